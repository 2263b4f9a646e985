import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating.layers import selection

H = 6


def logits(b=5, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, H)) * 2


@pytest.mark.parametrize('rule', ['topk', 'hard_concrete', 'sigmoid', 'static'])
@pytest.mark.parametrize('k', [1, 3])
def test_budget_keeps_at_most_k_open_heads_with_weight_exactly_one(rule, k):
  gate = selection.select(rule, logits(), k=k)
  assert gate.idx_BxK.shape == (5, k)
  w = np.asarray(gate.weights_BxH)
  assert set(np.unique(w)) <= {0.0, 1.0}
  assert ((w != 0).sum(axis=1) <= k).all()
  # every open head is one of the K computed on the gathered path
  for b in range(5):
    assert set(np.flatnonzero(w[b])) <= set(gate.idx_BxK[b].tolist())


def test_topk_selects_the_largest_logits_and_probs_are_softmax():
  x = logits()
  gate = selection.select('topk', x, k=2)
  want = np.sort(np.argsort(-np.asarray(x), axis=1)[:, :2], axis=1)
  np.testing.assert_array_equal(np.sort(gate.idx_BxK, axis=1), want)
  np.testing.assert_allclose(gate.probs_BxH, jax.nn.softmax(x), rtol=1e-6)
  assert (np.asarray(gate.weights_BxH).sum(axis=1) == 2).all()


def test_topk_needs_k():
  with pytest.raises(ValueError, match='active_heads'):
    selection.select('topk', logits())


def test_unknown_rule_and_noise_are_refused():
  with pytest.raises(ValueError, match="gate must be one of"):
    selection.select('top2', logits())
  with pytest.raises(ValueError, match='noise must be one of'):
    selection.select('topk', logits(), k=1, deterministic=False, rng=jax.random.key(0),
                     noise='uniform')


def test_straight_through_is_exact_in_value_and_carries_the_gradient():
  p = jnp.array([[0.3, 0.9, 0.1]])
  is_open = jnp.array([[True, False, True]])
  np.testing.assert_array_equal(selection.straight_through(is_open, p), [[1.0, 0.0, 1.0]])
  g = jax.grad(lambda p: (selection.straight_through(is_open, p) * jnp.arange(3.0)[None]).sum())(p)
  np.testing.assert_array_equal(g, [[0.0, 1.0, 2.0]])


def test_hard_concrete_eval_is_deterministic_and_expected_l0_matches_formula():
  x = logits()
  a = selection.select('hard_concrete', x)
  b = selection.select('hard_concrete', x)
  np.testing.assert_array_equal(a.weights_BxH, b.weights_BxH)
  beta, (gamma, zeta) = 2 / 3, selection.HARD_CONCRETE_STRETCH
  np.testing.assert_allclose(
      a.probs_BxH, jax.nn.sigmoid(x - beta * np.log(-gamma / zeta)), rtol=1e-6)
  # eval gate: z = clip(sigmoid(x) * 1.2 - 0.1, 0, 1); open iff z > 0
  z = np.clip(jax.nn.sigmoid(x) * (zeta - gamma) + gamma, 0, 1)
  np.testing.assert_array_equal(np.asarray(a.weights_BxH) > 0, z > 0)


def test_hard_concrete_training_samples_match_the_open_probability():
  x = jnp.broadcast_to(jnp.linspace(-3, 3, H), (4000, H))
  gate = selection.select('hard_concrete', x, deterministic=False, rng=jax.random.key(1))
  freq = (np.asarray(gate.weights_BxH) > 0).mean(axis=0)
  np.testing.assert_allclose(freq, gate.probs_BxH[0], atol=0.03)
  with pytest.raises(ValueError, match='needs an rng'):
    selection.select('hard_concrete', x, deterministic=False)


