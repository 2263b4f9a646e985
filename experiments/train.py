"""Train a gated model: python -m experiments.train [--preset NAME] [--workdir DIR] ...

Writes into the run folder: config.json (resolved config), provenance.json, data_info.json,
metrics.jsonl (train and eval lines), checkpoints/, summary.json and plots/. A --workdir
that holds a checkpoint resumes from it (the same config is required for model and data).

Examples:
  python -m experiments.train                                  # the default run (preset sums)
  python -m experiments.train --preset text --steps 3000 --set model.active_heads=4
  python -m experiments.train --set model.gate=hard_concrete --set model.eval_path=masked \\
      --set model.active_heads=none --set loss.l0_weight=0.05
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax


def parse_args(argv):
  from experiments.configs import DEFAULT, PRESETS
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', default=DEFAULT,
                      help=f'named config, one of {sorted(PRESETS)} (default: {DEFAULT}, the '
                           'headline benchmark at a five-minute budget)')
  parser.add_argument('--workdir', default=None,
                      help='run folder (default: runs/<preset>); resumes if it holds a checkpoint')
  parser.add_argument('--steps', type=int, default=None, help='training steps (overrides the preset)')
  parser.add_argument('--seed', type=int, default=None, help='random seed (overrides the preset)')
  parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                      help="config override, repeatable: e.g. model.active_heads=4, "
                           "loss.z_loss_weight=1e-3, data.sources=python,pydoc, k_schedule=8:200,4:400")
  parser.add_argument('--restore-step', type=int, default=None, metavar='N',
                      help='resume from the checkpoint at step N instead of the latest (e.g. '
                           'when the latest is corrupt); later steps are moved aside into '
                           'checkpoints_quarantine/, never deleted')
  parser.add_argument('--extend-schedule', action='store_true',
                      help='resume a run with more --steps than it was trained for: its '
                           'learning-rate schedule (warmup, cosine decay) is refit to the new '
                           'length, so the rate changes from the next step on (the line it '
                           'prints says by how much); without it such a resume is refused')
  parser.add_argument('--no-plots', action='store_true', help='do not write plots at the end')
  parser.add_argument('--no-progress', action='store_true', help='no progress bar')
  parser.add_argument('--print-config', action='store_true',
                      help='print the resolved config and exit')
  parser.add_argument('--distributed', action='store_true',
                      help='multi-process training: jax.distributed from a detected cluster '
                           '(SLURM, Open MPI, TPU pod) or from the three flags below')
  parser.add_argument('--coordinator', default=None, metavar='HOST:PORT',
                      help='with --distributed: the address of process 0')
  parser.add_argument('--num-processes', type=int, default=None, metavar='N',
                      help='with --distributed: the number of processes')
  parser.add_argument('--process-id', type=int, default=None, metavar='I',
                      help='with --distributed: this process, 0..N-1')
  parser.add_argument('--heartbeat-timeout', type=int, default=None, metavar='S',
                      help="with --distributed: seconds before the others fail when a "
                           "process stops answering (default: JAX's)")
  return parser.parse_args(argv)


def resolve(args):
  """The run's config: the preset with --steps, --seed and --set applied, and with
  model.pretrained, the checkpoint's architecture and tokenizer (config.with_pretrained)."""
  from experiments import configs
  from gating.training.config import override, with_pretrained
  overrides = list(args.overrides)
  if args.steps is not None:
    overrides.append(f'steps={args.steps}')
  if args.seed is not None:
    overrides.append(f'seed={args.seed}')
  return with_pretrained(override(configs.get(args.preset), overrides))


# The frozen rows the default job is compared with (python -m experiments.sweep
# default_job --report, results.csv copied here; docs/study.md).
REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         'docs', 'results', 'default_job.csv')


