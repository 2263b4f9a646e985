"""Per-sequence unit-importance labels from a frozen model (the targets of router fitting).

A unit is an attention head or a group of MLP channels; the gated layers are the
model's GatedMultiHeadAttention and GatedMLP layers, in graph order. For gated layer n,
sequence b and unit h, with every gated layer running all its units (weights forced to 1,
`force_gate`), let L_b(W) be the mean cross-entropy over b's scored positions when the
layers run with gate weights W (one [B, U_n] per layer; all ones: the full model). Three
labels u_n,BxU (`unit_importance`; `head_importance` stacks them, u_NxBxH), each larger
for a unit that matters more to that sequence (below for heads; a group's z is its
channels' contribution act(x W1_g + b1_g) W2_g):

  'ablation'     leave-one-head-out: u_nbh = L_b(W with W_nbh = 0) - L_b(1), the loss
                 increase when head h of layer n alone is dropped for sequence b
                 (N * H forward passes; the reference the others approximate).
  'grad_x_act'   gradient x activation, the first-order Taylor estimate of the same
                 difference: with y_n = sum_h W_nh z_nh + bias (z_nh: head h's output
                 through its slice of the output projection), dL_b/dW_nbh =
                 sum_t <dL_b/dy_n,t, z_nbh,t>, so u_nbh = -dL_b/dW_nbh at W = 1 (one
                 backward pass; ShadowLLM's best criterion).
  'output_norm'  mean over b's valid tokens of ||z_nbh,t||_2 (Deja Vu, Polar Sparsity):
                 input-dependent but blind to what the later layers do with the head.
                 z_nbh = dy_n/dW_nbh, one forward-mode derivative per head.

Sequences are independent (no normalisation across the batch), so one backward pass of
sum_b L_b gives every sequence's own gradient. The labels are computed under
`jax.lax.stop_gradient`-free functions of the parameters; callers that train on them
stop the gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gating.layers.attention import GatedMultiHeadAttention
from gating.layers.mlp import GatedMLP

LABELS = ('ablation', 'grad_x_act', 'output_norm')


def attention_layers(model: nnx.Module) -> list[tuple[tuple, GatedMultiHeadAttention]]:
  """(path, layer) of the model's gated attention layers, in graph order (layer 0 first)."""
  return [(path, m) for path, m in nnx.iter_graph(model)
          if isinstance(m, GatedMultiHeadAttention)]


def gated_layers(model: nnx.Module) -> list[tuple[tuple, GatedMultiHeadAttention | GatedMLP]]:
  """(path, layer) of every gated layer, attention and MLP groups, in graph order."""
  return [(path, m) for path, m in nnx.iter_graph(model)
          if isinstance(m, (GatedMultiHeadAttention, GatedMLP))]


def num_units(layer) -> int:
  """H of an attention layer, G of a GatedMLP."""
  return layer.num_heads if isinstance(layer, GatedMultiHeadAttention) else layer.num_groups


def sequence_losses(model: nnx.Module, batch, outputs_fn) -> jax.Array:
  """L_B: each sequence's mean cross-entropy over its scored positions (deterministic)."""
  _, ce, _, weight, *_ = outputs_fn(model, batch, deterministic=True)
  if ce.ndim == 1:               # an encoder: one loss per sequence already
    return ce
  return jnp.sum(ce * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)