def test_temperature_changes_probs_not_the_selection():
  x = logits()
  hot = selection.select('topk', x, k=2, temperature=5.0)
  cold = selection.select('topk', x, k=2, temperature=0.2)
  np.testing.assert_array_equal(hot.idx_BxK, cold.idx_BxK)
  assert np.asarray(hot.probs_BxH).max() < np.asarray(cold.probs_BxH).max()


def test_budget_pads_with_zero_weight_when_fewer_heads_are_open():
  x = jnp.array([[5.0, -5.0, -5.0, -5.0, -5.0, -5.0]])
  gate = selection.select('sigmoid', x, k=3)
  np.testing.assert_array_equal(gate.weights_BxH, [[1, 0, 0, 0, 0, 0]])
  assert gate.idx_BxK[0, 0] == 0


@pytest.mark.parametrize('rule,expect', [('topk', 'k_softmax'), ('sigmoid', 'p'),
                                         ('hard_concrete', 'z')])
def test_scaled_weights(rule, expect):
  x = logits()
  gate = selection.select(rule, x, k=3, scaled_weights=True)
  w = np.asarray(gate.weights_BxH)
  if expect == 'k_softmax':
    np.testing.assert_allclose(w.sum(axis=1), 3, rtol=1e-5)
  elif expect == 'p':
    p = np.asarray(jax.nn.sigmoid(x))
    np.testing.assert_allclose(w[w != 0], p[w != 0], rtol=1e-6)
  else:
    z = np.clip(np.asarray(jax.nn.sigmoid(x)) * 1.2 - 0.1, 0, 1)
    np.testing.assert_allclose(w[w != 0], z[w != 0], rtol=1e-6)
  assert not set(np.unique(w)) <= {0.0, 1.0}


@pytest.mark.parametrize('noise', ['gumbel', 'jitter'])
def test_noise_only_in_training(noise):
  x = logits(b=64)
  kw = dict(k=2, noise=noise, noise_scale=3.0)
  clean = selection.select('topk', x, **kw)
  same = selection.select('topk', x, deterministic=True, rng=jax.random.key(0), **kw)
  noisy = selection.select('topk', x, deterministic=False, rng=jax.random.key(0), **kw)
  np.testing.assert_array_equal(clean.idx_BxK, same.idx_BxK)
  assert (np.sort(clean.idx_BxK, 1) != np.sort(noisy.idx_BxK, 1)).any()


def test_dense_opens_every_head():
  gate = selection.select('dense', logits())
  np.testing.assert_array_equal(gate.weights_BxH, np.ones((5, H)))
  assert gate.idx_BxK is None


def test_hard_concrete_budget_ranks_by_log_alpha_not_by_the_sample():
  x = logits(b=32)
  gates = [selection.select('hard_concrete', x, k=2, deterministic=False,
                            rng=jax.random.key(seed)) for seed in range(3)]
  want = np.sort(np.argsort(-np.asarray(x), axis=1)[:, :2], axis=1)
  for gate in gates:
    np.testing.assert_array_equal(np.sort(gate.idx_BxK, axis=1), want)
  # the samples still open and close those heads at random
  assert any((np.asarray(g.weights_BxH) != np.asarray(gates[0].weights_BxH)).any()
             for g in gates[1:])


# --- top_p and the registry ----------------------------------------------------------------

