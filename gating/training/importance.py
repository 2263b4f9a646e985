"""Per-sequence head-importance labels from a frozen model (the targets of router fitting).

For attention layer n, sequence b and head h, with every gated layer running all its
heads (weights forced to 1, `GatedMultiHeadAttention.force_gate`), let L_b(W) be the
mean cross-entropy over b's scored positions when the layers run with gate weights
W_NxBxH (all ones: the full model). Three labels u_NxBxH, each larger for a head that
matters more to that sequence:

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

LABELS = ('ablation', 'grad_x_act', 'output_norm')


def attention_layers(model: nnx.Module) -> list[tuple[tuple, GatedMultiHeadAttention]]:
  """(path, layer) of the model's gated attention layers, in graph order (layer 0 first)."""
  return [(path, m) for path, m in nnx.iter_graph(model)
          if isinstance(m, GatedMultiHeadAttention)]


def sequence_losses(model: nnx.Module, batch, outputs_fn) -> jax.Array:
  """L_B: each sequence's mean cross-entropy over its scored positions (deterministic)."""
  _, ce, _, weight, *_ = outputs_fn(model, batch, deterministic=True)
  if ce.ndim == 1:               # an encoder: one loss per sequence already
    return ce
  return jnp.sum(ce * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)


def forced_forward(model: nnx.Module, batch, weights_NxBxH: jax.Array, outputs_fn):
  """Runs a copy of `model` with layer n's gate weights forced to weights_NxBxH[n].

  Returns (L_B, [router logits_BxR of layer n], [output_BxLxD of layer n]); `model` is
  not changed. Differentiable in the weights and in the model's parameters."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state, copy=True)
  layers = attention_layers(copy)
  for n, (_, attn) in enumerate(layers):
    attn.force_gate(weights_NxBxH[n])
  losses_B, sown = nnx.capture(lambda m: sequence_losses(m, batch, outputs_fn),
                               nnx.Intermediate)(copy)
  last = {path: v.get_value()[-1] for path, v in nnx.to_flat_state(sown)}
  return (losses_B, [last[(*p, 'router_logits')] for p, _ in layers],
          [last[(*p, 'output')] for p, _ in layers])


def head_importance(model: nnx.Module, batch, kind: str, outputs_fn) -> jax.Array:
  """u_NxBxH, the `kind` label (see the module docstring) of every head of every gated
  attention layer for every sequence of `batch`. `outputs_fn(model, batch,
  deterministic=True)` -> (logits, ce, correct, weight, ...), as
  gating.training.loop.model_outputs. The model is not changed."""
  if kind not in LABELS:
    raise ValueError(f'importance label must be one of {LABELS}, got {kind!r}')
  layers = attention_layers(model)
  if not layers:
    raise ValueError('the model has no gated attention layer to label')
  heads = {attn.num_heads for _, attn in layers}
  if len(heads) != 1:
    raise ValueError(f'every layer must have the same number of heads, got {sorted(heads)}')
  B, (H,), N = batch['tokens'].shape[0], heads, len(layers)
  ones_NxBxH = jnp.ones((N, B, H), jnp.float32)

  def run(weights_NxBxH):
    losses_B, _, outputs = forced_forward(model, batch, weights_NxBxH, outputs_fn)
    return losses_B, outputs

  if kind == 'grad_x_act':
    grad_NxBxH = jax.grad(lambda w: jnp.sum(run(w)[0]))(ones_NxBxH)
    return -grad_NxBxH
  # The loops below are Python loops, unrolled into the compiled program, so that XLA's
  # cost analysis counts every pass (it counts the body of a lax.map or scan once).
  if kind == 'ablation':
    full_B = run(ones_NxBxH)[0]
    return jnp.stack([jnp.stack([run(ones_NxBxH.at[n, :, h].set(0.0))[0] - full_B
                                 for h in range(H)], axis=1) for n in range(N)])
  # output_norm: z_nh = dy_n / dW_nh (y_n is linear in W_n), one jvp per head.
  valid_BxL = batch['valid'].astype(jnp.float32)
  tokens_B = jnp.maximum(valid_BxL.sum(axis=1), 1.0)
  labels = []
  for n in range(N):
    norms = []
    for h in range(H):
      tangent = jnp.zeros_like(ones_NxBxH).at[n, :, h].set(1.0)
      _, z_BxLxD = jax.jvp(lambda w, n=n: run(w)[1][n], (ones_NxBxH,), (tangent,))
      norm_BxL = jnp.linalg.norm(z_BxLxD.astype(jnp.float32), axis=-1)
      norms.append(jnp.sum(norm_BxL * valid_BxL, axis=1) / tokens_B)
    labels.append(jnp.stack(norms, axis=1))                       # [B, H]
  return jnp.stack(labels)
