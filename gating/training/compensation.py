"""Dropped-unit compensation (FLAP, An et al. 2024): a closed head or MLP channel group
contributes its mean output instead of 0.

For gated layer n and unit u (a head, or a group of MLP channels), let z_nu,bt be the
unit's contribution to the layer's output at token t of sequence b, with every unit of
every layer open (the full model): y_n = sum_u w_nu z_nu + bias, so z_nu = dy_n / dw_nu
(importance.unit_contributions). Its mean over the valid tokens of calibration batches

  m_nu = sum_{b,t} valid_bt z_nu,bt / sum_{b,t} valid_bt          [U_n, D]

is set on the layer (`compensate`), which then outputs

  y_n = sum_u w_nu z_nu + sum_u (1 - w_nu) m_nu + bias

on both compute paths (compute.dropped_mean): a sub-model that drops units starts from
the full model's mean output of those units rather than from zero. The means are not
parameters and are not checkpointed: measure them again after loading a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gating.training.importance import gated_layers, unit_contributions


def unit_means(model: nnx.Module, batches, outputs_fn) -> list[jax.Array]:
  """[m_n, U_n x D] of every gated layer (graph order), over the valid tokens of
  `batches` (an iterable of batches with 'tokens' and 'valid'); see the module docstring.
  Any compensation already set on the model is ignored (the contributions are measured
  with forced gates)."""
  if not gated_layers(model):
    raise ValueError('the model has no gated layer to compensate')
  sums, tokens = None, 0.0
  step = nnx.jit(lambda model, batch: _sums(model, batch, outputs_fn))
  for batch in batches:
    per_layer, count = step(model, batch)
    sums = per_layer if sums is None else [a + b for a, b in zip(sums, per_layer)]
    tokens += float(count)
  if sums is None or tokens == 0:
    raise ValueError('unit_means: the batches hold no valid token')
  return [s / tokens for s in sums]


def _sums(model, batch, outputs_fn):
  valid_BxL = batch['valid'].astype(jnp.float32)

  def token_sum(z_BxLxD):
    return jnp.einsum('BLD,BL->D', z_BxLxD.astype(jnp.float32), valid_BxL)
  contributions = unit_contributions(model, batch, outputs_fn, token_sum)
  return [jnp.stack(per_unit) for per_unit in contributions], valid_BxL.sum()


def compensate(model: nnx.Module, means: list[jax.Array] | None) -> None:
  """Sets (in place) each gated layer's dropped-unit means, in graph order as unit_means
  returns them; None turns compensation off everywhere."""
  layers = gated_layers(model)
  if means is not None and len(means) != len(layers):
    raise ValueError(f'compensate: {len(means)} means for {len(layers)} gated layers')
  for n, (_, layer) in enumerate(layers):
    layer.compensate(None if means is None else means[n])
