"""The slices rule: each sequence runs its assigned slice of heads (and of MLP groups) plus
the shared units, the same slice in every layer; the assignment is data (slice_B)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gating import GatedMLP, GatedMultiHeadAttention
from gating.layers.models import GatedLM

V, L, D, H, G = 32, 12, 32, 8, 8


def slices_lm(path='gathered', **kw):
  """H = 8 heads, S = 2 shared, K = 4: E = 3 slices of 2 heads; G = 8 groups, Sf = 2,
  Kf = 4: 3 slices of 2 groups."""
  args = dict(vocab_size=V, num_layers=2, features=D, num_heads=H, gate='slices',
              active_heads=4, shared_heads=2, path=path, mlp_groups=G, active_groups=4,
              shared_groups=2, max_length=16, prefix_len=4, rngs=nnx.Rngs(0))
  return GatedLM(**{**args, **kw})


def tokens(b=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, L)), jnp.int32)


def test_each_sequence_opens_its_slice_and_the_shared_units_in_every_layer():
  model = slices_lm()
  slice_B = jnp.array([0, 2, 1])
  out = model(tokens(), slice_B=slice_B)
  want_BxH = np.zeros((3, H))
  want_BxH[:, :2] = 1                                  # the shared heads
  for b, e in enumerate([0, 2, 1]):
    want_BxH[b, 2 + 2 * e: 4 + 2 * e] = 1              # slice e = heads 2 + 2e, 3 + 2e
  for layer in range(2):
    np.testing.assert_array_equal(out.gate_weights_BxNxH[:, layer], want_BxH)
    np.testing.assert_array_equal(out.group_weights_BxNxG[:, layer], want_BxH)  # same layout


def test_masked_equals_gathered():
  gathered, masked = slices_lm('gathered'), slices_lm('masked')
  x, slice_B = tokens(4), jnp.array([1, 0, 2, 1])
  np.testing.assert_allclose(gathered(x, slice_B=slice_B).logits_BxLxV,
                             masked(x, slice_B=slice_B).logits_BxLxV, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('path', ['gathered', 'masked'])
def test_slice_weights_get_gradients_only_from_their_own_sequences(path):
  model = slices_lm(path)
  x = tokens(4)
  slice_B = jnp.array([1, 1, 1, 1])     # every sequence in slice 1: heads and groups 4, 5

  def loss(model):
    return jnp.mean(model(x, slice_B=slice_B).logits_BxLxV ** 2)

  grads = nnx.grad(loss)(model)
  for layer in range(2):
    attention = grads['trunk']['blocks'][layer]['attention']
    q_DxHxDh = np.asarray(attention['query']['kernel'][...])
    out_HxDhxD = np.asarray(attention['out']['kernel'][...])
    for h in range(H):
      moved = np.abs(q_DxHxDh[:, h]).sum() > 0 and np.abs(out_HxDhxD[h]).sum() > 0
      assert moved == (h in (0, 1, 4, 5)), (layer, h)   # shared, and slice 1
    w_in_DxF = np.asarray(grads['trunk']['blocks'][layer]['mlp']['linear_in']['kernel'][...])
    per_group = np.abs(w_in_DxF).reshape(D, G, -1).sum(axis=(0, 2))
    np.testing.assert_array_equal(per_group > 0, [g in (0, 1, 4, 5) for g in range(G)])


def test_the_layers_alone_take_slice_b():
  x = jax.random.normal(jax.random.key(0), (2, L, D))
  attention = GatedMultiHeadAttention(H, D, gate='slices', active_heads=3, shared_heads=2,
                                      path='gathered', rngs=nnx.Rngs(0))
  assert attention.num_slices == 6                    # 6 routed heads, slices of 1
  gate = attention.gate(x, slice_B=jnp.array([5, 0]))
  np.testing.assert_array_equal(gate.weights_BxH, [[1, 1, 0, 0, 0, 0, 0, 1],
                                                   [1, 1, 1, 0, 0, 0, 0, 0]])
  y = attention(x, slice_B=jnp.array([5, 0]))
  masked = attention(x, slice_B=jnp.array([5, 0]), path='masked')
  np.testing.assert_allclose(y, masked, atol=2e-5, rtol=2e-5)
  mlp = GatedMLP(D, 64, 4, gate='slices', active_groups=2, path='gathered', rngs=nnx.Rngs(0))
  y, gate = mlp(x, slice_B=jnp.array([1, 0]), return_gate=True)   # 2 slices of 2 groups
  np.testing.assert_array_equal(gate.weights_BxH, [[0, 0, 1, 1], [1, 1, 0, 0]])
  assert y.shape == x.shape


def test_grouped_query_slices_are_whole_kv_groups():
  model = slices_lm(num_kv_heads=4, mlp_groups=None, active_groups=None, shared_groups=0)
  out = model(tokens(2), slice_B=jnp.array([0, 2]))     # 4 groups of 2 heads: S = 1, K = 2
  np.testing.assert_array_equal(out.gate_weights_BxNxH[:, 0],
                                [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 1, 1]])


@pytest.mark.parametrize('kwargs, message', [
    (dict(active_heads=6, mlp_groups=None, active_groups=None, shared_groups=0),
     r'slices of active_heads - shared_heads = 4 heads: that must divide 6'),
    (dict(active_heads=8, mlp_groups=None, active_groups=None, shared_groups=0),
     r'needs at least 2 slices: 6 routed heads in slices of 6 make 1'),
    (dict(active_groups=5), r"the attention's 3 slices and the MLP's 2 must be as many"),
    (dict(active_groups=None, path='masked'), r"gate='slices' needs a budget: pass "
                                              r'active_groups=Kf'),
    (dict(gate_options={'assigner': 'kmeans'}), r"assigner must be one of \('label', "
                                                r"'cluster', 'prefix_loss'\), got 'kmeans'"),
    (dict(gate_options={'assigner': 3.0}), r'assigner=3.0 .* must be a name'),
    (dict(gate_options={'assigner': 'prefix_loss', 'rounds': 0.5}),
     r"option rounds \(prefix_loss reassignments\) must be a whole number >= 1, got 0.5"),
    (dict(gate_options={'assigner': 'cluster', 'balance': 0.5}),
     r"option balance \(a slice takes at most ceil\(balance N / E\) training rows\) must be "
     r'>= 1, got 0.5'),
])
def test_bad_slices_are_refused_when_the_model_is_built(kwargs, message):
  with pytest.raises(ValueError, match=message):
    slices_lm(**kwargs)


def test_a_call_without_slice_b_or_with_a_bad_id_is_refused():
  model = slices_lm()
  with pytest.raises(ValueError, match=r"gate='slices' needs each sequence's slice: pass "
                                       r'slice_B'):
    model(tokens())
  with pytest.raises(ValueError, match=r'slice_B holds slice ids in \[0, 3\]; this layer has '
                                       r'3 slices \(ids 0..2\)'):
    model(tokens(), slice_B=jnp.array([0, 3, 1]))
  with pytest.raises(ValueError, match=r'slice_B must have shape \(3,\)'):
    model(tokens(), slice_B=jnp.array([0, 1]))
  topk = slices_lm(gate='topk', gate_options=None)
  with pytest.raises(ValueError, match=r"slice_B is for gate='slices'; no layer of this "
                                       r"model reads it \(gate 'topk'\)"):
    topk(tokens(), slice_B=jnp.array([0, 1, 2]))


def test_through_linen_the_call_takes_slice_b():
  import gating.linen  # pylint: disable=import-outside-toplevel
  attention = gating.linen.gated_attention(H, D, gate='slices', active_heads=4,
                                           shared_heads=2, path='gathered', name='attn')
  x = jax.random.normal(jax.random.key(0), (3, L, D))
  slice_B = jnp.array([0, 0, 2])
  variables = attention.init({'params': jax.random.key(1)}, x, slice_B=slice_B)
  y, updates = attention.apply(variables, x, slice_B=slice_B, mutable=['gate_stats'])
  assert y.shape == x.shape
  np.testing.assert_allclose(updates['gate_stats']['head_usage'],
                             [1, 1, 2 / 3, 2 / 3, 0, 0, 1 / 3, 1 / 3], atol=1e-6)


@pytest.mark.parametrize('projection', ['weights', 'activations', 'grouped'])
def test_cached_decoding_runs_each_sequences_slice_and_equals_the_full_forward(projection):
  from gating.layers import decode  # pylint: disable=import-outside-toplevel
  model, x, slice_B = slices_lm(), tokens(3), jnp.array([2, 0, 1])
  prompt = 6

  @nnx.jit(static_argnames=('projection',))
  def teacher_forced(model, x_BxL, slice_B, projection):
    logits_BxLxV, state = decode.prefill(model, x_BxL[:, :prompt], cache_length=L,
                                         projection=projection, slice_B=slice_B)
    step = lambda state, token_B: decode.decode_step(model, state, token_B)[::-1]
    _, steps_TxBxV = jax.lax.scan(step, state, x_BxL[:, prompt:].T)
    return jnp.concatenate([logits_BxLxV, steps_TxBxV.transpose(1, 0, 2)], axis=1)

  want_BxLxV = model(x, slice_B=slice_B).logits_BxLxV
  np.testing.assert_allclose(teacher_forced(model, x, slice_B, projection), want_BxLxV,
                             atol=2e-5, rtol=2e-5)
  # another slice is another model: sequence 0 decoded in slice 1 gives other logits
  other = teacher_forced(model, x, jnp.array([1, 0, 1]), projection)
  assert np.abs(np.asarray(other[0] - want_BxLxV[0])).max() > 1e-3
  out = decode.generate(model, x[:, :prompt], max_new_tokens=4, projection=projection,
                        slice_B=slice_B)
  full_BxTxV = model(out.tokens_BxT, slice_B=slice_B).logits_BxLxV
  np.testing.assert_array_equal(jnp.argmax(full_BxTxV[:, prompt - 1:-1], -1),
                                out.tokens_BxT[:, prompt:])


def test_cached_decoding_needs_the_slices_and_checks_them():
  from gating.layers import decode  # pylint: disable=import-outside-toplevel
  model, x = slices_lm(), tokens(2)[:, :6]
  with pytest.raises(ValueError, match=r"gate='slices': decoding needs each sequence's "
                                       r'slice, slice_B'):
    decode.generate(model, x, max_new_tokens=2)
  with pytest.raises(ValueError, match=r'slice_B holds slice ids in \[0, 3\]; this layer has '
                                       r'3 slices'):
    decode.generate(model, x, max_new_tokens=2, slice_B=jnp.array([0, 3]))
  with pytest.raises(ValueError, match=r'slice_B must have shape \(2,\)'):
    decode.prefill(model, x, cache_length=8, slice_B=jnp.array([0]))
  dense = GatedLM(V, num_layers=1, features=D, num_heads=H, max_length=16, prefix_len=4,
                  gate='dense', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"slice_B is for gate='slices'; no layer of this "
                                       r"model reads it \(gate 'dense'\)"):
    decode.generate(dense, x, max_new_tokens=2, slice_B=jnp.array([0, 1]))
