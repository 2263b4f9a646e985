import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import gating

V, L, D, H, P = 40, 16, 32, 4, 4


class TinyTransformer(nn.Module):
  """A Linen language model with one gated block in the middle."""

  @nn.compact
  def __call__(self, tokens_BxL, train: bool):
    x_BxLxD = nn.Embed(V, D)(tokens_BxL)
    x_BxLxD = gating.linen.gated_block(
        D, H, gate='topk', active_heads=2, noise='gumbel', router='prefix', prefix_len=P,
        dropout_rate=0.1, name='block')(x_BxLxD, is_causal=True, deterministic=not train)
    return nn.Dense(V)(nn.LayerNorm()(x_BxLxD))


def tokens(b=4, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, L), 0, V)


def test_a_linen_transformer_trains_one_step_and_reaches_the_gate_stats():
  model, x = TinyTransformer(), tokens()
  init = jax.jit(lambda rngs, x: model.init(rngs, x, False))
  variables = init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x)
  assert set(variables) == {'params', 'gate_stats', 'gate_temperature'}
  tx = optax.adam(1e-2)

  def loss_fn(params, rng):
    logits_BxLxV, updates = model.apply({**variables, 'params': params}, x, True,
                                        rngs={'dropout': rng}, mutable=['gate_stats'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV[:, P - 1:-1], x[:, P:])
    z_loss = updates['gate_stats']['block']['attention']['router_z_loss']
    return ce.mean() + 1e-3 * z_loss, updates['gate_stats']

  @jax.jit
  def train_step(params, opt_state, rng):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, stats, grads

  @jax.jit
  def eval_loss(params):
    logits_BxLxV = model.apply({**variables, 'params': params}, x, False)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV[:, P - 1:-1],
                                                           x[:, P:]).mean()

  params = variables['params']
  new_params, _, loss, stats, grads = train_step(params, tx.init(params), jax.random.key(2))
  assert np.isfinite(loss)
  usage = stats['block']['attention']['head_usage']
  assert usage.shape == (H,)
  np.testing.assert_allclose(usage.sum(), 2.0)
  router_grads = jax.tree.leaves(grads['block']['attention']['router'])
  assert max(float(jnp.abs(g).max()) for g in router_grads) > 0
  assert eval_loss(new_params) < eval_loss(params)


def test_linen_and_nnx_give_the_same_outputs_with_the_same_weights():
  x = jax.random.normal(jax.random.key(0), (3, L, D))
  mask = nnx.make_attention_mask(jnp.arange(L)[None] < jnp.array([[L], [9], [5]]),
                                 jnp.arange(L)[None] < jnp.array([[L], [9], [5]]))
  kwargs = dict(gate='topk', active_heads=2, path='gathered')
  attn = gating.GatedMultiHeadAttention(H, D, rngs=nnx.Rngs(0), **kwargs)
  params = nnx.to_pure_dict(nnx.state(attn, nnx.Param))
  linen_attn = gating.linen.gated_attention(H, D, **kwargs)
  np.testing.assert_allclose(linen_attn.apply({'params': params}, x, mask=mask),
                             attn(x, mask=mask), atol=1e-6)
  # And the other way: Linen's initial weights loaded into the NNX layer.
  variables = linen_attn.init(jax.random.key(5), x)
  state = nnx.state(attn, nnx.Param)
  nnx.replace_by_pure_dict(state, variables['params'])
  nnx.update(attn, state)
  np.testing.assert_allclose(linen_attn.apply(variables, x, mask=mask), attn(x, mask=mask),
                             atol=1e-6)

  lm_kwargs = dict(num_layers=2, features=D, num_heads=H, max_length=L, prefix_len=P,
                   positions='rotary', active_heads=[1, 3])
  lm = gating.GatedLM(V, rngs=nnx.Rngs(0), **lm_kwargs)
  linen_apply = jax.jit(lambda params, x: gating.linen.gated_lm(V, **lm_kwargs).apply(
      {'params': params}, x, deterministic=True))
  out = linen_apply(nnx.to_pure_dict(nnx.state(lm, nnx.Param)), tokens())
  assert isinstance(out, gating.LMOutput)
  want = nnx.jit(lambda lm, x: lm(x).logits_BxLxV)(lm, tokens())
  np.testing.assert_allclose(out.logits_BxLxV, want, atol=1e-5)


