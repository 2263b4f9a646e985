"""Sweeps: named grids of ordinary training runs, run as subprocesses, resumable.

A `Sweep` is plain data: a base preset, overrides shared by every point ('key=value'
strings, as `--set` takes them), and points {name: overrides}, each trained once per seed.
`Sweep.runs()` expands it into {folder: overrides}, folder = f'{point}_s{seed}'.

The sweep folder records its definition in sweep.json; `claim_folder` refuses a folder
that holds another sweep (or another definition of this one) or anything that is not a
sweep, so nothing is overwritten. `run_points` runs each point's commands (train, then
eval) in its own subprocess, N at once; a point whose summary.json exists is not trained
again, one whose eval.json exists is not evaluated again, and an unfinished point is
simply started again: the train script resumes from its checkpoint. A crash of one point
is reported and the others go on. Each point folder holds a lock while a process works in
it (held by the subprocess too), so two sweeps never train into one folder.

Threads: N parallel XLA processes on C cores would each start a thread pool of C threads.
`worker_env(N)` turns off XLA's multi-threaded CPU kernels (--xla_cpu_multi_thread_eigen=
false) when N >= C, so each run uses about one core; with N < C the runs keep XLA's default.
On GPUs, `devices.slot_envs` gives each worker slot its own devices (`--gpus-per-run`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import json
import os
import re
import subprocess
import threading
import time
from typing import Mapping, NamedTuple, Sequence

from gating.study import results
from gating.training import folders

SWEEP_FILE = 'sweep.json'
WALL_TIME_FILE = 'wall_time.json'
LOG_FILE = 'sweep.log'
LOCK_FILE = '.sweep.lock'
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


class SweepError(RuntimeError):
  """A sweep that cannot run as asked (its folder holds something else)."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A named grid of training runs over a preset.

  name: the sweep's name (its default folder is runs/sweeps/<name>).
  preset: the base config (experiments/configs PRESETS).
  points: {point name: overrides}; each point is trained once per seed.
  seeds: the training seeds (config `seed`; the data split stays fixed).
  common: overrides applied to every point before its own.
  description: one line for `--help` and the results table.
  warm_start: overrides of a warm-start run trained once per seed, before the points, in
    f'warm_s{seed}'. A point starts from it with the override f'init_from={WARM}'; the
    placeholder becomes that folder (`resolve_warm`). Empty: no warm start.
  split: the split every point is evaluated and reported on: 'test' (a study) or
    'validation' (a tuning round: settings are chosen on validation, never on test).
  """
  name: str
  preset: str
  points: Mapping[str, Sequence[str]]
  seeds: tuple[int, ...] = (0, 1, 2)
  common: tuple[str, ...] = ()
  description: str = ''
  warm_start: tuple[str, ...] = ()
  split: str = 'test'

  def __post_init__(self):
    if self.split not in ('test', 'validation'):
      raise ValueError(f"sweep {self.name!r}: split must be 'test' or 'validation', got "
                       f'{self.split!r}')
    if not self.points:
      raise ValueError(f'sweep {self.name!r}: points is empty')
    if not self.seeds:
      raise ValueError(f'sweep {self.name!r}: seeds is empty')
    for name in self.points:
      if not _NAME.match(name):
        raise ValueError(f'sweep {self.name!r}: point name {name!r} must be a plain folder '
                         'name (letters, digits, _ . -)')
      if name.startswith(WARM_PREFIX):
        raise ValueError(f'sweep {self.name!r}: point name {name!r}: {WARM_PREFIX!r} names '
                         'the warm-start runs')
    uses_warm = any(WARM in o for overrides in self.points.values() for o in overrides)
    if uses_warm and not self.warm_start:
      raise ValueError(f'sweep {self.name!r}: a point starts from {WARM} but warm_start '
                       'is empty')

  def runs(self, *, steps: int | None = None,
           seeds: Sequence[int] | None = None) -> dict[str, list[str]]:
    """{folder: overrides} for every point x seed: common, the point's, seed (and steps)."""
    seeds = self.seeds if seeds is None else tuple(seeds)
    extra = [] if steps is None else [f'steps={steps}']
    return {f'{point}_s{seed}': [*self.common, *overrides, f'seed={seed}', *extra]
            for point, overrides in self.points.items() for seed in seeds}

  def warm_runs(self, *, steps: int | None = None,
                seeds: Sequence[int] | None = None) -> dict[str, list[str]]:
    """{folder: overrides} of the warm-start runs (one per seed; none without warm_start)."""
    if not self.warm_start:
      return {}
    seeds = self.seeds if seeds is None else tuple(seeds)
    extra = [] if steps is None else [f'steps={steps}']
    return {f'{WARM_PREFIX}{seed}': [*self.common, *self.warm_start, f'seed={seed}', *extra]
            for seed in seeds}


