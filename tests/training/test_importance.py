"""Head-importance labels and router fitting on a model built so that, for task token t,
head t alone matters (every other head outputs exactly zero on that sequence)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gating.layers.models import GatedEncoder
from gating.training import importance, router_fit
from gating.training.loop import model_outputs

H, D, L = 4, 16, 6


def task_model(*, shared_heads=0, active_heads=1, seed=0):
  """A one-layer GatedEncoder whose head h copies 'the token is h' into residual dimension
  H + h, which the classifier reads; class = token. Everything else is zero, so for a
  sequence of token t only head t changes the output: dropping it leaves chance (log H)."""
  model = GatedEncoder(D, num_layers=1, features=D, num_heads=H, max_length=L, num_classes=H,
                       gate='topk', active_heads=active_heads, shared_heads=shared_heads,
                       rngs=nnx.Rngs(seed))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if 'router' in map(str, path) or path[-1] == 'scale':
      continue                                     # routers stay random, LayerNorms 1
    var[...] = jnp.zeros_like(var[...])
  trunk = model.trunk
  trunk.token_embed.embedding[...] = jnp.eye(D)
  attn = trunk.blocks[0].attention
  value = np.zeros((D, H, D // H), np.float32)
  out = np.zeros((H, D // H, D), np.float32)
  for h in range(H):
    value[h, h, 0], value[D - 1, h, 0] = 1.0, -1.0  # LN(e_t)[h] - LN(e_t)[D-1]: > 0 iff t = h
    out[h, 0, H + h] = 1.0
  attn.value.kernel[...] = jnp.asarray(value)
  attn.out.kernel[...] = jnp.asarray(out)
  classifier = np.zeros((D, H), np.float32)
  classifier[H + np.arange(H), np.arange(H)] = 1.0
  model.classifier.kernel[...] = jnp.asarray(classifier)
  return model


def task_batch(tokens_B):
  tokens_BxL = jnp.repeat(jnp.asarray(tokens_B, jnp.int32)[:, None], L, axis=1)
  return {'tokens': tokens_BxL, 'valid': jnp.ones_like(tokens_BxL, bool),
          'label': jnp.asarray(tokens_B, jnp.int32)}


def labels(model, batch, kind):
  """importance.head_importance, compiled (eager mode runs each op on its own: slow)."""
  return np.asarray(nnx.jit(lambda m, b: importance.head_importance(m, b, kind, model_outputs))(
      model, batch))


def losses_with(model, batch, weights):
  return np.asarray(nnx.jit(
      lambda m, b, w: importance.forced_forward(m, b, w, model_outputs)[0])(model, batch, weights))


def test_the_task_model_needs_exactly_its_head():
  model = task_model()
  batch = task_batch(np.arange(H))
  full_B = losses_with(model, batch, jnp.ones((1, H, H)))
  assert float(full_B.max()) < 0.5 * np.log(H)
  u = labels(model, batch, 'ablation')[0]
  np.testing.assert_allclose(np.diag(u), np.log(H) - full_B, rtol=1e-4)
  np.testing.assert_allclose(u[~np.eye(H, dtype=bool)], 0.0, atol=1e-5)


@pytest.mark.parametrize('kind', ['grad_x_act', 'output_norm'])
def test_cheap_labels_rank_heads_like_ablation(kind):
  model = task_model()
  batch = task_batch([2, 0, 3, 1, 1])
  ablation = labels(model, batch, 'ablation')
  cheap = labels(model, batch, kind)
  assert cheap.shape == ablation.shape == (1, 5, H)
  np.testing.assert_array_equal(cheap[0].argmax(axis=1), [2, 0, 3, 1, 1])
  np.testing.assert_array_equal(cheap[0].argmax(axis=1), ablation[0].argmax(axis=1))
  others = ~np.eye(H, dtype=bool)[[2, 0, 3, 1, 1]]
  np.testing.assert_allclose(cheap[0][others], 0.0, atol=1e-5)
  assert (cheap[0][~others] > 0).all()


def test_grad_x_act_is_the_first_order_ablation():
  """Each sequence gets its own gradient (rows independent), and -dL/dW matches the
  exact effect of a small change of one head's weight."""
  model = task_model()
  batch = task_batch([1, 3])
  u = labels(model, batch, 'grad_x_act')[0]
  eps = 1e-3
  w = jnp.ones((1, 2, H)).at[0, 0, 1].set(1 - eps)
  moved_B = losses_with(model, batch, w)
  full_B = losses_with(model, batch, jnp.ones((1, 2, H)))
  np.testing.assert_allclose(float(moved_B[0] - full_B[0]) / eps, u[0, 1], rtol=2e-2)
  assert float(moved_B[1] - full_B[1]) == 0.0


