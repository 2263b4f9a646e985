import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating

V, L, D, H, P = 40, 12, 32, 4, 4


class ShiftedEmbed(nnx.Embed):
  """Embedding plus a per-position perturbation, so gradients can be taken per position."""

  def __init__(self, embed, length, rngs):
    super().__init__(embed.num_embeddings, embed.features, rngs=rngs)
    self.embedding[...] = embed.embedding[...]
    self.delta = nnx.Param(jnp.zeros((1, length, embed.features)))

  def __call__(self, tokens):
    return super().__call__(tokens) + self.delta[...]


def position_jacobian(model, x, apply):
  """|d logits[:, t] / d embedding[s]| summed over batch, vocab and features: [t, s]."""
  graphdef, delta, rest = nnx.split(model, nnx.PathContains('delta'), ...)

  def logits_per_position(delta):
    return apply(nnx.merge(graphdef, delta, rest, copy=True), x).logits_BxLxV.sum(axis=(0, 2))
  jac = jax.jit(jax.jacrev(logits_per_position))(delta)['trunk']['token_embed']['delta'][...]
  return np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [t, 1, s, D] -> [t, s]


def lm(gate='topk', k=2, path='masked', **kw):
  k = H if gate == 'dense' and path == 'gathered' else (None if gate == 'dense' else k)
  return gating.GatedLM(V, num_layers=2, features=D, num_heads=H, max_length=L, prefix_len=P,
                        gate=gate, active_heads=k, path=path, rngs=nnx.Rngs(0), **kw)


def tokens(b=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, L), 0, V)


@pytest.mark.parametrize('gate', gating.RULES)
@pytest.mark.parametrize('path', ['masked', 'gathered'])
def test_causality_through_gradients(gate, path):
  if gating.RULES[gate].per_token and path == 'gathered':
    with pytest.raises(ValueError, match=r"decides per token: it runs on path='masked' only"):
      lm(gate, path=path)
    return
  model = lm(gate, path=path, positions='rotary' if gate == 'sigmoid' else 'learned',
             noise='gumbel' if gate == 'topk' else None, deterministic=False)
  model.trunk.token_embed = ShiftedEmbed(model.trunk.token_embed, L, nnx.Rngs(1))
  x = tokens()
  assigned = (dict(slice_B=jnp.array([1, 0])) if gating.RULES[gate].router == 'assignment'
              else {})                                  # gate='slices': the data's slices
  scored = np.asarray(model(x, rngs=nnx.Rngs(dropout=3), **assigned).scored_BxL[0])
  dependence_LxL = position_jacobian(
      model, x, lambda m, x: m(x, rngs=nnx.Rngs(dropout=3), **assigned))
  for t in range(L):
    if scored[t]:
      assert (dependence_LxL[t, t + 1:] == 0).all(), f'scored logit {t} reads the future'
    assert dependence_LxL[t, t] > 0


def test_unscored_positions_do_read_the_prefix_through_the_gate():
  """Why positions < P-1 are not scored: the gate carries later prefix tokens back."""
  model = lm('topk', path='masked', deterministic=True)
  model.trunk.token_embed = ShiftedEmbed(model.trunk.token_embed, L, nnx.Rngs(1))
  dependence_L = position_jacobian(model, tokens(), lambda m, x: m(x))[0]
  assert dependence_L[1:P].sum() > 0
  assert (dependence_L[P:] == 0).all()


def test_scored_positions_and_padding():
  model = lm(deterministic=True)
  valid = jnp.arange(L)[None, :] < jnp.array([[L], [7]])
  out = model(tokens(), valid_BxL=valid)
  want0 = [t >= P - 1 and t < L - 1 for t in range(L)]
  want1 = [t >= P - 1 and t < 6 for t in range(L)]
  np.testing.assert_array_equal(out.scored_BxL, [want0, want1])
  assert out.logits_BxLxV.shape == (2, L, V)
  assert out.gate_weights_BxNxH.shape == (2, 2, H)


def test_padding_changes_nothing_at_valid_positions():
  model = lm(deterministic=True)
  valid = jnp.arange(L)[None, :] < jnp.array([[8], [8]])
  a, b = tokens(seed=0), tokens(seed=1)
  b = jnp.where(valid, a, b)  # same valid tokens, different padding
  la = model(a, valid_BxL=valid).logits_BxLxV[:, :8]
  lb = model(b, valid_BxL=valid).logits_BxLxV[:, :8]
  np.testing.assert_allclose(la, lb, atol=1e-5)


