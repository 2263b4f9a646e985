"""Evaluate a run's latest checkpoint: python -m experiments.eval --workdir DIR [...]

Scores the model on the test split (or validation) on the masked and gathered compute
paths at several budgets K (a model trained with top-K runs at another K without
retraining): loss, accuracy and bits per token, overall and per task (synthetic) or
domain (text), head usage, and FLOPs per token (XLA's cost analysis of the compiled eval
step). It also scores the rule's own gate on the masked path without a budget (the
"training gate": every head with hard-concrete z > 0, top-K for topk, all heads for
dense; see gating/study/evaluation.py) and reports the gap to the gathered path at the run's
own K. Writes JSON (default DIR/eval.json).

Examples:
  python -m experiments.eval --workdir runs/synthetic
  python -m experiments.eval --workdir runs/text --paths gathered --k 2,4 --split validation
  python -m experiments.eval --workdir runs/text --paths gathered --compensate 8
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.flags import int_list


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='run folder (from experiments.train)')
  parser.add_argument('--paths', default='masked,gathered',
                      help='comma-separated compute paths (default: masked,gathered)')
  parser.add_argument('--k', default=None,
                      help='comma-separated budgets K, e.g. 1,2,4,8 (default: powers of two '
                           "up to H and the run's own K)")
  parser.add_argument('--groups', type=int, default=None, metavar='KF',
                      help='with MLP channel groups: run Kf groups of every MLP instead of '
                           "the run's own active_groups (the groups' budget knob)")
  parser.add_argument('--split', default='test', choices=('test', 'validation'),
                      help='test (reported numbers; default) or validation (tuning)')
  parser.add_argument('--max-batches', type=int, default=None,
                      help="score only N batches' worth of the split's rows, drawn at "
                           'random with a fixed seed (every domain, the same rows each '
                           'time; default: all rows)')
  parser.add_argument('--out', default=None, help='JSON file (default: DIR/eval.json)')
  parser.add_argument('--set', dest='overrides', action='append', default=[],
                      metavar='data.KEY=VALUE',
                      help='where the data is now, if it moved with the run folder, e.g. '
                           'data.sources=/new/corpus.txt (the content must be the same)')
  parser.add_argument('--compensate', type=int, default=None, metavar='N',
                      help='dropped-unit compensation: a closed head or MLP group adds its '
                           'mean output, measured on N training batches (FLAP; default off; '
                           'writes DIR/eval_compensated.json unless --out)')
  parser.add_argument('--restore-step', type=int, default=None, metavar='N',
                      help='evaluate the checkpoint at step N instead of the latest (e.g. '
                           'an intact one that the error for a corrupt checkpoint lists)')
  return parser.parse_args(argv)


def print_report(report):
  print(f"{report['workdir']} at step {report['step']}, {report['split']} split, "
        f"gate {report['gate']}, own K={report['own_K']} of H={report['num_heads']}"
        + (f", dropped units compensated (means of {report['compensated_on_batches']} "
           'training batches)' if report.get('compensated_on_batches') else ''))
  print(f"  {'path':<9} {'K':>4} {'loss':>8} {'accuracy':>9} {'bits/tok':>9} "
        f"{'active':>7} {'FLOPs/token':>12}")
  rows = [dict(r) for r in report['results']]
  rows.append({**report['training_gate'], 'path': 'masked*'})
  for r in rows:
    if 'skipped' in r:
      print(f"  {r['path']:<9} {str(r['K']):>4}  skipped: {r['skipped']}")
      continue
    flops = '-' if r['flops_per_token'] is None else f"{r['flops_per_token']:,.0f}"
    groups = (f"  groups Kf={r['Kf']}: active {r['active_group_fraction']:.3f}"
              if 'Kf' in r else '')
    print(f"  {r['path']:<9} {str(r['K']):>4} {r['loss']:8.4f} {r['accuracy']:9.4f} "
          f"{r['bits_per_token']:9.4f} {r['active_fraction']:7.3f} {flops:>12}{groups}")
  gap = report['gap']
  print(f"  * the training gate: {report['training_gate']['meaning']}")
  print(f"  gap ({gap['path']} at K={gap['K']} minus the training gate): "
        f"loss {gap['loss']:+.4f}, accuracy {gap['accuracy']:+.4f}, "
        f"active fraction {gap['active_fraction']:+.3f}")


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from gating.training import checkpoint
  from gating.training.folders import check_output_file, write_json
  from gating.study import evaluation
  try:
    paths = [p for p in args.paths.split(',') if p]
    ks = None if args.k is None else int_list(args.k, '--k')
    if args.out is not None:
      check_output_file(args.out, '--out')   # before the evaluation, not after it
    run = evaluation.load_run(args.workdir, step=args.restore_step,
                              data_overrides=args.overrides)
    if args.compensate is not None:
      run = evaluation.compensated(run, args.compensate)
    report = evaluation.evaluate_run(run, paths=paths, ks=ks, split=args.split,
                                     max_batches=args.max_batches, groups=args.groups)
  except (FileNotFoundError, ConnectionError, ValueError, FloatingPointError,
          checkpoint.CheckpointError) as e:
    sys.exit(f'error: {e}')
  if args.compensate is not None:
    report['compensated_on_batches'] = args.compensate
  out = args.out or os.path.join(
      args.workdir, 'eval.json' if args.compensate is None else 'eval_compensated.json')
  write_json(out, report)   # a reader (or a resumed sweep) never sees half a file
  print_report(report)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
