"""Run a named sweep: python -m experiments.sweep NAME [--parallel N] [--out DIR] ...

Sweeps are defined in experiments/configs/sweeps.py: points of overrides over a preset,
each trained once per seed. Every point is an ordinary training run in OUT/<point>_s<seed>
(`python -m experiments.train` in a subprocess, then `python -m experiments.eval` on the
test split (validation for a tuning sweep), gathered path at the point's own K, plus the
masked-path training-gate gap).
Stopped and started again, a sweep skips finished points (summary.json and eval.json
present) and resumes unfinished ones from their checkpoints; a crashed point is reported
and the others go on. --points NAMES runs only those points (every seed, with their warm
starts) this sitting; the rest wait. --keep DIR writes the sweep's record, its finished
points without checkpoints (gating/study/records.py), for a later sitting on another
machine: `cp -r DIR/. OUT/` there, and the sweep runs only the rest. OUT/sweep.json
records the definition: a folder of another sweep, or of another definition (e.g. other
--steps or --seeds), is refused, never overwritten.

A sweep with a warm start trains one warm-start run per seed (OUT/warm_s<seed>) first; the
points that start from it ('init_from={warm}') train the rest of their step budget, each
beginning as soon as its own seed's warm start has finished, while points that need no
warm start fill the free slots meanwhile.

At the end it writes OUT/results.csv (one row per point), OUT/results.md (mean +- std over
seeds per rule x K) and OUT/plots/ (quality vs active-head fraction, per label). --report
writes them from the points finished so far, and runs nothing: a long sweep's progress,
while it runs or between sittings.

With --parallel N >= the number of cores, each run's XLA uses single-threaded CPU kernels
(--xla_cpu_multi_thread_eigen=false), so N runs do not oversubscribe the machine.

With --gpus-per-run G, each run sees only its own G GPUs (CUDA_VISIBLE_DEVICES), and
--parallel defaults to the number of groups of G; with more runs than groups, runs share
GPUs and each one's memory preallocation is capped (XLA_PYTHON_CLIENT_MEM_FRACTION).

With --backend ray, each point is a Ray task (Ray core) on a local Ray cluster started in
this process, or on the cluster at --address; each task reserves --cpus-per-run CPUs
(default 1) and --gpus-per-run GPUs, and Ray sets its visible GPUs. OUT must then be on
storage that every node reaches. Needs the extra: pip install -e ".[cluster]".

Examples:
  python -m experiments.sweep synthetic --parallel 2
  python -m experiments.sweep text --out runs/sweeps/text_short --steps 500 --seeds 0
  python -m experiments.sweep tiny --dry-run
  python -m experiments.sweep recipes --report              # the results so far
  python -m experiments.sweep synthetic --gpus-per-run 1     # one run per GPU
  python -m experiments.sweep synthetic --backend ray --address HEAD:6379 --gpus-per-run 1
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from experiments.flags import int_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
  from experiments.configs.sweeps import SWEEPS
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('name', help=f'the sweep, one of {sorted(SWEEPS)}')
  parser.add_argument('--parallel', type=int, default=None,
                      help='runs at once (default 1; with --gpus-per-run, the number of '
                           'GPU groups)')
  parser.add_argument('--gpus-per-run', type=int, default=None, metavar='G',
                      help='give each run its own G GPUs (CUDA_VISIBLE_DEVICES)')
  parser.add_argument('--backend', choices=('local', 'ray'), default='local',
                      help='local: subprocesses on this machine (default); ray: Ray tasks')
  parser.add_argument('--address', default=None,
                      help='ray: the cluster to join (HOST:PORT of its head, or auto); '
                           'default: a local Ray cluster started in this process')
  parser.add_argument('--cpus-per-run', type=float, default=None, metavar='C',
                      help='ray: CPUs reserved by each run (default 1)')
  parser.add_argument('--num-gpus', type=int, default=None, metavar='N',
                      help='the GPUs to share out with --gpus-per-run (default: as many '
                           'as JAX sees, counted in a subprocess)')
  parser.add_argument('--out', default=None, help='sweep folder (default: runs/sweeps/NAME)')
  parser.add_argument('--steps', type=int, default=None,
                      help="training steps of every run, warm starts included (overrides "
                           "the sweep's; a quick look: the points' budgets then differ)")
  parser.add_argument('--seeds', default=None,
                      help="comma-separated training seeds (overrides the sweep's), e.g. 0,1")
  parser.add_argument('--points', default=None, metavar='NAMES',
                      help="comma-separated points of the sweep to run now (every seed of "
                           "each, and the warm starts they need), e.g. thin_dense,token_topk; "
                           "the others wait for a later sitting (default: all)")
  parser.add_argument('--dry-run', action='store_true',
                      help='print the points and their commands, and run nothing')
  parser.add_argument('--report', action='store_true',
                      help='write results.csv, results.md and the plots from the points '
                           'finished so far (a sweep still running, or stopped), and run '
                           'nothing')
  parser.add_argument('--keep', default=None, metavar='DIR',
                      help="write the sweep's record into DIR (sweep.json and every finished "
                           "point's reports, without checkpoints) and run nothing; copied "
                           'back into a sweep folder on another machine, the sweep runs only '
                           'the rest')
  parser.add_argument('--allow-partial', action='store_true',
                      help='with --report: count points whose eval.json scored part of the '
                           'split or an earlier step (left out otherwise); the tables name '
                           'them')
  return parser.parse_args(argv)


def points(sweep, out, *, steps, seeds):
  """(record for sweep.json, [gating.study.sweep.Point]): resolves every point's config first,
  so a bad override fails now, naming its point, before anything runs."""
  from experiments import configs
  from gating.study import evaluation, results
  from gating.training.config import override
  from gating.study.sweep import WARM, Point, resolve_warm, warm_folder
  warm = sweep.warm_runs(steps=steps, seeds=seeds)
  runs = sweep.runs(steps=steps, seeds=seeds)
  result = []
  for name, overrides in {**warm, **runs}.items():
    after = warm_folder(name) if any(WARM in o for o in overrides) else None
    overrides = resolve_warm(overrides, out, name)
    try:
      cfg = override(configs.get(sweep.preset), overrides)
    except ValueError as e:
      raise ValueError(f'sweep {sweep.name!r}, point {name}: {e}') from None
    workdir = os.path.join(out, name)
    k = evaluation.own_budget(cfg)
    if isinstance(k, tuple):
      raise ValueError(f'sweep {sweep.name!r}, point {name}: one K per layer ({k}) cannot '
                       'be evaluated by the sweep; use a single K')
    sets = [arg for o in overrides for arg in ('--set', o)]
    train = [sys.executable, '-m', 'experiments.train', '--preset', sweep.preset,
             '--workdir', workdir, '--no-progress', *sets]
    evaluate = [sys.executable, '-m', 'experiments.eval', '--workdir', workdir,
                '--paths', results.scored_path(cfg.model.gate), '--k', str(k),
                '--split', sweep.split]
    result.append(Point(name, workdir, train, evaluate, after, sweep.split))
  record = {'sweep': sweep.name, 'preset': sweep.preset, 'runs': runs}
  if sweep.split != 'test':       # (a study's record stays as older sweep folders hold it)
    record['split'] = sweep.split
  if warm:
    record['warm_runs'] = warm
  return record, result


def only_points(sweep, todo, names):
  """The points of `todo` (gating.study.sweep.Point) that belong to the sweep's points
  `names` (comma-separated, e.g. 'thin_dense,token_topk': every seed of each), with the
  warm starts they start from."""
  from gating.study.sweep import WARM_PREFIX
  chosen = [n for n in names.split(',') if n]
  unknown = [n for n in chosen if n not in sweep.points]
  if not chosen or unknown:
    raise ValueError(f'--points: unknown point(s) {", ".join(unknown) or repr(names)}; '
                     f'the sweep {sweep.name!r} has {", ".join(sweep.points)}')
  picked = [p for p in todo if not p.name.startswith(WARM_PREFIX)
            and p.name.rsplit('_s', 1)[0] in chosen]
  needed = {p.after for p in picked if p.after}
  return [p for p in todo if p.name in needed or p in picked]


def worker_envs(args):
  """(parallel, env): the subprocesses' environment, or one per worker slot with
  --gpus-per-run. Raises ValueError for a bad --parallel or --gpus-per-run."""
  from gating.study import devices
  from gating.study import sweep as runner
  if args.parallel is not None and args.parallel < 1:
    raise ValueError(f'--parallel must be >= 1, got {args.parallel}')
  if args.backend == 'ray':
    return None, ray_env(args)
  for flag, value in (('--address', args.address), ('--cpus-per-run', args.cpus_per_run)):
    if value is not None:
      raise ValueError(f'{flag} is for --backend ray')
  if args.gpus_per_run is None:
    parallel = args.parallel or 1
    env = runner.worker_env(parallel)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    return parallel, env
  if args.num_gpus is not None and args.num_gpus < 0:
    raise ValueError(f'--num-gpus must be >= 0, got {args.num_gpus}')
  count = devices.count_gpus() if args.num_gpus is None else args.num_gpus
  groups = devices.device_groups(devices.device_ids(count, os.environ), args.gpus_per_run)
  parallel = args.parallel or len(groups)
  env = runner.worker_env(parallel)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
  return parallel, devices.slot_envs(env, groups, parallel)


def ray_env(args):
  """The variables each Ray task adds to its own environment for the commands. Raises
  ValueError for flags of the local backend or bad amounts."""
  from gating.study import ray_backend
  from gating.study import sweep as runner
  for flag, value in (('--parallel', args.parallel), ('--num-gpus', args.num_gpus)):
    if value is not None:
      raise ValueError(f'{flag} is for the local backend; Ray runs as many points at once '
                       'as the resources of its cluster allow')
  cpus = 1 if args.cpus_per_run is None else args.cpus_per_run
  if cpus <= 0:
    raise ValueError(f'--cpus-per-run must be > 0, got {cpus}')
  if args.gpus_per_run is not None and args.gpus_per_run < 1:
    raise ValueError(f'--gpus-per-run must be >= 1, got {args.gpus_per_run}')
  ray_backend._ray()  # names the extra now when Ray is missing
  # one CPU per run: single-threaded XLA CPU kernels, as the local backend at full load
  env = runner.worker_env(1, base={}, cores=1) if cpus <= 1 else {}
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
  return env


def finish(sweep, out, names, allow_partial=False):
  """Writes results.csv, results.md and the sweep plots from the point folders (points
  evaluated on part of the split, or at an earlier step, count only with allow_partial,
  marked in the tables)."""
  from experiments import configs, plots
  from gating.study import results
  from gating.training.config import override
  reference = override(configs.get(sweep.preset), list(sweep.common)).model
  rows = [results.point_row(os.path.join(out, name), name, sweep.split, reference,
                            allow_partial=allow_partial) for name in names]
  results.write_csv(rows, os.path.join(out, 'results.csv'))
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(results.markdown(rows, f'{sweep.name}: {sweep.description}'))
  written = plots.plot_sweep(out)
  return [os.path.join(out, 'results.csv'), os.path.join(out, 'results.md'), *written]


def env_cpus(args):
  return 1 if args.cpus_per_run is None else args.cpus_per_run


def ray_backend_where(args):
  return f'the cluster at {args.address}' if args.address else 'a local cluster'


def _stop_on_sigterm(signum, frame):
  raise SystemExit(f'stopped by signal {signum}; the sweep resumes where it stopped')


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from experiments.configs import sweeps
  from gating.study import sweep as runner
  try:
    sweep = sweeps.get(args.name)
    seeds = None if args.seeds is None else int_list(args.seeds, '--seeds')
    out = args.out or os.path.join('runs', 'sweeps', sweep.name)
    if args.backend == 'ray':  # the tasks run in other folders, maybe on other nodes
      out = os.path.abspath(out)
    record, todo = points(sweep, out, steps=args.steps, seeds=seeds)
    studied = [p.name for p in todo if not p.name.startswith(runner.WARM_PREFIX)]
    if args.keep is not None and (args.report or args.points is not None):
      raise ValueError('--keep writes the record of every finished point, and runs nothing')
    if args.points is not None:
      if args.report:
        raise ValueError('--points chooses what runs; --report reports every point')
      todo = only_points(sweep, todo, args.points)
    parallel, env = worker_envs(args)
    if args.allow_partial and not args.report:
      raise ValueError('--allow-partial is for --report (a sweep evaluates every point on '
                       'the whole split)')
  except (ValueError, runner.SweepError) as e:
    sys.exit(f'error: {e}')
  if args.dry_run:
    for point in todo:
      print(f'{point.name}:\n  {" ".join(point.train_command)}\n  {" ".join(point.eval_command)}')
    if args.gpus_per_run is not None and args.backend == 'local':
      for slot, slot_env in enumerate(env):
        print(f'slot {slot}: CUDA_VISIBLE_DEVICES={slot_env["CUDA_VISIBLE_DEVICES"]}')
    return
  finished = sum(runner.is_finished(p.workdir, p.split) for p in todo)
  if args.keep is not None:
    from gating.study import records
    try:
      runner.check_folder(out, record)
      kept = records.keep(out, args.keep, [p.name for p in todo])
    except (ValueError, runner.SweepError) as e:
      sys.exit(f'error: {e}')
    print(f'sweep {sweep.name}: kept {len(kept)} of {len(todo)} points (the finished ones) '
          f'in {args.keep}')
    return
  if args.report:
    try:
      runner.check_folder(out, record)
      paths = finish(sweep, out, studied, allow_partial=args.allow_partial)
    except (ValueError, runner.SweepError) as e:
      sys.exit(f'error: {e}')
    print(f'sweep {sweep.name}: {finished} of {len(todo)} points finished in {out}')
    for path in paths:
      print(f'wrote {path}')
    return
  from gating.study import ray_backend
  try:
    if args.backend == 'ray':
      ray_backend.connect(args.address)
      ray_backend.check_resources(env_cpus(args), args.gpus_per_run or 0)
    runner.claim_folder(out, record)
  except runner.SweepError as e:
    if args.backend == 'ray':
      ray_backend.shutdown()
    sys.exit(f'error: {e}')

  at_once = (f'{parallel} at once' if args.backend == 'local' else
             f'on Ray ({ray_backend_where(args)})')
  print(f'sweep {sweep.name}: {len(todo)} points ({finished} finished before) in {out}, '
        f'{at_once}', flush=True)
  signal.signal(signal.SIGTERM, _stop_on_sigterm)
  start = time.time()
  report = lambda line: print(line, flush=True)
  if args.backend == 'ray':
    run = lambda todo: ray_backend.run_points(
        todo, extra_env=env, cpus_per_run=env_cpus(args),
        gpus_per_run=args.gpus_per_run or 0, report=report)
  else:
    run = lambda todo: runner.run_points(todo, parallel=parallel, env=env, report=report)
  try:
    outcomes = run(todo)        # warm starts first; each point after its own
  finally:
    if args.backend == 'ray':
      ray_backend.shutdown()
  print(f'sweep {sweep.name}: {time.time() - start:.0f} s this sitting', flush=True)
  try:
    for path in finish(sweep, out, studied):
      print(f'wrote {path}')
  except (ValueError, runner.SweepError) as e:   # a run folder the report cannot read
    sys.exit(f'error: {e}')
  failed = [o for o in outcomes if o.status in ('failed', 'busy')]
  if failed:
    sys.exit(f'{len(failed)} point(s) did not finish: ' +
             '; '.join(f'{o.name}: {o.message}' for o in failed))


if __name__ == '__main__':
  main()