def print_summary(summary):
  val, test = summary['validation'], summary['test']
  print(f"\nvalidation: loss {val['loss']:.4f}  accuracy {val['accuracy']:.4f}  "
        f"({val['sequences']} sequences)")
  print(f"test: loss {test['loss']:.4f}  accuracy {test['accuracy']:.4f}  exact match "
        f"{test['exact_match']:.4f}  ({test['sequences']} sequences; tokens seen in "
        f"training: {summary['tokens_seen']:,})")
  for name, block in test['per_label'].items():
    print(f"  {name:<16} test accuracy {block['accuracy']:.4f}  loss {block['loss']:.4f}")


def print_reference(cfg, preset: str, summary, path: str = REFERENCE) -> None:
  """After the default job, the frozen rows of its benchmark and budget beside this run's
  test accuracy (only when the run is the default job, whatever its seed)."""
  from experiments import configs
  from gating.study import results
  if preset != configs.DEFAULT or dataclasses.replace(cfg, seed=0) != configs.get(preset):
    return
  if not os.path.exists(path):
    print(f'(the frozen rows to compare with are in {os.path.relpath(path)} of the '
          'repository, absent here)')
    return
  rows = results.read_csv(path)
  print(f"\nthis run (seed {cfg.seed}): test accuracy {summary['test']['accuracy']:.3f} "
        f'with {cfg.model.active_heads} of {cfg.model.num_heads} heads per layer.\nThe frozen '
        f'rows of the same benchmark and budget (test split, {os.path.relpath(path)}):')
  for group in results.aggregate(rows):
    seeds = [r for r in rows if results.point_of(r['point']) == group['point']]
    mean, std, n = group['test_accuracy']
    each = ', '.join(f"{r['test_accuracy']:.3f}" for r in seeds)
    print(f"  {results.rule_label(group['rule']):<22} K = {group['K']}  accuracy "
          f'{mean:.3f} ± {std:.3f} over {n} seeds ({each})')


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = resolve(args)
  except ValueError as e:
    sys.exit(f'error: {e}')
  if args.print_config:
    print(cfg.to_json())
    return
  from gating.training import distributed
  from gating.training.loop import mesh_and_shardings
  try:
    if args.distributed:
      distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                             heartbeat_timeout_s=args.heartbeat_timeout)
    elif (args.coordinator, args.num_processes, args.process_id,
          args.heartbeat_timeout) != (None,) * 4:
      raise ValueError('--coordinator, --num-processes, --process-id and '
                       '--heartbeat-timeout need --distributed')
    mesh_and_shardings(cfg.batch_size, cfg.grad_accum)  # refuse a bad batch before compiling
  except ValueError as e:
    sys.exit(f'error: {e}')
  workdir = args.workdir or os.path.join('runs', args.preset)
  summary = run_and_report(cfg, workdir, progress=not args.no_progress,
                           plots=not args.no_plots, restore_step=args.restore_step,
                           extend_schedule=args.extend_schedule)
  if jax.process_index() == 0:
    print_reference(cfg, args.preset, summary)


def run_and_report(cfg, workdir, *, progress=True, plots=True, restore_step=None,
                   extend_schedule=False):
  """Trains (or resumes) cfg in workdir, prints the summary and writes the plots, and
  returns the summary; bad input exits with one `error:` line."""
  from gating.training.checkpoint import CheckpointError
  from gating.training.loop import train
  try:
    summary = train(cfg, workdir, progress=progress, restore_step=restore_step,
                    extend_schedule=extend_schedule)
  except (FileNotFoundError, ConnectionError, ValueError, FloatingPointError,
          CheckpointError) as e:
    sys.exit(f'error: {e}')
  if summary.get('already_finished'):
    print_summary(summary)
    print(f'run folder: {workdir} (finished; nothing was changed)')
    return summary
  if jax.process_index() == 0:
    print_summary(summary)
    if plots:
      from experiments import plots as plotting
      written = plotting.plot_run(workdir)
      print(f'plots: {", ".join(written)}')
  print(f'run folder: {workdir}')
  return summary


if __name__ == '__main__':
  main()
