import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating import GatedMultiHeadAttention
from gating.layers import compute

B, L, D, H = 3, 16, 32, 4
RULES_WITH_K = ['topk', 'hard_concrete', 'sigmoid', 'static']


def inputs(seed=0, b=B, l=L):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


def padding_mask(lengths=(16, 10, 5)):
  valid = jnp.arange(L)[None, :] < jnp.array(lengths)[:, None]
  return nnx.make_attention_mask(valid, valid), valid


def layer(gate='topk', k=2, **kw):
  kw.setdefault('deterministic', True)
  return GatedMultiHeadAttention(H, D, gate=gate, active_heads=k, rngs=nnx.Rngs(0), **kw)


# -- equality with nnx.MultiHeadAttention -------------------------------------------------

@pytest.mark.parametrize('use_mask', [False, True])
@pytest.mark.parametrize('is_causal', [False, True])
def test_from_dense_with_dense_gate_equals_mha(use_mask, is_causal):
  mha = nnx.MultiHeadAttention(H, D, qkv_features=48, out_features=24, decode=False,
                               rngs=nnx.Rngs(3))
  gated = GatedMultiHeadAttention.from_dense(mha, gate='dense', rngs=nnx.Rngs(0))
  x = inputs()
  mask = padding_mask()[0] if use_mask else None
  want = mha(x, mask=mask, is_causal=is_causal)
  for path, k in (('masked', None), ('gathered', H)):
    got = gated(x, mask=mask, is_causal=is_causal, path=path, active_heads=k)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('use_mask', [False, True])
