"""Attention benchmark: nnx.MultiHeadAttention vs our dense, masked, gathered and grouped paths.

For every length L and dtype, forward and forward+backward (gradients of sum(y) with
respect to the parameters and the input), all candidates of one (L, dtype, mode) timed
interleaved in one run. The denominator is flax.nnx.MultiHeadAttention with the same
sizes and dtype. Candidates: 'nnx_mha'; 'dense' (our layer, gate='dense', masked path);
'masked_kK' and 'gathered_kK' (gate='topk' with budget K; deterministic gate, no mask);
'weight_gather_k8': the gathered kernel with all 8 heads selected, which the layer itself
never runs (at K = H it computes every head with the shared weights instead);
'grouped_k2': the layer's gate and gathered computation with the projections done by
compute.grouped_attention (one ragged matmul per head over the sequences that chose it,
no per-sequence weight copies), which the layer does not offer as a path.
bf16 means parameters, inputs and compute in bfloat16.

--size gpu (`run_gpu`): B x L = 16 x 2048 and 4 x 8192, D = 1024, H = 8 and 16, bf16,
forward and forward+backward (the gradients of the parameters and x for a random
cotangent of y); candidates nnx_mha, dense, and masked, gathered and grouped
at K = H/4 (2 of 8, 4 of 16); every row timed against dense (our layer, gate='dense') and
with its memory figures (experiments.bench_rows). --dry-run compiles one row: the gathered
one at 4 x 8192, H = 16, forward+backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

import gating
from experiments.bench_rows import Candidate, Settings, format_rows, run_table
from experiments.timing import summarize, time_interleaved
from gating.layers import compute

SIZES = dict(batch=8, features=512, heads=8)


def _callable(module, x, mode, call=None, **call_kwargs):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  call = call or (lambda layer, x: layer(x, **call_kwargs))

  def forward(params, rest, x):
    return call(nnx.merge(graphdef, params, rest, copy=True), x)

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
  layer = gating.GatedMultiHeadAttention(H, D, gate='topk', active_heads=2, deterministic=True,
                                         rngs=nnx.Rngs(0), **common)
  out['grouped_k2'] = _callable(layer, x, mode, call=grouped_call)
  return out


def grouped_call(layer: gating.GatedMultiHeadAttention, x_BxLxD):
  """The layer's gathered path (its gate, weights K of H heads) with the projections of
  compute.grouped_attention: y_BxLxD."""
  gate = layer.gate(x_BxLxD, deterministic=True)
  x_BxLxD, *weights = dtypes.promote_dtype((x_BxLxD, *layer.head_weights()), dtype=layer.dtype)
  weights_BxK = jnp.take_along_axis(gate.weights_BxH, gate.idx_BxK, axis=1)
  return compute.grouped_attention(x_BxLxD, x_BxLxD, x_BxLxD, compute.HeadWeights(*weights),
                                   gate.idx_BxK, weights_BxK,
                                   compute.AttendOptions(precision=layer.precision))


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


# -- --size gpu ---------------------------------------------------------------------------

GPU = dict(shapes=((16, 2048), (4, 8192)), features=1024, heads=(8, 16), dtype='bfloat16')
GPU_DRY = dict(batch=4, length=8192, heads=16, mode='forward+backward')  # compiles gathered
MODES = ('forward', 'forward+backward')


def _estimate(B, L, D, H, N, mode, itemsize, extra=0) -> int:
  """Bytes of one attention call over N computed heads: the parameters, x and y, the
  q/k/v/o activations and the float32 scores B N L L (kept, with the probabilities at the
  compute dtype, for the backward), plus `extra` (per-sequence weight copies)."""
  params, x = (4 * D * D + 4 * D) * itemsize, B * L * D * itemsize
  qkvo, scores = 4 * B * L * N * (D // H) * itemsize, B * N * L * L * 4
  if mode == 'forward':
    return params + 2 * x + qkvo + scores + extra
  return 2 * (params + x) + 2 * qkvo + 2 * scores + B * N * L * L * itemsize + 2 * extra


def _gpu_candidate(make_layer, call, B, L, D, mode, dtype, estimate) -> Candidate:
  def build():
    graphdef, params, rest = nnx.split(nnx.eval_shape(make_layer), nnx.Param, ...)

    def forward(params, rest, x):
      return call(nnx.merge(graphdef, params, rest, copy=True), x)
    x = jax.ShapeDtypeStruct((B, L, D), dtype)
    if mode == 'forward':
      fn, args = jax.jit(lambda p, r, x, dy: forward(p, r, x)), (params, rest, x, None)
    else:  # the gradients for the cotangent dy, an input (not a constant XLA would fold)
      fn = jax.jit(lambda p, r, x, dy: jax.vjp(lambda p, x: forward(p, r, x), p, x)[1](dy))
      args = (params, rest, x, x)

    def make_call(compiled):
      _, params, rest = nnx.split(make_layer(), nnx.Param, ...)
      x = jax.random.normal(jax.random.key(0), (B, L, D), dtype)
      dy = None if mode == 'forward' else jax.random.normal(jax.random.key(1), (B, L, D), dtype)
      return lambda: compiled(params, rest, x, dy)
    return fn, args, make_call
  return Candidate(estimate, build)


def gpu_candidates(B, L, H, mode) -> dict[str, Candidate]:
  """nnx_mha, dense, and masked, gathered and grouped at K = H/4, at [B, L, D] in bf16."""
  D, dtype = GPU['features'], jnp.dtype(GPU['dtype'])
  K, Dh, e = H // 4, D // H, jnp.dtype(GPU['dtype']).itemsize
  common = dict(dtype=dtype, param_dtype=dtype)
  est = lambda N, extra=0: _estimate(B, L, D, H, N, mode, e, extra)
  gated = lambda: gating.GatedMultiHeadAttention(H, D, gate='topk', active_heads=K,
                                                 deterministic=True, rngs=nnx.Rngs(0),
                                                 **common)
  return {
      'nnx_mha': _gpu_candidate(
          lambda: nnx.MultiHeadAttention(H, D, decode=False, rngs=nnx.Rngs(0), **common),
          lambda layer, x: layer(x), B, L, D, mode, dtype, est(H)),
      'dense': _gpu_candidate(
          lambda: gating.GatedMultiHeadAttention(H, D, gate='dense', rngs=nnx.Rngs(0), **common),
          lambda layer, x: layer(x), B, L, D, mode, dtype, est(H)),
      f'masked_k{K}': _gpu_candidate(gated, lambda layer, x: layer(x, path='masked'),
                                     B, L, D, mode, dtype, est(H)),
      f'gathered_k{K}': _gpu_candidate(gated, lambda layer, x: layer(x, path='gathered'),
                                       B, L, D, mode, dtype, est(K, 4 * B * K * D * Dh * e)),
      f'grouped_k{K}': _gpu_candidate(gated, grouped_call, B, L, D, mode, dtype,
                                      est(K, 3 * B * K * L * D * e)),
  }


def run_gpu(settings: Settings) -> list[dict]:
  rows = []
  for B, L in GPU['shapes']:
    for H in GPU['heads']:
      for mode in MODES:
        dry = (B, L, H, mode) == tuple(GPU_DRY[k] for k in ('batch', 'length', 'heads', 'mode'))
        fields = dict(batch=B, length=L, features=GPU['features'], heads=H, K=H // 4,
                      dtype=GPU['dtype'], mode=mode)
        rows += run_table('attention', fields, gpu_candidates(B, L, H, mode), settings,
                          dry_compile=f'gathered_k{H // 4}' if dry else None)
  return rows


def format_gpu_table(rows: list[dict]) -> str:
  return format_rows(f'attention (D={GPU["features"]}, {GPU["dtype"]}): median ms [IQR], '
                     'ratio to dense (our layer, every head)', rows,
                     ('batch', 'length', 'heads', 'mode'))
