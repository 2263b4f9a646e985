"""Training benchmark: step time and tokens/s of a GatedLM on the masked and gathered paths
against the dense model, with the train step that training runs (`train.jit_train_step`:
forward, backward, AdamW update, state donated).

Candidates, timed interleaved in one run on one model size:
  dense         gate='dense' (every head, no router), the denominator
  masked_k2     gate='topk', K=2 of 8, masked path (every head computed, then gated)
  gathered_k2   gate='topk', K=2 of 8, gathered path (only the 2 selected heads computed)
Top-k trains with Gumbel noise as the presets do. Sizes: 4 layers, D=256, H=8, L=512,
batch 8 (--quick: 2 layers), where attention (projections and scores) is about half of
the step's FLOPs. Inputs are random byte tokens (vocabulary 258), every position valid and
scored after the gate prefix. Targets (issue 4): masked at most 1.10x the dense step
time; gathered at K=2 of 8 faster than dense.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments.timing import summarize, time_interleaved
from gating import data
from gating.training import loop as train
from gating.training.config import DataConfig, ModelConfig, TrainConfig

FULL = dict(layers=4, features=256, heads=8, length=512, batch=8, prefix=64)
QUICK = dict(layers=2, features=256, heads=8, length=512, batch=8, prefix=64)
CANDIDATES = {'dense': ('dense', 8, 'masked'), 'masked_k2': ('topk', 2, 'masked'),
              'gathered_k2': ('topk', 2, 'gathered')}


def _config(gate, k, path, sizes) -> TrainConfig:
  model = ModelConfig(num_layers=sizes['layers'], features=sizes['features'],
                      num_heads=sizes['heads'], prefix_len=sizes['prefix'], gate=gate,
                      active_heads=k, path=path, noise=None if gate == 'dense' else 'gumbel')
  return TrainConfig(model=model, data=DataConfig(kind='text', seq_len=sizes['length']),
                     steps=10_000, batch_size=sizes['batch'])


def _step(gate, k, path, sizes):
  """(zero-argument step callable, XLA flops of the compiled step)."""
  return step_callable(_config(gate, k, path, sizes), sizes)


def step_callable(cfg: TrainConfig, sizes):
  """The jitted train step of `cfg` on random byte tokens of sizes['batch'] x
  sizes['length']: (zero-argument step callable, XLA flops of the compiled step)."""
  k = cfg.model.active_heads
  B, L = sizes['batch'], sizes['length']
  info = data.DataInfo(vocab_size=data.BYTE_VOCAB, seq_len=L, prompt_len=0,
                       pad_id=data.BYTE_PAD_ID, label_names=('random',), fingerprint={})
  graphdef, state = train.create(cfg, info)
  tokens = np.random.default_rng(0).integers(0, 256, (1, B, L), dtype=np.int32)
  ones = np.ones((1, B, L), bool)
  batch = {'tokens': jnp.asarray(tokens), 'valid': jnp.asarray(ones),
           'target_mask': jnp.asarray(ones), 'label': jnp.zeros((1, B), jnp.int32)}
  compiled = train.jit_train_step(graphdef, cfg, k).lower(state, batch, jnp.int32(0)).compile()
  cost = compiled.cost_analysis()
  holder = {'state': state, 'step': 0}

  def call():
    holder['state'], metrics = compiled(holder['state'], batch, jnp.int32(holder['step']))
    holder['step'] += 1
    return metrics['loss']

  return call, cost.get('flops') if isinstance(cost, dict) else None


def run(quick: bool = False) -> list[dict]:
  sizes = QUICK if quick else FULL
  steps = {name: _step(*spec, sizes) for name, spec in CANDIDATES.items()}
  times = time_interleaved({name: fn for name, (fn, _) in steps.items()},
                           trials=5 if quick else 9, min_seconds=0.5)
  base = summarize(times['dense'])['median_s']
  tokens = sizes['batch'] * sizes['length']
  rows = []
  for name, (gate, k, path) in CANDIDATES.items():
    stats = summarize(times[name])
    rows.append(dict(section='train', candidate=name, gate=gate, K=k, path=path, **sizes,
                     xla_flops=steps[name][1], tokens_per_s=tokens / stats['median_s'],
                     ratio_vs_dense=stats['median_s'] / base, **stats))
  return rows


def format_table(rows: list[dict]) -> str:
  r0 = rows[0]
  lines = [f"train step (GatedLM {r0['layers']} layers, D={r0['features']}, H={r0['heads']}, "
           f"L={r0['length']}, batch {r0['batch']}): median ms [IQR], tokens/s, ratio to dense",
           '  targets: masked_k2 <= 1.10x, gathered_k2 < 1.00x']
  for r in rows:
    flops = '-' if r['xla_flops'] is None else f"{r['xla_flops'] / 1e9:.1f} GFLOP"
    lines.append(f"    {r['candidate']:<12} {r['median_s'] * 1e3:9.1f} ms "
                 f"[{r['q25_s'] * 1e3:.1f}, {r['q75_s'] * 1e3:.1f}]  "
                 f"{r['tokens_per_s']:9,.0f} tok/s  {r['ratio_vs_dense']:6.3f}x  {flops}")
  return '\n'.join(lines)
