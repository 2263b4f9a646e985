"""Shared units: shared_heads=S heads always on, K - S routed (K counts every head that
runs), and shared_groups=Sf MLP channel groups always open, Kf - Sf routed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating import GatedMLP, GatedMultiHeadAttention
from gating.layers import decode
from gating.training import config, elastic

B, L, D, H = 3, 16, 32, 4
F, G = 64, 8


def inputs(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, L, D))


def gated_layer(unit: str, rule: str, k: int, shared: int, **kw):
  """A layer with `shared` always-open units and budget k: heads (U = H) or MLP channel
  groups (U = G)."""
  if unit == 'heads':
    return GatedMultiHeadAttention(H, D, gate=rule, active_heads=k, shared_heads=shared,
                                   rngs=nnx.Rngs(0), **kw)
  return GatedMLP(D, F, G, gate=rule, active_groups=k, shared_groups=shared,
                  rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize('unit, shared, num_units', [('heads', 1, H), ('groups', 2, G)])
@pytest.mark.parametrize('rule', ['topk', 'hard_concrete', 'sigmoid', 'static'])
def test_shared_units_are_always_open_and_masked_equals_gathered(rule, unit, shared,
                                                                 num_units):
  layer = gated_layer(unit, rule, 3, shared, deterministic=True)
  x = inputs()
  gate = layer.gate(x)
  np.testing.assert_array_equal(gate.weights_BxH[:, :shared], 1.0)
  np.testing.assert_array_equal(gate.idx_BxK[:, :shared], [list(range(shared))] * B)
  assert gate.idx_BxK.shape == (B, 3) and (np.asarray(gate.idx_BxK)[:, shared:] >= shared).all()
  assert ((np.asarray(gate.weights_BxH) != 0).sum(axis=1) <= 3).all()
  np.testing.assert_allclose(layer(x, path='masked'), layer(x, path='gathered'), atol=1e-5)
  router = layer.router
  width = router.logits_H.shape[0] if rule == 'static' else router.logits.kernel.shape[1]
  assert width == num_units - shared     # the router scores the routed units only


@pytest.mark.parametrize('unit', ['heads', 'groups'])
def test_gradients_reach_the_router_of_the_routed_units(unit):
  layer = gated_layer(unit, 'topk', 2, 1)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

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
  with pytest.raises(ValueError, match='model.shared_heads=2 must be < active_heads=2'):
    config.override(config.TrainConfig(), ['model.shared_heads=2'])


# -- shared MLP channel groups ---------------------------------------------------------------


@pytest.mark.parametrize('kwargs, match', [
    (dict(gate='topk', active_groups=2, shared_groups=2), 'must be < active_groups=2'),
    (dict(gate='topk', active_groups=2, shared_groups=-1), 'shared_groups must be an int >= 0'),
    (dict(gate='hard_concrete', shared_groups=8), 'shared_groups=8 must be < num_groups=8'),
    (dict(gate='dense', shared_groups=1), "gate='dense' opens every group"),
])
def test_bad_shared_groups_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    GatedMLP(D, F, G, rngs=nnx.Rngs(0), **kwargs)


def test_shared_groups_need_mlp_groups():
  with pytest.raises(ValueError, match='shared_groups=1 needs mlp_groups'):
    gating.GatedTransformerBlock(D, H, shared_groups=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='shared_groups=1 needs mlp_groups'):
    gating.GatedLM(vocab_size=32, num_layers=1, features=D, num_heads=H, max_length=L,
                   prefix_len=4, active_heads=2, shared_groups=1, rngs=nnx.Rngs(0))


def test_a_group_budget_override_at_or_below_the_shared_groups_is_refused():
  mlp = GatedMLP(D, F, G, gate='topk', active_groups=3, shared_groups=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='active_groups=2 must be > shared_groups=2'):
    mlp(inputs(), active_groups=2)


@pytest.mark.parametrize('group_router', ['own', 'attention'])
def test_the_decode_cache_keeps_the_shared_groups_open(group_router):
  lm = gating.GatedLM(vocab_size=32, num_layers=2, features=D, num_heads=H, max_length=24,
                      prefix_len=4, gate='topk', active_heads=2, mlp_groups=G,
                      active_groups=3, shared_groups=1, group_router=group_router,
                      path='gathered', rngs=nnx.Rngs(0))
  if group_router == 'attention':   # the attention router's group layer scores G - Sf groups
    assert lm.blocks[0].attention.router.group_logits.kernel.shape[1] == G - 1
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  logits, state = decode.prefill(lm, tokens, jnp.array([8, 8]), cache_length=12)
  group = state.mlps[0]
  np.testing.assert_array_equal(group.idx_BxK[:, 0], 0)
  assert group.idx_BxK.shape == (2, 3)
  full = lm(tokens, deterministic=True)
  np.testing.assert_array_equal(full.group_weights_BxNxG[:, :, 0], 1.0)
  np.testing.assert_allclose(logits, full.logits_BxLxV, atol=1e-4)


def test_elastic_sub_models_keep_the_shared_groups_open():
  lm = gating.GatedLM(vocab_size=32, num_layers=2, features=D, num_heads=H, max_length=L,
                      prefix_len=4, gate='topk', active_heads=2, mlp_groups=G,
                      active_groups=3, shared_groups=1, rngs=nnx.Rngs(0))
  model = elastic.random_subsets(lm, 2, 3)
  tokens = jax.random.randint(jax.random.key(0), (16, L), 0, 32)
  out = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=1))
  open_BxNxG = np.asarray(out.group_weights_BxNxG != 0)
  assert open_BxNxG[:, :, 0].all() and (open_BxNxG.sum(axis=2) == 3).all()
  assert len({tuple(np.flatnonzero(row)) for row in open_BxNxG[:, 0]}) > 3
  with pytest.raises(ValueError, match=r'elastic Kf=1 must be in \(1, num_groups=8\]'):
    elastic.random_subsets(lm, 2, 1)


def test_the_config_carries_shared_groups_and_checks_them():
  groups = ['model.mlp_groups=8', 'model.active_groups=3']
  cfg = config.override(config.TrainConfig(), [*groups, 'model.shared_groups=2'])
  assert cfg.model.shared_groups == 2
  with pytest.raises(ValueError, match='model.shared_groups=3 must be < active_groups=3'):
    config.override(config.TrainConfig(), [*groups, 'model.shared_groups=3'])
  with pytest.raises(ValueError, match='model.shared_groups: 1 needs model.mlp_groups'):
    config.override(config.TrainConfig(), ['model.shared_groups=1'])
