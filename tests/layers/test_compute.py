import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gating.layers import compute

B, L, S, D, H, Dh = 3, 8, 6, 16, 4, 5


def weights(seed=0, bias=True):
  ks = jax.random.split(jax.random.key(seed), 8)
  n = lambda k, s: jax.random.normal(k, s) / np.sqrt(s[0])
  return compute.HeadWeights(
      n(ks[0], (D, H, Dh)), n(ks[1], (D, H, Dh)), n(ks[2], (D, H, Dh)), n(ks[3], (H, Dh, D)),
      *((n(ks[4], (H, Dh)), n(ks[5], (H, Dh)), n(ks[6], (H, Dh)), n(ks[7], (D,)))
        if bias else ()))


def reference(xq, xkv, w, weights_BxH):
  """Per-sequence, per-head loop: the math of DESIGN 4, written the slow way."""
  w = compute.HeadWeights(*(np.asarray(a, np.float64) for a in w))
  out = np.zeros((xq.shape[0], xq.shape[1], D))
  for b in range(xq.shape[0]):
    for h in range(H):
      q = xq[b] @ w.wq_DxHxDh[:, h] + w.bq_HxDh[h]
      k = xkv[b] @ w.wk_DxHxDh[:, h] + w.bk_HxDh[h]
      v = xkv[b] @ w.wv_DxHxDh[:, h] + w.bv_HxDh[h]
      logits = q @ k.T / np.sqrt(Dh)
      a = np.exp(logits - logits.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out[b] += weights_BxH[b, h] * (a @ v) @ w.wo_HxDhxDo[h]
  return out + w.bo_Do


@pytest.mark.parametrize('cross', [False, True])
def test_both_paths_equal_the_per_head_loop(cross):
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  xkv = jax.random.normal(jax.random.key(2), (B, S, D)) if cross else x
  w = weights()
  idx_BxK = jnp.array([[0, 2], [3, 1], [1, 2]])
  weights_BxK = jnp.array([[1.0, 0.5], [2.0, 1.0], [0.0, 1.0]])
  weights_BxH = jnp.zeros((B, H)).at[jnp.arange(B)[:, None], idx_BxK].set(weights_BxK)
  want = reference(np.asarray(x), np.asarray(xkv), w, np.asarray(weights_BxH))
  masked = compute.masked_attention(x, xkv, xkv, w, weights_BxH)
  gathered = compute.gathered_attention(x, xkv, xkv, w, idx_BxK, weights_BxK)
  np.testing.assert_allclose(masked, want, atol=1e-5)
  np.testing.assert_allclose(gathered, want, atol=1e-5)


def test_gathered_follows_a_per_head_mask():
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  w = weights(bias=False)
  mask_BxHxLxL = jax.random.bernoulli(jax.random.key(3), 0.7, (B, H, L, L)) | jnp.eye(L, dtype=bool)[None, None]
  idx_BxK = jnp.array([[0, 2], [3, 1], [1, 2]])
  weights_BxH = jnp.zeros((B, H)).at[jnp.arange(B)[:, None], idx_BxK].set(1.0)
  options = compute.AttendOptions(mask=mask_BxHxLxL)
  masked = compute.masked_attention(x, x, x, w, weights_BxH, options)
  gathered = compute.gathered_attention(x, x, x, w, idx_BxK, jnp.ones((B, 2)), options)
  np.testing.assert_allclose(masked, gathered, atol=1e-5)


def test_gather_heads_layout():
  w_DxHxDh = jnp.arange(D * H * Dh, dtype=jnp.float32).reshape(D, H, Dh)
  idx_BxK = jnp.array([[2, 0]])
  g = compute.gather_heads(w_DxHxDh, idx_BxK)
  assert g.shape == (1, D, 2, Dh)
  np.testing.assert_array_equal(g[0, :, 0], w_DxHxDh[:, 2])
  np.testing.assert_array_equal(g[0, :, 1], w_DxHxDh[:, 0])


def test_out_of_range_unit_indices_are_refused_where_they_can_be_read():
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  w = weights()
  bad_BxK = jnp.array([[0, 2], [3, 4], [1, 2]])           # head 4 of 4 heads (0..3)
  with pytest.raises(ValueError, match=r'idx_BxK holds head indices in \[0, 4\]; this '
                                       r'layer has 4 heads \(indices 0..3\)'):
    compute.gathered_attention(x, x, x, w, bad_BxK, jnp.ones((B, 2)))
  with pytest.raises(ValueError, match='in \\[-1, 3\\]'):
    compute.gathered_attention(x, x, x, w, bad_BxK.at[0, 0].set(-1).at[1, 1].set(0),
                               jnp.ones((B, 2)))
  with pytest.raises(ValueError, match='integer head indices'):
    compute.gathered_attention(x, x, x, w, bad_BxK.astype(jnp.float32), jnp.ones((B, 2)))
  mlp = compute.MLPWeights(jnp.ones((D, 8)), jnp.ones((8, D)))
  with pytest.raises(ValueError, match='this layer has 4 groups'):
    compute.gathered_mlp(x, mlp, jnp.array([[4], [0], [1]]), jnp.ones((B, 1)), 4)
  # Under jit the indices are not known: the gather clips them (documented), no error.
  y = jax.jit(lambda i: compute.gathered_attention(x, x, x, w, i, jnp.ones((B, 2))))(bad_BxK)
  clipped = compute.gathered_attention(x, x, x, w, jnp.minimum(bad_BxK, H - 1),
                                       jnp.ones((B, 2)))
  # (jit and eager sum in another order: float32 rounding, far below a wrong head's O(1))
  np.testing.assert_allclose(y, clipped, rtol=1e-5, atol=1e-5)


# -- grouped-query attention: G K/V heads, query head h reads KV head h // (H / G) ---------

G = 2   # with H = 4: two query heads per KV head


def gqa_weights(seed=0):
  ks = jax.random.split(jax.random.key(seed), 8)
  n = lambda k, s: jax.random.normal(k, s) / np.sqrt(s[0])
  return compute.HeadWeights(
      n(ks[0], (D, H, Dh)), n(ks[1], (D, G, Dh)), n(ks[2], (D, G, Dh)), n(ks[3], (H, Dh, D)),
      n(ks[4], (H, Dh)), n(ks[5], (G, Dh)), n(ks[6], (G, Dh)), n(ks[7], (D,)))


def gqa_reference(xq, xkv, w, weights_BxH):
  """Per-sequence, per-query-head loop; head h attends with KV head h // (H / G)."""
  w = compute.HeadWeights(*(np.asarray(a, np.float64) for a in w[:8]))
  out = np.zeros((xq.shape[0], xq.shape[1], D))
  for b in range(xq.shape[0]):
    for h in range(H):
      g = h // (H // G)
      q = xq[b] @ w.wq_DxHxDh[:, h] + w.bq_HxDh[h]
      k = xkv[b] @ w.wk_DxHxDh[:, g] + w.bk_HxDh[g]
      v = xkv[b] @ w.wv_DxHxDh[:, g] + w.bv_HxDh[g]
      logits = q @ k.T / np.sqrt(Dh)
      a = np.exp(logits - logits.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out[b] += weights_BxH[b, h] * (a @ v) @ w.wo_HxDhxDo[h]
  return out + w.bo_Do


def test_grouped_query_attention_on_both_paths_and_both_units_equals_the_loop():
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  w = gqa_weights()
  # any query heads (unit 'query_head'), and whole groups (heads 0, 1 | 2, 3: 'kv_group')
  for unit, idx_BxK in (('query_head', jnp.array([[0, 3], [2, 1], [1, 2]])),
                        ('kv_group', jnp.array([[0, 1], [2, 3], [2, 3]]))):
    weights_BxK = jnp.array([[1.0, 0.5], [2.0, 1.0], [0.0, 1.0]])
    weights_BxH = jnp.zeros((B, H)).at[jnp.arange(B)[:, None], idx_BxK].set(weights_BxK)
    want = gqa_reference(np.asarray(x), np.asarray(x), w, np.asarray(weights_BxH))
    np.testing.assert_allclose(compute.masked_attention(x, x, x, w, weights_BxH), want,
                               atol=1e-5)
    got = compute.gathered_attention(x, x, x, w, idx_BxK, weights_BxK, unit=unit)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_grouped_query_attention_equals_flax():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  mha = nnx.MultiHeadAttention(H, D, num_kv_heads=G, decode=False, rngs=nnx.Rngs(0))
  w = compute.HeadWeights(*(getattr(mha, n).kernel[...] for n in ('query', 'key', 'value', 'out')),
                          *(getattr(mha, n).bias[...] for n in ('query', 'key', 'value', 'out')))
  x = jax.random.normal(jax.random.key(2), (B, L, D))
  options = compute.AttendOptions(is_causal=True)
  want = mha(x, is_causal=True)
  np.testing.assert_allclose(compute.masked_attention(x, x, x, w, jnp.ones((B, H)), options),
                             want, atol=1e-5)
  every = jnp.broadcast_to(jnp.arange(H), (B, H))
  for unit in compute.UNITS:
    np.testing.assert_allclose(compute.gathered_attention(x, x, x, w, every, jnp.ones((B, H)),
                                                          options, unit=unit),
                               want, atol=1e-5)


def test_bad_grouped_query_weights_and_indices_are_refused():
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  w = gqa_weights()
  three = w._replace(wk_DxHxDh=jnp.ones((D, 3, Dh)), wv_DxHxDh=jnp.ones((D, 3, Dh)))
  for fn in (lambda: compute.masked_attention(x, x, x, three, jnp.ones((B, H))),
             lambda: compute.gathered_attention(x, x, x, three, jnp.zeros((B, 1), jnp.int32),
                                                jnp.ones((B, 1)))):
    with pytest.raises(ValueError, match='the key and value weights hold 3 and 3 heads, the '
                                         'query weights 4 .* divide the query heads'):
      fn()
  with pytest.raises(ValueError, match="unit='kv_group': idx_BxK must hold whole KV groups"):
    compute.gathered_attention(x, x, x, w, jnp.array([[0, 2], [2, 3], [0, 1]]),
                               jnp.ones((B, 2)), unit='kv_group')
  with pytest.raises(ValueError, match="K=3 query heads are not whole groups of 2"):
    compute.gathered_attention(x, x, x, w, jnp.array([[0, 1, 2]] * B), jnp.ones((B, 3)),
                               unit='kv_group')
  with pytest.raises(ValueError, match="unit must be one of"):
    compute.gathered_attention(x, x, x, w, jnp.array([[0, 1]] * B), jnp.ones((B, 2)),
                               unit='group')


def test_gathered_equals_masked_with_qk_norm_rope_and_three_kv_groups():
  """The options that only some models set (QK norm, RoPE at shifted positions) and three
  KV groups (with two, a wrong group index clips back to a right one): the gathered path
  equals the masked one on both units. A planted gathered-only bug in each (no QK norm, no
  RoPE, the query head's index as the KV group's) passed every test file here before."""
  h, g, dh = 6, 3, 4
  ks = jax.random.split(jax.random.key(5), 10)
  n = lambda k, s: jax.random.normal(k, s) / np.sqrt(s[0])
  w = compute.HeadWeights(
      n(ks[0], (D, h, dh)), n(ks[1], (D, g, dh)), n(ks[2], (D, g, dh)), n(ks[3], (h, dh, D)),
      n(ks[4], (h, dh)), n(ks[5], (g, dh)), n(ks[6], (g, dh)), n(ks[7], (D,)),
      1.0 + 0.5 * jax.random.normal(ks[8], (dh,)), 1.0 + 0.5 * jax.random.normal(ks[9], (dh,)))
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  positions_BxL = jnp.arange(L)[None, :] + jnp.array([[0], [5], [11]])
  options = compute.AttendOptions(rotary_base=10_000.0, positions_q_BxL=positions_BxL,
                                  positions_k_BxS=positions_BxL, is_causal=True)
  for unit, idx_BxK in (('query_head', jnp.array([[0, 5, 3, 1], [2, 4, 1, 0], [5, 4, 3, 2]])),
                        ('kv_group', jnp.array([[4, 5, 0, 1], [2, 3, 4, 5], [0, 1, 2, 3]]))):
    weights_BxK = jnp.array([[1.0, 0.5, 2.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.5, 1.0, 1.0, 1.0]])
    weights_BxH = jnp.zeros((B, h)).at[jnp.arange(B)[:, None], idx_BxK].set(weights_BxK)
    masked = compute.masked_attention(x, x, x, w, weights_BxH, options)
    gathered = compute.gathered_attention(x, x, x, w, idx_BxK, weights_BxK, options,
                                          unit=unit)
    np.testing.assert_allclose(gathered, masked, atol=1e-5)
