import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating import GatedMultiHeadAttention

V, L, D, H, P = 40, 12, 32, 4, 4
ROOT = os.path.join(os.path.dirname(__file__), '..')


class UserModel(nnx.Module):
  """A model that knows nothing of gating: two self-attentions and a cross-attention."""

  def __init__(self, *, rngs):
    self.embed = nnx.Linear(8, D, rngs=rngs)
    self.layers = nnx.List([nnx.MultiHeadAttention(H, D, decode=False, rngs=rngs)
                            for _ in range(2)])
    self.cross = nnx.MultiHeadAttention(H, D, in_kv_features=16, decode=False, rngs=rngs)

  def __call__(self, x, context):
    x = self.embed(x)
    for attn in self.layers:
      x = x + attn(x, is_causal=True)
    return x + self.cross(x, context)


def user_inputs(b=3):
  return (jax.random.normal(jax.random.key(0), (b, L, 8)),
          jax.random.normal(jax.random.key(1), (b, 5, 16)))


# -- gate_heads -------------------------------------------------------------------------------

def test_gate_heads_with_the_dense_gate_leaves_outputs_unchanged():
  model = UserModel(rngs=nnx.Rngs(0))
  gated = gating.gate_heads(model, rngs=nnx.Rngs(1), gate='dense')
  assert all(isinstance(m, GatedMultiHeadAttention) for m in (*gated.layers, gated.cross))
  assert all(isinstance(m, nnx.MultiHeadAttention) for m in (*model.layers, model.cross))
  np.testing.assert_allclose(gated(*user_inputs()), model(*user_inputs()), atol=1e-5)
  gated.embed.kernel[...] = gated.embed.kernel[...] * 0  # a copy: the original is untouched
  assert np.abs(np.asarray(model.embed.kernel[...])).sum() > 0


def test_gate_heads_gates_every_layer():
  model = gating.gate_heads(UserModel(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), gate='topk',
                            active_heads=2, path='gathered', causal=True)
  y = model(*user_inputs())
  assert y.shape == (3, L, D)
  stats = gating.gate_stats(model)
  assert sorted(stats) == ['cross', 'layers/0', 'layers/1']
  np.testing.assert_allclose(stats['cross']['head_usage'].sum(), 2.0)


def test_gate_heads_bad_models():
  with pytest.raises(ValueError, match='found no attention module it can gate in Linear.*nnx.MultiHeadAttention.*gemma'):
    gating.gate_heads(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0), gate='dense')
  caching = nnx.MultiHeadAttention(H, D, decode=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='decode=True'):
    gating.gate_heads(caching, rngs=nnx.Rngs(0), gate='dense')
  with pytest.raises(ValueError, match="gate='topk' needs a budget"):
    gating.gate_heads(UserModel(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0), gate='topk')


class CausalLM(nnx.Module):
  """A home-made causal LM that passes a causal *mask* (not is_causal) to its layers."""

  def __init__(self, *, rngs):
    self.layers = nnx.List([nnx.MultiHeadAttention(H, D, decode=False, rngs=rngs)
                            for _ in range(2)])

  def __call__(self, x_BxLxD):
    mask = nnx.make_causal_mask(jnp.ones(x_BxLxD.shape[:2]))
    for attn in self.layers:
      x_BxLxD = x_BxLxD + attn(x_BxLxD, mask=mask)
    return x_BxLxD


def future_influence(model, x_BxLxD):
  """influence[t, s] = |d out[t] / d x[s]| summed over batch and features."""
  graphdef, state = nnx.split(model)

  def out_per_position(x_LxD):
    return nnx.merge(graphdef, state, copy=True)(x_LxD[None])[0].sum(-1)
  jac_LxLxD = jax.jit(jax.jacrev(out_per_position))(x_BxLxD[0])   # [t, s, D]
  return np.asarray(jnp.abs(jac_LxLxD).sum(-1))


