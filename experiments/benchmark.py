"""All speed and memory figures in one place: a table on screen and JSON on disk.

  python -m experiments.benchmark [--size cpu|gpu] [--quick] [--sections a,b] [--out DIR]
                                  [--dry-run] [--memory-limit BYTES]

--size cpu (the default): sizes chosen for a 2-core CPU. Sections: attention
(nnx.MultiHeadAttention vs the masked, gathered and grouped paths, forward and
forward+backward); decode (GatedLM decoding at K = 2, 4, 8 of 8 vs dense: tokens/s, KV-cache
and weight bytes per step; and a whole forward pass against its FLOP-allowed speedup);
train (the train step of a GatedLM: masked and gathered at K=2 of 8 vs dense); study (the
forward pass of the study's K=2 models, gathered and masked, vs their dense twins); width
(heads and MLP channel groups gated at 2 of 8 each and together vs dense: forward on the
gathered path, train step on the masked path, and decoding with heads only and heads + MLP
groups at 2 of 8 on a 512-token prompt); projection (decoding at B = 1, 16, 64 with each
step projection: weights, activations, grouped).

--size gpu: sizes where a GPU is busy, all in bfloat16. Sections: attention (B x L =
16 x 2048 and 4 x 8192, D = 1024, H = 8 and 16, forward and forward+backward); forward (a
whole GatedLM, 8 layers, D = 1024, F = 4096 in G = 8 groups, L = 2048, B = 16: dense vs
heads, groups and both at 2 of 8); train (the train step at the same size, bfloat16
compute); decode (D = 1024, 4 layers, 4096-token prompts, B = 1, 16, 64: dense vs K = 2
with each step projection). Every row gives its time ratio to dense in the same run, the
device, and its memory: an estimate made before compiling, XLA's memory analysis of the
compiled function, and the device's peak bytes where the backend reports them
(experiments.bench_memory). A row that would not fit in the device's memory is refused,
named with its bytes, before it compiles (or, by XLA's analysis, before it runs).
--dry-run (gpu only) compiles one row of each section and times nothing;
--memory-limit stands for the device's memory (the CPU reports none), e.g. to rehearse
which rows an 80 GB device would refuse. The gpu size needs only jax, flax, optax and
numpy (not `datasets`); it runs on the CPU too, slowly.

Every ratio is against the dense baseline measured in the same run, with candidates
interleaved over repeated trials. Benchmarks never run in the tests (the gpu --dry-run
does: it times nothing).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from experiments.bench_rows import Settings
from gating.training.folders import check_output_folder, write_json
from gating.training.provenance import provenance

SIZES = ('cpu', 'gpu')
# size: section -> module (imported only when run: the cpu study and train sections need
# `datasets`, which the gpu size must not)
SECTIONS = {
    'cpu': {'attention': 'experiments.bench_attention', 'decode': 'experiments.bench_decode',
            'train': 'experiments.bench_train', 'study': 'experiments.bench_study',
            'width': 'experiments.bench_width', 'projection': 'experiments.bench_projection',
            'gqa': 'experiments.bench_gqa'},
    'gpu': {'attention': 'experiments.bench_attention', 'forward': 'experiments.bench_width',
            'train': 'experiments.bench_train', 'decode': 'experiments.bench_decode'},
}


def parse(argv=None):
  """The arguments, checked: a ValueError names what is wrong and the choices."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--size', default='cpu',
                      help=f'benchmark sizes: {" or ".join(SIZES)} (default: cpu)')
  parser.add_argument('--quick', action='store_true',
                      help='cpu only: fewer sizes and trials, a shorter run (each section '
                           'prints its own time)')
  parser.add_argument('--sections', default=None,
                      help='comma-separated subset; cpu: ' + ', '.join(SECTIONS['cpu'])
                           + '; gpu: ' + ', '.join(SECTIONS['gpu']))
  parser.add_argument('--out', default='runs/benchmark',
                      help='folder for benchmark.json (default: runs/benchmark)')
  parser.add_argument('--dry-run', action='store_true',
                      help='gpu only: compile one row of each section, time nothing')
  parser.add_argument('--memory-limit', default=None,
                      help="gpu only: bytes the device holds (default: the backend's "
                           'bytes_limit; the CPU reports none, so nothing is refused there)')
  args = parser.parse_args(argv)
  if args.size not in SIZES:
    raise ValueError(f'unknown size {args.size!r}; choose one of: {", ".join(SIZES)}')
  known = SECTIONS[args.size]
  names = list(known) if args.sections is None else [s for s in args.sections.split(',') if s]
  unknown = [s for s in names if s not in known]
  if unknown or not names:
    raise ValueError(f'unknown sections {unknown} for --size {args.size}; choose from: '
                     f'{", ".join(known)}')
  if args.size == 'cpu' and (args.dry_run or args.memory_limit is not None):
    raise ValueError('--dry-run and --memory-limit are for --size gpu (the cpu sizes run '
                     'and time every row)')
  if args.size == 'gpu' and args.quick:
    raise ValueError('--quick is for --size cpu; the gpu sizes are fixed (use --sections '
                     'or --dry-run for a shorter run)')
  if args.memory_limit is not None:
    try:
      args.memory_limit = int(float(args.memory_limit))
    except (ValueError, OverflowError):    # 'abc'; 'inf', '1e400'
      raise ValueError(f'--memory-limit must be a number of bytes, got '
                       f'{args.memory_limit!r}') from None
    if args.memory_limit <= 0:
      raise ValueError(f'--memory-limit must be > 0 bytes, got {args.memory_limit}')
  args.sections = names
  check_output_folder(args.out, '--out')   # before anything compiles
  return args


def main(argv=None):
  try:
    args = parse(argv)
  except ValueError as e:
    sys.exit(f'error: {e}')
  result = {'provenance': provenance(), 'size': args.size, 'quick': args.quick,
            'dry_run': args.dry_run, 'memory_limit': args.memory_limit, 'sections': {}}
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'benchmark.json')

  def write():  # rewritten (atomically) after each row: a run cut short keeps its progress
    write_json(path, result)

  for name in args.sections:
    module = importlib.import_module(SECTIONS[args.size][name])
    start = time.time()
    if args.size == 'cpu':
      rows = module.run(quick=args.quick)
      table = module.format_table(rows)
    else:
      done, current = [], []

      def progress(rows, final, name=name, done=done, current=current):
        current[:] = rows
        result['sections'][name] = done + current
        if final:
          done.extend(rows)
          current.clear()
        write()
      rows = module.run_gpu(Settings(dry_run=args.dry_run, memory_limit=args.memory_limit,
                                     progress=progress))
      table = module.format_gpu_table(rows)
    print(table, flush=True)
    print(f'  ({name}: {time.time() - start:.0f} s)\n', flush=True)
    result['sections'][name] = rows
    write()
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
