"""shared_heads=S: S heads always on, K - S routed; K counts every head that runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating import GatedMultiHeadAttention
from gating.layers import decode
from gating.training import config

B, L, D, H = 3, 16, 32, 4


def inputs(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, L, D))


@pytest.mark.parametrize('rule', ['topk', 'hard_concrete', 'sigmoid', 'static'])
def test_shared_heads_are_always_open_and_masked_equals_gathered(rule):
  attn = GatedMultiHeadAttention(H, D, gate=rule, active_heads=3, shared_heads=1,
                                 deterministic=True, rngs=nnx.Rngs(0))
  x = inputs()
  gate = attn.gate(x)
  np.testing.assert_array_equal(gate.weights_BxH[:, 0], 1.0)
  np.testing.assert_array_equal(gate.idx_BxK[:, 0], 0)
  assert gate.idx_BxK.shape == (B, 3) and (np.asarray(gate.idx_BxK)[:, 1:] >= 1).all()
  assert ((np.asarray(gate.weights_BxH) != 0).sum(axis=1) <= 3).all()
  np.testing.assert_allclose(attn(x, path='masked'), attn(x, path='gathered'), atol=1e-5)
  router = attn.router
  width = router.logits_H.shape[0] if rule == 'static' else router.logits.kernel.shape[1]
  assert width == H - 1     # the router scores the routed heads only


def test_gradients_reach_the_router_of_the_routed_heads():
  attn = GatedMultiHeadAttention(H, D, gate='topk', active_heads=2, shared_heads=1,
                                 rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

  def loss(params):
    return (nnx.merge(graphdef, params, rest, copy=True)(inputs()) ** 2).sum()
  grads = jax.grad(loss)(params)
  assert np.abs(np.asarray(grads['router']['logits']['kernel'])).sum() > 0


@pytest.mark.parametrize('kwargs, match', [
    (dict(gate='topk', active_heads=2, shared_heads=2), 'must be < active_heads=2'),
    (dict(gate='topk', active_heads=2, shared_heads=-1), 'must be an int >= 0'),
    (dict(gate='hard_concrete', shared_heads=4), 'must be < num_heads=4'),
    (dict(gate='dense', shared_heads=1), "gate='dense' opens every head"),
])
def test_bad_shared_heads_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    GatedMultiHeadAttention(H, D, rngs=nnx.Rngs(0), **kwargs)


def test_a_budget_override_at_or_below_the_shared_heads_is_refused():
  attn = GatedMultiHeadAttention(H, D, gate='topk', active_heads=3, shared_heads=2,
                                 rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='active_heads=2 must be > shared_heads=2'):
    attn(inputs(), active_heads=2)


def test_the_decode_cache_holds_the_shared_and_the_routed_heads():
  lm = gating.GatedLM(vocab_size=32, num_layers=2, features=D, num_heads=H, max_length=24,
                      prefix_len=4, gate='topk', active_heads=2, shared_heads=1,
                      path='gathered', rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  logits, state = decode.prefill(lm, tokens, jnp.array([8, 8]), cache_length=12)
  assert state.layers[0].k_BxNxSxDh.shape[1] == 2               # S + routed = K heads
  np.testing.assert_array_equal(state.layers[0].idx_BxK[:, 0], 0)
  full = lm(tokens, deterministic=True).logits_BxLxV
  np.testing.assert_allclose(logits, full, atol=1e-4)


def test_the_config_carries_shared_heads_and_checks_them():
  cfg = config.override(config.TrainConfig(), ['model.shared_heads=1'])
  assert cfg.model.shared_heads == 1
  with pytest.raises(ValueError, match='model.shared_heads: 2 must be < every active_heads'):
    config.override(config.TrainConfig(), ['model.shared_heads=2'])
