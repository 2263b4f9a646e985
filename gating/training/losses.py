"""Task losses, sparsity regularizers and their schedules (pure functions; DESIGN 4).

The regularizers read the gate statistics that every gated layer writes on its call
(`gating.gate_stats(model)`: {layer: {'head_usage': f_H, 'head_prob': P_H,
'head_weight': W_H, 'router_z_loss': z}}), averaged over layers:

  expected_l0    s_hat = mean_h P_h            P_h: mean open probability of head h
                 (hard_concrete / static: the expected L0 of Louizos et al., / H)
  l1             mean_h W_h                    W_h: mean gate weight of head h
  lagrangian     lambda1 (s_hat - t) + lambda2 (s_hat - t)^2   (CoFi; Sheared-LLaMA);
                 the lambdas are trained by gradient ascent, t ramps from 1 to the target
  load_balance   H sum_h f_h P_h, with f and P normalized to sum to 1 over heads (Switch);
                 1 when usage is uniform. Computed per micro-batch.
  z_loss         mean over sequences of logsumexp(logits)^2 (ST-MoE)

For the topk rule P_h is a softmax, so s_hat is always 1/H: its budget is K, not a penalty.

Units: a gated MLP layer writes the same statistics for its channel groups
('group_usage', 'group_prob', 'group_weight', 'router_z_loss'). Every regularizer treats a
layer of groups like a layer of heads (`units` reads either), so with `mlp_groups` the
means above run over the attention layers and the MLP layers together. The metrics
`active_heads_per_layer` and `usage_entropy` report heads; their twins
`active_groups_per_layer` and `usage_entropy(stats, 'group')` report groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# -- task losses ----------------------------------------------------------------------------

def next_token_weights(scored_BxL, target_mask_BxL):
  """weight_BxL: position t is trained to predict token t+1 if t is scored and t+1 a target."""
  B = target_mask_BxL.shape[0]
  next_target_BxL = jnp.concatenate(
      [target_mask_BxL[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
  return (scored_BxL & next_target_BxL).astype(jnp.float32)


def next_token_losses(logits_BxLxV, tokens_BxL):
  """(ce_BxL, correct_BxL): cross-entropy and argmax hit of predicting token t+1 at t."""
  B = tokens_BxL.shape[0]
  next_BxL = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros((B, 1), tokens_BxL.dtype)], axis=1)
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  picked_BxL = jnp.take_along_axis(logits_BxLxV, next_BxL[:, :, None], axis=-1)[:, :, 0]
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == next_BxL
  return log_z_BxL - picked_BxL, correct_BxL


def weighted_mean(values, weights):
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def classification_losses(logits_BxC, labels_B):
  """(ce_B, correct_B) of a classifier."""
  logits_BxC = logits_BxC.astype(jnp.float32)
  log_z_B = jax.nn.logsumexp(logits_BxC, axis=-1)
  picked_B = jnp.take_along_axis(logits_BxC, labels_B[:, None], axis=-1)[:, 0]
  return log_z_B - picked_B, jnp.argmax(logits_BxC, axis=-1) == labels_B


# -- sparsity terms ---------------------------------------------------------------------------

UNIT_KINDS = ('head', 'group')


def units(stats, kind: str | None = None):
  """The gated layers' statistics under unit-agnostic names: {layer: {'usage', 'prob',
  'weight', 'router_z_loss'}}, for heads and groups (kind=None) or one kind only."""
  out = {}
  for layer, s in stats.items():
    for k in UNIT_KINDS if kind is None else (kind,):
      if f'{k}_usage' in s:
        out[layer] = {'usage': s[f'{k}_usage'], 'prob': s[f'{k}_prob'],
                      'weight': s[f'{k}_weight'], 'router_z_loss': s['router_z_loss']}
  return out


def _mean_over_layers(stats, term):
  values = [term(layer) for layer in units(stats).values()]
  if not values:
    raise ValueError('the model has no gated layers: nothing to regularize')
  return jnp.mean(jnp.stack(values))


def expected_l0(stats):
  """s_hat: the expected fraction of open units (mean over layers of mean_h P_h)."""
  return _mean_over_layers(stats, lambda s: jnp.mean(s['prob']))


def l1(stats):
  return _mean_over_layers(stats, lambda s: jnp.mean(jnp.abs(s['weight'])))


def lagrangian(s_hat, target, lambda1, lambda2):
  gap = s_hat - target
  return lambda1 * gap + lambda2 * gap ** 2


def load_balance(stats):
  def term(s):
    f_H = s['usage'] / jnp.maximum(jnp.sum(s['usage']), 1e-9)
    p_H = s['prob'] / jnp.maximum(jnp.sum(s['prob']), 1e-9)
    return f_H.shape[0] * jnp.sum(jax.lax.stop_gradient(f_H) * p_H)
  return _mean_over_layers(stats, term)


def z_loss(stats):
  return _mean_over_layers(stats, lambda s: s['router_z_loss'])


def active_heads_per_layer(stats):
  """Mean number of open heads per sequence, one value per attention layer (a metric)."""
  return jnp.stack([jnp.sum(s['usage']) for s in units(stats, 'head').values()])


def active_groups_per_layer(stats):
  """Mean number of open MLP channel groups per sequence, one value per MLP layer."""
  return jnp.stack([jnp.sum(s['usage']) for s in units(stats, 'group').values()])


def usage_entropy(stats, kind: str = 'head'):
  """Entropy (nats) of each layer's usage distribution over its units: log H when uniform."""
  def entropy(s):
    f_H = s['usage'] / jnp.maximum(jnp.sum(s['usage']), 1e-9)
    return -jnp.sum(jnp.where(f_H > 0, f_H * jnp.log(jnp.maximum(f_H, 1e-9)), 0.0))
  return jnp.stack([entropy(s) for s in units(stats, kind).values()])


# -- schedules ----------------------------------------------------------------------------------

def target_at(step, target_fraction, warmup_steps):
  """Lagrangian target t: ramps linearly from 1 (all heads) to target_fraction."""
  ramp = jnp.minimum(1.0, step / max(warmup_steps, 1)) if warmup_steps else 1.0
  return 1.0 - (1.0 - target_fraction) * ramp


def temperature_at(step, start, end, steps):
  """Geometric annealing from start to end over `steps`, then constant (traced step)."""
  frac = jnp.clip(step / max(steps, 1), 0.0, 1.0)
  return start * (end / start) ** frac


def k_at(step: int, schedule, final):
  """The budget K at a step (a Python int: each distinct K compiles once).

  schedule: ((K, until_step), ...); after the last until_step, `final`.
  """
  for k, until in schedule:
    if step < until:
      return k
  return final
