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
  """Projection weights in flax.nnx.MultiHeadAttention's layout (biases may be None)."""
  wq_DxHxDh: jax.Array
  wk_DxHxDh: jax.Array
  wv_DxHxDh: jax.Array
  wo_HxDhxDo: jax.Array
  bq_HxDh: jax.Array | None = None
  bk_HxDh: jax.Array | None = None
  bv_HxDh: jax.Array | None = None
  bo_Do: jax.Array | None = None


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


def rotate(x_BxLxNxDh, positions_BxL, base: float):
  """RoPE, half-split form: each pair (x_i, x_{i+Dh/2}) is rotated by angle pos * base^(-2i/Dh)."""
  half = x_BxLxNxDh.shape[-1] // 2
  freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xF = (positions_BxL.astype(jnp.float32)[:, :, None] * freq_F[None, None, :])[:, :, None, :]
  sin, cos = jnp.sin(angle_BxLx1xF), jnp.cos(angle_BxLx1xF)
  x1, x2 = x_BxLxNxDh[..., :half].astype(jnp.float32), x_BxLxNxDh[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxDh.dtype)


def attend(q_BxLxNxDh, k_BxSxNxDh, v_BxSxNxDh, options: AttendOptions):
  """Softmax attention over N heads (N = H or K); flax's kernel, so it matches nnx MHA."""
  if options.rotary_base is not None:
    B, L, S = q_BxLxNxDh.shape[0], q_BxLxNxDh.shape[1], k_BxSxNxDh.shape[1]
    pos_q = options.positions_q_BxL
    pos_k = options.positions_k_BxS
    pos_q = jnp.broadcast_to(jnp.arange(L)[None, :], (B, L)) if pos_q is None else pos_q
    pos_k = jnp.broadcast_to(jnp.arange(S)[None, :], (B, S)) if pos_k is None else pos_k
    q_BxLxNxDh = rotate(q_BxLxNxDh, pos_q, options.rotary_base)
    k_BxSxNxDh = rotate(k_BxSxNxDh, pos_k, options.rotary_base)
  return nnx.dot_product_attention(
      q_BxLxNxDh, k_BxSxNxDh, v_BxSxNxDh, mask=options.mask, is_causal=options.is_causal,
      dropout_rng=options.dropout_rng, dropout_rate=options.dropout_rate,
      broadcast_dropout=options.broadcast_dropout, deterministic=options.deterministic,
      precision=options.precision)


def dropped_mean(weights_BxU, mean_UxD):
  """Dropped-unit compensation (FLAP, An et al. 2024): each unit's missing share of its
  mean contribution, sum_u (1 - w_bu) m_u -> [B, 1, D], added to a gated layer's output
  so that a closed unit (w = 0) contributes its mean m_u instead of 0 and an open one
  (w = 1) nothing extra."""
  return jnp.einsum('BU,UD->BD', 1.0 - weights_BxU.astype(mean_UxD.dtype), mean_UxD)[:, None]


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
  """y_BxLxDo = sum_h weights_bh o_bh Wo_h + bo: every head's output, weighted."""
  o_BxLxHxDh = o_BxLxHxDh * weights_BxH[:, None, :, None].astype(o_BxLxHxDh.dtype)
  return _add(jnp.einsum('BLHE,HEO->BLO', o_BxLxHxDh, wo_HxDhxDo, precision=precision), bo_Do)


def output_gathered(o_BxLxKxDh, weights_BxK, wo_BxKxDhxDo, bo_Do, precision=None):
  """y_BxLxDo = sum_j weights_bj o_bj Wo_bj + bo: each sequence's K heads, weighted."""
  o_BxLxKxDh = o_BxLxKxDh * weights_BxK[:, None, :, None].astype(o_BxLxKxDh.dtype)
  return _add(jnp.einsum('BLKE,BKEO->BLO', o_BxLxKxDh, wo_BxKxDhxDo, precision=precision),
              bo_Do)


def masked_attention(xq_BxLxD, xk_BxSxD, xv_BxSxD, w: HeadWeights, weights_BxH,
                     options: AttendOptions = AttendOptions()):
  """All H heads computed; head h's output scaled by weights_BxH[:, h]. -> y_BxLxDo."""
  p = options.precision
  q_BxLxHxDh = project_all(xq_BxLxD, w.wq_DxHxDh, w.bq_HxDh, p)
  k_BxSxHxDh = project_all(xk_BxSxD, w.wk_DxHxDh, w.bk_HxDh, p)
  v_BxSxHxDh = project_all(xv_BxSxD, w.wv_DxHxDh, w.bv_HxDh, p)
  o_BxLxHxDh = attend(q_BxLxHxDh, k_BxSxHxDh, v_BxSxHxDh, options)
  return output_all(o_BxLxHxDh, weights_BxH, w.wo_HxDhxDo, w.bo_Do, p)