def test_top_p_opens_the_fewest_heads_whose_probabilities_reach_p():
  probs = jnp.array([[0.5, 0.05, 0.3, 0.1, 0.04, 0.01],
                     [0.95, 0.01, 0.01, 0.01, 0.01, 0.01]])
  x = jnp.log(probs)
  for p, want in ((0.45, [[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]),
                  (0.75, [[1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]),
                  (0.85, [[1, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]),
                  (1.0, [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])):
    gate = selection.select('top_p', x, options={'p': p})
    np.testing.assert_array_equal(np.asarray(gate.weights_BxH), want)
    np.testing.assert_allclose(gate.probs_BxH, probs, rtol=1e-5)


def test_top_p_with_a_budget_keeps_at_most_k_and_routes_gradients():
  x = logits()
  gate = selection.select('top_p', x, k=2, options={'p': 0.99})
  w = np.asarray(gate.weights_BxH)
  assert ((w != 0).sum(axis=1) <= 2).all() and gate.idx_BxK.shape == (5, 2)
  np.testing.assert_array_equal(np.sort(gate.idx_BxK, axis=1),
                                np.sort(np.argsort(-np.asarray(x), axis=1)[:, :2], axis=1))
  grad = jax.grad(lambda x: (selection.select('top_p', x, options={'p': 0.7}).weights_BxH
                             * jnp.arange(H)[None]).sum())(x)
  assert np.abs(np.asarray(grad)).sum() > 0
  scaled = selection.select('top_p', x, options={'p': 0.7}, scaled_weights=True).weights_BxH
  open_B = (np.asarray(scaled) != 0).sum(axis=1)
  np.testing.assert_allclose(np.asarray(scaled).sum(axis=1), open_B, rtol=1e-5)


def test_top_p_scaled_weights_under_a_budget_are_normalised_over_the_heads_kept():
  """With K = 2 of 4 open by mass, the two kept weigh 2 softmax over those two (sum 2),
  not 4 softmax over all four cut to two (sum below 2)."""
  x = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1, 0.0, 0.0]]) + 1e-9)
  gate = selection.select('top_p', x, k=2, options={'p': 0.95}, scaled_weights=True)
  kept = np.exp(np.asarray(x[0, :2])) / np.exp(np.asarray(x[0, :2])).sum()
  np.testing.assert_allclose(np.asarray(gate.weights_BxH)[0], [*(2 * kept), 0, 0, 0, 0],
                             rtol=1e-5)


@pytest.mark.parametrize('options, match', [
    ({'q': 0.5}, "no option.*'q'.*its options: p"),
    ({'p': 1.5}, r'p must be in \(0, 1\]'),
    ({'p': 'high'}, 'must be a number'),
])
def test_rule_options_are_checked(options, match):
  with pytest.raises(ValueError, match=match):
    selection.select('top_p', logits(), options=options)


def test_sigmoid_threshold_is_an_option():
  x = logits()
  low = selection.select('sigmoid', x, options={'threshold': 0.1}).weights_BxH
  high = selection.select('sigmoid', x, options={'threshold': 0.9}).weights_BxH
  assert (np.asarray(low) != 0).sum() > (np.asarray(high) != 0).sum()
  np.testing.assert_array_equal(
      high, selection.select('sigmoid', x, threshold=0.9).weights_BxH)  # the older spelling


@pytest.mark.parametrize('call', [
    lambda: selection.select('topk', logits(), k=2, threshold=0.7),
    lambda: gating.GatedMultiHeadAttention(4, 16, gate='topk', active_heads=2, threshold=0.7,
                                           rngs=nnx.Rngs(0))])
def test_an_older_spelling_a_rule_does_not_take_is_refused_not_ignored(call):
  with pytest.raises(ValueError, match=r"threshold=0.7: gate 'topk' has no option threshold "
                                       r'\(its options: none\)'):
    call()
  with pytest.raises(ValueError, match=r"stretch=\(-0.2, 1.2\): gate 'sigmoid' has no "
                                       r'option gamma or zeta \(its options: threshold\)'):
    selection.select('sigmoid', logits(), stretch=(-0.2, 1.2))
  gate = selection.select('hard_concrete', logits(), stretch=(-0.2, 1.2))   # it has them
  assert gate.weights_BxH.shape == logits().shape


def test_every_rule_declares_its_properties():
  for name, rule in selection.RULES.items():
    assert rule.name == name and rule.meaning and rule.label
    assert rule.budget in ('required', 'optional', 'none')
    assert rule.temperature > 0
  assert selection.RULES['topk'].needs_k and not selection.RULES['sigmoid'].needs_k
  assert selection.RULES['hard_concrete'].samples and not selection.RULES['top_p'].samples
  with pytest.raises(ValueError, match='already registered'):
    selection.register(selection.RULES['topk'])
