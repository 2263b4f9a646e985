import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gating.training import losses


def stats(usage, prob, weight=None, z=0.0):
  usage, prob = jnp.asarray(usage, jnp.float32), jnp.asarray(prob, jnp.float32)
  return {'layer': {'head_usage': usage, 'head_prob': prob,
                    'head_weight': usage if weight is None else jnp.asarray(weight),
                    'router_z_loss': jnp.asarray(z)}}


def test_next_token_losses_and_weights():
  tokens = jnp.array([[1, 2, 3, 0]])
  logits = jax.nn.one_hot(jnp.array([[2, 3, 1, 0]]), 4) * 10.0
  ce, correct = losses.next_token_losses(logits, tokens)
  np.testing.assert_array_equal(correct[0, :3], [True, True, False])
  assert ce[0, 0] < 1e-3 and ce[0, 2] > 5
  scored = jnp.array([[False, True, True, False]])
  target = jnp.array([[False, False, True, True]])
  np.testing.assert_array_equal(losses.next_token_weights(scored, target), [[0, 1, 1, 0]])


def test_classification_losses():
  ce, correct = losses.classification_losses(jnp.array([[0.0, 5.0], [5.0, 0.0]]),
                                             jnp.array([1, 1]))
  np.testing.assert_array_equal(correct, [True, False])
  assert ce[0] < ce[1]


def test_sparsity_terms():
  s = stats(usage=[1, 1, 0, 0], prob=[0.9, 0.7, 0.2, 0.2], weight=[1, 0.5, 0, 0], z=2.0)
  assert float(losses.expected_l0(s)) == pytest.approx(0.5)
  assert float(losses.l1(s)) == pytest.approx(0.375)
  assert float(losses.z_loss(s)) == pytest.approx(2.0)
  np.testing.assert_allclose(losses.active_heads_per_layer(s), [2.0])
  assert float(losses.lagrangian(0.5, 0.25, 2.0, 4.0)) == pytest.approx(2 * 0.25 + 4 * 0.0625)


def test_load_balance_is_one_when_uniform_and_larger_when_collapsed():
  uniform = stats(usage=[0.5] * 4, prob=[0.25] * 4)
  collapsed = stats(usage=[1, 1, 0, 0], prob=[0.5, 0.5, 0, 0])
  assert float(losses.load_balance(uniform)) == pytest.approx(1.0)
  assert float(losses.load_balance(collapsed)) == pytest.approx(2.0)
  # gradient flows through P only, and lowers the probability of the over-used heads
  g = jax.grad(lambda p: losses.load_balance(stats([1, 1, 0, 0], p)))(jnp.full(4, 0.25))
  assert g[0] > 0 and g[2] < 0


def test_entropy_of_usage():
  np.testing.assert_allclose(losses.usage_entropy(stats([1] * 4, [1] * 4)), [np.log(4)],
                             rtol=1e-6)
  np.testing.assert_allclose(losses.usage_entropy(stats([1, 0, 0, 0], [1] * 4)), [0.0],
                             atol=1e-6)


def test_schedules():
  assert float(losses.target_at(0, 0.25, 100)) == pytest.approx(1.0)
  assert float(losses.target_at(50, 0.25, 100)) == pytest.approx(0.625)
  assert float(losses.target_at(500, 0.25, 100)) == pytest.approx(0.25)
  assert float(losses.temperature_at(0, 1.0, 0.1, 10)) == pytest.approx(1.0)
  assert float(losses.temperature_at(5, 1.0, 0.01, 10)) == pytest.approx(0.1)
  assert float(losses.temperature_at(50, 1.0, 0.1, 10)) == pytest.approx(0.1)
  schedule = ((8, 10), (4, 20))
  assert [losses.k_at(s, schedule, 2) for s in (0, 9, 10, 19, 20, 99)] == [8, 8, 4, 4, 2, 2]


def test_no_gated_layers_is_an_error():
  with pytest.raises(ValueError, match='no gated layers'):
    losses.expected_l0({})


def test_groups_are_regularized_like_heads():
  heads = stats(usage=[1, 1, 0, 0], prob=[0.9, 0.7, 0.2, 0.2], weight=[1, 0.5, 0, 0], z=2.0)
  group = {'mlp': {'group_usage': jnp.array([1.0, 0.0]), 'group_prob': jnp.array([0.5, 0.1]),
                   'group_weight': jnp.array([1.0, 0.0]), 'router_z_loss': jnp.asarray(4.0)}}
  both = {**heads, **group}
  assert float(losses.expected_l0(both)) == pytest.approx((0.5 + 0.3) / 2)
  assert float(losses.l1(both)) == pytest.approx((0.375 + 0.5) / 2)
  assert float(losses.z_loss(both)) == pytest.approx(3.0)
  assert float(losses.load_balance(group)) == pytest.approx(2 * 1.0 * 0.5 / 0.6)
  np.testing.assert_allclose(losses.active_heads_per_layer(both), [2.0])
  np.testing.assert_allclose(losses.active_groups_per_layer(both), [1.0])
  np.testing.assert_allclose(losses.usage_entropy(both, 'group'), [0.0], atol=1e-6)