def test_k_per_layer_and_the_budget_knob():
  model = lm('topk', k=[1, 3], deterministic=True)
  out = model(tokens())
  np.testing.assert_array_equal(np.asarray(out.gate_weights_BxNxH).sum(-1), [[1, 3], [1, 3]])
  out = model(tokens(), active_heads=2, path='gathered')
  np.testing.assert_array_equal(np.asarray(out.gate_weights_BxNxH).sum(-1), [[2, 2], [2, 2]])


def test_untied_output_and_encoder():
  model = lm(tie_embeddings=False, deterministic=True)
  assert model.unembed is not None and model(tokens()).logits_BxLxV.shape == (2, L, V)
  enc = gating.GatedEncoder(V, num_layers=2, features=D, num_heads=H, max_length=L,
                            num_classes=3, gate='topk', active_heads=2, rngs=nnx.Rngs(0))
  valid = jnp.arange(L)[None, :] < jnp.array([[L], [5]])
  a = tokens()
  b = jnp.where(valid, a, 0)
  out_a, out_b = enc(a, valid_BxL=valid), enc(b, valid_BxL=valid)
  assert out_a.class_logits_BxC.shape == (2, 3) and out_a.hidden_BxLxD.shape == (2, L, D)
  np.testing.assert_allclose(out_a.class_logits_BxC, out_b.class_logits_BxC, atol=1e-5)


def test_bad_model_arguments():
  with pytest.raises(ValueError, match='shorter than the gate prefix'):
    lm(deterministic=True)(tokens()[:, :P - 1])
  with pytest.raises(ValueError, match='exceeds max_length'):
    lm(deterministic=True)(jnp.zeros((1, L + 1), jnp.int32))
  with pytest.raises(ValueError, match='active_heads has 3 entries for 2 layers'):
    lm(k=[1, 2, 3])
  with pytest.raises(ValueError, match='positions must be one of'):
    lm(positions='sinusoidal')
  with pytest.raises(ValueError, match='prefix_len must be in'):
    gating.GatedLM(V, num_layers=1, features=D, num_heads=H, max_length=L, prefix_len=L + 1,
                   gate='dense', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="GatedLM is causal: its router must read no token "
                                       r"after a fixed prefix .*router='mean' reads every"):
    lm(router='mean')
  with pytest.raises(ValueError, match='shape \\[batch, length\\]'):
    lm(deterministic=True)(jnp.zeros((L,), jnp.int32))
  model = lm()
  with pytest.raises(ValueError, match=rf'tokens hold ids in \[0, {V}\], outside the '
                                       rf'vocabulary \[0, {V}\) of this model'):
    model(jnp.zeros((2, L), jnp.int32).at[1, 3].set(V))
  # Under jit the ids cannot be read: an id past the table gives NaN logits (documented).
  logits = nnx.jit(lambda m, t: m(t).logits_BxLxV)(model, jnp.full((2, L), V, jnp.int32))
  assert np.isnan(np.asarray(logits)).all()


def test_num_heads_per_layer_with_an_explicit_head_width():
  model = gating.GatedLM(V, num_layers=2, features=D, num_heads=[1, 3], head_dim=6,
                         max_length=L, prefix_len=P, gate='topk', active_heads=[1, 2],
                         path='gathered', rngs=nnx.Rngs(0))
  assert [b.attention.query.kernel.shape for b in model.blocks] == [(D, 1, 6), (D, 3, 6)]
  out = nnx.jit(lambda model, x: model(x))(model, tokens())
  assert out.gate_weights_BxNxH.shape == (2, 2, 3)  # padded to the widest layer with 0
  np.testing.assert_array_equal(np.asarray(out.gate_weights_BxNxH).sum(-1), [[1, 2], [1, 2]])
  with pytest.raises(ValueError, match='pass head_dim'):
    gating.GatedLM(V, num_layers=2, features=D, num_heads=[1, 3], max_length=L, prefix_len=P,
                   gate='dense', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_heads has 3 entries for 2 layers'):
    gating.GatedLM(V, num_layers=2, features=D, num_heads=[1, 3, 2], head_dim=6,
                   max_length=L, prefix_len=P, gate='dense', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_heads must be an int >= 1'):
    gating.GatedLM(V, num_layers=2, features=D, num_heads=[0, 3], head_dim=6, max_length=L,
                   prefix_len=P, gate='dense', rngs=nnx.Rngs(0))