def gathered_attention(xq_BxLxD, xk_BxSxD, xv_BxSxD, w: HeadWeights, idx_BxK, weights_BxK,
                       options: AttendOptions = AttendOptions()):
  """Only each sequence's K heads idx_BxK computed, scaled by weights_BxK. -> y_BxLxDo.

  A mask with a head axis of size H is gathered to the K heads like the weights. Concrete
  indices outside [0, H) are refused; under jit they are clipped (see `check_indices`).
  """
  check_indices(idx_BxK, w.wq_DxHxDh.shape[1])
  p = options.precision
  if options.mask is not None and options.mask.shape[-3] != 1:
    B, L, S, H = xq_BxLxD.shape[0], xq_BxLxD.shape[1], xk_BxSxD.shape[1], w.wq_DxHxDh.shape[1]
    mask_BxHxLxS = jnp.broadcast_to(options.mask, (B, H, L, S))
    options = options._replace(
        mask=jnp.take_along_axis(mask_BxHxLxS, idx_BxK[:, :, None, None], axis=1))
  q_BxLxKxDh = project_gathered(xq_BxLxD, gather_heads(w.wq_DxHxDh, idx_BxK),
                                take_heads(w.bq_HxDh, idx_BxK), p)
  k_BxSxKxDh = project_gathered(xk_BxSxD, gather_heads(w.wk_DxHxDh, idx_BxK),
                                take_heads(w.bk_HxDh, idx_BxK), p)
  v_BxSxKxDh = project_gathered(xv_BxSxD, gather_heads(w.wv_DxHxDh, idx_BxK),
                                take_heads(w.bv_HxDh, idx_BxK), p)
  o_BxLxKxDh = attend(q_BxLxKxDh, k_BxSxKxDh, v_BxSxKxDh, options)
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
  """The MLP's weights in nnx.Linear's layout (kernels [in, out]; biases may be None)."""
  w1_DxF: jax.Array
  w2_FxD: jax.Array
  b1_F: jax.Array | None = None
  b2_D: jax.Array | None = None


def group_view(w: MLPWeights, num_groups: int):
  """(w1_DxGxFg, b1_GxFg, w2_GxFgxD): the weights split into G contiguous channel groups."""
  D, F = w.w1_DxF.shape
  Fg = F // num_groups
  b1_GxFg = None if w.b1_F is None else w.b1_F.reshape(num_groups, Fg)
  return (w.w1_DxF.reshape(D, num_groups, Fg), b1_GxFg,
          w.w2_FxD.reshape(num_groups, Fg, w.w2_FxD.shape[1]))


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
  h_BxLxF = _add(jnp.einsum('BLD,DF->BLF', x_BxLxD, w.w1_DxF, precision=precision), w.b1_F)
  scale_BxF = jnp.repeat(weights_BxG, F // num_groups, axis=-1)
  h_BxLxF = activation(h_BxLxF) * scale_BxF[:, None, :].astype(h_BxLxF.dtype)
  return _add(jnp.einsum('BLF,FD->BLD', h_BxLxF, w.w2_FxD, precision=precision), w.b2_D)


class GatheredMLPWeights(NamedTuple):
  """The MLP weights of each sequence's Kf groups, gathered once (see `gather_mlp`)."""
  w1_BxDxKxFg: jax.Array
  b1_BxKxFg: jax.Array | None
  w2_BxKxFgxD: jax.Array


def gather_mlp(w: MLPWeights, idx_BxK, num_groups: int) -> GatheredMLPWeights:
  """Each sequence's Kf groups idx_BxK: the W1 columns w1_DxGxFg -> w1_BxDxKxFg, the b1
  entries b1_GxFg -> b1_BxKxFg (None stays None) and the W2 rows w2_GxFgxD -> w2_BxKxFgxD.
  Reads B Kf / G of W1, b1 and W2's bytes. Concrete indices outside [0, G) are refused;
  under jit they are clipped (see `check_indices`)."""
  check_indices(idx_BxK, num_groups, unit='group')
  w1_DxGxFg, b1_GxFg, w2_GxFgxD = group_view(w, num_groups)
  b1_BxKxFg = None if b1_GxFg is None else jnp.take(b1_GxFg, idx_BxK, axis=0, mode='clip')
  return GatheredMLPWeights(gather_groups(w1_DxGxFg, idx_BxK), b1_BxKxFg,
                            jnp.take(w2_GxFgxD, idx_BxK, axis=0, mode='clip'))


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
  h_BxLxC = jnp.einsum('BLD,BDC->BLC', x_BxLxD, g.w1_BxDxKxFg.reshape(B, D, K * Fg),
                       precision=precision)
  if g.b1_BxKxFg is not None:
    h_BxLxC = h_BxLxC + g.b1_BxKxFg.reshape(B, 1, K * Fg)
  scale_BxC = jnp.repeat(weights_BxK, Fg, axis=-1)
  h_BxLxC = activation(h_BxLxC) * scale_BxC[:, None, :].astype(h_BxLxC.dtype)
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