@pytest.mark.parametrize('kwargs, first_scored', [
    (dict(prefix_len=4), 3),   # router='prefix': positions P-1.. are causal
    (dict(), 0),               # router='first': every position is causal
])
def test_causal_retrofit_never_lets_a_later_token_move_a_scored_position(kwargs, first_scored):
  model = CausalLM(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, L, D))
  leaky = gating.gate_heads(model, rngs=nnx.Rngs(1), gate='topk', active_heads=2)
  assert leaky.layers[0].router.pool == 'mean'
  influence = future_influence(leaky, x)
  assert influence[:-1, -1].max() > 1e-3    # the leak this guards against: mean pooling
  gated = gating.gate_heads(model, rngs=nnx.Rngs(1), gate='topk', active_heads=2,
                            causal=True, **kwargs)
  assert gated.layers[0].router.pool == ('prefix' if kwargs else 'first')
  influence = future_influence(gated, x)
  for t in range(first_scored, L):
    assert influence[t, t + 1:].max(initial=0.0) == 0.0, f'position {t} sees the future'


def test_causal_retrofit_refuses_a_pooling_router_and_is_causal_refuses_it_too():
  with pytest.raises(ValueError, match="causal=True: router='mean' reads every token"):
    gating.gate_heads(CausalLM(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), gate='topk',
                      active_heads=2, causal=True, router='mean')
  model = gating.gate_heads(UserModel(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), gate='topk',
                            active_heads=2)   # UserModel calls is_causal=True
  with pytest.raises(ValueError, match="is_causal=True with router='mean'.*causal leak"):
    model(*user_inputs())


def test_set_path_switches_every_layer_and_refuses_without_a_budget():
  model = gating.gate_heads(UserModel(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), gate='topk',
                            active_heads=2, causal=True)
  masked = model(*user_inputs())
  assert gating.set_path(model, 'gathered') is model
  assert {m.path for m in (*model.layers, model.cross)} == {'gathered'}
  np.testing.assert_allclose(model(*user_inputs()), masked, atol=1e-5)
  gating.set_path(model, 'gathered', active_heads=1)
  assert model.layers[0].active_heads == 1
  assert gating.gate_stats(model)['cross']['head_usage'].sum() == pytest.approx(2.0)
  model(*user_inputs())
  assert gating.gate_stats(model)['cross']['head_usage'].sum() == pytest.approx(1.0)
  sigmoid = gating.gate_heads(UserModel(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), gate='sigmoid',
                              causal=True)
  with pytest.raises(ValueError, match="layer '(cross|layers/0)'.*gathered.*needs a static budget"):
    gating.set_path(sigmoid, 'gathered')
  assert sigmoid.layers[0].path == 'masked'     # nothing changed
  with pytest.raises(ValueError, match='set_path found no gated attention layer'):
    gating.set_path(UserModel(rngs=nnx.Rngs(0)), 'gathered')


SHARDED = textwrap.dedent('''
    import json
    import jax
    jax.config.update('jax_num_cpu_devices', 4)
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from flax import nnx
    import gating

    class Model(nnx.Module):  # as in flax's "Scale up on multiple devices" guide
      def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.embed = nnx.Linear(8, 32, kernel_init=nnx.with_partitioning(init, (None, 'model')),
                                rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            4, 32, decode=False, kernel_init=nnx.with_partitioning(init, (None, 'model', None)),
            out_kernel_init=nnx.with_partitioning(init, ('model', None, None)), rngs=rngs)

      def __call__(self, x):
        return self.attn(self.embed(x))

    mesh = jax.make_mesh((2, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    forward = nnx.jit(lambda model, x: model(x))
    with jax.set_mesh(mesh):
      model = Model(nnx.Rngs(0))
      x = jax.device_put(jnp.ones((4, 16, 8)), NamedSharding(mesh, P('data')))
      dense = gating.gate_heads(model, rngs=nnx.Rngs(1), gate='dense')
      topk = gating.gate_heads(model, rngs=nnx.Rngs(1), gate='topk', active_heads=2,
                               path='gathered')
      placements = {'/'.join(map(str, path)): list(v[...].sharding.spec)
                    for path, v in nnx.to_flat_state(nnx.state(topk))
                    if isinstance(v[...].sharding, NamedSharding) and v[...].sharding.mesh == mesh}
      n_arrays = len(nnx.to_flat_state(nnx.state(topk)))
      y = forward(topk, x)
      print(json.dumps(dict(
          max_diff=float(jnp.abs(forward(dense, x) - forward(model, x)).max()),
          placements=placements, n_arrays=n_arrays, y_shape=list(y.shape),
          metadata=list(topk.attn.query.kernel.get_metadata()['out_sharding']),
          pspec=list(nnx.get_partition_spec(nnx.state(topk.attn.router))['hidden']['kernel']
                     .get_value()))))
    ''')


