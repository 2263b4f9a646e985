"""The grouped matmul with its tiling made explicit: how the CPU runs `projection='grouped'`.

The grouped projections (compute.project_grouped) sort the M = B K (sequence, unit) pairs
by unit and multiply each unit's rows by that unit's weights with jax.lax.ragged_dot. GPU
and TPU have a kernel for it; the CPU has none, and JAX's generic lowering multiplies every
row by every unit's weights (U times the pairs' FLOPs). A grouped-matmul kernel tiles each
unit's rows into blocks of C rows; this module does that tiling in JAX, once, when the
pairs are fixed (at prefill, for cached decoding):

  the sorted pairs are cut into N tiles of C rows, every tile holding pairs of one unit
  only (a unit's last tile padded with empty rows). With n_u pairs of unit u the tiles
  needed are sum_u ceil(n_u / C) <= (M + U (C - 1)) / C, so N = ceil((M + U (C - 1)) / C)
  tiles always suffice (the spare ones are empty).

  tile t holds unit u_t and the pairs pair[t, c]; its weights W_{u_t} are gathered once
  (`tile_heads`, `tile_mlp`: N copies of a unit's weights, against the M of the gathered
  path), and one batched matmul computes every tile:

      y[t, c] = x_{seq(pair[t, c])} W_{u_t}      (an empty row reads zeros)

  then each pair takes its row back. The FLOPs are those of N C rows, against the pairs'
  M (the gathered path's, B K/U of every unit) and B U rows for computing every unit.

C = ceil(M / U) by default (`tile_rows`), the pairs a unit would hold were they spread
evenly: then M / C <= U and N <= 2U tiles, so the tiles hold at most twice the units'
weights whatever the batch (the gathered path: M = B K copies), and at most
U (C - 1) <= M padded rows. Against C = ceil(M / 2U) (at most 3U tiles) it decoded
as fast at B = 64, K = 2 of 8 and faster at B = 16 on this CPU (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gating.layers.compute import HeadWeights, MLPWeights, PairGroups, group_view, up_view


class PairTiles(NamedTuple):
  """N tiles of C rows over the M = B K pairs of `PairGroups` (see the module docstring).
  Pair m is (b, j) = (m // K, m % K); an empty row holds the pair index M."""
  pair_NC: jax.Array    # the pair in each tile row, [N C] (M: empty)
  row_M: jax.Array      # each pair's tile row, [M]
  units_N: jax.Array    # the unit of each tile, [N] (spare tiles: any unit, no rows)


def tile_rows(num_pairs: int, num_units: int) -> int:
  """The default C: ceil(M / U), the pairs per unit were they spread evenly; at least 1."""
  return max(1, -(-num_pairs // num_units))


def tile_count(num_pairs: int, num_units: int, rows: int) -> int:
  """N = ceil((M + U (C - 1)) / C): enough tiles of C rows for any split of M pairs over
  U units."""
  return -(-(num_pairs + num_units * (rows - 1)) // rows)


def tile_pairs(groups: PairGroups, num_units: int, rows: int | None = None) -> PairTiles:
  """The pairs of `groups` (sorted by unit) in tiles of `rows` (C; default `tile_rows`)
  rows, each tile one unit's."""
  M, U = groups.order_M.shape[0], num_units
  C = tile_rows(M, U) if rows is None else rows
  if C < 1:
    raise ValueError(f'a tile needs at least one row, got rows={C}')
  N = tile_count(M, U, C)
  padded_U = (groups.sizes_U + C - 1) // C * C        # each unit's rows, whole tiles
  end_U = jnp.cumsum(padded_U)
  start_U = jnp.cumsum(groups.sizes_U) - groups.sizes_U
  u_M = groups.units_M                                 # sorted position s -> its unit
  row_sorted_M = (end_U - padded_U)[u_M] + jnp.arange(M) - start_U[u_M]
  row_M = row_sorted_M[groups.rank_M].astype(jnp.int32)
  pair_NC = jnp.full((N * C,), M, jnp.int32).at[row_M].set(jnp.arange(M, dtype=jnp.int32))
  units_N = jnp.searchsorted(end_U, jnp.arange(N) * C, side='right')
  return PairTiles(pair_NC, row_M, jnp.minimum(units_N, U - 1).astype(jnp.int32))


class TiledHeadWeights(NamedTuple):
  """Every tile's head's weights (`tile_heads`): N of each projection."""
  wq_NxDxDh: jax.Array
  wk_NxDxDh: jax.Array
  wv_NxDxDh: jax.Array
  wo_NxDhxDo: jax.Array
  bq_NxDh: jax.Array | None
  bk_NxDh: jax.Array | None
  bv_NxDh: jax.Array | None


def _take(x_UxA, units_N):
  return None if x_UxA is None else x_UxA[units_N]


def tile_heads(w: HeadWeights, tiles: PairTiles) -> TiledHeadWeights:
  """The Q/K/V/O weights of every tile's head (one K/V head per query head, as the grouped
  projections need: compute.check_grouped_heads)."""
  per_head = lambda w_DxHxDh: w_DxHxDh.transpose(1, 0, 2)[tiles.units_N]
  return TiledHeadWeights(per_head(w.wq_DxHxDh), per_head(w.wk_DxHxDh),
                          per_head(w.wv_DxHxDh), w.wo_HxDhxDo[tiles.units_N],
                          _take(w.bq_HxDh, tiles.units_N), _take(w.bk_HxDh, tiles.units_N),
                          _take(w.bv_HxDh, tiles.units_N))


class TiledMLPWeights(NamedTuple):
  """Every tile's channel group's W1 columns, b1 entries and W2 rows (`tile_mlp`)."""
  w1_NxDxFg: jax.Array
  b1_NxFg: jax.Array | None
  w2_NxFgxD: jax.Array
  w3_NxDxFg: jax.Array | None = None    # a gated linear unit's up projection
  b3_NxFg: jax.Array | None = None


def tile_mlp(w: MLPWeights, tiles: PairTiles, num_groups: int) -> TiledMLPWeights:
  """The weights of every tile's channel group."""
  w1_DxGxFg, b1_GxFg, w2_GxFgxD = group_view(w, num_groups)
  columns = lambda w_DxGxFg: w_DxGxFg.transpose(1, 0, 2)[tiles.units_N]
  up = {}
  if w.w3_DxF is not None:
    w3_DxGxFg, b3_GxFg = up_view(w, num_groups)
    up = dict(w3_NxDxFg=columns(w3_DxGxFg), b3_NxFg=_take(b3_GxFg, tiles.units_N))
  return TiledMLPWeights(columns(w1_DxGxFg), _take(b1_GxFg, tiles.units_N),
                         w2_GxFgxD[tiles.units_N], **up)


def _tiles_to_pairs(y_NxCLxE, tiles: PairTiles, B: int, L: int):
  """Each pair's row back: [N, C L, E] -> [B, K, L, E]."""
  M = tiles.row_M.shape[0]
  y_MxLxE = y_NxCLxE.reshape(-1, L, y_NxCLxE.shape[-1])[tiles.row_M]
  return y_MxLxE.reshape(B, M // B, L, -1)


def _rows_in_tiles(x_BxLxD, tiles: PairTiles):
  """Each tile row's sequence's rows (zeros for an empty row): [B, L, D] -> [N, C L, D]."""
  B, L, D = x_BxLxD.shape
  K = tiles.row_M.shape[0] // B
  x_BplusxLxD = jnp.concatenate([x_BxLxD, jnp.zeros((1, L, D), x_BxLxD.dtype)])
  return x_BplusxLxD[tiles.pair_NC // K].reshape(tiles.units_N.shape[0], -1, D)  # M // K = B


def project_tiled(x_BxLxD, w_NxDxE, b_NxE, tiles: PairTiles, precision=None):
  """Each pair's unit, one batched matmul over the tiles: [B, L, D] -> [B, L, K, E].
  Equals compute.project_grouped (and project_gathered) on the same pairs."""
  B, L, _ = x_BxLxD.shape
  x_NxCLxD = _rows_in_tiles(x_BxLxD, tiles)
  y_NxCLxE = jnp.einsum('NTD,NDE->NTE', x_NxCLxD, w_NxDxE, precision=precision)
  if b_NxE is not None:
    y_NxCLxE = y_NxCLxE + b_NxE[:, None, :].astype(y_NxCLxE.dtype)
  return _tiles_to_pairs(y_NxCLxE, tiles, B, L).transpose(0, 2, 1, 3)


def output_tiled(o_BxLxKxE, weights_BxK, wo_NxExDo, bo_Do, tiles: PairTiles,
                 precision=None):
  """y_b = sum_j weights_bj o_bj Wo_idx_bj + bo, one batched matmul over the tiles
  (equals compute.output_grouped). -> y_BxLxDo."""
  B, L, K, E = o_BxLxKxE.shape
  N = tiles.units_N.shape[0]
  o_BxLxKxE = o_BxLxKxE * weights_BxK[:, None, :, None].astype(o_BxLxKxE.dtype)
  o_MxLxE = o_BxLxKxE.transpose(0, 2, 1, 3).reshape(B * K, L, E)
  o_MplusxLxE = jnp.concatenate([o_MxLxE, jnp.zeros((1, L, E), o_MxLxE.dtype)])
  o_NxCLxE = o_MplusxLxE[tiles.pair_NC].reshape(N, -1, E)
  y_NxCLxDo = jnp.einsum('NTE,NEO->NTO', o_NxCLxE, wo_NxExDo, precision=precision)
  y_BxLxDo = _tiles_to_pairs(y_NxCLxDo, tiles, B, L).sum(axis=1)
  return y_BxLxDo if bo_Do is None else y_BxLxDo + bo_Do.astype(y_BxLxDo.dtype)[None, None]


def mlp_tiled(x_BxLxD, w: TiledMLPWeights, tiles: PairTiles, weights_BxK, b2_D,
              activation=jax.nn.gelu, precision=None):
  """y_b = sum_j weights_bj act(x_b W1_g + b1_g) W2_g + b2 over each sequence's Kf groups
  g = idx_bj, one batched matmul per projection over the tiles, the hidden activations
  kept in the tiles between them (equals compute.mlp_grouped). -> y_BxLxD."""
  B, L, _ = x_BxLxD.shape
  x_NxCLxD = _rows_in_tiles(x_BxLxD, tiles)
  tile_bias = lambda b_NxFg: 0 if b_NxFg is None else b_NxFg[:, None, :]
  h_NxCLxFg = activation(jnp.einsum('NTD,NDF->NTF', x_NxCLxD, w.w1_NxDxFg,
                                    precision=precision) + tile_bias(w.b1_NxFg))
  if w.w3_NxDxFg is not None:     # gated linear unit: times the up projection
    h_NxCLxFg = h_NxCLxFg * (jnp.einsum('NTD,NDF->NTF', x_NxCLxD, w.w3_NxDxFg,
                                        precision=precision) + tile_bias(w.b3_NxFg))
  weights_M = jnp.concatenate([weights_BxK.reshape(-1), jnp.zeros((1,), weights_BxK.dtype)])
  gate_NxCL = jnp.repeat(weights_M[tiles.pair_NC], L).reshape(x_NxCLxD.shape[:2])  # empty: 0
  h_NxCLxFg = h_NxCLxFg * gate_NxCL[:, :, None].astype(h_NxCLxFg.dtype)
  y_NxCLxD = jnp.einsum('NTF,NFD->NTD', h_NxCLxFg, w.w2_NxFgxD, precision=precision)
  y_BxLxD = _tiles_to_pairs(y_NxCLxD, tiles, B, L).sum(axis=1)
  return y_BxLxD if b2_D is None else y_BxLxD + b2_D.astype(y_BxLxD.dtype)[None, None]
