"""A new selection rule is one function and one registry entry: it then works in the
layer, the config and `--set`, eval's bookkeeping, the sweep tables and Linen, with no
other file touched (the layout issue's test of "one place per idea")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating.layers import selection
from gating.study import evaluation, results
from gating.training import config


def lowest_k(logits_BxH, *, k, temperature, margin, **_):
  """A toy rule: open every head whose logit is within `margin` of the smallest."""
  p_BxH = jax.nn.sigmoid(-logits_BxH / temperature)
  open_BxH = logits_BxH <= logits_BxH.min(axis=-1, keepdims=True) + margin
  return selection.Decision(open_BxH, p_BxH, p_BxH, -logits_BxH, p_BxH)


@pytest.fixture
def new_rule():
  rule = selection.register(selection.Rule(
      'lowest', lowest_k, label='dynamic lowest', options={'margin': 1.0},
      meaning='every head within margin of the lowest logit, per sequence'))
  yield rule
  del selection.RULES['lowest']


def test_a_registered_rule_works_everywhere(new_rule):  # pylint: disable=redefined-outer-name,unused-argument
  x = jax.random.normal(jax.random.key(0), (3, 8, 16))
  attn = gating.GatedMultiHeadAttention(4, 16, gate='lowest', active_heads=2,
                                        gate_options={'margin': 0.5}, rngs=nnx.Rngs(0))
  gate = attn.gate(x)
  masked = attn(x, path='masked')
  gathered = attn(x, path='gathered')
  np.testing.assert_allclose(masked, gathered, atol=1e-5)
  assert ((np.asarray(gate.weights_BxH) != 0).sum(axis=1) <= 2).all()
  with pytest.raises(ValueError, match="no option.*'width'"):
    gating.GatedMultiHeadAttention(4, 16, gate='lowest', gate_options={'width': 1},
                                   rngs=nnx.Rngs(0))

  cfg = config.override(config.TrainConfig(), ['model.gate=lowest',
                                               'model.gate_options=margin=0.25'])
  assert cfg.model.gate_options == (('margin', 0.25),)
  assert config.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match='model.gate_options'):
    config.override(cfg, ['model.gate_options=width=1'])

  assert evaluation.training_gate_budget(cfg) == cfg.model.num_heads
  assert evaluation.unsupported(cfg, 'gathered', 2) is None
  assert results.rule_label('lowest') == 'dynamic lowest'

  layer = gating.linen.gated_attention(4, 16, gate='lowest', active_heads=2,
                                       gate_options={'margin': 0.5})
  variables = layer.init({'params': jax.random.key(0)}, x)
  y = layer.apply(variables, x, path='gathered', mutable=['gate_stats'])[0]
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


def test_unknown_rule_is_refused_with_the_known_names():
  with pytest.raises(ValueError, match="gate must be one of .*'top_p'.*got 'nope'"):
    gating.GatedMultiHeadAttention(4, 16, gate='nope', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='model.gate: must be one of'):
    config.override(config.TrainConfig(), ['model.gate=nope'])


def test_top_p_through_the_layer_and_the_config():
  x = jax.random.normal(jax.random.key(1), (4, 8, 16))
  attn = gating.GatedMultiHeadAttention(4, 16, gate='top_p', gate_options={'p': 0.6},
                                        active_heads=3, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(attn(x, path='masked'), attn(x, path='gathered'), atol=1e-5)
  cfg = config.override(config.TrainConfig(), [
      'model.gate=top_p', 'model.gate_options=p=0.8', 'model.active_heads=none',
      'model.eval_path=masked'])
  assert dict(cfg.model.gate_options) == {'p': 0.8}
  with pytest.raises(ValueError, match=r"model.gate_options: gate 'top_p' has no "
                                       r"option\(s\) \['q'\]; its options: p"):
    config.override(cfg, ['model.gate_options=q=0.8'])
  with pytest.raises(ValueError, match=r"the 'top_p' rule's option p must be in \(0, 1\], "
                                       r'got 1.5'):
    gating.select('top_p', jnp.zeros((2, 4)), options={'p': 1.5})
  sig = config.override(config.TrainConfig(), ['model.gate=sigmoid',
                                               'model.gate_options=threshold=0.7'])
  assert dict(sig.model.gate_options) == {'threshold': 0.7}
  assert jnp.isfinite(attn.gate(x).weights_BxH).all()