def test_gate_heads_on_a_model_sharded_over_a_device_mesh():
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT), JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-c', SHARDED], capture_output=True, text=True,
                       env=env, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out['max_diff'] < 1e-5
  assert out['y_shape'] == [4, 16, 32]
  assert len(out['placements']) == out['n_arrays']  # every array, old and new, on the mesh
  assert out['placements']['attn/query/kernel'] == [None, 'model', None]
  assert out['placements']['attn/router/hidden/kernel'] == []  # replicated
  assert out['metadata'] == [None, 'model', None] and out['pspec'] == []


# -- prune --------------------------------------------------------------------------------------

def lm(gate='topk', k=(1, 3), path='gathered', **kw):
  return gating.GatedLM(V, num_layers=2, features=D, num_heads=H, max_length=L, prefix_len=P,
                        gate=gate, active_heads=list(k) if k else None, path=path,
                        rngs=nnx.Rngs(0), **kw)


FAVOURED = ([-9.0, -9.0, 9.0, -9.0], [9.0, 9.0, -9.0, 9.0])  # layer 0 picks {2}, layer 1 {0, 1, 3}


def favour(model, logits=FAVOURED):
  """Router biases that make every sequence pick the same heads."""
  for block, bias in zip(model.blocks, logits):
    block.attention.router.logits.bias[...] = jnp.array(bias)
  return model


def tokens(b=3, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, L), 0, V)


@nnx.jit
def forward(model, tokens_BxL):
  """model(tokens) compiled; the gate statistics it records reach the model."""
  return model(tokens_BxL)


@pytest.mark.parametrize('path', ['masked', 'gathered'])
def test_pruned_equals_gated_when_the_gate_picks_the_kept_heads(path):
  model = favour(lm(path=path))
  gated = forward(model, tokens())
  pruned, report = gating.prune(model, 0.0)  # usage recorded by the call above
  assert report.num_heads == (1, 3) and report.head_dim == D // H
  assert report.kept_heads == {'trunk/blocks/0/attention': (2,),
                               'trunk/blocks/1/attention': (0, 1, 3)}
  assert [b.attention.num_heads for b in pruned.blocks] == [1, 3]
  assert all(b.attention.router is None for b in pruned.blocks)
  out = forward(pruned, tokens())
  np.testing.assert_allclose(out.logits_BxLxV, gated.logits_BxLxV, atol=1e-5)
  np.testing.assert_array_equal(out.scored_BxL, gated.scored_BxL)
  # On other tokens too: the gate picks the same heads for every sequence.
  np.testing.assert_allclose(forward(pruned, tokens(seed=7)).logits_BxLxV,
                             forward(model, tokens(seed=7)).logits_BxLxV, atol=1e-5)


def test_pruned_differs_where_the_gate_picks_removed_heads():
  model = favour(lm(k=(1, 1)), ([-9.0, -9.0, 9.0, -9.0], [9.0, -9.0, -9.0, -9.0]))
  pruned, _ = gating.prune(model, {'trunk/blocks/0/attention': [0, 0, 1, 0],
                                   'trunk/blocks/1/attention': [0, 0, 0, 1]})
  difference = forward(pruned, tokens()).logits_BxLxV - forward(model, tokens()).logits_BxLxV
  assert np.abs(np.asarray(difference)).max() > 1e-3


