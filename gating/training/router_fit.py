"""Routers fitted to a frozen model's own per-sequence unit importance (Deja Vu, ShadowLLM).

A run with `loss.router_labels` set trains only the routers; every other parameter is
frozen (its update is zero) after a warm start from a trained run (`init_from`, typically
an elastic one). The routers are those of every gated layer: the attention's over heads
and, in a model with MLP groups, the MLPs' over groups (H, S, K below read G, Sf, Kf for
them). Each step, for the batch:

  u_NxBxH  = importance labels of the frozen model (gating.training.importance), with
             every layer running all its units; stop-gradient
  r_n,BxR  = router n's logits on the same forward's layer input (R = H - S routed heads;
             the S shared heads are always on and not scored)
  T_n,BxR  = 1 on the top-(K - S) routed heads of u_n per sequence, else 0

and the loss is the mean over layers of

  'bce'       mean_{b,h} BCE(sigmoid(r_n,bh), T_n,bh)              (Deja Vu, Polar Sparsity)
  'listwise'  mean_b CE(softmax(u_n,b / std_h(u_n,b)), softmax(r_n,b))   (ListNet top-1)

The run's gate then picks top-(K - S) of the router's logits (gate='topk', weights 1, as
the sub-models of elastic training ran). `router/recall` is the mean share of the label's
top-(K - S) routed heads that the router's top-(K - S) holds; the validation loss of the
routed model is the loop's usual evaluation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gating.layers.mlp import GatedMLP
from gating.training import importance

LOSSES = ('bce', 'listwise')


def top_k_mask(scores_BxR: jax.Array, k: int) -> jax.Array:
  """1.0 on the k highest scores of each row, else 0.0."""
  _, idx_BxK = jax.lax.top_k(scores_BxR, k)
  return jnp.zeros_like(scores_BxR).at[jnp.arange(scores_BxR.shape[0])[:, None], idx_BxK].set(1.0)


def router_loss(logits_BxR: jax.Array, labels_BxR: jax.Array, k: int, kind: str) -> jax.Array:
  """The router's loss against importance labels (see the module docstring)."""
  if kind == 'bce':
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits_BxR, top_k_mask(labels_BxR, k)))
  if kind == 'listwise':
    scale_Bx1 = jnp.std(labels_BxR, axis=1, keepdims=True) + 1e-6
    target_BxR = jax.nn.softmax(labels_BxR / scale_Bx1, axis=1)
    return jnp.mean(optax.softmax_cross_entropy(logits_BxR, target_BxR))
  raise ValueError(f'loss.router_loss must be one of {LOSSES}, got {kind!r}')


def recall(logits_BxR: jax.Array, labels_BxR: jax.Array, k: int) -> jax.Array:
  """Mean |top-k(logits) & top-k(labels)| / k over the batch."""
  both = top_k_mask(logits_BxR, k) * top_k_mask(labels_BxR, k)
  return jnp.sum(both) / (k * logits_BxR.shape[0])


def fit_loss(model, batch, *, labels: str, kind: str, outputs_fn):
  """(loss, metrics) of the routers of `model` against the frozen model's labels.

  Every parameter outside the routers enters through stop_gradient, so its gradient is
  exactly zero (no backward pass through the model; gradient clipping sees only the
  routers' gradients)."""
  graphdef, routers, rest = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains('router')),
                                      ...)
  model = nnx.merge(graphdef, routers, jax.lax.stop_gradient(rest))
  layers = importance.gated_layers(model)
  u = jax.lax.stop_gradient(importance.unit_importance(model, batch, labels, outputs_fn))
  _, logits, _ = importance.forced_forward(model, batch, [jnp.ones_like(x) for x in u],
                                           outputs_fn)
  per_layer, recalls = [], []
  for n, (_, layer) in enumerate(layers):
    S, k = routed_budget(layer)
    labels_BxR = router_units(layer, u[n])[:, S:]
    per_layer.append(router_loss(logits[n], labels_BxR, k, kind))
    recalls.append(recall(logits[n], labels_BxR, k))
  loss = jnp.mean(jnp.stack(per_layer))
  return loss, {'loss': loss, 'task_loss': loss, 'router/recall': jnp.mean(jnp.stack(recalls)),
                'router/recall_per_layer': jnp.stack(recalls)}


def routed_budget(layer) -> tuple[int, int]:
  """(S, K - S) of a gated layer in the units its router scores: its always-on units
  (shared heads or shared groups; shared KV groups under unit='kv_group') and the budget
  its router picks among the rest."""
  if isinstance(layer, GatedMLP):
    return layer.shared_groups, layer.active_groups - layer.shared_groups
  size = layer.unit_size
  return layer.shared_units, (layer.active_heads - layer.shared_heads) // size


def router_units(layer, u_BxU):
  """Labels over the units a layer's router scores: per head, or under unit='kv_group'
  per KV group, the sum of its query heads' labels (a group opens and closes as one)."""
  if isinstance(layer, GatedMLP) or layer.unit_size == 1:
    return u_BxU
  B = u_BxU.shape[0]
  return u_BxU.reshape(B, layer.num_units, layer.unit_size).sum(axis=-1)


def fit_config(source, *, k: int, labels: str = 'grad_x_act', loss: str = 'bce',
               shared_heads: int = 0, steps: int = 300, learning_rate: float = 3e-3,
               init_from: str, seed: int | None = None, router: str | None = None,
               groups: int | None = None, shared_groups: int = 0):
  """The TrainConfig of a router fit on the run `init_from` whose config is `source`: the
  same model shape and data, gate='topk' at budget K (S shared) and, for a model with MLP
  groups, Kf = `groups` (required there; Sf = `shared_groups` of them shared), labels
  and loss as given, the routers trained
  at `learning_rate` for `steps` and nothing else."""
  if labels not in importance.LABELS:
    raise ValueError(f'labels must be one of {importance.LABELS}, got {labels!r}')
  if steps < 1:   # checked here: the warmup below is derived from it
    raise ValueError(f'steps: a fit needs at least 1 step, got {steps}')
  if loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
  if (source.model.mlp_groups is None) != (groups is None):
    raise ValueError('groups: ' + (
        'the source has no MLP channel groups' if groups is not None else
        f'the source has MLP channel groups (G={source.model.mlp_groups}): give their '
        'budget Kf'))
  model = dataclasses.replace(
      source.model, gate='topk', active_heads=k, shared_heads=shared_heads, gate_options=(),
      active_groups=groups, shared_groups=shared_groups,
      noise=None, scaled_weights=False, temperature=None, router=router,
      path='masked', eval_path='gathered')
  return dataclasses.replace(
      source, model=model, loss=type(source.loss)(router_labels=labels, router_loss=loss),
      optim=dataclasses.replace(source.optim, learning_rate=learning_rate,
                                router_learning_rate=None, warmup_steps=min(20, steps - 1)),
      steps=steps, eval_every=None, checkpoint_every=None, temperature_start=None,
      temperature_end=None, temperature_steps=0, k_schedule=(), init_from=init_from,
      seed=source.seed if seed is None else seed)
