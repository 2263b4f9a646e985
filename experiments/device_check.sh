#!/usr/bin/env bash
# The device check: every `--size gpu` section of experiments.benchmark on one GPU (or TPU)
# in about 6 minutes, and one JSON file. Needs only jax, flax, optax and numpy.
#
#   experiments/device_check.sh [OUT] [benchmark options...]
#
# OUT (default runs/device_check) receives device_check.json: the versions, the device,
# each section's rows (experiments.benchmark's JSON, with times, ratios to dense and
# memory figures) and each section's exit status and seconds. Each section runs in its
# own process under a time budget (BUDGETS below, about 6 minutes in all); a section cut
# short keeps the rows it finished (the benchmark rewrites its JSON after every row) and
# the check goes on. Options after OUT go to every benchmark call: `--dry-run` (compile
# one row per section, time nothing; the only way to run this without a GPU or TPU) and
# `--memory-limit BYTES`. PYTHON names the interpreter; by default `python`, or `python3`
# where there is no `python` (as on a GPU image whose python3 holds JAX).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/device_check}
shift || true
if [ -z "${PYTHON:-}" ]; then
  PYTHON=$(command -v python || command -v python3) || {
    echo 'error: neither python nor python3 is on PATH; set PYTHON' >&2; exit 1; }
fi
BUDGETS="attention:90 forward:60 train:110 decode:80"   # seconds per section
mkdir -p "$OUT"

echo "== versions and device"
if ! "$PYTHON" - "$@" <<'EOF'
import importlib.metadata as md
import platform
import sys

import jax

print('python', sys.version.split()[0], '|', platform.platform())
for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy'):
  print(f'{name} {md.version(name)}')
plugins = sorted(d.metadata['Name'] for d in md.distributions()
                 if d.metadata['Name'] and d.metadata['Name'].startswith('jax-cuda'))
print('jax plugins:', ', '.join(plugins) or 'none')
devices = jax.devices()
print('backend', jax.default_backend(), '|', len(devices), 'device(s):',
      ', '.join(sorted({d.device_kind for d in devices})))
print('memory_stats of device 0:', devices[0].memory_stats())
if jax.default_backend() not in ('gpu', 'tpu') and '--dry-run' not in sys.argv[1:]:
  sys.exit(f'error: no GPU or TPU: jax sees only {jax.default_backend()}; the gpu sizes '
           'would take hours here (pass --dry-run to rehearse the check)')
EOF
then
  exit 1
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

rm -f "$OUT/status.tsv"
for spec in $BUDGETS; do
  name=${spec%%:*}
  budget=${spec##*:}
  echo "== $name (budget $budget s)"
  start=$(date +%s)
  timeout --kill-after=10 "$budget" "$PYTHON" -m experiments.benchmark --size gpu \
    --sections "$name" --out "$OUT/$name" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$budget" \
    >> "$OUT/status.tsv"
done

"$PYTHON" - "$OUT" <<'EOF'
import json
import os
import sys

out = sys.argv[1]
merged = {'sections': {}, 'status': {}}
for line in open(os.path.join(out, 'status.tsv')):
  name, rc, seconds, budget = line.split()
  path = os.path.join(out, name, 'benchmark.json')
  result = json.load(open(path)) if os.path.exists(path) else {}
  for key in ('provenance', 'dry_run', 'memory_limit'):
    merged.setdefault(key, result.get(key))
  rows = result.get('sections', {}).get(name, [])
  merged['sections'][name] = rows
  merged['status'][name] = {
      'exit_code': int(rc), 'seconds': int(seconds), 'budget_s': int(budget),
      'timed_out': int(rc) in (124, 137), 'rows': len(rows),
      'timed_rows': sum(r.get('median_s') is not None for r in rows),
      'refused_rows': sum(bool(r.get('refused')) for r in rows)}
path = os.path.join(out, 'device_check.json')
with open(path, 'w') as f:
  json.dump(merged, f, indent=1)
print('== status')
for name, s in merged['status'].items():
  print(f"  {name:<10} exit {s['exit_code']:>3}  {s['seconds']:>4} s of {s['budget_s']}"
        f"{'  TIMED OUT' if s['timed_out'] else ''}  rows {s['rows']}, timed "
        f"{s['timed_rows']}, refused {s['refused_rows']}")
print(f'wrote {path}')
EOF
