"""Dropped-unit compensation: a closed head or MLP group adds its mean contribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating import GatedMLP, GatedMultiHeadAttention
from gating.layers import decode
from gating.training import compensation, importance
from gating.training.loop import model_outputs

B, L, D, H, V = 4, 10, 32, 4, 16


def inputs():
  return jax.random.normal(jax.random.key(0), (B, L, D))


@pytest.mark.parametrize('unit', ['heads', 'groups'])
def test_a_closed_unit_adds_its_mean_on_both_paths(unit):
  if unit == 'heads':
    layer = GatedMultiHeadAttention(H, D, gate='topk', active_heads=2, rngs=nnx.Rngs(0))
  else:
    layer = GatedMLP(D, 64, H, gate='topk', active_groups=2, rngs=nnx.Rngs(0))
  x = inputs()
  plain, gate = layer(x, path='masked', return_gate=True)
  mean_UxD = jax.random.normal(jax.random.key(1), (H, D))
  layer.compensate(mean_UxD)
  masked, gathered = layer(x, path='masked'), layer(x, path='gathered')
  expected = plain + ((1 - gate.weights_BxH) @ mean_UxD)[:, None, :]
  np.testing.assert_allclose(masked, expected, atol=1e-5)
  np.testing.assert_allclose(gathered, expected, atol=1e-5)
  layer.compensate(None)
  np.testing.assert_allclose(layer(x, path='masked'), plain, atol=1e-6)
  with pytest.raises(ValueError, match=r'compensate: mean of shape \(3, 32\)'):
    layer.compensate(mean_UxD[:3])


def test_a_per_token_gate_adds_each_tokens_closed_heads_means():
  """token_topk's weights are per token: a compensated layer crashed on them (an einsum
  for [B, U]). With m_h = c e_h, each token's addition shows which heads it closed: H - K
  of them, and their mean over the tokens is the gate the layer reports."""
  layer = GatedMultiHeadAttention(H, D, gate='token_topk', active_heads=2, router='token',
                                  rngs=nnx.Rngs(0))
  x = inputs()
  plain, gate = layer(x, return_gate=True)
  layer.compensate(3.0 * jnp.eye(H, D))
  closed_BxLxH = np.asarray(layer(x) - plain)[..., :H] / 3.0
  np.testing.assert_allclose(closed_BxLxH.sum(-1), H - 2, atol=1e-4)
  np.testing.assert_allclose(1.0 - closed_BxLxH.mean(axis=1), gate.weights_BxH, atol=1e-4)


def lm(num_layers=2, **kw):
  return gating.GatedLM(vocab_size=V, num_layers=num_layers, features=D, num_heads=H,
                        max_length=L, prefix_len=3, gate='topk', active_heads=2,
                        rngs=nnx.Rngs(0), **kw)


def batch(seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, V)
  valid = jnp.ones((B, L), bool).at[0, 7:].set(False)     # one padded sequence
  return {'tokens': tokens, 'valid': valid, 'target_mask': valid.at[:, :3].set(False),
          'label': jnp.zeros((B,), jnp.int32)}


def test_unit_means_are_each_units_mean_contribution_over_valid_tokens():
  """m_nu = mean over valid tokens of y_n(all open) - y_n(unit u of layer n closed): the
  layer's output is linear in its own gate weights, so this difference is z_nu."""
  model = lm(num_layers=1, mlp_groups=4, active_groups=2)
  batches = [batch(0), batch(1)]
  means = compensation.unit_means(model, batches, model_outputs)
  layers = importance.gated_layers(model)
  assert [m.shape for m in means] == [(H, D), (4, D)]
  outputs = jax.jit(lambda w, b: importance.forced_forward(model, b, w, model_outputs)[2])
  ones = [jnp.ones((B, importance.num_units(l)), jnp.float32) for _, l in layers]
  full = [outputs(ones, b) for b in batches]
  count = sum(float(b['valid'].sum()) for b in batches)
  for n, (_, layer) in enumerate(layers):
    for u in range(importance.num_units(layer)):
      closed = [w.at[:, u].set(0.0) if i == n else w for i, w in enumerate(ones)]
      total = sum(jnp.einsum('BLD,BL->D', y[n] - outputs(closed, b)[n],
                             b['valid'].astype(jnp.float32)) for y, b in zip(full, batches))
      np.testing.assert_allclose(means[n][u], total / count, atol=1e-5)


def test_a_compensated_layer_keeps_the_full_layers_mean_output():
  """With the means of its own calibration tokens, a layer running the same 2 of 4 heads
  for every sequence (a static gate) has the token-mean output of the layer running all 4:
  what FLAP's bias compensation keeps. (A per-sequence gate keeps it only approximately:
  a kept head's tokens are then not all tokens.)"""
  attn = GatedMultiHeadAttention(H, D, gate='static', active_heads=2, deterministic=True,
                                 rngs=nnx.Rngs(0))
  x = inputs()

  def forced(weights_H):
    attn.force_gate(jnp.broadcast_to(weights_H, (B, H)))
    y, _ = nnx.capture(lambda layer: layer(x), nnx.Intermediate)(attn)   # forced: it sows
    attn.force_gate(None)
    return y
  base = forced(jnp.zeros(H))
  mean_HxD = jnp.stack([(forced(jnp.eye(H)[h]) - base).mean(axis=(0, 1)) for h in range(H)])
  full = forced(jnp.ones(H)).mean(axis=(0, 1))
  assert np.abs(np.asarray(attn(x).mean(axis=(0, 1)) - full)).max() > 1e-3
  attn.compensate(mean_HxD)
  np.testing.assert_allclose(attn(x).mean(axis=(0, 1)), full, atol=1e-5)
  np.testing.assert_allclose(attn(x, path='gathered').mean(axis=(0, 1)), full, atol=1e-5)


def test_decode_prune_and_bad_means_refuse_compensation():
  model = lm()
  means = compensation.unit_means(model, [batch()], model_outputs)
  with pytest.raises(ValueError, match='1 means for 2 gated layers'):
    compensation.compensate(model, means[:1])
  compensation.compensate(model, means)
  with pytest.raises(ValueError, match='decoding does not support dropped-unit compensation'):
    decode.prefill(model, batch()['tokens'], cache_length=L)
  with pytest.raises(ValueError, match='prune does not export dropped-unit compensation'):
    gating.prune(model, 0.0)
  with pytest.raises(ValueError, match='no valid token'):
    compensation.unit_means(lm(), [dict(batch(), valid=jnp.zeros((B, L), bool))],
                            model_outputs)