WARM = '{warm}'
WARM_PREFIX = 'warm_s'


def warm_folder(folder: str) -> str:
  """The folder name of the warm-start run of run `folder` ('<point>_s<seed>')."""
  return f"{WARM_PREFIX}{folder.rsplit('_s', 1)[1]}"


def resolve_warm(overrides: Sequence[str], out: str, folder: str) -> list[str]:
  """The overrides of run `folder` ('<point>_s<seed>') with WARM made the absolute path
  of that seed's warm-start run."""
  warm = os.path.abspath(os.path.join(out, warm_folder(folder)))
  return [o.replace(WARM, warm) for o in overrides]


def claim_folder(out: str, record: dict) -> None:
  """Makes `out` this sweep's folder, or checks that it already is.

  record: what defines the sweep ({'sweep', 'preset', 'runs'}); it is written to
  out/sweep.json. An existing sweep.json must be equal to it; a non-empty folder without
  one is refused, and so is a path that cannot be a folder (a file's). Raises SweepError
  naming the difference; never deletes anything.
  """
  folders.check_output_folder(out, '--out', SweepError)
  path = os.path.join(out, SWEEP_FILE)
  if os.path.exists(path):
    check_folder(out, record)
    return
  if os.path.isdir(out) and os.listdir(out):
    raise SweepError(f'{out} is not empty and holds no {SWEEP_FILE}: not a sweep folder; '
                     'refusing to write into it: use another --out')
  folders.write_json(path, record)


def check_folder(out: str, record: dict) -> None:
  """Checks that `out` is the folder of this sweep as `record` defines it (its sweep.json
  equal to `record`); raises SweepError naming the difference, or saying that `out` holds
  no sweep. Writes nothing."""
  path = os.path.join(out, SWEEP_FILE)
  if not os.path.exists(path):
    raise SweepError(f"{out} holds no {SWEEP_FILE}: sweep {record['sweep']!r} has not "
                     'been started there')
  with open(path) as f:
    saved = json.load(f)
  if saved == record:
    return
  if saved.get('sweep') != record['sweep']:
    raise SweepError(f"{out} holds sweep {saved.get('sweep')!r}, not {record['sweep']!r}; "
                     'refusing to mix them: use another --out')
  diffs = []
  for key, default in (('preset', None), ('split', 'test')):  # no 'split': the test split
    was, now = saved.get(key, default), record.get(key, default)
    if was != now:
      diffs.append(f'{key} {was!r} vs now {now!r}')
  diffs += _point_diffs(saved.get('runs', {}), record['runs'], 'points')
  diffs += _point_diffs(saved.get('warm_runs', {}), record.get('warm_runs', {}), 'warm starts')
  raise SweepError(f"{out} holds a different definition of sweep {record['sweep']!r} "
                   f"({'; '.join(diffs)}); it is neither run nor reported into: use another "
                   '--out, or the same definition (e.g. the same --steps and --seeds)')


def _point_diffs(old: dict[str, list[str]], new: dict[str, list[str]], what: str
                 ) -> list[str]:
  """What differs between two {folder: overrides} of a sweep record, in words."""
  diffs = []
  if sorted(old) != sorted(new):
    gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    diffs.append(f'{what} only in the folder: {gone}; only in the definition now: {added}')
  changed = [name for name in old if name in new and old[name] != new[name]]
  for name in changed[:3]:
    removed = [o for o in old[name] if o not in new[name]]
    added = [o for o in new[name] if o not in old[name]]
    diffs.append(f'{name}: overrides without {removed} and with {added} now'
                 if removed or added else f'{name}: the same overrides in another order')
  if len(changed) > 3:
    diffs.append(f'and {len(changed) - 3} more changed {what}')
  return diffs