def test_forcing_leaves_the_model_as_it_was():
  model = task_model()
  batch = task_batch([0, 1])
  before = model_outputs(model, batch, deterministic=True)[1]
  labels(model, batch, 'output_norm')
  assert importance.attention_layers(model)[0][1].forced_weights_BxH is None
  np.testing.assert_array_equal(before, model_outputs(model, batch, deterministic=True)[1])


def test_bad_label_names_are_refused():
  with pytest.raises(ValueError, match='importance label must be one of'):
    importance.head_importance(task_model(), task_batch([0]), 'gradient', model_outputs)
  with pytest.raises(ValueError, match='router_loss must be one of'):
    router_fit.router_loss(jnp.zeros((1, 4)), jnp.zeros((1, 4)), 1, 'mse')


def test_recall_and_targets():
  labels = jnp.array([[0.1, 0.9, 0.5, 0.0]])
  np.testing.assert_array_equal(router_fit.top_k_mask(labels, 2), [[0, 1, 1, 0]])
  assert float(router_fit.recall(jnp.array([[0.0, 2.0, -1.0, 1.0]]), labels, 2)) == 0.5


@pytest.mark.slow
@pytest.mark.parametrize('loss,shared', [('bce', 0), ('listwise', 0), ('bce', 1)])
def test_a_fitted_router_picks_the_task_head(loss, shared):
  """The model frozen, the router alone trained on the labels: recall of the task's head
  >= 90% on held-out sequences (with a shared head, it scores the other three)."""
  model = task_model(shared_heads=shared, active_heads=shared + 1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(shared, H, size=64)
  train, held_out = task_batch(tokens[:48]), task_batch(tokens[48:])
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.All(nnx.Param, nnx.PathContains('router')))
  frozen = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if 'router' not in map(str, p)}

  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(model):
      return router_fit.fit_loss(model, batch, labels='grad_x_act', kind=loss,
                                 outputs_fn=model_outputs)
    (_, metrics), grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains('router'))),
        has_aux=True)(model)
    optimizer.update(model, grads)
    return metrics

  for _ in range(60):
    step(model, optimizer, train)
  _, metrics = nnx.jit(lambda m, b: router_fit.fit_loss(
      m, b, labels='grad_x_act', kind=loss, outputs_fn=model_outputs))(model, held_out)
  assert float(metrics['router/recall']) >= 0.9
  # The routed model runs the task's head: the deterministic gate opens it.
  gate_BxNxH = model_outputs(model, held_out, deterministic=True)[4]
  np.testing.assert_array_equal(np.asarray(gate_BxNxH)[:, 0, :].argmax(axis=1) if not shared
                                else np.asarray(gate_BxNxH)[:, 0, shared:].argmax(axis=1) + shared,
                                tokens[48:])
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if p in frozen:
      np.testing.assert_array_equal(v[...], frozen[p])


def test_only_the_routers_get_gradients():
  """The model is frozen by stop_gradient inside the loss: every other gradient is 0."""
  model = task_model()
  batch = task_batch([0, 1, 2])

  def loss_fn(model):
    return router_fit.fit_loss(model, batch, labels='grad_x_act', kind='bce',
                               outputs_fn=model_outputs)[0]

  grads = nnx.jit(nnx.grad(loss_fn))(model)
  flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  routed = [p for p in flat if 'router' in map(str, p)]
  assert routed and any(np.abs(flat[p]).sum() > 0 for p in routed)
  for p, g in flat.items():
    if p not in routed:
      assert np.abs(g).sum() == 0, p


# -- MLP channel groups: units like heads -----------------------------------------------------

G = 4


def grouped_lm(active_groups=(1, 2), shared_groups=0):
  from gating.layers.models import GatedLM  # pylint: disable=import-outside-toplevel
  return GatedLM(12, num_layers=2, features=D, num_heads=H, max_length=L, prefix_len=2,
                 gate='topk', active_heads=2, mlp_groups=G, active_groups=list(active_groups),
                 shared_groups=shared_groups, rngs=nnx.Rngs(3))


