"""Study models benchmark: inference speed of the study's K = 2 models against dense.

For each study preset (synthetic, text), the model the sweeps train, at its batch size and
sequence length, with random weights (speed does not depend on them): the jitted forward
pass of GatedLM on the gathered path at K = 2 of 8 and on the masked path at K = 2, against
the dense model (gate='dense'), interleaved in one run. FLOPs are XLA's cost analysis of
each compiled forward, so `flop_ratio` is what the gathered path saves on paper and
`ratio_vs_dense` what it saves in time.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from experiments import configs
from experiments.timing import summarize, time_interleaved
from gating.training import loop as train

PRESETS = ('synthetic', 'text')


def _forward(cfg, info, path, k):
  model_cfg = dataclasses.replace(cfg.model, gate='dense' if k is None else 'topk',
                                  active_heads=k, path=path)
  model = train.build_model(model_cfg, info, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(0), (cfg.batch_size, info.seq_len), 0,
                              info.vocab_size)
  fn = jax.jit(lambda state, tokens: nnx.merge(graphdef, state, copy=True)(
      tokens, deterministic=True).logits_BxLxV)
  flops = fn.lower(state, tokens).compile().cost_analysis().get('flops')
  return (lambda: fn(state, tokens)), flops


def run(quick: bool = False) -> list[dict]:
  rows = []
  for preset in PRESETS:
    cfg = configs.get(preset)
    info = train.load_data(cfg).info
    cands = {'dense': _forward(cfg, info, 'masked', None),
             'masked_k2': _forward(cfg, info, 'masked', 2),
             'gathered_k2': _forward(cfg, info, 'gathered', 2)}
    times = time_interleaved({n: fn for n, (fn, _) in cands.items()}, 3 if quick else 9)
    base = summarize(times['dense'])['median_s']
    base_flops = cands['dense'][1]
    for name, (_, flops) in cands.items():
      stats = summarize(times[name])
      rows.append(dict(section='study', preset=preset, candidate=name,
                       batch=cfg.batch_size, length=info.seq_len,
                       layers=cfg.model.num_layers, features=cfg.model.features,
                       heads=cfg.model.num_heads, xla_flops=flops,
                       flop_ratio=flops / base_flops,
                       tokens_per_s=cfg.batch_size * info.seq_len / stats['median_s'],
                       ratio_vs_dense=stats['median_s'] / base, **stats))
  return rows


def format_table(rows: list[dict]) -> str:
  lines = ['study models: forward pass, median ms [IQR], ratio to dense, FLOP ratio (XLA)']
  preset = None
  for r in rows:
    if r['preset'] != preset:
      preset = r['preset']
      lines.append(f'\n  {preset}: {r["layers"]} layers, D={r["features"]}, H={r["heads"]}, '
                   f'B={r["batch"]}, L={r["length"]}')
    lines.append(f'    {r["candidate"]:<12} {r["median_s"] * 1e3:8.2f} ms '
                 f'[{r["q25_s"] * 1e3:.2f}, {r["q75_s"] * 1e3:.2f}]  '
                 f'{r["ratio_vs_dense"]:6.3f}x time  {r["flop_ratio"]:6.3f}x FLOPs')
  return '\n'.join(lines)
