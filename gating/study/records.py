"""A sweep's record: its finished points without their checkpoints, to carry a long sweep
across machines.

A sweep resumes in its own folder, but a folder of trained runs (checkpoints, TensorBoard
events) is too large to keep where the study is written up, and a sweep too long for one
sitting may have its next sitting on another machine. `keep(out, dest)` copies what the
reports read of every finished point (trained, and evaluated on the whole split at its
final step) into `dest`:

  dest/sweep.json                  the definition, as the sweep folder holds it
  dest/<point>/config.json, summary.json, eval.json, wall_time.json, data_info.json,
               provenance.json     (those the point has)
  dest/<point>/metrics.jsonl       its periodic evaluations only (kind 'eval'); the
                                   per-step training lines stay in the sweep folder

  dest/warm_s<seed>/checkpoints/<step>/
                                   a warm-start run's last checkpoint, only while a point
                                   that starts from it is not finished in the record (it
                                   is removed once every such point is)

Copied back into a sweep folder (`cp -r dest/. runs/sweeps/NAME/`), the points count as
finished: the sweep skips them and runs the rest (the points left start from the kept
warm-start checkpoint), and `--report` and the plots read them (the training curves of
the kept points excepted). A kept point finds its warm start beside it, wherever the
record is (`results.warm_source`). What a record cannot do is evaluate its points again,
or feed the headroom oracle, which needs the checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil

from gating.study.sweep import (SWEEP_FILE, WALL_TIME_FILE, WARM, SweepError, is_finished,
                                warm_folder)
from gating.training import folders
from gating.training.metrics_file import read_metrics

KEPT_FILES = ('config.json', 'summary.json', 'eval.json', WALL_TIME_FILE, 'data_info.json',
              'provenance.json')
METRICS_FILE = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'


def keep(out: str, dest: str, names: list[str]) -> list[str]:
  """Writes the record of the sweep folder `out` into `dest`: sweep.json and every point of
  `names` that is finished (the others are left out). Returns the points kept.

  `dest` must be empty, absent, or a record of the same sweep definition (its points are
  then brought up to date); anything else raises SweepError and writes nothing."""
  with open(os.path.join(out, SWEEP_FILE)) as f:
    definition = json.load(f)
  if os.path.abspath(dest) == os.path.abspath(out):
    raise SweepError(f'{dest} is the sweep folder itself; keep its record elsewhere')
  folders.check_output_folder(dest, '--keep', SweepError)
  saved = os.path.join(dest, SWEEP_FILE)
  if os.path.exists(saved):
    with open(saved) as f:
      if json.load(f) != definition:
        raise SweepError(f"{dest} holds the record of another sweep or definition than "
                         f"{out}'s; refusing to mix them")
  elif os.path.isdir(dest) and os.listdir(dest):
    raise SweepError(f'{dest} is not empty and holds no {SWEEP_FILE}: not a sweep record')
  split = definition.get('split', 'test')
  kept = [name for name in names if is_finished(os.path.join(out, name), split)]
  needed = _warm_starts_needed(definition['runs'], dest, kept, split)
  last = {name: _last_step(os.path.join(out, name, CHECKPOINTS))
          for name in kept if name in needed}
  for name, step in last.items():
    if step is None:
      raise SweepError(f'{os.path.join(out, name)} holds no checkpoint, and points that '
                       f'start from it are not finished ({", ".join(needed[name])}): a '
                       'record could not resume them; finish them first')
  os.makedirs(dest, exist_ok=True)
  shutil.copyfile(os.path.join(out, SWEEP_FILE), saved)
  for name in kept:
    source, target = os.path.join(out, name), os.path.join(dest, name)
    os.makedirs(target, exist_ok=True)
    for file in KEPT_FILES:
      if os.path.exists(os.path.join(source, file)):
        shutil.copyfile(os.path.join(source, file), os.path.join(target, file))
    _keep_evaluations(os.path.join(source, METRICS_FILE), os.path.join(target, METRICS_FILE))
  for name in kept:
    if name in last:
      _keep_checkpoint(os.path.join(out, name, CHECKPOINTS, last[name]),
                       os.path.join(dest, name, CHECKPOINTS))
    else:
      shutil.rmtree(os.path.join(dest, name, CHECKPOINTS), ignore_errors=True)
  return kept


def _warm_starts_needed(runs: dict[str, list[str]], dest: str, kept: list[str],
                        split: str) -> dict[str, list[str]]:
  """{warm-start run: the points that start from it} for the points of `runs` ({folder:
  overrides}, as sweep.json holds them) neither kept now nor finished in the record."""
  needed: dict[str, list[str]] = {}
  for name, overrides in runs.items():
    if (any(WARM in o for o in overrides) and name not in kept
        and not is_finished(os.path.join(dest, name), split)):
      needed.setdefault(warm_folder(name), []).append(name)
  return needed


def _last_step(checkpoints: str) -> str | None:
  """The last step folder's name in `checkpoints` (the one a warm start loads), or None."""
  if not os.path.isdir(checkpoints):
    return None
  steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
  return str(max(steps)) if steps else None


def _keep_checkpoint(step_dir: str, kept_dir: str) -> None:
  """Copies the step folder `step_dir` into `kept_dir` (a record's checkpoints/), through a
  temporary folder renamed when complete; a step already there is the same finished run's
  and is left as it is."""
  if os.path.isdir(os.path.join(kept_dir, os.path.basename(step_dir))):
    return
  shutil.rmtree(kept_dir, ignore_errors=True)     # another step of it, from before
  tmp = kept_dir + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(step_dir, os.path.join(tmp, os.path.basename(step_dir)))
  os.replace(tmp, kept_dir)


def _keep_evaluations(source: str, target: str) -> None:
  """Copies the evaluation lines (kind 'eval') of the metrics file `source` to `target`."""
  records = read_metrics(source) if os.path.exists(source) else []
  with open(target + '.tmp', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records if r.get('kind') == 'eval')
  os.replace(target + '.tmp', target)