def worker_env(parallel: int, base: Mapping[str, str] | None = None,
               cores: int | None = None) -> dict[str, str]:
  """The environment of each point's subprocess (see the module docstring)."""
  env = dict(os.environ if base is None else base)
  cores = cores or len(os.sched_getaffinity(0))
  if parallel >= cores:
    flags = env.get('XLA_FLAGS', '')
    if '--xla_cpu_multi_thread_eigen' not in flags:
      env['XLA_FLAGS'] = (flags + ' --xla_cpu_multi_thread_eigen=false').strip()
  return env


class Point(NamedTuple):
  """One run of a sweep: its folder and the commands that train and evaluate it.

  after: the name of the point it starts from (its seed's warm start), or None. It runs
  only once that point has finished, and fails without running if that point failed.
  split: the split eval_command scores (the sweep's); an eval.json of another is redone.
  """
  name: str
  workdir: str
  train_command: list[str]
  eval_command: list[str]
  after: str | None = None
  split: str = 'test'


class Outcome(NamedTuple):
  name: str
  status: str        # 'done' (this sitting), 'skipped' (already done), 'failed', 'busy'
  message: str
  seconds: float

  @property
  def finished(self) -> bool:
    return self.status in ('done', 'skipped')


def not_run_after(point: Point) -> Outcome:
  """The outcome of a point not run because the point it starts from did not finish."""
  return Outcome(point.name, 'failed', f'not run: {point.after}, which it starts from, did '
                 'not finish', 0.0)


def _stage_record(path: str) -> dict | None:
  """The JSON object a finished stage wrote (summary.json, eval.json), or None where it is
  absent or cannot be read (cut by a kill, damaged): the stage then runs again, and the
  train loop moves an unreadable summary.json aside (eval.json is replaced)."""
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):   # absent (or under a file: the --out check says so)
    return None
  return record if isinstance(record, dict) else None


def is_trained(workdir: str) -> bool:
  return _stage_record(os.path.join(workdir, 'summary.json')) is not None


def is_evaluated(workdir: str, split: str = 'test') -> bool:
  """eval.json exists and scored the whole of `split` (the sweep's) at the run's final
  step (an evaluation of part of it, e.g. with --max-batches or --restore-step, or of
  another split, is done again)."""
  report = _stage_record(os.path.join(workdir, 'eval.json'))
  summary = _stage_record(os.path.join(workdir, 'summary.json'))
  if report is None or summary is None:
    return False
  return results.partial_evaluation(report, summary, split) is None


def is_finished(workdir: str, split: str = 'test') -> bool:
  """Trained and evaluated on the whole of `split`: a point the sweep skips."""
  return is_trained(workdir) and is_evaluated(workdir, split)


def _add_wall_time(workdir: str, stage: str, seconds: float) -> None:
  """Adds one sitting's seconds of `stage` ('train' | 'eval') to wall_time.json. A sitting
  killed with the sweep (SIGKILL) records nothing: its time is lost, not guessed."""
  path = os.path.join(workdir, WALL_TIME_FILE)
  times = {}
  if os.path.exists(path):
    with open(path) as f:
      times = json.load(f)
  times[f'{stage}_s'] = times.get(f'{stage}_s', 0.0) + seconds
  times[f'{stage}_sittings'] = times.get(f'{stage}_sittings', 0) + 1
  folders.write_json(path, times)


class _Children:
  """The live subprocesses, so that an interrupted sweep can stop them."""

  def __init__(self):
    self._lock = threading.Lock()
    self._procs: set[subprocess.Popen] = set()
    self.stopping = False

  def run(self, command, *, env, log, pass_fds) -> int:
    with self._lock:
      if self.stopping:
        return -1
      proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, pass_fds=pass_fds)
      self._procs.add(proc)
    try:
      return proc.wait()
    finally:
      with self._lock:
        self._procs.discard(proc)

  def stop(self):
    with self._lock:
      self.stopping = True
      for proc in self._procs:
        proc.terminate()