def test_prune_reports_parameters_and_flops():
  model = favour(lm())
  forward(model, tokens())
  pruned, report = gating.prune(model, 0.0)
  Dh, removed_heads = D // H, (H - 1) + (H - 3)
  router = sum(x.size for x in jax.tree.leaves(nnx.state(model.blocks[0].attention.router)))
  per_head = 3 * (D * Dh + Dh) + Dh * D
  assert report.params_before == gating.convert.count_params(model)
  assert report.params_before - report.params_after == removed_heads * per_head + 2 * router
  assert report.params_after == gating.convert.count_params(pruned)
  assert report.flops_input_shape == (1, L)
  assert 0 < report.flops_after < report.flops_before
  dense_flops = gating.convert.forward_flops(lm('dense', k=None, path='masked'),
                                             jnp.zeros((1, L), jnp.int32))
  assert report.flops_after < dense_flops
  assert 'XLA cost analysis' in str(report)


def test_pruned_model_round_trips_through_an_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  model = favour(lm(positions='rotary'))
  forward(model, tokens())
  pruned, report = gating.prune(model, 0.0)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(0, args=ocp.args.StandardSave(nnx.state(pruned)))
    manager.wait_until_finished()
    abstract = nnx.eval_shape(lambda: gating.GatedLM(
        V, num_layers=2, features=D, num_heads=list(report.num_heads),
        head_dim=report.head_dim, max_length=L, prefix_len=P, positions='rotary',
        gate='dense', rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = manager.restore(0, args=ocp.args.StandardRestore(abstract_state))
  restored = nnx.merge(graphdef, state)
  np.testing.assert_allclose(forward(restored, tokens()).logits_BxLxV,
                             forward(model, tokens()).logits_BxLxV, atol=1e-5)


def test_static_router_with_scaled_weights_folds_them():
  model = lm('static', k=(2, 2), scaled_weights=True, deterministic=True)
  for block in model.blocks:
    block.attention.router.logits_H[...] = jnp.array([1.0, -5.0, 0.3, -5.0])
  out = forward(model, tokens())
  assert np.unique(np.asarray(out.gate_weights_BxNxH)).size > 2  # weights other than 0 and 1
  pruned, report = gating.prune(model, 0.5)
  assert report.num_heads == (2, 2)
  np.testing.assert_allclose(forward(pruned, tokens(seed=5)).logits_BxLxV,
                             forward(model, tokens(seed=5)).logits_BxLxV, atol=1e-5)


def test_prune_a_retrofitted_user_model_and_an_encoder():
  model = gating.gate_heads(UserModel(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), gate='static',
                            active_heads=2, router_init_logit=3.0)
  for attn in (*model.layers, model.cross):
    attn.router.logits_H[...] = jnp.array([3.0, -3.0, 3.0, -3.0])
  model.eval()
  want = model(*user_inputs())
  pruned, report = gating.prune(model, 0.5, inputs=user_inputs(1))
  assert report.num_heads == (2, 2, 2) and report.flops_after < report.flops_before
  np.testing.assert_allclose(pruned(*user_inputs()), want, atol=1e-5)
  encoder = gating.GatedEncoder(V, num_layers=2, features=D, num_heads=H, max_length=L,
                                num_classes=3, gate='topk', active_heads=2, rngs=nnx.Rngs(0))
  usage = {f'trunk/blocks/{i}/attention': [0.0, 0.5, 0.5, 0.0] for i in range(2)}
  thin, report = gating.prune(encoder, usage)
  assert report.num_heads == (2, 2)
  assert forward(thin, tokens()).class_logits_BxC.shape == (3, 3)


def test_prune_bad_arguments():
  model = favour(lm(k=(2, 2)), ([9.0, 9.0, -9.0, -9.0], [9.0, -9.0, -9.0, 9.0]))
  forward(model, tokens())
  with pytest.raises(ValueError, match=r"budget of K=2 heads but only 1 would be left"):
    gating.prune(model, {'trunk/blocks/0/attention': [1.0, 0.02, 0.0, 0.0],
                         'trunk/blocks/1/attention': [1.0, 0.0, 0.0, 1.0]}, threshold=0.05)
  with pytest.raises(ValueError, match='would keep no head'):
    gating.prune(model, 1.0)
  with pytest.raises(ValueError, match=r"missing \['trunk/blocks/1/attention'\]"):
    gating.prune(model, {'trunk/blocks/0/attention': [1, 1, 0, 0]})
  with pytest.raises(ValueError, match='has shape \\(3,\\); that layer has 4 heads'):
    gating.prune(model, {'trunk/blocks/0/attention': [1, 1, 0],
                         'trunk/blocks/1/attention': [1, 1, 0, 0]})
  with pytest.raises(ValueError, match='pass the threshold once'):
    gating.prune(model, 0.1, threshold=0.1)
  with pytest.raises(ValueError, match='found no GatedMultiHeadAttention'):
    gating.prune(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 0.0)


# -- MLP channel groups ------------------------------------------------------------------------

F, G = 64, 4


def grouped_lm(gate='topk', **kw):
  return gating.GatedLM(V, num_layers=2, features=D, num_heads=H, max_length=L, prefix_len=P,
                        mlp_features=F, gate=gate, active_heads=2, mlp_groups=G,
                        active_groups=2, path='gathered', rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize('path', ['masked', 'gathered'])
def test_pruned_groups_equal_the_gated_parent_on_sequences_that_use_the_kept_groups(path):
  model = grouped_lm()
  x = tokens(b=4)
  out = forward(model, x)
  # Keep exactly the heads and groups that sequence 0 uses, in every layer.
  usage = {}
  for i in range(2):
    usage[f'trunk/blocks/{i}/attention'] = np.asarray(out.gate_weights_BxNxH[0, i] != 0, float)
    usage[f'trunk/blocks/{i}/mlp'] = np.asarray(out.group_weights_BxNxG[0, i] != 0, float)
  thin, report = gating.prune(model, usage)
  assert report.num_heads == (2, 2) and report.mlp_features == (F // 2, F // 2)
  assert [len(g) for g in report.kept_groups.values()] == [2, 2]
  assert report.flops_after < report.flops_before
  assert report.params_after < report.params_before
  assert 'MLP groups per layer [2, 2]' in str(report)
  assert [b.mlp_in.kernel.shape for b in thin.blocks] == [(D, F // 2)] * 2
  np.testing.assert_allclose(forward(thin, x[:1]).logits_BxLxV,
                             model(x[:1], path=path).logits_BxLxV, atol=1e-4)
  # The thin model is what the constructor builds with per-layer MLP widths, no groups.
  abstract = nnx.eval_shape(lambda: gating.GatedLM(
      V, num_layers=2, features=D, num_heads=list(report.num_heads), head_dim=report.head_dim,
      mlp_features=list(report.mlp_features), max_length=L, prefix_len=P, gate='dense',
      rngs=nnx.Rngs(0)))
  shapes = lambda m: jax.tree.map(lambda v: v.shape, nnx.state(m, nnx.Param))
  assert shapes(abstract) == shapes(thin)


def test_static_group_router_with_scaled_weights_folds_them():
  model = grouped_lm('static', scaled_weights=True, deterministic=True)
  for block in model.blocks:
    block.attention.router.logits_H[...] = jnp.array([1.0, -5.0, 0.3, -5.0])
    block.mlp.router.logits_H[...] = jnp.array([-5.0, 0.7, -5.0, 2.0])
  want = forward(model, tokens()).logits_BxLxV
  thin, report = gating.prune(model, 0.5)
  assert report.kept_groups == {'trunk/blocks/0/mlp': (1, 3), 'trunk/blocks/1/mlp': (1, 3)}
  np.testing.assert_allclose(forward(thin, tokens()).logits_BxLxV, want, atol=1e-5)


def test_prune_refuses_fewer_groups_than_the_budget():
  model = grouped_lm()
  usage = {f'trunk/blocks/{i}/{unit}': [1.0, 1.0, 0.0, 0.0] for i in range(2)
           for unit in ('attention', 'mlp')}
  usage['trunk/blocks/1/mlp'] = [1.0, 0.0, 0.0, 0.0]
  with pytest.raises(ValueError, match='active_groups=2 groups but only 1 would be left'):
    gating.prune(model, usage)
  with pytest.raises(ValueError, match=r"missing \['trunk/blocks/0/mlp'"):
    gating.prune(model, {f'trunk/blocks/{i}/attention': [1.0] * 4 for i in range(2)})


LLAMA_LIKE = dict(norm='rms', mlp='swiglu', mlp_bias=False, use_bias=False, qk_norm=True,
                  positions='rotary', tie_embeddings=False)


@pytest.mark.parametrize('unit,kept', [('kv_group', [0, 0, 1, 1]),
                                       ('query_head', [1, 0, 1, 0]),
                                       ('query_head', [1, 1, 1, 0])])
def test_prune_a_grouped_query_swiglu_model(unit, kept):
  """Llama/Qwen3-style blocks (GQA with G=2 of H=4, RMSNorm, SwiGLU, QK norm): the thin
  model equals the gated one on every sequence whose gate opens exactly the kept heads
  (forced here), keeps GQA where the kept heads fill their groups equally and gives each
  kept head its group's K/V otherwise, and is what the constructor builds."""
  k = sum(kept)
  model = grouped_lm(num_kv_heads=2, unit=unit, **LLAMA_LIKE)
  for block in model.blocks:
    block.attention.active_heads = k
  usage = {f'trunk/blocks/{i}/{part}': np.asarray(kept, float)
           for i in range(2) for part in ('attention', 'mlp')}
  usage.update({f'trunk/blocks/{i}/mlp': np.asarray([1.0, 0.0, 1.0, 0.0]) for i in range(2)})
  thin, report = gating.prune(model, usage)
  assert report.num_heads == (k, k)
  want_kv = {(0, 0, 1, 1): 1, (1, 0, 1, 0): 2, (1, 1, 1, 0): 3}[tuple(kept)]
  assert [b.attention.num_kv_heads for b in thin.blocks] == [want_kv] * 2
  assert report.num_kv_heads == (None if want_kv == k else (want_kv, want_kv))
  x = tokens(b=2)
  for block in model.blocks:
    block.attention.force_gate(jnp.broadcast_to(jnp.asarray(kept, jnp.float32), (2, H)))
    block.mlp.force_gate(jnp.broadcast_to(jnp.asarray([1.0, 0.0, 1.0, 0.0]), (2, G)))
  forced, _ = nnx.capture(lambda m: m(x), nnx.Intermediate)(model)   # sows what it forced
  np.testing.assert_allclose(forward(thin, x).logits_BxLxV, forced.logits_BxLxV, atol=1e-4)
  abstract = nnx.eval_shape(lambda: gating.GatedLM(
      V, num_layers=2, features=D, num_heads=list(report.num_heads), head_dim=report.head_dim,
      num_kv_heads=None if report.num_kv_heads is None else list(report.num_kv_heads),
      mlp_features=list(report.mlp_features), max_length=L, prefix_len=P, gate='dense',
      rngs=nnx.Rngs(0), **LLAMA_LIKE))
  shapes = lambda m: jax.tree.map(lambda v: v.shape, nnx.state(m, nnx.Param))
  assert shapes(abstract) == shapes(thin)
