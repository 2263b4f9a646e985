"""The two compute paths of gated attention and of the gated MLP, as pure functions (no
modules, no state). The MLP's channel groups are at the end of this file.

With o_bh head h's attention output for sequence b and w_bh its gate weight:

  masked:    y_b = sum_h  w_bh  o_bh Wo_h + bo             every head computed
  gathered:  y_b = sum_j  w_b,idx_bj  o_b,idx_bj Wo_idx_bj + bo   only K heads computed

The gathered path gathers the Q/K/V/O weights of each sequence's K heads,
[D, H, Dh] -> [B, D, K, Dh], so its projection and attention FLOPs and its K/V
activations scale as K/H. The gather itself reads B K/H times a layer's weight bytes:
it pays when L is long (training, prefill) and loses for one-token decode steps with
B > H/K, where `decode.py` projects with the full weights and gathers activations instead.

Contract: masked equals gathered when the gate has the same K heads open with the same
weights; with all weights 1, masked equals `flax.nnx.MultiHeadAttention` with the same
weights (the attention itself is `flax.nnx.dot_product_attention`, which calls
`jax.nn.dot_product_attention` when there is no dropout, and an explicit softmax with
dropout otherwise).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class HeadWeights(NamedTuple):
  """Projection weights in flax.nnx.MultiHeadAttention's layout (biases may be None).

  With grouped-query attention the key and value weights hold G heads (`wk_DxHxDh` is
  then [D, G, Dh], `bk_HxDh` [G, Dh]), G a divisor of the H query heads: query head h
  reads KV head h // (H / G), as in flax and Hugging Face. `q_norm_Dh` and `k_norm_Dh`
  (Qwen3's QK norm) are the scales of an RMSNorm over each head of the queries and keys,
  applied before RoPE; None: none.
  """
  wq_DxHxDh: jax.Array
  wk_DxHxDh: jax.Array
  wv_DxHxDh: jax.Array
  wo_HxDhxDo: jax.Array
  bq_HxDh: jax.Array | None = None
  bk_HxDh: jax.Array | None = None
  bv_HxDh: jax.Array | None = None
  bo_Do: jax.Array | None = None
  q_norm_Dh: jax.Array | None = None
  k_norm_Dh: jax.Array | None = None

  @property
  def num_heads(self) -> int:
    return self.wq_DxHxDh.shape[1]

  @property
  def num_kv_heads(self) -> int:
    return self.wk_DxHxDh.shape[1]


def check_kv_heads(w: HeadWeights) -> int:
  """H / G, the query heads per KV head; a ValueError unless the K/V weights hold G heads
  with G a divisor of the H query heads (and the output weights H)."""
  H, G = w.num_heads, w.num_kv_heads
  if w.wv_DxHxDh.shape[1] != G or H % G or w.wo_HxDhxDo.shape[0] != H:
    raise ValueError(f'the key and value weights hold {G} and {w.wv_DxHxDh.shape[1]} heads, '
                     f'the query weights {H} and the output weights {w.wo_HxDhxDo.shape[0]}: '
                     'the K/V heads must be equal in number and divide the query heads '
                     '(grouped-query attention), and the output weights match the queries')
  return H // G


class AttendOptions(NamedTuple):
  """Arguments of the attention kernel that are the same for both paths.

  With `rotary_base` set, queries and keys are rotated by their positions (RoPE, Su et
  al. 2021) before the dot product: positions_q_BxL and positions_k_BxS (default arange).
  """
  mask: jax.Array | None = None      # boolean, broadcastable to [B, N, L, S]
  is_causal: bool = False
  dropout_rate: float = 0.0
  dropout_rng: jax.Array | None = None
  broadcast_dropout: bool = True
  deterministic: bool = True
  precision: jax.lax.PrecisionLike = None
  rotary_base: float | None = None
  positions_q_BxL: jax.Array | None = None
  positions_k_BxS: jax.Array | None = None
  rotary_inv_freq: tuple[float, ...] | None = None   # RoPE inverse frequencies (Dh/2);
                                                     # None: base^(-2i/Dh)
  norm_eps: float = 1e-6                             # of the QK norm (HeadWeights.q_norm_Dh)
  logit_scale: float | None = None   # logits = s q.k; None: Dh ** -0.5 (Gemma sets its own)
  soft_cap: float | None = None      # logits -> c tanh(logits / c) before the mask (Gemma 2)


def rotate(x_BxLxNxDh, positions_BxL, base: float, inv_freq=None):
  """RoPE, half-split form (Hugging Face's `rotate_half`): each pair (x_i, x_{i+Dh/2}) is
  rotated by angle pos * f_i, f_i = base^(-2i/Dh), or the given inverse frequencies
  `inv_freq` (Dh/2 of them: a rescaled RoPE such as Llama 3's)."""
  half = x_BxLxNxDh.shape[-1] // 2
  freq_F = (base ** (-jnp.arange(half, dtype=jnp.float32) / half) if inv_freq is None
            else jnp.asarray(inv_freq, jnp.float32))
  angle_BxLx1xF = (positions_BxL.astype(jnp.float32)[:, :, None] * freq_F[None, None, :])[:, :, None, :]
  sin, cos = jnp.sin(angle_BxLx1xF), jnp.cos(angle_BxLx1xF)
  x1, x2 = x_BxLxNxDh[..., :half].astype(jnp.float32), x_BxLxNxDh[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxDh.dtype)


def rope_inv_freq(base: float, head_dim: int, scaling=None) -> tuple[float, ...]:
  """RoPE's Dh/2 inverse frequencies f_i = base^(-2i/Dh), rescaled by `scaling` (a
  mapping in Hugging Face's `rope_scaling` form), as a tuple. Supported: None, and Llama
  3's rope_type 'llama3' (factor, low_freq_factor, high_freq_factor,
  original_max_position_embeddings): wavelengths 2 pi / f_i longer than
  original / low_freq_factor are divided by `factor`, shorter than original /
  high_freq_factor kept, and those between interpolated smoothly. Anything else is a
  ValueError naming it."""
  inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return tuple(float(f) for f in inv)
  kind = scaling.get('rope_type', scaling.get('type'))
  if kind != 'llama3':
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: None, 'llama3')")
  missing = [k for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                         'original_max_position_embeddings') if k not in scaling]
  if missing:
    raise ValueError(f"rope scaling 'llama3' needs {missing}")
  factor, low, high = (float(scaling[k]) for k in ('factor', 'low_freq_factor',
                                                   'high_freq_factor'))
  old = float(scaling['original_max_position_embeddings'])
  wavelen = 2 * np.pi / inv
  smooth = (old / wavelen - low) / (high - low)
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  middle = (wavelen >= old / high) & (wavelen <= old / low)
  inv = np.where(middle, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  return tuple(float(f) for f in inv)


def rms_norm_heads(x_BxLxNxDh, scale_Dh, eps: float):
  """RMSNorm over each head's Dh features (Qwen3's QK norm): x / sqrt(mean(x^2) + eps) s,
  computed in float32."""
  x = x_BxLxNxDh.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  scale = scale_Dh.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return (x * scale).astype(x_BxLxNxDh.dtype)


def attend(q_BxLxNxDh, k_BxSxNxDh, v_BxSxNxDh, options: AttendOptions, w=None):
  """Softmax attention of N query heads over M key/value heads (N = H or K; M = N, or G
  or the chosen groups with grouped-query attention: query head n reads KV head
  n // (N / M)); flax's kernel, so it matches nnx MHA. The QK norm of `w` (HeadWeights),
  if any, then RoPE are applied to the queries and keys first."""
  if w is not None and w.q_norm_Dh is not None:
    q_BxLxNxDh = rms_norm_heads(q_BxLxNxDh, w.q_norm_Dh, options.norm_eps)
    k_BxSxNxDh = rms_norm_heads(k_BxSxNxDh, w.k_norm_Dh, options.norm_eps)
  if options.rotary_base is not None:
    B, L, S = q_BxLxNxDh.shape[0], q_BxLxNxDh.shape[1], k_BxSxNxDh.shape[1]
    pos_q = options.positions_q_BxL
    pos_k = options.positions_k_BxS
    pos_q = jnp.broadcast_to(jnp.arange(L)[None, :], (B, L)) if pos_q is None else pos_q
    pos_k = jnp.broadcast_to(jnp.arange(S)[None, :], (B, S)) if pos_k is None else pos_k
    q_BxLxNxDh = rotate(q_BxLxNxDh, pos_q, options.rotary_base, options.rotary_inv_freq)
    k_BxSxNxDh = rotate(k_BxSxNxDh, pos_k, options.rotary_base, options.rotary_inv_freq)
  if options.logit_scale is not None:   # the kernel scales by Dh ** -0.5 itself
    q_BxLxNxDh = q_BxLxNxDh * jnp.asarray(options.logit_scale * q_BxLxNxDh.shape[-1] ** 0.5,
                                          q_BxLxNxDh.dtype)
  if options.soft_cap is not None:
    return soft_capped_attention(q_BxLxNxDh, k_BxSxNxDh, v_BxSxNxDh, options)
  return nnx.dot_product_attention(
      q_BxLxNxDh, k_BxSxNxDh, v_BxSxNxDh, mask=options.mask, is_causal=options.is_causal,
      dropout_rng=options.dropout_rng, dropout_rate=options.dropout_rate,
      broadcast_dropout=options.broadcast_dropout, deterministic=options.deterministic,
      precision=options.precision)


def soft_capped_attention(q_BxLxNxDh, k_BxSxMxDh, v_BxSxMxDh, options: AttendOptions):
  """Attention with capped logits (Gemma 2): a = softmax(mask(c tanh(q.k Dh^-1/2 / c))),
  o = a v, c = options.soft_cap; query head n reads KV head n // (N / M). No dropout."""
  if options.dropout_rate > 0 and not options.deterministic:
    raise ValueError('soft-capped attention has no dropout (Gemma has none)')
  N, M, L, S = q_BxLxNxDh.shape[2], k_BxSxMxDh.shape[2], q_BxLxNxDh.shape[1], k_BxSxMxDh.shape[1]
  k_BxSxNxDh = jnp.repeat(k_BxSxMxDh, N // M, axis=2)
  v_BxSxNxDh = jnp.repeat(v_BxSxMxDh, N // M, axis=2)
  logits_BxNxLxS = jnp.einsum('BLNE,BSNE->BNLS', q_BxLxNxDh, k_BxSxNxDh,
                              precision=options.precision) * q_BxLxNxDh.shape[-1] ** -0.5
  cap = options.soft_cap
  logits_BxNxLxS = jnp.tanh(logits_BxNxLxS.astype(jnp.float32) / cap) * cap
  mask = options.mask
  if options.is_causal:
    causal_LxS = jnp.tril(jnp.ones((L, S), bool))   # as jax.nn.dot_product_attention
    mask = causal_LxS if mask is None else jnp.logical_and(mask, causal_LxS)
  if mask is not None:
    logits_BxNxLxS = jnp.where(mask, logits_BxNxLxS, jnp.finfo(jnp.float32).min)
  probs_BxNxLxS = jax.nn.softmax(logits_BxNxLxS, axis=-1).astype(v_BxSxNxDh.dtype)
  return jnp.einsum('BNLS,BSNE->BLNE', probs_BxNxLxS, v_BxSxNxDh, precision=options.precision)


def dropped_mean(weights_BxU, mean_UxD):
  """Dropped-unit compensation (FLAP, An et al. 2024): each unit's missing share of its
  mean contribution, sum_u (1 - w_bu) m_u -> [B, 1, D], added to a gated layer's output
  so that a closed unit (w = 0) contributes its mean m_u instead of 0 and an open one
  (w = 1) nothing extra. A per-token gate's weights_BxLxU give it per token: [B, L, D]."""
  missing = jnp.einsum('...U,UD->...D', 1.0 - weights_BxU.astype(mean_UxD.dtype), mean_UxD)
  return missing[:, None] if weights_BxU.ndim == 2 else missing


def check_indices(idx_BxK, num_units: int, name: str = 'idx_BxK',
                  unit: str = 'head') -> None:
  """A ValueError unless concrete unit indices are ints in [0, num_units). Traced ones
  (under jit) cannot be read and pass unchecked: there the gathers clip an out-of-range
  index to [0, num_units - 1] (jnp.take's mode='clip'), silently. The layers' own gates
  are always in range (top-k over the units)."""
  if not jnp.issubdtype(jnp.result_type(idx_BxK), jnp.integer):
    raise ValueError(f'{name} must hold integer {unit} indices, got dtype '
                     f'{jnp.result_type(idx_BxK)}')
  if isinstance(idx_BxK, jax.core.Tracer) or jnp.size(idx_BxK) == 0:
    return
  values = np.asarray(idx_BxK)
  if values.min() < 0 or values.max() >= num_units:
    raise ValueError(f'{name} holds {unit} indices in [{values.min()}, {values.max()}]; '
                     f'this layer has {num_units} {unit}s (indices 0..{num_units - 1})')


def _add(x, bias):
  """x + bias, the bias broadcast over x's leading axes (explicitly: no rank promotion)."""
  if bias is None:
    return x
  return x + bias.reshape((1,) * (x.ndim - bias.ndim) + bias.shape)


def project_all(x_BxLxD, w_DxHxDh, b_HxDh, precision=None):
  """Every head: [B, L, D] x [D, H, Dh] -> [B, L, H, Dh]."""
  return _add(jnp.einsum('BLD,DHE->BLHE', x_BxLxD, w_DxHxDh, precision=precision), b_HxDh)


def gather_heads(w_DxHxDh, idx_BxK):
  """Each sequence's heads: [D, H, Dh] -> [B, D, K, Dh] (a clean batched-matmul layout)."""
  return jnp.take(w_DxHxDh, idx_BxK, axis=1, mode='clip').transpose(1, 0, 2, 3)


def project_gathered(x_BxLxD, w_BxDxKxDh, b_BxKxDh, precision=None):
  """Per-sequence heads: [B, L, D] x [B, D, K, Dh] -> [B, L, K, Dh]."""
  q_BxLxKxDh = jnp.einsum('BLD,BDKE->BLKE', x_BxLxD, w_BxDxKxDh, precision=precision)
  return q_BxLxKxDh if b_BxKxDh is None else q_BxLxKxDh + b_BxKxDh[:, None, :, :]


def take_heads(b_HxE, idx_BxK):
  """[H, ...] -> [B, K, ...] (biases, output weights); None stays None."""
  return None if b_HxE is None else jnp.take(b_HxE, idx_BxK, axis=0, mode='clip')


def output_all(o_BxLxHxDh, weights_BxH, wo_HxDhxDo, bo_Do, precision=None):
  """y_BxLxDo = sum_h weights_bh o_bh Wo_h + bo: every head's output, weighted (per token,
  w_blh, when the weights are weights_BxLxH: a per-token rule)."""
  w_BxLxH = weights_BxH if weights_BxH.ndim == 3 else weights_BxH[:, None, :]
  o_BxLxHxDh = o_BxLxHxDh * w_BxLxH[..., None].astype(o_BxLxHxDh.dtype)
  return _add(jnp.einsum('BLHE,HEO->BLO', o_BxLxHxDh, wo_HxDhxDo, precision=precision), bo_Do)


def output_gathered(o_BxLxKxDh, weights_BxK, wo_BxKxDhxDo, bo_Do, precision=None):
  """y_BxLxDo = sum_j weights_bj o_bj Wo_bj + bo: each sequence's K heads, weighted."""
  o_BxLxKxDh = o_BxLxKxDh * weights_BxK[:, None, :, None].astype(o_BxLxKxDh.dtype)
  return _add(jnp.einsum('BLKE,BKEO->BLO', o_BxLxKxDh, wo_BxKxDhxDo, precision=precision),
              bo_Do)


def masked_attention(xq_BxLxD, xk_BxSxD, xv_BxSxD, w: HeadWeights, weights_BxH,
                     options: AttendOptions = AttendOptions()):
  """All H heads computed; head h's output scaled by weights_BxH[:, h]. -> y_BxLxDo.
  With grouped-query attention every one of the G K/V heads is computed (`HeadWeights`)."""
  check_kv_heads(w)
  p = options.precision
  q_BxLxHxDh = project_all(xq_BxLxD, w.wq_DxHxDh, w.bq_HxDh, p)
  k_BxSxGxDh = project_all(xk_BxSxD, w.wk_DxHxDh, w.bk_HxDh, p)
  v_BxSxGxDh = project_all(xv_BxSxD, w.wv_DxHxDh, w.bv_HxDh, p)
  o_BxLxHxDh = attend(q_BxLxHxDh, k_BxSxGxDh, v_BxSxGxDh, options, w)
  return output_all(o_BxLxHxDh, weights_BxH, w.wo_HxDhxDo, w.bo_Do, p)


UNITS = ('query_head', 'kv_group')   # what a gate opens with grouped-query attention


def check_whole_groups(idx_BxK, group_size: int) -> None:
  """A ValueError unless concrete query-head indices come in whole KV groups, each
  group's `group_size` heads consecutive and in order (what unit='kv_group' gathers);
  traced ones pass unchecked."""
  K = idx_BxK.shape[-1]
  if K % group_size:
    raise ValueError(f"unit='kv_group': K={K} query heads are not whole groups of "
                     f'{group_size} (H / G)')
  if isinstance(idx_BxK, jax.core.Tracer):
    return
  idx = np.asarray(idx_BxK).reshape(idx_BxK.shape[0], K // group_size, group_size)
  expected = idx[..., :1] - idx[..., :1] % group_size + np.arange(group_size)
  if not (idx == expected).all():
    raise ValueError(f"unit='kv_group': idx_BxK must hold whole KV groups, each group's "
                     f'{group_size} query heads consecutive and in order')


def options_for_heads(options: AttendOptions, idx_BxK, H: int, B: int, L: int,
                      S: int) -> AttendOptions:
  """`options` for the K heads idx_BxK of H: a per-head mask [B, H, L, S] is taken at
  those heads; a mask shared by the heads ([..., 1, L, S], or [L, S] with no head axis)
  or none is kept as it is."""
  if options.mask is None or options.mask.ndim < 3 or options.mask.shape[-3] == 1:
    return options
  mask_BxHxLxS = jnp.broadcast_to(options.mask, (B, H, L, S))
  return options._replace(
      mask=jnp.take_along_axis(mask_BxHxLxS, idx_BxK[:, :, None, None], axis=1))


def gathered_attention(xq_BxLxD, xk_BxSxD, xv_BxSxD, w: HeadWeights, idx_BxK, weights_BxK,
                       options: AttendOptions = AttendOptions(), *, unit: str = 'query_head'):
  """Only each sequence's K query heads idx_BxK computed, scaled by weights_BxK.
  -> y_BxLxDo.

  With grouped-query attention (G < H K/V heads in `w`; query head h reads KV head
  h // (H / G)), `unit` says what was chosen:
    'query_head'  any K query heads, each against its group's K/V; the K/V of every group
                  are computed (Q/O and attention FLOPs scale as K/H, K/V projections not)
    'kv_group'    whole groups (idx_BxK: each chosen group's H/G heads, consecutive and in
                  order): only the chosen groups' K/V are computed, so K/V FLOPs and a KV
                  cache scale as K/H as well
  Without GQA (G = H) both are the per-head gather.

  A mask with a head axis of size H is gathered to the K heads like the weights. Concrete
  indices outside [0, H), or not in whole groups under 'kv_group', are refused; under jit
  indices are clipped (see `check_indices`).
  """
  if unit not in UNITS:
    raise ValueError(f'unit must be one of {UNITS}, got {unit!r}')
  group_size = check_kv_heads(w)
  H = w.num_heads
  check_indices(idx_BxK, H)
  p = options.precision
  options = options_for_heads(options, idx_BxK, H, *xq_BxLxD.shape[:2], xk_BxSxD.shape[1])
  q_BxLxKxDh = project_gathered(xq_BxLxD, gather_heads(w.wq_DxHxDh, idx_BxK),
                                take_heads(w.bq_HxDh, idx_BxK), p)
  if group_size == 1:
    kv_BxM = idx_BxK                                  # every head its own K/V
  elif unit == 'kv_group':
    check_whole_groups(idx_BxK, group_size)
    kv_BxM = idx_BxK[:, ::group_size] // group_size   # the chosen groups
  else:
    kv_BxM = None                                     # every group, picked per head below
  if kv_BxM is not None:
    k_BxSxMxDh = project_gathered(xk_BxSxD, gather_heads(w.wk_DxHxDh, kv_BxM),
                                  take_heads(w.bk_HxDh, kv_BxM), p)
    v_BxSxMxDh = project_gathered(xv_BxSxD, gather_heads(w.wv_DxHxDh, kv_BxM),
                                  take_heads(w.bv_HxDh, kv_BxM), p)
  else:
    group_Bx1xKx1 = (idx_BxK // group_size)[:, None, :, None]
    k_BxSxMxDh = jnp.take_along_axis(project_all(xk_BxSxD, w.wk_DxHxDh, w.bk_HxDh, p),
                                     group_Bx1xKx1, axis=2)
    v_BxSxMxDh = jnp.take_along_axis(project_all(xv_BxSxD, w.wv_DxHxDh, w.bv_HxDh, p),
                                     group_Bx1xKx1, axis=2)
  o_BxLxKxDh = attend(q_BxLxKxDh, k_BxSxMxDh, v_BxSxMxDh, options, w)
  return output_gathered(o_BxLxKxDh, weights_BxK, take_heads(w.wo_HxDhxDo, idx_BxK), w.bo_Do, p)


# -- gated MLP: channel groups ------------------------------------------------------------
#
# The MLP's hidden width F is split into G groups of Fg = F / G contiguous channels: group
# g holds channels g Fg .. (g+1) Fg - 1, i.e. the columns of W1 [D, F] and the rows of
# W2 [F, D] viewed as W1 [D, G, Fg] and W2 [G, Fg, D]. With w_bg group g's gate weight:
#
#   masked:    y_b = sum_g  w_bg  act(x_b W1_g + b1_g) W2_g + b2             every group
#   gathered:  y_b = sum_j  w_b,idx_bj  act(x_b W1_idx_bj + b1_idx_bj) W2_idx_bj + b2
#
# The gathered path gathers W1 columns, b1 entries and W2 rows of each sequence's Kf
# groups once, [D, G, Fg] -> [B, D, Kf, Fg], so its FLOPs scale as Kf / G. With all
# weights 1, masked equals the ungated MLP  act(x W1 + b1) W2 + b2  with the same weights.
# Einsum letters: G groups, K the Kf selected groups, C the Fg channels of a group.


class MLPWeights(NamedTuple):
  """The MLP's weights in nnx.Linear's layout (kernels [in, out]; biases may be None).

  With `w3_DxF` the MLP is gated linear (SwiGLU with act = silu, Llama's and Qwen's):
  h = act(x W1 + b1) * (x W3 + b3), W1 the gate projection and W3 the up projection; a
  channel group then holds the same F/G columns of W1 and W3 and rows of W2."""
  w1_DxF: jax.Array
  w2_FxD: jax.Array
  b1_F: jax.Array | None = None
  b2_D: jax.Array | None = None
  w3_DxF: jax.Array | None = None
  b3_F: jax.Array | None = None


def group_view(w: MLPWeights, num_groups: int):
  """(w1_DxGxFg, b1_GxFg, w2_GxFgxD): the weights split into G contiguous channel groups."""
  D, F = w.w1_DxF.shape
  Fg = F // num_groups
  b1_GxFg = None if w.b1_F is None else w.b1_F.reshape(num_groups, Fg)
  return (w.w1_DxF.reshape(D, num_groups, Fg), b1_GxFg,
          w.w2_FxD.reshape(num_groups, Fg, w.w2_FxD.shape[1]))


def up_view(w: MLPWeights, num_groups: int):
  """(w3_DxGxFg, b3_GxFg): a gated linear unit's up projection split as W1 is."""
  w3_DxGxFg, b3_GxFg, _ = group_view(w._replace(w1_DxF=w.w3_DxF, b1_F=w.b3_F), num_groups)
  return w3_DxGxFg, b3_GxFg


def gather_groups(w1_DxGxFg, idx_BxK):
  """Each sequence's groups: [D, G, Fg] -> [B, D, Kf, Fg] (a clean batched-matmul layout)."""
  return jnp.take(w1_DxGxFg, idx_BxK, axis=1, mode='clip').transpose(1, 0, 2, 3)


def masked_mlp(x_BxLxD, w: MLPWeights, weights_BxG, num_groups: int,
               activation=jax.nn.gelu, precision=None):
  """All G groups computed; group g's activations scaled by weights_BxG[:, g]. -> y_BxLxD.

  y = (act(x W1 + b1) * repeat(weights_BxG, F/G)) W2 + b2: group g is the channels
  [g F/G, (g+1) F/G). Both products are plain [., D] x [D, F] matmuls (a [D, G, F/G]
  einsum ran slower on CPU).
  """
  F = w.w1_DxF.shape[1]
  h_BxLxF = activation(_add(jnp.einsum('BLD,DF->BLF', x_BxLxD, w.w1_DxF,
                                       precision=precision), w.b1_F))
  if w.w3_DxF is not None:     # gated linear unit: times the up projection
    h_BxLxF = h_BxLxF * _add(jnp.einsum('BLD,DF->BLF', x_BxLxD, w.w3_DxF,
                                        precision=precision), w.b3_F)
  scale_BxF = jnp.repeat(weights_BxG, F // num_groups, axis=-1)
  h_BxLxF = h_BxLxF * scale_BxF[:, None, :].astype(h_BxLxF.dtype)
  return _add(jnp.einsum('BLF,FD->BLD', h_BxLxF, w.w2_FxD, precision=precision), w.b2_D)


class GatheredMLPWeights(NamedTuple):
  """The MLP weights of each sequence's Kf groups, gathered once (see `gather_mlp`)."""
  w1_BxDxKxFg: jax.Array
  b1_BxKxFg: jax.Array | None
  w2_BxKxFgxD: jax.Array
  w3_BxDxKxFg: jax.Array | None = None    # a gated linear unit's up projection
  b3_BxKxFg: jax.Array | None = None


def gather_mlp(w: MLPWeights, idx_BxK, num_groups: int) -> GatheredMLPWeights:
  """Each sequence's Kf groups idx_BxK: the W1 columns w1_DxGxFg -> w1_BxDxKxFg, the b1
  entries b1_GxFg -> b1_BxKxFg (None stays None) and the W2 rows w2_GxFgxD -> w2_BxKxFgxD.
  Reads B Kf / G of W1, b1 and W2's bytes. Concrete indices outside [0, G) are refused;
  under jit they are clipped (see `check_indices`)."""
  check_indices(idx_BxK, num_groups, unit='group')
  w1_DxGxFg, b1_GxFg, w2_GxFgxD = group_view(w, num_groups)
  take = lambda b_GxFg: None if b_GxFg is None else jnp.take(b_GxFg, idx_BxK, axis=0,
                                                             mode='clip')
  up = {}
  if w.w3_DxF is not None:     # the up projection's columns, as W1's
    w3_DxGxFg, b3_GxFg = up_view(w, num_groups)
    up = dict(w3_BxDxKxFg=gather_groups(w3_DxGxFg, idx_BxK), b3_BxKxFg=take(b3_GxFg))
  return GatheredMLPWeights(gather_groups(w1_DxGxFg, idx_BxK), take(b1_GxFg),
                            jnp.take(w2_GxFgxD, idx_BxK, axis=0, mode='clip'), **up)


def mlp_gathered_weights(x_BxLxD, g: GatheredMLPWeights, weights_BxK, b2_D,
                         activation=jax.nn.gelu, precision=None):
  """y_b = sum_j weights_bj act(x_b w1_bj + b1_bj) w2_bj + b2, with each sequence's Kf
  groups' weights already gathered (`gather_mlp`): x_BxLxD -> y_BxLxD. FLOPs scale as
  Kf / G; used by `gathered_mlp`, and by `decode` steps with weights gathered at prefill.

  The Kf groups are flattened into one hidden axis of Kf F/G channels (free reshapes), so
  both products are batched [L, D] x [D, Kf F/G] matmuls (faster on CPU than keeping a
  separate group axis).
  """
  B, D, K, Fg = g.w1_BxDxKxFg.shape

  def project(w_BxDxKxFg, b_BxKxFg):
    h_BxLxC = jnp.einsum('BLD,BDC->BLC', x_BxLxD, w_BxDxKxFg.reshape(B, D, K * Fg),
                         precision=precision)
    return h_BxLxC if b_BxKxFg is None else h_BxLxC + b_BxKxFg.reshape(B, 1, K * Fg)
  h_BxLxC = activation(project(g.w1_BxDxKxFg, g.b1_BxKxFg))
  if g.w3_BxDxKxFg is not None:     # gated linear unit: times the up projection
    h_BxLxC = h_BxLxC * project(g.w3_BxDxKxFg, g.b3_BxKxFg)
  scale_BxC = jnp.repeat(weights_BxK, Fg, axis=-1)
  h_BxLxC = h_BxLxC * scale_BxC[:, None, :].astype(h_BxLxC.dtype)
  return _add(jnp.einsum('BLC,BCD->BLD', h_BxLxC, g.w2_BxKxFgxD.reshape(B, K * Fg, -1),
                         precision=precision), b2_D)


def scatter_groups(weights_BxK, idx_BxK, num_groups: int):
  """weights_BxK of the groups idx_BxK back in their G slots, 0 elsewhere -> weights_BxG.
  With it, `masked_mlp` computes every group with the full weights and zeroes the closed
  groups' activations: it equals `gathered_mlp` on (idx_BxK, weights_BxK)."""
  B = weights_BxK.shape[0]
  return jnp.zeros((B, num_groups), weights_BxK.dtype).at[
      jnp.arange(B)[:, None], idx_BxK].add(weights_BxK)


def gathered_mlp(x_BxLxD, w: MLPWeights, idx_BxK, weights_BxK, num_groups: int,
                 activation=jax.nn.gelu, precision=None):
  """Only each sequence's Kf groups idx_BxK computed, scaled by weights_BxK. -> y_BxLxD."""
  return mlp_gathered_weights(x_BxLxD, gather_mlp(w, idx_BxK, num_groups), weights_BxK,
                              w.b2_D, activation, precision)


# -- grouped: one matmul per unit over every (sequence, unit) pair that chose it ----------
#
# With idx_BxK each sequence's K units (heads, or MLP channel groups), the M = B K pairs
# (b, j) are sorted by their unit u = idx_bj, so that the pairs of unit u are consecutive;
# then one ragged matmul (jax.lax.ragged_dot, the primitive of MaxText's MoE layers)
# multiplies each unit's rows by that unit's own weights:
#
#   q_bj = x_b Wq_u   for every pair, as ragged_dot(x_sorted [M L, D], Wq [U, D, E], L n_u)
#
# with n_u the pairs that chose unit u. Each unit's weights are read once whatever B, and
# the FLOPs are those of the gathered path (B K/H of every head). On TPU and GPU, JAX
# emits XLA's ragged-dot instruction (how fast XLA runs it there is for a device run to
# tell: experiments/device_check.sh); on the CPU, JAX lowers ragged_dot to its generic
# form, which multiplies every row by every unit's weights and masks the result: U times
# the FLOPs, K times those of computing every unit (docs/benchmarks.md has the figures).


class PairGroups(NamedTuple):
  """The M = B K (sequence, unit) pairs of idx_BxK sorted by unit (see `group_pairs`).
  Pair m is (b, j) = (m // K, m % K)."""
  order_M: jax.Array   # the pair at each sorted position
  rank_M: jax.Array    # each pair's sorted position (the inverse of order_M)
  units_M: jax.Array   # the unit of each sorted position (non-decreasing)
  sizes_U: jax.Array   # n_u: how many pairs chose each unit (int32, sum M)


def group_pairs(idx_BxK, num_units: int, unit: str = 'head') -> PairGroups:
  """The pairs of idx_BxK sorted by unit (stable: by sequence within a unit). Concrete
  indices outside [0, U) are refused; under jit they are clipped, as the gathers do
  (see `check_indices`)."""
  check_indices(idx_BxK, num_units, unit=unit)
  unit_M = jnp.clip(idx_BxK.reshape(-1), 0, num_units - 1).astype(jnp.int32)
  order_M = jnp.argsort(unit_M, stable=True).astype(jnp.int32)
  rank_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0],
                                                               dtype=jnp.int32))
  sizes_U = jnp.bincount(unit_M, length=num_units).astype(jnp.int32)
  return PairGroups(order_M, rank_M, unit_M[order_M], sizes_U)


def _ragged(x_MxLxI, w_UxIxO, groups: PairGroups, precision):
  """Sorted rows [M, L, I] times their unit's weights [U, I, O] -> [M, L, O]."""
  M, L, I = x_MxLxI.shape
  y = jax.lax.ragged_dot(x_MxLxI.reshape(M * L, I), w_UxIxO, groups.sizes_U * L,
                         precision=precision)
  return y.reshape(M, L, w_UxIxO.shape[-1])


def project_grouped(x_BxLxD, w_DxUxE, b_UxE, groups: PairGroups, precision=None):
  """Each pair's unit, one matmul per unit: [B, L, D] x [D, U, E] -> [B, L, K, E].

  Equals project_gathered(x, gather_heads(w, idx_BxK), take_heads(b, idx_BxK)) without
  materialising the per-sequence weights [B, D, K, E].
  """
  B = x_BxLxD.shape[0]
  M = groups.order_M.shape[0]
  K = M // B
  x_MxLxD = x_BxLxD[groups.order_M // K]
  y_MxLxE = _ragged(x_MxLxD, w_DxUxE.transpose(1, 0, 2), groups, precision)
  if b_UxE is not None:
    y_MxLxE = y_MxLxE + b_UxE[groups.units_M][:, None, :].astype(y_MxLxE.dtype)
  L, E = y_MxLxE.shape[1:]
  return y_MxLxE[groups.rank_M].reshape(B, K, L, E).transpose(0, 2, 1, 3)


def output_grouped(o_BxLxKxE, weights_BxK, wo_UxExDo, bo_Do, groups: PairGroups,
                   precision=None):
  """y_b = sum_j weights_bj o_bj Wo_idx_bj + bo, one matmul per unit over its pairs
  (equals output_gathered with take_heads(wo, idx_BxK)). -> y_BxLxDo."""
  B, L, K, E = o_BxLxKxE.shape
  o_BxLxKxE = o_BxLxKxE * weights_BxK[:, None, :, None].astype(o_BxLxKxE.dtype)
  o_MxLxE = o_BxLxKxE.transpose(0, 2, 1, 3).reshape(B * K, L, E)[groups.order_M]
  y_MxLxDo = _ragged(o_MxLxE, wo_UxExDo, groups, precision)
  y_BxKxLxDo = y_MxLxDo[groups.rank_M].reshape(B, K, L, -1)
  return _add(y_BxKxLxDo.sum(axis=1), bo_Do)


def grouped_attention(xq_BxLxD, xk_BxSxD, xv_BxSxD, w: HeadWeights, idx_BxK, weights_BxK,
                      options: AttendOptions = AttendOptions()):
  """gathered_attention computed by `project_grouped` and `output_grouped`: each head's
  Q/K/V/O weights used once for all the pairs that chose it, never gathered per sequence.
  -> y_BxLxDo, equal to gathered_attention on the same (idx_BxK, weights_BxK).
  Grouped-query weights (fewer K/V heads than query heads) are refused."""
  check_grouped_heads(w)
  H = w.wq_DxHxDh.shape[1]
  groups = group_pairs(idx_BxK, H)
  p = options.precision
  options = options_for_heads(options, idx_BxK, H, *xq_BxLxD.shape[:2], xk_BxSxD.shape[1])
  q_BxLxKxDh = project_grouped(xq_BxLxD, w.wq_DxHxDh, w.bq_HxDh, groups, p)
  k_BxSxKxDh = project_grouped(xk_BxSxD, w.wk_DxHxDh, w.bk_HxDh, groups, p)
  v_BxSxKxDh = project_grouped(xv_BxSxD, w.wv_DxHxDh, w.bv_HxDh, groups, p)
  o_BxLxKxDh = attend(q_BxLxKxDh, k_BxSxKxDh, v_BxSxKxDh, options, w)
  return output_grouped(o_BxLxKxDh, weights_BxK, w.wo_HxDhxDo, w.bo_Do, groups, p)


def check_grouped_heads(w: HeadWeights) -> None:
  """A ValueError unless every query head has its own K/V head: the grouped projections
  sort (sequence, head) pairs by query head, which grouped-query attention's shared K/V
  heads do not fit."""
  H, G = w.wq_DxHxDh.shape[1], w.wk_DxHxDh.shape[1]
  if G != H or w.wv_DxHxDh.shape[1] != H:
    raise ValueError(f'the grouped projections need one K/V head per query head; these '
                     f'weights hold {H} query and {G} K/V heads (grouped-query attention): use '
                     "gathered_attention, or projection='weights' or 'activations' when "
                     'decoding')


def mlp_grouped(x_BxLxD, w: MLPWeights, groups: PairGroups, weights_BxK, num_groups: int,
                activation=jax.nn.gelu, precision=None):
  """y_b = sum_j weights_bj act(x_b W1_g + b1_g) W2_g + b2 over each sequence's Kf groups
  g = idx_bj, one matmul per group over the pairs that chose it (W1 [D, G, Fg] and W2
  [G, Fg, D] read once whatever B). Equals gathered_mlp on the same groups. -> y_BxLxD."""
  w1_DxGxFg, b1_GxFg, w2_GxFgxD = group_view(w, num_groups)
  h_BxLxKxFg = activation(project_grouped(x_BxLxD, w1_DxGxFg, b1_GxFg, groups, precision))
  if w.w3_DxF is not None:     # gated linear unit: times the up projection
    w3_DxGxFg, b3_GxFg = up_view(w, num_groups)
    h_BxLxKxFg = h_BxLxKxFg * project_grouped(x_BxLxD, w3_DxGxFg, b3_GxFg, groups, precision)
  return output_grouped(h_BxLxKxFg, weights_BxK, w2_GxFgxD, w.b2_D, groups, precision)
