import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating.layers import compute
from gating.layers.mlp import GatedMLP
from tests.layers.test_models import ShiftedEmbed, position_jacobian

B, L, D, F, G = 3, 16, 32, 64, 4
V, P = 40, 4


def x_BxLxD(seed=1):
  return jax.random.normal(jax.random.key(seed), (B, L, D))


def mlp_weights(seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return compute.MLPWeights(jax.random.normal(ks[0], (D, F)) / np.sqrt(D),
                            jax.random.normal(ks[1], (F, D)) / np.sqrt(F),
                            jax.random.normal(ks[2], (F,)), jax.random.normal(ks[3], (D,)))


def reference(x, w, weights_BxG):
  """Per-sequence, per-group loop: the math of compute.py, written the slow way."""
  x, w = np.asarray(x, np.float64), [np.asarray(a, np.float64) for a in w]
  w1, w2, b1, b2 = w[:4]
  Fg = F // G
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    for g in range(G):
      c = slice(g * Fg, (g + 1) * Fg)
      h = np.asarray(jax.nn.gelu(x[b] @ w1[:, c] + b1[c]))
      out[b] += weights_BxG[b, g] * h @ w2[c]
  return out + b2


def test_both_paths_equal_the_per_group_loop():
  x, w = x_BxLxD(), mlp_weights()
  idx_BxK = jnp.array([[0, 2], [3, 1], [1, 2]])
  weights_BxK = jnp.array([[1.0, 0.5], [2.0, 1.0], [0.0, 1.0]])
  weights_BxG = jnp.zeros((B, G)).at[jnp.arange(B)[:, None], idx_BxK].set(weights_BxK)
  want = reference(x, w, np.asarray(weights_BxG))
  np.testing.assert_allclose(compute.masked_mlp(x, w, weights_BxG, G), want, atol=1e-4)
  np.testing.assert_allclose(compute.gathered_mlp(x, w, idx_BxK, weights_BxK, G), want,
                             atol=1e-4)
  # The pieces decode uses: weights gathered once, then applied; or the Kf weights put
  # back in their G slots for the masked computation with the full weights.
  g = compute.gather_mlp(w, idx_BxK, G)
  assert g.w1_BxDxKxFg.shape == (B, D, 2, F // G) and g.b1_BxKxFg.shape == (B, 2, F // G)
  assert g.w2_BxKxFgxD.shape == (B, 2, F // G, D)
  np.testing.assert_allclose(compute.mlp_gathered_weights(x, g, weights_BxK, w.b2_D), want,
                             atol=1e-4)
  np.testing.assert_array_equal(compute.scatter_groups(weights_BxK, idx_BxK, G), weights_BxG)


def test_gather_groups_layout():
  w1_DxGxFg = jnp.arange(D * F, dtype=jnp.float32).reshape(D, G, F // G)
  g = compute.gather_groups(w1_DxGxFg, jnp.array([[2, 0]]))
  assert g.shape == (1, D, 2, F // G)
  np.testing.assert_array_equal(g[0, :, 0], w1_DxGxFg[:, 2])
  np.testing.assert_array_equal(g[0, :, 1], w1_DxGxFg[:, 0])


def ungated(mlp: GatedMLP, x):
  """The block's ungated MLP carrying the same weights: W2 gelu(W1 x + b1) + b2."""
  return mlp.linear_out(jax.nn.gelu(mlp.linear_in(x)))


@pytest.mark.parametrize('gate,k', [('dense', None), ('topk', G), ('sigmoid', None)])
def test_all_groups_open_equals_the_ungated_mlp(gate, k):
  mlp = GatedMLP(D, F, G, gate=gate, active_groups=k, router_init_logit=5.0,
                 rngs=nnx.Rngs(0))
  x = x_BxLxD()
  y, gate_ = mlp(x, return_gate=True)
  np.testing.assert_array_equal(gate_.weights_BxH, np.ones((B, G)))
  np.testing.assert_allclose(y, ungated(mlp, x), atol=1e-5)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_the_gathered_path_below_g_equals_the_ungated_mlp_without_the_closed_groups(k):
  """At Kf < G, sequence b's output is the ungated MLP (its nnx.Linear layers) with every
  group outside b's Kf zeroed in W2: an independent per-sequence reference."""
  mlp = GatedMLP(D, F, G, gate='topk', active_groups=k, rngs=nnx.Rngs(2))
  x = x_BxLxD(seed=6)
  got = mlp(x, path='gathered')
  idx_BxK = np.asarray(mlp.gate(x).idx_BxK)
  Fg = F // G
  for b in range(B):
    alone = nnx.clone(mlp)
    for g in np.setdiff1d(np.arange(G), idx_BxK[b]):
      alone.linear_out.kernel[...] = alone.linear_out.kernel[...].at[g * Fg:(g + 1) * Fg].set(0)
    np.testing.assert_allclose(got[b], ungated(alone, x[b:b + 1])[0], atol=1e-5, rtol=1e-5)


def test_the_group_gather_itself_at_kf_equal_g_equals_the_ungated_mlp():
  """The gathered kernel, not the layer's Kf = G shortcut: each sequence's G groups
  gathered, in its own order, equal the ungated MLP."""
  mlp = GatedMLP(D, F, G, gate='dense', rngs=nnx.Rngs(0))
  x = x_BxLxD()
  idx_BxG = jnp.stack([jnp.roll(jnp.arange(G), b) for b in range(B)])
  got = compute.gathered_mlp(x, mlp.mlp_weights(), idx_BxG, jnp.ones((B, G)), G)
  np.testing.assert_allclose(got, ungated(mlp, x), atol=1e-5, rtol=1e-5)


def test_block_all_open_equals_the_ungated_block_with_the_same_weights():
  plain = gating.GatedTransformerBlock(D, 4, mlp_features=F, gate='dense', rngs=nnx.Rngs(0))
  gated = gating.GatedTransformerBlock(D, 4, mlp_features=F, gate='dense', mlp_groups=G,
                                       rngs=nnx.Rngs(0))
  gated.attention = plain.attention
  gated.mlp.linear_in, gated.mlp.linear_out = plain.mlp_in, plain.mlp_out
  x = x_BxLxD()
  np.testing.assert_allclose(gated(x), plain(x), atol=1e-5)


@pytest.mark.parametrize('gate', gating.RULES)
def test_masked_equals_gathered_on_the_same_gate(gate):
  if gating.RULES[gate].per_token:
    with pytest.raises(ValueError, match='decides per token and gates attention heads only'):
      GatedMLP(D, F, G, gate=gate, active_groups=2, rngs=nnx.Rngs(0))
    return
  mlp = GatedMLP(D, F, G, gate=gate, active_groups=None if gate == 'dense' else 2,
                 rngs=nnx.Rngs(0))
  if mlp.router is not None:  # logits that differ per sequence and group
    for _, p in nnx.iter_graph(mlp.router):
      if isinstance(p, nnx.Param):
        p[...] = jax.random.normal(jax.random.key(3), p.shape)
  x = x_BxLxD()
  assigned = (dict(slice_B=jnp.array([0, 1, 1])) if gating.RULES[gate].router == 'assignment'
              else {})                                  # gate='slices': the data's slices
  masked, g = mlp(x, path='masked', deterministic=True, return_gate=True, **assigned)
  gathered = mlp(x, path='gathered', active_groups=G if gate == 'dense' else None,
                 deterministic=True, **assigned)
  np.testing.assert_allclose(masked, gathered, atol=1e-5)
  if gate != 'dense':
    assert g.idx_BxK.shape == (B, 2)


def test_gradients_reach_the_group_router():
  mlp = GatedMLP(D, F, G, gate='topk', active_groups=2, rngs=nnx.Rngs(0))
  x = x_BxLxD()

  def loss(mlp):
    return jnp.sum(mlp(x) ** 2) + jnp.sum(mlp.group_prob[...])
  grads = nnx.grad(loss)(mlp)
  router = grads.router
  assert float(jnp.abs(router.logits.kernel[...]).sum()) > 0
  assert float(jnp.abs(router.hidden.kernel[...]).sum()) > 0


def test_stats_are_recorded_like_heads():
  mlp = GatedMLP(D, F, G, gate='topk', active_groups=2, rngs=nnx.Rngs(0))
  mlp(x_BxLxD())
  stats = gating.gate_stats(mlp)['']
  assert set(stats) == {'group_usage', 'group_prob', 'group_weight', 'router_z_loss'}
  assert float(stats['group_usage'].sum()) == pytest.approx(2.0)


def test_jit_compiles_once_per_shape():
  mlp = GatedMLP(D, F, G, gate='topk', active_groups=2, path='gathered', rngs=nnx.Rngs(0))
  traces = []

  @nnx.jit
  def forward(mlp, x):
    traces.append(x.shape)
    return mlp(x)
  for seed in range(3):
    forward(mlp, x_BxLxD(seed))
  forward(mlp, x_BxLxD()[:, :8])
  assert traces == [(B, L, D), (B, 8, D)]


def test_padding_does_not_move_the_group_gate():
  mlp = GatedMLP(D, F, G, gate='topk', active_groups=2, rngs=nnx.Rngs(0))
  valid_BxL = jnp.arange(L)[None, :] < jnp.array([[L], [9], [5]])
  x, noise = x_BxLxD(1), x_BxLxD(2)
  a = mlp.gate(x, valid_BxL)
  b = mlp.gate(jnp.where(valid_BxL[:, :, None], x, noise), valid_BxL)
  np.testing.assert_array_equal(a.idx_BxK, b.idx_BxK)


@pytest.mark.parametrize('make,message', [
    (lambda: GatedMLP(D, F, 5, gate='topk', active_groups=2, rngs=nnx.Rngs(0)),
     'num_groups=5 must divide'),
    (lambda: GatedMLP(D, F, G, gate='topk', active_groups=G + 1, rngs=nnx.Rngs(0)),
     r'active_groups must be in \[1, G=4\]'),
    (lambda: GatedMLP(D, F, G, gate='topk', active_groups=0, rngs=nnx.Rngs(0)),
     'active_groups must be in'),
    (lambda: GatedMLP(D, F, G, gate='topk', rngs=nnx.Rngs(0)), 'active_groups=Kf'),
    (lambda: gating.GatedTransformerBlock(D, 4, mlp_features=F, mlp_groups=3, active_heads=2,
                                          rngs=nnx.Rngs(0)), 'mlp_groups=3 must divide'),
    (lambda: gating.GatedTransformerBlock(D, 4, mlp_features=F, active_groups=2,
                                          active_heads=2, rngs=nnx.Rngs(0)),
     'active_groups=2 needs mlp_groups'),
    (lambda: gating.GatedLM(V, num_layers=2, features=D, num_heads=4, max_length=L,
                            prefix_len=P, gate='dense', active_groups=2, rngs=nnx.Rngs(0)),
     'active_groups=2 needs mlp_groups'),
    (lambda: gating.GatedLM(V, num_layers=2, features=D, num_heads=4, max_length=L,
                            prefix_len=P, active_heads=2, mlp_features=F, mlp_groups=G,
                            active_groups=[1, 2, 3], rngs=nnx.Rngs(0)),
     'active_groups has 3 entries for 2 layers'),
    (lambda: gating.GatedTransformerBlock(D, 4, mlp_features=F, active_heads=2,
                                          group_router='attention', rngs=nnx.Rngs(0)),
     "group_router='attention' needs mlp_groups"),
    (lambda: gating.GatedTransformerBlock(D, 4, mlp_features=F, mlp_groups=G, active_groups=2,
                                          active_heads=2, group_router='both', rngs=nnx.Rngs(0)),
     "group_router must be one of \\('own', 'attention'\\)"),
    (lambda: gating.GatedTransformerBlock(D, 4, mlp_features=F, mlp_groups=G, active_groups=2,
                                          gate='static', active_heads=2, group_router='attention',
                                          rngs=nnx.Rngs(0)),
     "group_router='attention' needs an attention router that reads the input"),
    (lambda: GatedMLP(D, F, G, gate='dense', router='attention', rngs=nnx.Rngs(0)),
     "router='attention' takes the group logits from the attention's router"),
    (lambda: GatedMLP(D, F, G, gate='sigmoid', temperature=0.0, rngs=nnx.Rngs(0)),
     'temperature must be > 0, got 0.0'),
])
def test_bad_arguments_name_the_argument(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# -- in the models ------------------------------------------------------------------------

def lm(path='masked', gate='topk', **kw):
  return gating.GatedLM(V, num_layers=2, features=D, num_heads=4, max_length=L, prefix_len=P,
                        mlp_features=F, gate=gate, active_heads=2, mlp_groups=G,
                        active_groups=[1, 2], path=path, rngs=nnx.Rngs(0), **kw)


def tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (2, L), 0, V)


@pytest.mark.parametrize('gate,group_router', [('topk', 'own'), ('hard_concrete', 'own'),
                                             ('topk', 'attention')])
@pytest.mark.parametrize('path', ['masked', 'gathered'])
def test_lm_with_groups_is_causal_through_gradients(gate, group_router, path):
  model = lm(path, gate=gate, noise='gumbel' if gate == 'topk' else None, deterministic=False,
             group_router=group_router)
  assert model.blocks[1].group_router == group_router
  block = model.blocks[0]
  router = block.attention.router if group_router == 'attention' else block.mlp.router
  assert router.pool == 'prefix'
  model.trunk.token_embed = ShiftedEmbed(model.trunk.token_embed, L, nnx.Rngs(1))
  x = tokens()
  scored = np.asarray(model(x, rngs=nnx.Rngs(dropout=3)).scored_BxL[0])
  dependence_LxL = position_jacobian(model, x, lambda m, x: m(x, rngs=nnx.Rngs(dropout=3)))
  for t in range(L):
    if scored[t]:
      assert (dependence_LxL[t, t + 1:] == 0).all(), f'scored logit {t} reads the future'
    assert dependence_LxL[t, t] > 0


def test_lm_returns_group_weights_and_paths_agree():
  model = lm()
  masked = model(tokens())
  gathered = model(tokens(), path='gathered')
  assert masked.group_weights_BxNxG.shape == (2, 2, G)
  np.testing.assert_array_equal(np.asarray(masked.group_weights_BxNxG).sum(-1), [[1, 2]] * 2)
  np.testing.assert_allclose(masked.logits_BxLxV, gathered.logits_BxLxV, atol=1e-4)
  knob = model(tokens(), active_groups=3, path='gathered')   # the budget knob
  np.testing.assert_array_equal(np.asarray(knob.group_weights_BxNxG).sum(-1), [[3, 3]] * 2)
  stats = gating.gate_stats(model)
  assert 'group_usage' in stats['trunk/blocks/1/mlp']
  assert gating.GatedLM(V, num_layers=1, features=D, num_heads=4, max_length=L, prefix_len=P,
                        gate='dense', rngs=nnx.Rngs(0))(tokens()).group_weights_BxNxG is None


def test_encoder_with_groups():
  enc = gating.GatedEncoder(V, num_layers=2, features=D, num_heads=4, max_length=L,
                            num_classes=3, mlp_features=F, gate='topk', active_heads=2,
                            mlp_groups=G, active_groups=2, rngs=nnx.Rngs(0))
  valid = jnp.arange(L)[None, :] < jnp.array([[L], [5]])
  a = tokens()
  out_a, out_b = enc(a, valid_BxL=valid), enc(jnp.where(valid, a, 0), valid_BxL=valid)
  assert out_a.group_weights_BxNxG.shape == (2, 2, G)
  assert enc.blocks[0].mlp.router.pool == 'mean'
  np.testing.assert_allclose(out_a.class_logits_BxC, out_b.class_logits_BxC, atol=1e-5)


# The state of a 1-layer GatedLM built without mlp_groups, as before channel gating: the
# same paths, so that today's checkpoints still restore.
STATE_PATHS_WITHOUT_GROUPS = sorted([
    'trunk/blocks/0/attention/head_prob', 'trunk/blocks/0/attention/head_usage',
    'trunk/blocks/0/attention/head_weight', 'trunk/blocks/0/attention/key/bias',
    'trunk/blocks/0/attention/key/kernel', 'trunk/blocks/0/attention/out/bias',
    'trunk/blocks/0/attention/out/kernel', 'trunk/blocks/0/attention/query/bias',
    'trunk/blocks/0/attention/query/kernel', 'trunk/blocks/0/attention/router/hidden/bias',
    'trunk/blocks/0/attention/router/hidden/kernel',
    'trunk/blocks/0/attention/router/logits/bias',
    'trunk/blocks/0/attention/router/logits/kernel',
    'trunk/blocks/0/attention/router/norm/bias', 'trunk/blocks/0/attention/router/norm/scale',
    'trunk/blocks/0/attention/router_z_loss', 'trunk/blocks/0/attention/temperature',
    'trunk/blocks/0/attention/value/bias', 'trunk/blocks/0/attention/value/kernel',
    'trunk/blocks/0/attention_norm/bias', 'trunk/blocks/0/attention_norm/scale',
    'trunk/blocks/0/dropout/rngs/count', 'trunk/blocks/0/dropout/rngs/key',
    'trunk/blocks/0/mlp_in/bias', 'trunk/blocks/0/mlp_in/kernel',
    'trunk/blocks/0/mlp_norm/bias', 'trunk/blocks/0/mlp_norm/scale',
    'trunk/blocks/0/mlp_out/bias', 'trunk/blocks/0/mlp_out/kernel',
    'trunk/dropout/rngs/count', 'trunk/dropout/rngs/key', 'trunk/final_norm/bias',
    'trunk/final_norm/scale', 'trunk/position_embed/embedding',
    'trunk/token_embed/embedding'])


def test_state_paths_without_groups_are_unchanged():
  model = gating.GatedLM(V, num_layers=1, features=D, num_heads=4, max_length=L, prefix_len=P,
                         gate='topk', active_heads=2, rngs=nnx.Rngs(0))
  paths = sorted('/'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model)))
  assert paths == STATE_PATHS_WITHOUT_GROUPS


# -- the groups' router shared with the attention --------------------------------------------

def test_shared_router_reads_the_attention_routers_features():
  block = gating.GatedTransformerBlock(D, 4, mlp_features=F, mlp_groups=G, active_groups=2,
                                       active_heads=2, router='mean', group_router='attention',
                                       rngs=nnx.Rngs(0))
  assert block.group_router == 'attention' and block.mlp.router is None
  router = block.attention.router
  assert router.group_logits.kernel.shape == (router.hidden_features, G)
  for p in (router.group_logits.kernel, router.logits.kernel):
    p[...] = jax.random.normal(jax.random.key(4), p.shape)
  x = x_BxLxD()
  y, (head_gate, group_gate) = block(x, return_gates=True)
  # The groups' logits are the attention router's hidden features times the groups' layer.
  xn = block.attention_norm(x)
  f_BxF = block.attention.router.features(xn)
  want = block.mlp.gate(block.mlp_norm(x), logits_BxG=router.group_logits(f_BxF))
  np.testing.assert_array_equal(group_gate.idx_BxK, want.idx_BxK)
  np.testing.assert_allclose(group_gate.weights_BxH, want.weights_BxH)
  np.testing.assert_allclose(y, block(x, path='gathered'), atol=1e-5)
  # Its own router would read LayerNorm(h), after the attention: a different decision.
  own = gating.GatedTransformerBlock(D, 4, mlp_features=F, mlp_groups=G, active_groups=2,
                                     active_heads=2, router='mean', rngs=nnx.Rngs(0))
  assert own.group_router == 'own' and own.mlp.router is not None
  assert not hasattr(own.attention.router, 'group_logits')

  def loss(block):
    return jnp.sum(block(x) ** 2) + jnp.sum(block.mlp.group_prob[...])
  grads = nnx.grad(loss)(block)
  assert float(jnp.abs(grads.attention.router.group_logits.kernel[...]).sum()) > 0
  assert float(jnp.abs(grads.attention.router.hidden.kernel[...]).sum()) > 0


def test_a_shared_router_mlp_needs_its_logits():
  mlp = GatedMLP(D, F, G, gate='topk', active_groups=2, router='attention', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"router='attention': pass its group logits logits_BxG"):
    mlp(x_BxLxD())
  with pytest.raises(ValueError, match='of shape \\(3, 4\\), got \\(3, 2\\)'):
    mlp(x_BxLxD(), logits_BxG=jnp.zeros((B, 2)))
  own = GatedMLP(D, F, G, gate='topk', active_groups=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='only taken by a GatedMLP built with'):
    own(x_BxLxD(), logits_BxG=jnp.zeros((B, G)))