@pytest.mark.parametrize('is_causal', [False, True])
def test_the_weight_gather_itself_at_k_equal_h_equals_mha(use_mask, is_causal):
  """The gathered kernel, not the layer's K = H shortcut (which computes every head with
  the shared weights): each sequence's H heads gathered, in its own order, equal flax."""
  mha = nnx.MultiHeadAttention(H, D, qkv_features=48, out_features=24, decode=False,
                               rngs=nnx.Rngs(3))
  gated = GatedMultiHeadAttention.from_dense(mha, gate='dense', rngs=nnx.Rngs(0))
  x = inputs()
  mask = padding_mask()[0] if use_mask else None
  idx_BxH = jnp.stack([jnp.roll(jnp.arange(H), b) for b in range(B)])
  options = compute.AttendOptions(mask=mask, is_causal=is_causal)
  got = compute.gathered_attention(x, x, x, gated.head_weights(), idx_BxH,
                                   jnp.ones((B, H)), options)
  np.testing.assert_allclose(got, mha(x, mask=mask, is_causal=is_causal), atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_the_gathered_path_below_h_equals_mha_without_the_closed_heads(k):
  """At K < H, sequence b's output is flax's attention with every head outside b's K
  zeroed in the output projection: an independent per-sequence reference."""
  mha = nnx.MultiHeadAttention(H, D, decode=False, rngs=nnx.Rngs(3))
  gated = GatedMultiHeadAttention.from_dense(mha, gate='topk', active_heads=k,
                                             rngs=nnx.Rngs(0))
  x = inputs(seed=5)
  got = gated(x, path='gathered')
  idx_BxK = np.asarray(gated.gate(x).idx_BxK)
  assert len({tuple(sorted(row)) for row in idx_BxK}) > 1 or k == H  # the gate varies
  for b in range(B):
    alone = nnx.clone(mha)
    closed = np.setdiff1d(np.arange(H), idx_BxK[b])
    alone.out.kernel[...] = alone.out.kernel[...].at[closed].set(0.0)
    np.testing.assert_allclose(got[b], alone(x[b:b + 1])[0], atol=1e-5, rtol=1e-5)


def test_from_dense_copies_weights_and_refuses_other_modules():
  mha = nnx.MultiHeadAttention(H, D, decode=False, rngs=nnx.Rngs(3))
  gated = GatedMultiHeadAttention.from_dense(mha, gate='topk', active_heads=2,
                                             rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(gated.query.kernel[...], mha.query.kernel[...])
  gated.query.kernel[...] = gated.query.kernel[...] * 0  # a copy, not a shared reference
  assert np.abs(mha.query.kernel[...]).sum() > 0
  with pytest.raises(ValueError, match='nnx.MultiHeadAttention'):
    GatedMultiHeadAttention.from_dense(nnx.Linear(D, D, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))


# -- path equivalence ---------------------------------------------------------------------

@pytest.mark.parametrize('rule', RULES_WITH_K)
@pytest.mark.parametrize('jit', [False, True])
def test_masked_equals_gathered_for_every_rule(rule, jit):
  attn = layer(rule, k=2, router='first' if rule != 'static' else None)  # causal-safe
  x = inputs()
  mask, _ = padding_mask()

  def run(attn, x, path):
    return attn(x, mask=mask, is_causal=True, path=path)
  run = nnx.jit(run, static_argnums=2) if jit else run
  masked, gathered = run(attn, x, 'masked'), run(attn, x, 'gathered')
  np.testing.assert_allclose(masked, gathered, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('rule', ['topk', 'hard_concrete'])
def test_masked_equals_gathered_in_training_with_the_same_rng(rule):
  attn = layer(rule, k=2, noise='gumbel', dropout_rate=0.2, deterministic=False)
  x = inputs()
  masked = attn(x, rngs=nnx.Rngs(dropout=7))
  gathered = attn(x, rngs=nnx.Rngs(dropout=7), path='gathered')
  np.testing.assert_allclose(masked, gathered, atol=1e-5, rtol=1e-5)
  other = attn(x, rngs=nnx.Rngs(dropout=8))
  assert np.abs(np.asarray(masked - other)).max() > 1e-3


def test_cross_attention_paths_agree():
  attn = GatedMultiHeadAttention(H, D, in_kv_features=24, gate='topk', active_heads=2,
                                 rngs=nnx.Rngs(0))
  x, context = inputs(), jax.random.normal(jax.random.key(1), (B, 7, 24))
  np.testing.assert_allclose(attn(x, context), attn(x, context, path='gathered'), atol=1e-5)
  assert attn(x, context).shape == (B, L, D)


def test_budget_knob_runs_a_topk_layer_at_another_k():
  attn = layer('topk', k=2)
  x = inputs()
  gate3 = attn.gate(x, active_heads=3)
  assert gate3.idx_BxK.shape == (B, 3)
  np.testing.assert_allclose(attn(x, active_heads=3), attn(x, active_heads=3, path='gathered'),
                             atol=1e-5)
  assert np.asarray(gate3.weights_BxH).sum() == B * 3


def test_bfloat16_compute():
  attn = layer('topk', k=2, dtype=jnp.bfloat16)
  y = attn(inputs(), path='gathered')
  assert y.dtype == jnp.bfloat16


def test_bfloat16_parameters_keep_a_float32_router():
  """param_dtype is the projections' dtype; the router's parameters stay float32, as
  documented (it computes in float32), and both paths still agree."""
  attn = layer('topk', k=2, param_dtype=jnp.bfloat16)
  dtypes = lambda module: {x.dtype for x in jax.tree.leaves(nnx.state(module, nnx.Param))}
  assert dtypes(attn.router) == {jnp.dtype('float32')}
  assert dtypes(attn.query) == {jnp.dtype('bfloat16')}
  x = inputs()
  np.testing.assert_allclose(attn(x, path='gathered'), attn(x, path='masked'), atol=1e-5)


# -- gradients, padding, static, determinism ------------------------------------------------

@pytest.mark.parametrize('rule,path', [('topk', 'masked'), ('hard_concrete', 'masked'),
                                       ('sigmoid', 'masked'), ('topk', 'gathered')])
def test_gradients_reach_the_router(rule, path):
  attn = layer(rule, k=2, path=path, deterministic=False)
  x, target = inputs(), inputs(seed=5)

  def loss(attn):
    return jnp.mean((attn(x, rngs=nnx.Rngs(dropout=0)) - target) ** 2)
  grads = nnx.grad(loss)(attn)
  router_grads = jax.tree.leaves(grads['router'])
  assert router_grads and max(float(jnp.abs(g).max()) for g in router_grads) > 0


def test_padding_does_not_move_the_gate():
  attn = layer('topk', k=2)
  mask, valid = padding_mask()
  x = inputs()
  other = jnp.where(valid[:, :, None], x, 1e3 * inputs(seed=9))
  a, b = attn.gate(x, mask=mask), attn.gate(other, mask=mask)
  np.testing.assert_array_equal(a.idx_BxK, b.idx_BxK)
  np.testing.assert_array_equal(a.weights_BxH, b.weights_BxH)
  ya, yb = attn(x, mask=mask), attn(other, mask=mask)
  np.testing.assert_allclose(ya[1, :10], yb[1, :10], atol=1e-5)


def test_static_router_gives_every_sequence_the_same_heads():
  attn = layer('static', k=2)
  attn.router.logits_H[...] = jnp.array([0.0, 3.0, -2.0, 1.0])
  gate = attn.gate(inputs(b=6))
  assert (np.sort(gate.idx_BxK, axis=1) == [1, 3]).all()


def test_hard_concrete_is_deterministic_in_eval_and_random_in_training():
  attn = layer('hard_concrete', k=None)
  x = inputs()
  np.testing.assert_array_equal(attn(x), attn(x))
  attn.train()
  gates = [attn.gate(x).weights_BxH for _ in range(4)]
  assert any(np.any(gates[0] != g) for g in gates[1:])
  attn.eval()
  np.testing.assert_array_equal(attn.gate(x).weights_BxH, attn.gate(x).weights_BxH)


# -- state: statistics, temperature, traces ---------------------------------------------------

def test_gate_stats_are_collected_from_a_user_model():
  class UserModel(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Linear(8, D, rngs=rngs)
      self.layers = nnx.List([layer('topk', k=1), layer('sigmoid', k=None)])

    def __call__(self, x):
      x = self.embed(x)
      for attn in self.layers:
        x = x + attn(x)
      return x

  model = UserModel(nnx.Rngs(0))
  model(jnp.ones((5, L, 8)))
  stats = gating.gate_stats(model)
  assert sorted(stats) == ['layers/0', 'layers/1']
  assert stats['layers/0']['head_usage'].shape == (H,)
  np.testing.assert_allclose(stats['layers/0']['head_usage'].sum(), 1.0)
  assert stats['layers/0']['router_z_loss'].shape == ()
  assert 'gate_stats' not in str(nnx.state(model, nnx.Param))


def test_jit_compiles_once_for_the_same_shapes_and_temperature_is_traced():
  attn = layer('hard_concrete', k=2, path='gathered', deterministic=False)
  traces = []

  @nnx.jit
  def step(attn, x):
    traces.append(1)
    return attn(x)

  for seed in range(3):
    step(attn, inputs(seed))
  gating.set_temperature(attn, 0.3)
  assert float(attn.temperature[...]) == pytest.approx(0.3)
  step(attn, inputs(4))
  assert len(traces) == 1
  step(attn, inputs(5, b=5))  # a new batch size compiles once more; stats keep their shape
  step(attn, inputs(6))
  assert len(traces) == 2
  assert attn.head_usage[...].shape == (H,)


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs,message', [
    (dict(active_heads=0), r'active_heads must be in \[1, num_heads=4\]'),
    (dict(active_heads=5), r'active_heads must be in \[1, num_heads=4\]'),
    (dict(active_heads=2.0), 'active_heads must be an int'),
    (dict(gate='hard_concrete', path='gathered'), "path='gathered' needs a static budget"),
    (dict(gate='topk'), "gate='topk' needs a budget"),
    (dict(gate='top2', active_heads=2), 'gate must be one of'),
    (dict(gate='topk', active_heads=2, path='sparse'), 'path must be one of'),
    (dict(gate='dense', active_heads=2), "gate='dense' opens all 4 heads"),
    (dict(gate='topk', active_heads=2, qkv_features=30), r'qkv_features \(30\) must be divisible'),
    (dict(gate='topk', active_heads=2, num_kv_heads=3),
     'num_kv_heads must be an int >= 1 that divides num_heads=4'),
    (dict(gate='topk', active_heads=1, num_kv_heads=2),
     "active_heads=1: with unit='kv_group' a gate opens whole groups of 2 query heads"),
    (dict(gate='topk', active_heads=2, num_kv_heads=2, unit='group'), 'unit must be one of'),
    (dict(gate='topk', active_heads=4, num_kv_heads=2, shared_heads=1),
     "shared_heads=1: with unit='kv_group'"),
    (dict(gate='topk', active_heads=2, attention_fn=lambda *a, **k: None), 'attention_fn'),
    (dict(gate='topk', active_heads=2, normalize_qk=True), 'normalize_qk'),
    (dict(gate='topk', active_heads=2, decode=True), 'gating.decode'),
    (dict(gate='topk', active_heads=2, qkv_promote_dtype=None), 'qkv_promote_dtype'),
    (dict(gate='topk', active_heads=2, router='max'), 'router must be one of'),
    (dict(gate='topk', active_heads=2, noise='salt'), 'noise must be one of'),
    (dict(gate='static', active_heads=2, router='mean'), 'uses the input-free router'),
    (dict(gate='sigmoid', active_heads=None, temperature=-1.0),
     'temperature must be > 0, got -1.0'),
    (dict(gate='topk', active_heads=2, temperature=0.0), 'temperature must be > 0, got 0.0'),
    (dict(gate='hard_concrete', active_heads=None, gate_options={'gamma': 0.1}),
     'hard concrete needs gamma < 0 and zeta > 1, got gamma=0.1'),
    (dict(gate='static', active_heads=None, gate_options={'zeta': 0.9}),
     'needs gamma < 0 and zeta > 1'),
])
def test_bad_construction_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    GatedMultiHeadAttention(H, D, rngs=nnx.Rngs(0), **kwargs)


def test_bad_calls_raise():
  attn = layer('topk', k=2)
  x = inputs()
  with pytest.raises(ValueError, match=r'rank >= 2 \[\.\.\., length, features\]'):
    attn(x[0, 0])    # [L, D] and [..., L, D] are accepted, as by nnx.MultiHeadAttention
  with pytest.raises(ValueError, match='has 8 features; this layer expects 32'):
    attn(jnp.ones((B, L, 8)))
  with pytest.raises(ValueError, match='does not broadcast'):
    attn(x, mask=jnp.ones((B, 1, L, L + 1), bool))
  with pytest.raises(ValueError, match='does not broadcast'):
    attn(x, mask=jnp.ones((2, 1, L, L), bool))
  with pytest.raises(ValueError, match='gating.decode'):
    attn(x, decode=True)
  with pytest.raises(ValueError, match=r'active_heads must be in \[1, num_heads=4\]'):
    attn(x, active_heads=9)
  with pytest.raises(ValueError, match='path must be one of'):
    attn(x, path='fast')
  with pytest.raises(ValueError, match='sow_weights'):
    attn(x, sow_weights=True)
  stochastic = layer('hard_concrete', k=2, deterministic=None)
  with pytest.raises(ValueError, match='needs `deterministic`'):
    stochastic(x)


# -- inputs shaped as nnx.MultiHeadAttention accepts them ---------------------------------------

@pytest.mark.parametrize('path', ['masked', 'gathered'])
def test_unbatched_and_extra_batch_dimensions_match_the_batched_call(path):
  attn = layer('topk', k=2, router='first')
  x = inputs(b=6)
  mask, _ = padding_mask(lengths=(16, 10, 5))
  mask6 = jnp.concatenate([mask, mask], axis=0)
  want = attn(x, mask=mask6, path=path)
  np.testing.assert_allclose(attn(x[1], mask=mask6[1], path=path), want[1], atol=1e-6)
  y, gate = attn(x.reshape(2, 3, L, D), mask=mask6.reshape(2, 3, 1, L, L), path=path,
                 return_gate=True)
  np.testing.assert_allclose(y, want.reshape(2, 3, L, D), atol=1e-6)
  assert gate.weights_BxH.shape == (2, 3, H) and gate.idx_BxK.shape == (2, 3, 2)
  np.testing.assert_array_equal(attn.gate(x.reshape(2, 3, L, D)).idx_BxK.reshape(6, 2),
                                attn.gate(x).idx_BxK)
  # A cross-attention mask (S keys, not L) with two batch dimensions: gate() reads the
  # same valid rows as with one.
  cross = jnp.concatenate([mask6, jnp.zeros((6, 1, L, 3), bool)], axis=-1)
  np.testing.assert_array_equal(
      attn.gate(x.reshape(2, 3, L, D), cross.reshape(2, 3, 1, L, L + 3)).weights_BxH,
      attn.gate(x, cross).weights_BxH.reshape(2, 3, H))
  mha = nnx.MultiHeadAttention(H, D, decode=False, rngs=nnx.Rngs(3))
  dense = GatedMultiHeadAttention.from_dense(mha, gate='dense', rngs=nnx.Rngs(0))
  np.testing.assert_allclose(dense(x[0]), mha(x[0]), atol=1e-6)
  np.testing.assert_allclose(dense(x.reshape(2, 3, L, D)), mha(x.reshape(2, 3, L, D)),
                             atol=1e-6)


def test_from_dense_keeps_dropout_and_refuses_what_it_cannot_carry():
  """The original's dropout stream and keep_rngs come along (a dense gate then equals it
  in training too); a customized matmul or dtype promotion, which the gated einsums would
  drop, is refused as the constructor refuses it."""
  x = inputs()
  mha = nnx.MultiHeadAttention(H, D, dropout_rate=0.5, decode=False, rngs=nnx.Rngs(3))
  dense = GatedMultiHeadAttention.from_dense(mha, gate='dense', rngs=nnx.Rngs(0))
  np.testing.assert_allclose(dense(x, deterministic=False), mha(x, deterministic=False),
                             atol=1e-6)
  unkept = nnx.MultiHeadAttention(H, D, dropout_rate=0.5, decode=False, keep_rngs=False,
                                  rngs=nnx.Rngs(3))
  gated = GatedMultiHeadAttention.from_dense(unkept, gate='dense', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='needs `rngs` at call time'):
    gated(x, deterministic=False)
  gated(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  for name, value in (('qkv_dot_general', jax.lax.dot_general),
                      ('out_promote_dtype', lambda *a, **k: a)):
    custom = nnx.MultiHeadAttention(H, D, decode=False, rngs=nnx.Rngs(3), **{name: value})
    with pytest.raises(ValueError, match=f'does not support: {name}'):
      GatedMultiHeadAttention.from_dense(custom, gate='dense', rngs=nnx.Rngs(0))


def test_prefix_router_without_prefix_len_names_the_router_argument():
  with pytest.raises(ValueError, match=r"router='prefix' needs prefix_len=P >= 1"):
    layer('topk', k=2, router='prefix')


def test_a_mask_without_batch_or_head_axes_runs_on_both_paths():
  """A [L, S] mask broadcasts to every sequence and head: the gathered path takes it as
  the masked path does (it read a head axis that is not there)."""
  attn = layer('topk', k=2)
  x = inputs()
  L = x.shape[1]
  mask_LxS = jnp.tril(jnp.ones((L, L), bool))
  masked, gathered = (attn(x, mask=mask_LxS, path=p) for p in ('masked', 'gathered'))
  np.testing.assert_allclose(gathered, masked, atol=1e-5)
  np.testing.assert_allclose(masked, attn(x, mask=mask_LxS[None, None], path='masked'), atol=0)


def test_causal_construction_gives_a_per_token_rule_the_token_router():
  attn = gating.GatedMultiHeadAttention.from_dense(
      nnx.MultiHeadAttention(H, D, decode=False, rngs=nnx.Rngs(0)), gate='token_topk',
      active_heads=2, causal=True, rngs=nnx.Rngs(1))
  assert attn.router.pool == 'token'
  attn(inputs(), is_causal=True)


def test_is_causal_with_a_pooling_router_is_refused():
  with pytest.raises(ValueError, match="is_causal=True with router='mean'"):
    layer('topk', k=2)(inputs(), is_causal=True)
  layer('topk', k=2, router='prefix', prefix_len=4)(inputs(), is_causal=True)
  layer('static', k=2)(inputs(), is_causal=True)


@pytest.mark.parametrize('bad', [-1.0, 0.0, float('nan')])
def test_set_temperature_refuses_a_temperature_that_is_not_positive(bad):
  attn = layer('topk', k=2)
  with pytest.raises(ValueError, match='temperature must be > 0'):
    gating.set_temperature(attn, bad)
  gating.set_temperature(attn, 0.5)
  assert float(attn.temperature[...]) == 0.5
  with pytest.raises(ValueError, match='temperature must be > 0'):
    gating.linen.set_temperature({'gate_temperature': {}}, bad)
