"""Attention benchmark: nnx.MultiHeadAttention vs our dense, masked and gathered paths.

For every length L and dtype, forward and forward+backward (gradients of sum(y) with
respect to the parameters and the input), all candidates of one (L, dtype, mode) timed
interleaved in one run. The denominator is flax.nnx.MultiHeadAttention with the same
sizes and dtype. Candidates: 'nnx_mha'; 'dense' (our layer, gate='dense', masked path);
'masked_kK' and 'gathered_kK' (gate='topk' with budget K; deterministic gate, no mask);
'weight_gather_k8': the gathered kernel with all 8 heads selected, which the layer itself
never runs (at K = H it computes every head with the shared weights instead).
bf16 means parameters, inputs and compute in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import gating
from experiments.timing import summarize, time_interleaved

SIZES = dict(batch=8, features=512, heads=8)


def _callable(module, x, mode, **call_kwargs):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def forward(params, rest, x):
    return nnx.merge(graphdef, params, rest, copy=True)(x, **call_kwargs)

  if mode == 'forward':
    fn = jax.jit(forward)
  else:
    loss = lambda params, rest, x: forward(params, rest, x).astype(jnp.float32).sum()
    fn = jax.jit(jax.grad(loss, argnums=(0, 2)))
  flops = fn.lower(params, rest, x).compile().cost_analysis().get('flops')
  return (lambda: fn(params, rest, x)), flops


def candidates(length, dtype, mode, ks=(1, 2, 4, 8)):
  B, D, H = SIZES['batch'], SIZES['features'], SIZES['heads']
  x = jax.random.normal(jax.random.key(0), (B, length, D), dtype)
  common = dict(dtype=dtype, param_dtype=dtype)
  out = {'nnx_mha': _callable(nnx.MultiHeadAttention(H, D, decode=False, rngs=nnx.Rngs(0),
                                                     **common), x, mode)}
  out['dense'] = _callable(gating.GatedMultiHeadAttention(H, D, gate='dense', rngs=nnx.Rngs(0),
                                                          **common), x, mode)
  for k in ks:
    layer = gating.GatedMultiHeadAttention(H, D, gate='topk', active_heads=k, deterministic=True,
                                           rngs=nnx.Rngs(0), **common)
    out[f'masked_k{k}'] = _callable(layer, x, mode, path='masked')
    out[f'gathered_k{k}'] = _callable(layer, x, mode, path='gathered')
  # The layer computes K = H without a gather; this is what the weight gather would cost.
  out[f'weight_gather_k{H}'] = _raw_gather(layer, x, mode)
  return out


def _raw_gather(layer, x, mode):
  """compute.gathered_attention with every head selected (the gather the layer skips)."""
  w = layer.head_weights()
  B, H = x.shape[0], layer.num_heads
  idx_BxK = jnp.broadcast_to(jnp.arange(H), (B, H))
  ones_BxK = jnp.ones((B, H), x.dtype)

  def forward(w, x):
    return gating.gathered_attention(x, x, x, w, idx_BxK, ones_BxK)

  if mode == 'forward':
    fn = jax.jit(forward)
  else:
    fn = jax.jit(jax.grad(lambda w, x: forward(w, x).astype(jnp.float32).sum(), argnums=(0, 1)))
  flops = fn.lower(w, x).compile().cost_analysis().get('flops')
  return (lambda: fn(w, x)), flops


def run(quick: bool = False) -> list[dict]:
  lengths = (128, 512) if quick else (128, 512, 2048)
  dtypes = (jnp.float32,) if quick else (jnp.float32, jnp.bfloat16)
  rows = []
  for dtype in dtypes:
    for length in lengths:
      for mode in ('forward', 'forward+backward'):
        cands = candidates(length, dtype, mode)
        trials = 3 if quick else (9 if length <= 512 else 5)
        times = time_interleaved({n: fn for n, (fn, _) in cands.items()}, trials)
        base = summarize(times['nnx_mha'])['median_s']
        for name, (_, flops) in cands.items():
          stats = summarize(times[name])
          rows.append(dict(section='attention', length=length, dtype=jnp.dtype(dtype).name,
                           mode=mode, candidate=name, **SIZES, xla_flops=flops,
                           ratio_vs_nnx_mha=stats['median_s'] / base, **stats))
  return rows


def format_table(rows: list[dict]) -> str:
  lines = ['attention (B=8, D=512, H=8): median ms [IQR] and ratio to nnx.MultiHeadAttention']
  key = None
  for r in rows:
    if (r['dtype'], r['length'], r['mode']) != key:
      key = (r['dtype'], r['length'], r['mode'])
      lines.append(f'\n  {r["dtype"]} L={r["length"]} {r["mode"]}')
    lines.append(f'    {r["candidate"]:<13} {r["median_s"] * 1e3:9.2f} ms '
                 f'[{r["q25_s"] * 1e3:.2f}, {r["q75_s"] * 1e3:.2f}]  '
                 f'{r["ratio_vs_nnx_mha"]:6.3f}x')
  return '\n'.join(lines)
