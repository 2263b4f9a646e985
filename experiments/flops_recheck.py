"""Training FLOPs of a sweep's points, counted both ways: python -m experiments.flops_recheck NAME

Until the count moved to the compiled train step, a run's `train_flops` was XLA's cost
analysis of the *lowered* step (the HLO before optimization). This script rebuilds every
point of a named sweep (and its warm start) from its config, without training, counts one
train step both ways at every K the point trains with, and prints per point the total
(steps x per-step, warm start included) under each count and their ratio, so that the
equal-FLOPs comparisons of a frozen study can be re-checked. Writes
runs/flops_recheck/NAME.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def counts(cfg, info):
  """{K: (lowered, compiled)} per-step FLOPs of cfg's train step at every K it trains."""
  import jax
  import jax.numpy as jnp
  from gating import data
  from gating.training import loop, losses
  graphdef, state = loop.create(cfg, info)
  rows = data.batch_at(loop.load_data(cfg).train, 0, cfg.batch_size, cfg.seed)
  batch = {k: v[None] for k, v in loop.model_inputs(rows).items()}   # one micro-batch
  one = dataclasses.replace(cfg, grad_accum=1)
  out = {}
  for k in sorted({losses.k_at(s, cfg.k_schedule, cfg.model.active_heads)
                   for s in range(cfg.steps)}, key=str):
    lowered = jax.jit(lambda s, b, i, k=k: loop.train_step(
        s, b, i, graphdef=graphdef, cfg=one, active_heads=k)).lower(state, batch, jnp.int32(0))
    out[k] = (float(lowered.cost_analysis()['flops']),
              loop.step_flops(cfg, graphdef, state, batch, k))
  return out


def total(cfg, per_k, which):
  from gating.training import losses
  steps_at = {}
  for s in range(cfg.steps):
    k = losses.k_at(s, cfg.k_schedule, cfg.model.active_heads)
    steps_at[k] = steps_at.get(k, 0) + 1
  return sum(per_k[k][which] * n for k, n in steps_at.items())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('sweep', help='a named sweep (experiments/configs/sweeps.py)')
  parser.add_argument('--out', default=None, help='JSON file (default: '
                      'runs/flops_recheck/NAME.json)')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  from experiments import configs
  from experiments.configs import sweeps
  from gating.study.sweep import WARM
  from gating.training import loop
  from gating.training.config import override
  from gating.training.folders import check_output_file, write_json
  try:
    sweep = sweeps.get(args.sweep)
    if args.out is not None:
      check_output_file(args.out, '--out')
  except ValueError as e:
    sys.exit(f'error: {e}')
  seed = sweep.seeds[0]
  cache, rows = {}, {}

  def point(overrides):
    cfg = override(configs.get(sweep.preset), [*sweep.common, *overrides, f'seed={seed}'])
    key = cfg.to_json()
    if key not in cache:
      info = loop.load_data(cfg).info
      cache[key] = (cfg, counts(cfg, info))
    return cache[key]

  warm = point(sweep.warm_start) if sweep.warm_start else None
  for name, overrides in sweep.points.items():
    cfg, per_k = point(overrides)
    lowered, compiled = total(cfg, per_k, 0), total(cfg, per_k, 1)
    if warm is not None and any(WARM in o for o in overrides):
      lowered += total(*warm, 0)
      compiled += total(*warm, 1)
    rows[name] = {'lowered': lowered, 'compiled': compiled, 'ratio': compiled / lowered,
                  'per_step': {str(k): {'lowered': v[0], 'compiled': v[1]}
                               for k, v in per_k.items()}}
    print(f'{name:<28} lowered {lowered:.4g}  compiled {compiled:.4g}  '
          f'compiled / lowered {compiled / lowered:.3f}', flush=True)
  out = args.out or os.path.join('runs', 'flops_recheck', f'{sweep.name}.json')
  write_json(out, {'sweep': sweep.name, 'seed': seed, 'points': rows})
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