def lm_batch(b=3):
  tokens_BxL = jax.random.randint(jax.random.key(1), (b, L), 0, 12)
  valid_BxL = jnp.ones_like(tokens_BxL, bool)
  return {'tokens': tokens_BxL, 'valid': valid_BxL,
          'target_mask': valid_BxL.at[:, 0].set(False), 'label': jnp.zeros((b,), jnp.int32)}


@pytest.mark.slow
def test_group_labels_are_those_of_the_heads_for_channel_groups():
  model, batch = grouped_lm(), lm_batch()
  layers = importance.gated_layers(model)
  assert [type(m).__name__ for _, m in layers] == ['GatedMultiHeadAttention', 'GatedMLP'] * 2
  ablation = nnx.jit(lambda m, b: importance.unit_importance(m, b, 'ablation', model_outputs))(
      model, batch)
  assert [u.shape for u in ablation] == [(3, H), (3, G)] * 2
  # Forcing group 2 of the second MLP to 0 is the model with that group's W2 rows zeroed
  # (every other unit open): the ablation label is that loss change.
  ones = [jnp.ones((3, importance.num_units(m))) for _, m in layers]
  full_B = losses_with(model, batch, ones)
  mlp = model.blocks[1].mlp
  cut = nnx.clone(model)
  w2 = cut.blocks[1].mlp.linear_out.kernel
  Fg = mlp.hidden_features // G
  w2[...] = w2[...].at[2 * Fg:3 * Fg].set(0.0)
  cut_B = losses_with(cut, batch, ones)
  np.testing.assert_allclose(ablation[3][:, 2], cut_B - full_B, atol=1e-5)
  # grad x act of a group is the first-order effect of its weight.
  u = nnx.jit(lambda m, b: importance.unit_importance(m, b, 'grad_x_act', model_outputs))(
      model, batch)
  eps = 1e-3
  moved = [w.at[0, 1].set(1 - eps) if n == 1 else w for n, w in enumerate(ones)]
  np.testing.assert_allclose((losses_with(model, batch, moved)[0] - full_B[0]) / eps,
                             u[1][0, 1], rtol=5e-2, atol=1e-4)
  with pytest.raises(ValueError, match='same number of units'):
    importance.head_importance(
        GatedEncoderWithGroups(), lm_batch(), 'grad_x_act', model_outputs)


def GatedEncoderWithGroups():  # pylint: disable=invalid-name
  return GatedEncoder(12, num_layers=1, features=D, num_heads=H, max_length=L, num_classes=2,
                      gate='topk', active_heads=2, mlp_groups=8, active_groups=2,
                      rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_fitting_reaches_the_group_routers_and_nothing_else():
  model, batch = grouped_lm(), lm_batch()

  def loss_fn(model):
    return router_fit.fit_loss(model, batch, labels='output_norm', kind='bce',
                               outputs_fn=model_outputs)

  grads, metrics = nnx.jit(nnx.grad(loss_fn, has_aux=True))(model)
  assert metrics['router/recall_per_layer'].shape == (4,)
  flat = {'/'.join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  for name, g in flat.items():
    if '/router/' in name:
      continue
    assert np.abs(g).sum() == 0, name
  assert np.abs(flat['trunk/blocks/1/mlp/router/logits/kernel']).sum() > 0
  assert np.abs(flat['trunk/blocks/0/attention/router/logits/kernel']).sum() > 0


@pytest.mark.slow
def test_the_group_routers_fit_only_the_routed_groups_beside_shared_ones():
  model, batch = grouped_lm(active_groups=(2, 3), shared_groups=1), lm_batch()
  mlp = model.blocks[1].mlp
  assert router_fit.routed_budget(mlp) == (1, 2)    # (Sf, Kf - Sf)

  def loss_fn(model):
    return router_fit.fit_loss(model, batch, labels='output_norm', kind='bce',
                               outputs_fn=model_outputs)
  grads, metrics = nnx.jit(nnx.grad(loss_fn, has_aux=True))(model)
  assert np.isfinite(float(metrics['loss']))
  kernel = np.asarray(grads['trunk']['blocks'][1]['mlp']['router']['logits']['kernel'][...])
  assert kernel.shape[-1] == G - 1 and np.abs(kernel).sum() > 0
