"""The grouped matmul as tiles (gating.layers.tiles), the CPU's projection='grouped'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating.layers import compute, decode, tiles

U, D, E = 4, 16, 8


def pairs():
  """B = 5 sequences' K = 2 of U = 4 units, unsorted; unit 1 chosen by nobody."""
  return jnp.array([[2, 0], [0, 2], [3, 0], [0, 3], [2, 3]], jnp.int32)


@pytest.mark.parametrize('rows', [1, 2, 3, 7, 11])
def test_every_pair_sits_once_in_a_tile_of_its_own_unit(rows):
  idx_BxK = pairs()
  B, K = idx_BxK.shape
  M = B * K
  t = tiles.tile_pairs(compute.group_pairs(idx_BxK, U), U, rows)
  N = -(-(M + U * (rows - 1)) // rows)
  assert t.units_N.shape == (N,) and t.pair_NC.shape == (N * rows,)
  pair_NxC = np.asarray(t.pair_NC).reshape(N, rows)
  units = np.asarray(idx_BxK).reshape(-1)
  np.testing.assert_array_equal(np.sort(pair_NxC[pair_NxC < M]), np.arange(M))
  for n in range(N):           # a tile holds one unit's pairs, and it is the tile's unit
    held = pair_NxC[n][pair_NxC[n] < M]
    assert (units[held] == int(t.units_N[n])).all()
  np.testing.assert_array_equal(np.asarray(t.pair_NC)[np.asarray(t.row_M)], np.arange(M))
  assert tiles.tile_count(M, U, rows) == N


def test_the_default_tile_holds_the_pairs_per_unit_and_at_most_2u_tiles():
  assert tiles.tile_rows(128, 8) == 16 and tiles.tile_rows(2, 8) == 1
  for M in (1, 2, 7, 16, 64, 128, 1000):
    assert tiles.tile_count(M, 8, tiles.tile_rows(M, 8)) <= 2 * 8
  with pytest.raises(ValueError, match='at least one row'):
    tiles.tile_pairs(compute.group_pairs(pairs(), U), U, 0)


def test_tiled_projections_and_mlp_equal_the_grouped_and_gathered_ones():
  keys = jax.random.split(jax.random.key(3), 12)
  idx_BxK = pairs()
  B, K = idx_BxK.shape
  L = 3
  x_BxLxD = jax.random.normal(keys[0], (B, L, D))
  weights_BxK = jax.random.uniform(keys[1], (B, K))
  groups = compute.group_pairs(idx_BxK, U)
  w = compute.HeadWeights(*(jax.random.normal(k, s) for k, s in zip(
      keys[2:], [(D, U, E), (D, U, E), (D, U, E), (U, E, D), (U, E), (U, E), (U, E), (D,)])))
  glu = compute.MLPWeights(*(jax.random.normal(k, s) for k, s in zip(
      keys[4:], [(D, 4 * E), (4 * E, D), (4 * E,), (D,), (D, 4 * E), (4 * E,)])))
  for rows in (1, 2, 5):
    t = tiles.tile_pairs(groups, U, rows)
    tw = tiles.tile_heads(w, t)
    for tiled_w, tiled_b, whole_w, whole_b in (   # Q, K and V, each with its own bias
        (tw.wq_NxDxDh, tw.bq_NxDh, w.wq_DxHxDh, w.bq_HxDh),
        (tw.wk_NxDxDh, tw.bk_NxDh, w.wk_DxHxDh, w.bk_HxDh),
        (tw.wv_NxDxDh, tw.bv_NxDh, w.wv_DxHxDh, w.bv_HxDh)):
      np.testing.assert_allclose(tiles.project_tiled(x_BxLxD, tiled_w, tiled_b, t),
                                 compute.project_grouped(x_BxLxD, whole_w, whole_b, groups),
                                 atol=1e-5, rtol=1e-5)
    o_BxLxKxE = jax.random.normal(keys[11], (B, L, K, E))
    np.testing.assert_allclose(
        tiles.output_tiled(o_BxLxKxE, weights_BxK, tw.wo_NxDhxDo, w.bo_Do, t),
        compute.output_gathered(o_BxLxKxE, weights_BxK,
                                compute.take_heads(w.wo_HxDhxDo, idx_BxK), w.bo_Do),
        atol=1e-4, rtol=1e-5)
    for mlp_w, act in ((glu._replace(w3_DxF=None, b3_F=None), jax.nn.gelu),
                       (glu, jax.nn.silu)):       # plain, and gated linear with biases
      got = tiles.mlp_tiled(x_BxLxD, tiles.tile_mlp(mlp_w, t, U), t, weights_BxK,
                            mlp_w.b2_D, act)
      np.testing.assert_allclose(got, compute.gathered_mlp(x_BxLxD, mlp_w, idx_BxK,
                                                           weights_BxK, U, act),
                                 atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_grouped_decoding_runs_ragged_dot_where_it_has_a_kernel_and_tiles_on_the_cpu(
    monkeypatch):
  """The same logits either way, and those of 'weights'; the state says which ran."""
  model = gating.GatedLM(48, num_layers=2, features=32, num_heads=4, max_length=16,
                         prefix_len=4, gate='topk', active_heads=2, path='gathered',
                         mlp_groups=4, active_groups=2, rngs=nnx.Rngs(0))
  prompts_BxL = jax.random.randint(jax.random.key(2), (3, 8), 0, 48)

  def greedy(projection):      # eagerly, so that each call reads GROUPED_TILES anew
    logits_BxLxV, state = decode.prefill(model, prompts_BxL, cache_length=12,
                                         projection=projection)
    out = [logits_BxLxV[:, -1]]
    for _ in range(3):
      logits_BxV, state = decode.decode_step(model, state, jnp.argmax(out[-1], axis=-1))
      out.append(logits_BxV)
    return jnp.stack(out), state

  on_cpu, state = greedy('grouped')
  assert state.layers[0].pair_tiles is not None and state.mlps[0].tiled is not None
  monkeypatch.setattr(decode, 'GROUPED_TILES', frozenset())   # as on a GPU or TPU
  ragged, state = greedy('grouped')
  assert state.layers[0].pair_tiles is None and state.mlps[0].tiled is None
  assert state.layers[0].groups is not None and state.projections == ('grouped',) * 2
  np.testing.assert_allclose(ragged, on_cpu, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(greedy('weights')[0], on_cpu, atol=2e-5, rtol=2e-5)
