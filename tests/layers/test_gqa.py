"""Grouped-query attention in the gated layer: G K/V heads, two gate units ('kv_group',
'query_head'), every rule, shared units, masked == gathered, equality with flax, and
G = H exactly as before; also QK norm and Llama 3's RoPE scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating.layers import compute
from tests import hf_reference

B, L, D, H, G = 3, 12, 32, 8, 4   # two query heads per KV head
RULES_WITH_K = ['topk', 'hard_concrete', 'sigmoid', 'static']


def x_BxLxD(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, L, D))


def layer(unit=None, k=4, gate='topk', **kw):
  kw.setdefault('deterministic', True)
  return gating.GatedMultiHeadAttention(H, D, num_kv_heads=G, unit=unit, gate=gate,
                                        active_heads=k, rngs=nnx.Rngs(0), **kw)


def test_the_dense_gate_equals_flax_grouped_query_attention():
  mha = nnx.MultiHeadAttention(H, D, num_kv_heads=G, decode=False, rngs=nnx.Rngs(1))
  x = x_BxLxD()
  want = mha(x, is_causal=True)
  for unit in ('kv_group', 'query_head'):
    gated = gating.GatedMultiHeadAttention.from_dense(mha, gate='dense', unit=unit,
                                                      rngs=nnx.Rngs(0))
    assert gated.key.kernel[...].shape == (D, G, D // H)
    np.testing.assert_allclose(gated(x, is_causal=True), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('rule', RULES_WITH_K)
@pytest.mark.parametrize('unit,k,shared', [('kv_group', 4, 0), ('kv_group', 4, 2),
                                           ('query_head', 3, 0), ('query_head', 3, 1)])
def test_masked_equals_gathered_for_both_units(rule, unit, k, shared):
  attn = layer(unit, k, rule, shared_heads=shared)
  x = x_BxLxD()
  np.testing.assert_allclose(attn(x, path='masked'), attn(x, path='gathered'), atol=1e-5,
                             rtol=1e-5)
  gate = attn.gate(x)
  assert gate.weights_BxH.shape == (B, H) and gate.idx_BxK.shape == (B, k)
  if shared:
    assert (np.asarray(gate.weights_BxH)[:, :shared] == 1).all()


def test_a_kv_group_gate_opens_whole_groups_and_scores_groups():
  attn = layer('kv_group', 4)
  assert attn.router.logits.out_features == G and attn.num_units == G
  gate = attn.gate(x_BxLxD(3))
  idx = np.asarray(gate.idx_BxK).reshape(B, 2, 2)             # two groups of 2 heads
  np.testing.assert_array_equal(idx, (idx[..., :1] // 2) * 2 + np.arange(2))
  w = np.asarray(gate.weights_BxH).reshape(B, G, 2)
  assert (w == w[:, :, :1]).all()                             # a group opens as one
  heads = layer('query_head', 3)
  assert heads.router.logits.out_features == H and heads.num_units == H


def test_gathered_kv_group_computes_only_the_chosen_groups():
  """XLA's FLOP count: 'kv_group' at two groups computes half of the K/V projections that
  'query_head' at four heads computes (every group)."""
  x = x_BxLxD()

  def flops(unit):
    attn = layer(unit, 4)
    graphdef, state = nnx.split(attn)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, path='gathered'))
    return fn.lower(state, x).compile().cost_analysis()['flops']
  assert flops('kv_group') < flops('query_head')


def test_g_equal_to_h_changes_no_parameter_and_no_number():
  x = x_BxLxD()
  plain = gating.GatedMultiHeadAttention(4, D, gate='topk', active_heads=2, rngs=nnx.Rngs(0))
  explicit = gating.GatedMultiHeadAttention(4, D, num_kv_heads=4, gate='topk',
                                            active_heads=2, rngs=nnx.Rngs(0))
  paths = lambda m: [p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))]
  assert paths(plain) == paths(explicit)
  assert explicit.unit == 'query_head' and explicit.num_units == 4
  for path in ('masked', 'gathered'):
    np.testing.assert_array_equal(plain(x, path=path), explicit(x, path=path))


def test_qk_norm_rms_normalizes_every_head_of_queries_and_keys():
  attn = gating.GatedMultiHeadAttention(4, D, gate='dense', qk_norm=True, norm_eps=1e-6,
                                        use_bias=False, rngs=nnx.Rngs(0))
  attn.query_norm.scale[...] = jnp.linspace(0.5, 1.5, D // 4)
  x = x_BxLxD()
  w = attn.head_weights()
  q = jnp.einsum('BLD,DHE->BLHE', x, w.wq_DxHxDh)
  k = jnp.einsum('BLD,DHE->BLHE', x, w.wk_DxHxDh)
  v = jnp.einsum('BLD,DHE->BLHE', x, w.wv_DxHxDh)
  rms = lambda t, s: t / jnp.sqrt((t ** 2).mean(-1, keepdims=True) + 1e-6) * s[None, None, None]
  o = nnx.dot_product_attention(rms(q, w.q_norm_Dh), rms(k, w.k_norm_Dh), v)
  want = jnp.einsum('BLHE,HEO->BLO', o, w.wo_HxDhxDo)
  np.testing.assert_allclose(attn(x), want, atol=1e-5)
  assert {'query_norm', 'key_norm'} <= {str(p[0]) for p, _ in
                                        nnx.to_flat_state(nnx.state(attn, nnx.Param))}


def test_llama3_rope_scaling_matches_the_published_frequencies():
  scaling = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
             'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}
  config = {'rope_theta': 500000.0, 'rope_scaling': scaling}
  np.testing.assert_allclose(compute.rope_inv_freq(500000.0, 64, scaling),
                             hf_reference.inverse_frequencies(config, 64), rtol=1e-12)
  plain = compute.rope_inv_freq(500000.0, 64)
  assert plain != compute.rope_inv_freq(500000.0, 64, scaling)
  with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
    compute.rope_inv_freq(10000.0, 16, {'rope_type': 'yarn', 'factor': 2.0})
  with pytest.raises(ValueError, match='rotary_scaling needs rotary_base'):
    gating.GatedMultiHeadAttention(4, D, gate='dense', rotary_scaling=scaling,
                                   rngs=nnx.Rngs(0))


def test_an_out_bias_of_its_own():
  attn = gating.GatedMultiHeadAttention(4, D, gate='dense', use_bias=True, out_bias=False,
                                        rngs=nnx.Rngs(0))
  assert attn.query.bias is not None and attn.out.bias is None