def forced_forward(model: nnx.Module, batch, weights, outputs_fn):
  """Runs a copy of `model` with gated layer n's gate weights forced to weights[n] (a list
  of [B, U_n], or an array N x B x U when every layer has U units).

  Returns (L_B, [router logits_BxR of layer n], [output_BxLxD of layer n]); `model` is
  not changed. Differentiable in the weights and in the model's parameters."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state, copy=True)
  layers = gated_layers(copy)
  for n, (_, layer) in enumerate(layers):
    layer.force_gate(weights[n])
  losses_B, sown = nnx.capture(lambda m: sequence_losses(m, batch, outputs_fn),
                               nnx.Intermediate)(copy)
  last = {path: v.get_value()[-1] for path, v in nnx.to_flat_state(sown)}
  return (losses_B, [last[(*p, 'router_logits')] for p, _ in layers],
          [last[(*p, 'output')] for p, _ in layers])


def unit_importance(model: nnx.Module, batch, kind: str, outputs_fn) -> list[jax.Array]:
  """[u_n,BxU], the `kind` label (see the module docstring) of every unit of every gated
  layer for every sequence of `batch`. `outputs_fn(model, batch, deterministic=True)` ->
  (logits, ce, correct, weight, ...), as gating.training.loop.model_outputs. The model
  is not changed."""
  if kind not in LABELS:
    raise ValueError(f'importance label must be one of {LABELS}, got {kind!r}')
  layers = gated_layers(model)
  if not layers:
    raise ValueError('the model has no gated layer to label')
  B = batch['tokens'].shape[0]
  ones = [jnp.ones((B, num_units(layer)), jnp.float32) for _, layer in layers]

  def run(weights):
    return forced_forward(model, batch, weights, outputs_fn)[0]      # L_B

  def one_off(n, h):
    return [w.at[:, h].set(0.0) if i == n else w for i, w in enumerate(ones)]

  if kind == 'grad_x_act':
    return [-g for g in jax.grad(lambda w: jnp.sum(run(w)))(ones)]
  # The loops below are Python loops, unrolled into the compiled program, so that XLA's
  # cost analysis counts every pass (it counts the body of a lax.map or scan once).
  if kind == 'ablation':
    full_B = run(ones)
    return [jnp.stack([run(one_off(n, h)) - full_B for h in range(w.shape[1])], axis=1)
            for n, w in enumerate(ones)]
  # output_norm: the mean over each sequence's valid tokens of ||z_nh||.
  valid_BxL = batch['valid'].astype(jnp.float32)
  tokens_B = jnp.maximum(valid_BxL.sum(axis=1), 1.0)

  def mean_norm(z_BxLxD):
    norm_BxL = jnp.linalg.norm(z_BxLxD.astype(jnp.float32), axis=-1)
    return jnp.sum(norm_BxL * valid_BxL, axis=1) / tokens_B
  return [jnp.stack(per_unit, axis=1)                               # [B, U_n]
          for per_unit in unit_contributions(model, batch, outputs_fn, mean_norm)]


def unit_contributions(model: nnx.Module, batch, outputs_fn, reduce) -> list[list]:
  """[[reduce(z_nu) for each unit u] for each gated layer n], where z_nu,BxLxD =
  dy_n / dW_nu is unit u's contribution to layer n's output with every unit of every
  layer open (y_n is linear in its gate weights W_n, so this is exact): one forward-mode
  derivative (jvp) per unit. The model is not changed."""
  layers = gated_layers(model)
  B = batch['tokens'].shape[0]
  ones = [jnp.ones((B, num_units(layer)), jnp.float32) for _, layer in layers]
  out = []
  for n, w in enumerate(ones):
    per_unit = []
    for u in range(w.shape[1]):
      tangent = [jnp.zeros_like(v).at[:, u].set(1.0) if i == n else jnp.zeros_like(v)
                 for i, v in enumerate(ones)]
      _, z_BxLxD = jax.jvp(
          lambda w, n=n: forced_forward(model, batch, w, outputs_fn)[2][n], (ones,),
          (tangent,))
      per_unit.append(reduce(z_BxLxD))
    out.append(per_unit)
  return out


def head_importance(model: nnx.Module, batch, kind: str, outputs_fn) -> jax.Array:
  """u_NxBxH: `unit_importance` stacked, for a model whose gated layers all have H units
  (e.g. attention only)."""
  units = {num_units(layer) for _, layer in gated_layers(model)}
  if len(units) > 1:
    raise ValueError(f'every gated layer must have the same number of units, got '
                     f'{sorted(units)}; use unit_importance')
  return jnp.stack(unit_importance(model, batch, kind, outputs_fn))
