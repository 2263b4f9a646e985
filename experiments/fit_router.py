"""Fit routers to a trained run's own head importance, the model frozen:

  python -m experiments.fit_router --from RUN --workdir DIR --k K [--groups KF]
      [--labels grad_x_act] [--loss bce] [--shared-heads S] [--shared-groups SF]
      [--router KIND | --static-subset] [--steps 300] [--lr 3e-3]
      [--set KEY=VALUE ...]

DIR becomes an ordinary run folder (config.json, metrics.jsonl with `router/recall`,
checkpoints, summary.json, plots) of a gate='topk' model at budget K with RUN's weights
and data (with MLP channel groups, --groups KF: their routers are fitted too, at budget
Kf); only its routers train (see gating/training/router_fit.py). Evaluate it with
experiments.eval, search its headroom with experiments.headroom, resume it like any run.

Labels (gating/training/importance.py): 'grad_x_act' (one backward pass; default),
'output_norm', 'ablation' (leave-one-head-out: N * H forward passes per step).

Example, the recipe chain on the synthetic benchmark:
  python -m experiments.train --workdir runs/elastic --set model.gate=dense \\
      --set model.active_heads=none --set model.eval_path=masked --set loss.elastic_ks=2,4,8
  python -m experiments.fit_router --from runs/elastic --workdir runs/elastic_router_k2 --k 2
  python -m experiments.eval --workdir runs/elastic_router_k2
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--from', dest='source', required=True,
                      help='the trained run folder whose model is frozen')
  parser.add_argument('--workdir', required=True, help='the new run folder (resumes if it '
                      'holds a checkpoint)')
  parser.add_argument('--k', type=int, required=True, help='budget K: heads per layer that run')
  parser.add_argument('--groups', type=int, default=None, metavar='KF',
                      help='budget Kf of MLP channel groups (a source with mlp_groups)')
  parser.add_argument('--labels', default='grad_x_act',
                      help='importance labels: grad_x_act (default), output_norm, ablation')
  parser.add_argument('--loss', default='bce', help='router loss: bce (default) or listwise')
  parser.add_argument('--shared-heads', type=int, default=0, metavar='S',
                      help='S heads always on; the router picks K - S of the others')
  parser.add_argument('--shared-groups', type=int, default=0, metavar='SF',
                      help='SF MLP groups always open; the router picks KF - SF of the others')
  parser.add_argument('--router', default=None, metavar='KIND',
                      help="the fitted router's kind, how it reads a sequence ('prefix', "
                           "'first', 'mean' or a registered kind; default: the model's)")
  parser.add_argument('--static-subset', action='store_true',
                      help='fit one subset of K heads for every sequence (an input-free '
                           'router) to the same labels: the static baseline of the recipe '
                           "(older spelling: --router static)")
  parser.add_argument('--steps', type=int, default=300, help='router training steps (300)')
  parser.add_argument('--lr', type=float, default=3e-3, help="the routers' learning rate")
  parser.add_argument('--seed', type=int, default=None, help="default: the source run's")
  parser.add_argument('--set', dest='overrides', action='append', default=[],
                      metavar='KEY=VALUE', help='config override, repeatable')
  parser.add_argument('--no-plots', action='store_true')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--print-config', action='store_true',
                      help='print the resolved config and exit')
  return parser.parse_args(argv)


def resolve(args):
  """The fit's TrainConfig; a ValueError names what is wrong with the source or flags."""
  from gating.layers import names
  from gating.training import router_fit
  from gating.training.config import override, read_config
  config_path = os.path.join(args.source, 'config.json')
  if not os.path.exists(config_path):
    raise ValueError(f'--from {args.source}: not a run folder (no config.json)')
  if not os.path.isdir(os.path.join(args.source, 'checkpoints')):
    raise ValueError(f'--from {args.source}: the run has no checkpoint to fit routers to')
  source = read_config(config_path)
  router = args.router
  if router == 'static':
    names.renamed('fit_router', '--router static', '--static-subset')
    router = 'input_free'
  if args.static_subset:
    if router not in (None, 'input_free'):
      raise ValueError(f'--static-subset fits an input-free router; --router {router} asks '
                       'for another kind')
    router = 'input_free'
  cfg = router_fit.fit_config(
      source, k=args.k, labels=args.labels, loss=args.loss, shared_heads=args.shared_heads,
      steps=args.steps, learning_rate=args.lr, init_from=args.source, seed=args.seed,
      router=router, groups=args.groups, shared_groups=args.shared_groups)
  return override(cfg, args.overrides)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = resolve(args)
  except ValueError as e:
    sys.exit(f'error: {e}')
  if args.print_config:
    print(cfg.to_json())
    return
  if os.path.abspath(args.workdir) == os.path.abspath(args.source):
    sys.exit('error: --workdir must be a new folder, not the --from run')
  from experiments.train import run_and_report
  run_and_report(cfg, args.workdir, progress=not args.no_progress, plots=not args.no_plots)


if __name__ == '__main__':
  main()
