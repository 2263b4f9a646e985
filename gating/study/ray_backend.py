"""Ray core as the sweep engine: each point is a Ray task that runs its commands.

The task is `sweep.run_point` itself, run on whichever node Ray picks: it skips a
finished point, trains it unless summary.json exists (the train script resumes from its
checkpoint), evaluates it unless eval.json exists, and holds the point folder's lock
meanwhile. So everything the local backend promises holds on Ray too; the sweep folder
must be on storage that every node reaches, and the repository and Python at the same
paths on every node (the commands name the driver's `sys.executable`).

Ray reserves each task's resources (`num_cpus`, `num_gpus`) and sets the task's visible
GPUs (CUDA_VISIBLE_DEVICES) itself; the task passes its own environment on to the
commands, with the extra variables the driver adds (PYTHONPATH; XLA_FLAGS, whose flags
are appended to those the worker already has, not put in their place). Ray core,
not Ray Tune: Tune's own restore would fight the resume by run folder. A task is never
retried by Ray (a crashed point is reported, as with the local backend, and resumes the
next time the sweep runs).
"""

from __future__ import annotations

import os
import socket
from typing import Mapping, Sequence

from gating.study import sweep

EXTRA = 'cluster'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONNECT_TIMEOUT_S = 5.0


def _ray():
  try:
    import ray
  except ImportError:
    raise sweep.SweepError(f'--backend ray needs Ray, which is not installed: pip install -e '
                           f'".[{EXTRA}]"') from None
  return ray


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
  """Starts a local Ray cluster in this process (address None), or joins the one at
  `address` (HOST:PORT of its head, 'ray://HOST:PORT', or 'auto'). An address that does
  not answer fails within CONNECT_TIMEOUT_S, naming it."""
  ray = _ray()
  if address and address != 'auto':
    host_port = address.split('://', 1)[-1]
    host, _, port = host_port.rpartition(':')
    if not host or not port.isdigit():
      raise sweep.SweepError(f'--address must be HOST:PORT (or ray://HOST:PORT), got '
                             f'{address!r}')
    try:
      socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
      raise sweep.SweepError(f'cannot reach the Ray cluster at {address}: {e}') from None
  # The workers import this package (the tasks' function) from this very tree.
  kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                runtime_env={'env_vars': {'PYTHONPATH': ROOT}})
  if address:
    ray.init(address=address, **kwargs)
  else:
    ray.init(num_cpus=num_cpus, **kwargs)


def check_resources(cpus_per_run: float, gpus_per_run: float) -> None:
  """Refuses a task that no node of the cluster could ever run (it would wait forever)."""
  ray = _ray()
  nodes = [n['Resources'] for n in ray.nodes() if n.get('Alive')]
  for name, want in (('CPU', cpus_per_run), ('GPU', gpus_per_run)):
    most = max((n.get(name, 0.0) for n in nodes), default=0.0)
    if want > most:
      flag = f'--{name.lower()}s-per-run'
      raise sweep.SweepError(f'{flag} {want:g} is more than the {most:g} {name}s of any node '
                             'of the Ray cluster')


def task_env(worker: Mapping[str, str], extra_env: Mapping[str, str]) -> dict[str, str]:
  """The environment of a point's commands on a Ray worker: the worker's, with the
  driver's `extra_env` set over it, except XLA_FLAGS, whose flags are appended to the
  worker's (a flag of the worker's own, say for its devices, is kept)."""
  env = {**worker, **extra_env}
  if worker.get('XLA_FLAGS') and extra_env.get('XLA_FLAGS'):
    env['XLA_FLAGS'] = f"{worker['XLA_FLAGS']} {extra_env['XLA_FLAGS']}"
  return env


def _run_point_task(point: sweep.Point, extra_env: Mapping[str, str],
                    after: sweep.Outcome | None = None) -> sweep.Outcome:
  """Runs on a Ray worker: the point's commands in the worker's environment (with the
  GPUs Ray gave it) plus `extra_env`. after: the outcome of the point it starts from
  (Ray runs this task only once that one has ended); if it did not finish, neither
  does this one."""
  if after is not None and not after.finished:
    return sweep.not_run_after(point)
  env = task_env(os.environ, extra_env)
  children = sweep._Children()
  try:
    return sweep.run_point(point, env, children)
  except BaseException:  # cancelled: stop the command too (it resumes next time)
    children.stop()
    raise


def run_points(points: Sequence[sweep.Point], *, extra_env: Mapping[str, str],
               cpus_per_run: float = 1, gpus_per_run: float = 0,
               report=print) -> list[sweep.Outcome]:
  """Runs every point as a Ray task (as many at once as the cluster's resources allow)
  and returns their outcomes in order; report(line) as each point ends. A point with
  `after` (which must come earlier in `points`) is given that point's task result, so Ray
  starts it only once that one has ended. On an interrupt the tasks are cancelled and
  stop their commands (their points resume from their checkpoints next time)."""
  ray = _ray()
  task = ray.remote(_run_point_task).options(
      num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
  refs, by_name = {}, {}
  for p in points:        # a point that starts from another gets that one's result first
    if p.after is not None and p.after not in by_name:
      raise ValueError(f'point {p.name} starts after {p.after}, which is not among the '
                       'points before it')
    after = () if p.after is None else (by_name[p.after],)
    by_name[p.name] = task.remote(p, dict(extra_env), *after)
    refs[by_name[p.name]] = p
  outcomes: dict[str, sweep.Outcome] = {}
  pending = list(refs)
  try:
    while pending:
      done, pending = ray.wait(pending, num_returns=1)
      for ref in done:
        point = refs[ref]
        try:
          outcome = ray.get(ref)
        except Exception as e:  # the worker died (node lost, killed): reported, not raised
          outcome = sweep.Outcome(point.name, 'failed', f'Ray task failed: {e}'.split('\n')[0],
                                  0.0)
        outcomes[outcome.name] = outcome
        report(f'  {outcome.name:<28} {outcome.status:<8} {outcome.seconds:7.0f} s  '
               f'{outcome.message}'.rstrip())
  except BaseException:
    for ref in pending:
      ray.cancel(ref)
    raise
  return [outcomes[p.name] for p in points]


def shutdown() -> None:
  ray = _ray()
  if ray.is_initialized():
    ray.shutdown()
