"""gate_mlps: per-sequence channel gating of an outside model's MLPs (masked path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating

D, F, V, L = 16, 32, 11, 7


class UserMLP(nnx.Module):
  """Someone else's MLP: its own activation (a sigmoid: act(0) != 0) in its own code."""

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(D, F, rngs=rngs)
    self.fc2 = nnx.Linear(F, D, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.sigmoid(self.fc1(x)))


class UserLM(nnx.Module):
  """A causal toy LM: embedding, causal attention with a causal mask, two MLP blocks."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(4, D, decode=False, rngs=rngs)
    self.blocks = nnx.List([UserMLP(rngs) for _ in range(2)])
    self.head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attention(x, mask=nnx.make_causal_mask(tokens), deterministic=True)
    for block in self.blocks:
      x = x + block(x)
    return self.head(x)


def tokens(seed=0, batch=3):
  return jax.random.randint(jax.random.key(seed), (batch, L), 0, V)


def test_dense_gate_leaves_the_model_unchanged_and_the_original_intact():
  model = UserLM(nnx.Rngs(0))
  x = tokens()
  gated = gating.gate_mlps(model, num_groups=4, where='blocks/*/fc2', gate='dense',
                           rngs=nnx.Rngs(1))
  assert isinstance(gated.blocks[0].fc2, gating.GatedChannels)
  assert isinstance(model.blocks[0].fc2, nnx.Linear)            # the original untouched
  assert isinstance(gated.blocks[0].fc1, nnx.Linear)
  np.testing.assert_allclose(gated(x), model(x), atol=1e-6)


@pytest.mark.parametrize('shared', [0, 1])
def test_topk_closes_exactly_the_unchosen_groups_of_each_sequence(shared):
  model = UserLM(nnx.Rngs(0))
  gated = gating.gate_mlps(model, num_groups=4, where='blocks/*/fc2', gate='topk',
                           active_groups=2, shared_groups=shared, rngs=nnx.Rngs(1))
  layer = gated.blocks[0]
  h_BxLxF = jax.nn.sigmoid(layer.fc1(jax.random.normal(jax.random.key(2), (3, L, D))))
  gate = layer.fc2.gate(h_BxLxF)
  open_BxG = np.asarray(gate.weights_BxH) != 0
  assert (open_BxG.sum(axis=1) == 2).all() and open_BxG[:, :shared].all()
  assert layer.fc2.router.logits.kernel.shape[1] == 4 - shared   # routed groups only
  mask_BxF = np.repeat(open_BxG, F // 4, axis=1).astype(np.float32)
  expected = model.blocks[0].fc2(h_BxLxF * mask_BxF[:, None, :])   # the same weights
  np.testing.assert_allclose(layer.fc2(h_BxLxF), expected, atol=1e-6)
  stats = gating.gate_stats(gated)
  assert set(stats) == {'blocks/0/fc2', 'blocks/1/fc2'}
  assert float(np.sum(stats['blocks/0/fc2']['group_usage'])) == pytest.approx(2.0)


def test_a_callback_selects_and_the_router_trains():
  model = UserLM(nnx.Rngs(0))
  gated = gating.gate_mlps(model, num_groups=2, active_groups=1, rngs=nnx.Rngs(1),
                           where=lambda path, layer: path == 'blocks/1/fc2')
  assert isinstance(gated.blocks[1].fc2, gating.GatedChannels)
  assert isinstance(gated.blocks[0].fc2, nnx.Linear)

  def loss(m):
    return jnp.mean(m(tokens()) ** 2)
  grads = nnx.grad(loss)(gated)
  router = grads.blocks[1].fc2.router
  assert float(jnp.abs(router.logits.kernel[...]).sum()) > 0    # straight-through top-k


def test_causal_retrofit_reads_no_later_token():
  """causal=True: the routers read token 0 only, so changing a later token changes no
  earlier position's output (the default 'mean' router would)."""
  model = UserLM(nnx.Rngs(0))
  x = tokens(batch=8)
  later = x.at[:, -1].set((x[:, -1] + 1) % V)
  for causal, leaks in ((True, False), (False, True)):
    gated = gating.gate_mlps(model, num_groups=4, active_groups=1, where='blocks/*/fc2',
                             causal=causal, rngs=nnx.Rngs(3))
    moved = np.abs(np.asarray(gated(x)[:, :-1] - gated(later)[:, :-1])).max()
    assert (moved > 1e-6) == leaks
  with pytest.raises(ValueError, match="router='mean' reads every token"):
    gating.gate_mlps(model, num_groups=4, active_groups=1, where='blocks/*/fc2',
                     causal=True, router='mean', rngs=nnx.Rngs(3))


@pytest.mark.parametrize('kwargs, match', [
    (dict(where='mlp/*/dense2', num_groups=4), r"selects no layer of UserLM; its nnx.Linear "
                                               r"layers are \['blocks/0/fc1'"),
    (dict(where='blocks/*', num_groups=4), r"selects 'blocks/0', a UserMLP"),
    (dict(where='blocks/*/fc2', num_groups=5), 'num_groups=5 must divide the MLP hidden width'),
    (dict(where='blocks/*/fc2', num_groups=4, active_groups=9),
     r'active_groups must be in \[1, G=4\], got 9'),
    (dict(where=3, num_groups=4), 'where must be a path pattern or a callable'),
    (dict(where='blocks/*/fc2', num_groups=4, gate='slices', active_groups=2),
     "gate='slices' decides per token or by an assignment the caller passes"),
    (dict(where='blocks/*/fc2', num_groups=4, gate='token_topk', active_groups=2),
     "gate='token_topk' decides per token"),
    (dict(where='blocks/*/fc2', num_groups=4, active_groups=2, temperature=-0.5),
     'temperature must be > 0, got -0.5'),
])
def test_bad_arguments_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gating.gate_mlps(UserLM(nnx.Rngs(0)), rngs=nnx.Rngs(1), **kwargs)
