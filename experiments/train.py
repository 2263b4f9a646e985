"""Train a gated model: python -m experiments.train [--preset NAME] [--workdir DIR] ...

Writes into the run folder: config.json (resolved config), provenance.json, data_info.json,
metrics.jsonl (train and eval lines), checkpoints/, summary.json and plots/. A --workdir
that holds a checkpoint resumes from it (the same config is required for model and data).

Examples:
  python -m experiments.train                                  # the default synthetic run
  python -m experiments.train --preset text --steps 3000 --set model.active_heads=4
  python -m experiments.train --set model.gate=hard_concrete --set model.eval_path=masked \\
      --set model.active_heads=none --set loss.l0_weight=0.05
"""

from __future__ import annotations

import argparse
import os
import sys

import jax


def parse_args(argv):
  from experiments.configs import PRESETS
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', default='synthetic',
                      help=f'named config, one of {sorted(PRESETS)} (default: synthetic)')
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
  from experiments import configs
  from gating.training.config import override
  overrides = list(args.overrides)
  if args.steps is not None:
    overrides.append(f'steps={args.steps}')
  if args.seed is not None:
    overrides.append(f'seed={args.seed}')
  return override(configs.get(args.preset), overrides)


def print_summary(summary):
  val = summary['validation']
  print(f"\nvalidation: loss {val['loss']:.4f}  accuracy {val['accuracy']:.4f}  "
        f"exact match {val['exact_match']:.4f}  ({val['sequences']} sequences)")
  for name, block in val['per_label'].items():
    print(f"  {name:<16} accuracy {block['accuracy']:.4f}  loss {block['loss']:.4f}")
  test = summary['test']
  print(f"test: loss {test['loss']:.4f}  accuracy {test['accuracy']:.4f}  "
        f"(tokens seen in training: {summary['tokens_seen']:,})")


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
  run_and_report(cfg, workdir, progress=not args.no_progress, plots=not args.no_plots,
                 restore_step=args.restore_step, extend_schedule=args.extend_schedule)


def run_and_report(cfg, workdir, *, progress=True, plots=True, restore_step=None,
                   extend_schedule=False):
  """Trains (or resumes) cfg in workdir, prints the summary and writes the plots; bad
  input exits with one `error:` line."""
  from gating.training.checkpoint import CheckpointError
  from gating.training.loop import train
  try:
    summary = train(cfg, workdir, progress=progress, restore_step=restore_step,
                    extend_schedule=extend_schedule)
  except (FileNotFoundError, ValueError, FloatingPointError, CheckpointError) as e:
    sys.exit(f'error: {e}')
  if summary.get('already_finished'):
    print_summary(summary)
    print(f'run folder: {workdir} (finished; nothing was changed)')
    return
  if jax.process_index() == 0:
    print_summary(summary)
    if plots:
      from experiments import plots as plotting
      written = plotting.plot_run(workdir)
      print(f'plots: {", ".join(written)}')
  print(f'run folder: {workdir}')


if __name__ == '__main__':
  main()