def test_stochastic_gates_draw_from_the_dropout_stream():
  attn = gating.linen.gated_attention(H, D, gate='hard_concrete', active_heads=2)
  x = jax.random.normal(jax.random.key(0), (3, L, D))
  with pytest.raises(ValueError, match="init needs rngs=\\{'params': key, 'dropout': key\\}"):
    attn.init(jax.random.key(0), x, deterministic=True)
  variables = attn.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x,
                        deterministic=True)
  sample = lambda seed: attn.apply(variables, x, deterministic=False,
                                   rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_array_equal(sample(3), sample(3))
  assert np.abs(np.asarray(sample(3) - sample(4))).max() > 1e-4
  with pytest.raises(ValueError, match="pass apply\\(..., rngs=\\{'dropout': key\\}\\)"):
    attn.apply(variables, x, deterministic=False)
  np.testing.assert_array_equal(attn.apply(variables, x, deterministic=True),
                                attn.apply(variables, x, deterministic=True))


def test_a_block_with_dropout_and_deterministic_unset_needs_the_dropout_stream():
  """Unset, the block's nnx.Dropout runs in training mode: without a 'dropout' rng it drew
  the same mask from the bridge's fixed key every call. Refused; deterministic=True runs."""
  block = gating.linen.gated_block(D, H, gate='topk', active_heads=2, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (2, L, D))
  variables = block.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x,
                         deterministic=True)
  with pytest.raises(ValueError, match='with deterministic=None draws dropout'):
    block.apply(variables, x)
  block.apply(variables, x, deterministic=True)
  block.apply(variables, x, rngs={'dropout': jax.random.key(2)})


def test_set_temperature_on_linen_variables():
  attn = gating.linen.gated_attention(H, D, gate='sigmoid', scaled_weights=True)
  x = jax.random.normal(jax.random.key(0), (2, L, D))
  variables = attn.init(jax.random.key(0), x)
  hot = gating.linen.set_temperature(variables, 5.0)
  assert float(hot['gate_temperature']['temperature']) == 5.0
  assert float(variables['gate_temperature']['temperature']) == 1.0
  assert np.abs(np.asarray(attn.apply(hot, x) - attn.apply(variables, x))).max() > 1e-4


def test_trained_dense_linen_attention_weights_carry_over():
  x = jax.random.normal(jax.random.key(0), (2, L, D))
  dense = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D)
  dense_vars = dense.init(jax.random.key(1), x)
  gated = gating.linen.gated_attention(H, D, gate='dense')
  gated_vars = gated.init({'params': jax.random.key(2)}, x)
  params = gating.linen.from_dense_params(gated_vars['params'], dense_vars['params'])
  y = gated.apply({**gated_vars, 'params': params}, x, mutable=['gate_stats'])[0]
  np.testing.assert_allclose(y, dense.apply(dense_vars, x), atol=1e-5)
  topk = gating.linen.gated_attention(H, D, gate='topk', active_heads=2)
  topk_vars = topk.init({'params': jax.random.key(2)}, x)
  carried = gating.linen.from_dense_params(topk_vars['params'], dense_vars['params'])
  assert 'router' in carried
  np.testing.assert_array_equal(carried['query']['kernel'], dense_vars['params']['query']['kernel'])
  wide = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=2 * D).init(
      jax.random.key(1), x)
  with pytest.raises(ValueError, match='from_dense_params: query has shapes'):
    gating.linen.from_dense_params(gated_vars['params'], wide['params'])


@pytest.mark.slow
def test_grouped_query_attention_and_modern_blocks_through_linen():
  """GQA (both units) and a Llama-style LM through the bridge equal their NNX layers."""
  x = jax.random.normal(jax.random.key(0), (2, L, D))
  for unit, k in (('kv_group', 2), ('query_head', 1)):
    kwargs = dict(num_kv_heads=2, unit=unit, gate='topk', active_heads=k, path='gathered',
                  qk_norm=True, use_bias=False)
    attn = gating.GatedMultiHeadAttention(H, D, rngs=nnx.Rngs(0), **kwargs)
    params = nnx.to_pure_dict(nnx.state(attn, nnx.Param))
    assert params['key']['kernel'].shape == (D, 2, D // H)
    np.testing.assert_allclose(
        gating.linen.gated_attention(H, D, **kwargs).apply({'params': params}, x), attn(x),
        atol=1e-6)
  lm_kwargs = dict(num_layers=1, features=D, num_heads=H, num_kv_heads=2, max_length=L,
                   prefix_len=P, positions='rotary', active_heads=2, norm='rms',
                   mlp='swiglu', mlp_bias=False, use_bias=False, tie_embeddings=False)
  lm = gating.GatedLM(V, rngs=nnx.Rngs(0), **lm_kwargs)
  out = gating.linen.gated_lm(V, **lm_kwargs).apply(
      {'params': nnx.to_pure_dict(nnx.state(lm, nnx.Param))}, tokens(), deterministic=True)
  np.testing.assert_allclose(out.logits_BxLxV, lm(tokens()).logits_BxLxV, atol=1e-5)