def run_point(point: Point, env: Mapping[str, str], children: _Children) -> Outcome:
  """Trains the point unless summary.json exists, then evaluates it unless eval.json does.

  Output goes to workdir/sweep.log (appended); wall times add up in wall_time.json.
  """
  start = time.time()
  if is_finished(point.workdir, point.split):
    return Outcome(point.name, 'skipped', 'finished before', 0.0)
  os.makedirs(point.workdir, exist_ok=True)
  with open(os.path.join(point.workdir, LOCK_FILE), 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return Outcome(point.name, 'busy', f'another process works in {point.workdir}', 0.0)
    log_path = os.path.join(point.workdir, LOG_FILE)
    with open(log_path, 'a') as log:
      evaluated = lambda workdir: is_evaluated(workdir, point.split)
      for stage, command, done in (('train', point.train_command, is_trained),
                                   ('eval', point.eval_command, evaluated)):
        if done(point.workdir):
          continue
        log.write(f'\n$ {" ".join(command)}\n')
        log.flush()
        t0 = time.time()
        rc = children.run(command, env=env, log=log, pass_fds=(lock.fileno(),))
        _add_wall_time(point.workdir, stage, time.time() - t0)
        if rc != 0 or not done(point.workdir):
          return Outcome(point.name, 'failed', f'{stage} exited with code {rc}; see {log_path}',
                         time.time() - start)
  return Outcome(point.name, 'done', '', time.time() - start)


def run_points(points: Sequence[Point], *, parallel: int = 1,
               env: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
               report=print) -> list[Outcome]:
  """Runs the points, `parallel` at once, and returns their outcomes in order.

  Each free slot takes the first point, in the given order, that is ready: one without
  `after`, or whose `after` point (among these) has finished. So the runs that start from
  a warm start begin as soon as their own seed's warm start ends, while points that need
  none fill the slots meanwhile. A point whose `after` failed fails too, without running.

  env: the subprocesses' environment, or one per worker slot (`parallel` of them, e.g.
  from `devices.slot_envs`: each point runs in the environment of the slot it holds).
  report(line) is called as each point ends. On an interrupt (KeyboardInterrupt, or
  SystemExit from a signal handler) the running subprocesses are terminated; their points
  resume from their last checkpoint next time.
  """
  if parallel < 1:
    raise ValueError(f'parallel must be >= 1, got {parallel}')
  if env is None or isinstance(env, Mapping):
    envs = [worker_env(parallel) if env is None else dict(env)] * parallel
  else:
    envs = [dict(e) for e in env]
    if len(envs) != parallel:
      raise ValueError(f'{len(envs)} worker environments for parallel={parallel}')
  names = {p.name for p in points}
  for p in points:
    if p.after is not None and p.after not in names:
      raise ValueError(f'point {p.name} starts after {p.after}, which is not among the '
                       'points to run')

  outcomes: dict[str, Outcome] = {}

  def settle(outcome):
    outcomes[outcome.name] = outcome
    report(f'  {outcome.name:<28} {outcome.status:<8} {outcome.seconds:7.0f} s  '
           f'{outcome.message}'.rstrip())

  def blocked(point):     # its `after` point ended without finishing
    return point.after in outcomes and not outcomes[point.after].finished

  def ready(point):
    return point.after is None or (point.after in outcomes and not blocked(point))

  children = _Children()
  free = list(envs)
  waiting = list(points)
  running: dict[concurrent.futures.Future, dict] = {}
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
  try:
    while waiting or running:
      for point in [p for p in waiting if blocked(p)]:
        waiting.remove(point)
        settle(not_run_after(point))
      while free and (point := next((p for p in waiting if ready(p)), None)):
        waiting.remove(point)
        slot_env = free.pop(0)
        running[pool.submit(run_point, point, slot_env, children)] = slot_env
      if not running:     # what still waits can never start (its `after` waits too)
        for point in waiting:
          settle(Outcome(point.name, 'failed', f'not run: {point.after} never ran', 0.0))
        break
      done, _ = concurrent.futures.wait(running,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        free.append(running.pop(future))
        settle(future.result())
  except BaseException:
    children.stop()
    pool.shutdown(wait=True, cancel_futures=True)
    raise
  pool.shutdown(wait=True)
  return [outcomes[p.name] for p in points]
