"""NNX Variable types of our own, and helpers that read or set them anywhere in a model.

`GateStats` holds what a gated layer measured on its last call: per-head usage `[H]`,
per-head open probability `[H]`, per-head mean weight `[H]` and the router z-loss (a
scalar). Shapes never depend on
the batch, so nothing retraces when it changes. The values written inside a
differentiated function are traced, so regularizers built from them carry gradients to
the router. Checkpoints store `nnx.Param` state only, so these are left out of them.
Linen models (through `gating.linen`) see them in the `gate_stats` collection.

`GateTemperature` is the rule's temperature (softmax temperature for topk and sigmoid,
beta for hard_concrete). It is state rather than a Python constant, so a schedule that
changes it between steps never recompiles: `set_temperature(model, t)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class GateStats(nnx.Variable):
  """Statistics of a gate's last call (usage, open probability, z-loss); not a parameter."""


class GateTemperature(nnx.Variable):
  """The selection rule's temperature; changing it never recompiles."""


nnx.register_variable_name('gate_stats', GateStats)
nnx.register_variable_name('gate_temperature', GateTemperature)


def gate_stats(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
  """Collects the GateStats of every gated layer in `model`.

  Returns {layer path: {'head_usage': [H], 'head_prob': [H], 'head_weight': [H],
  'router_z_loss': []}}, in a
  stable order, with the path as '/'-joined attribute names (e.g. 'blocks/0/attention').
  Works on any NNX model: a user's model needs no change to carry the statistics.
  """
  layers: dict[str, dict[str, jax.Array]] = {}
  for path, value in nnx.to_flat_state(nnx.state(model, GateStats)):
    *layer, name = (str(p) for p in path)
    layers.setdefault('/'.join(layer), {})[name] = value[...]
  return layers


def check_temperature(temperature) -> None:
  """A ValueError unless a concrete temperature is > 0 (traced values pass unchecked)."""
  if isinstance(temperature, jax.core.Tracer):
    return
  value = np.asarray(temperature)
  if not np.all(value > 0):
    raise ValueError(f'temperature must be > 0, got {value.tolist()}')


def set_temperature(model: nnx.Module, temperature: float | jax.Array) -> None:
  """Sets the temperature of every gated layer in `model` (in place; never recompiles).

  The temperature divides the logits (beta of hard concrete): it must be > 0. A concrete
  value <= 0 (or NaN) is refused; a traced one is not checked.
  """
  check_temperature(temperature)
  for _, variable in nnx.iter_graph(model):
    if isinstance(variable, GateTemperature):
      variable.set_value(jnp.asarray(temperature, variable[...].dtype))   # see record_gate


def new_gate_stats(num_units: int) -> tuple[GateStats, GateStats, GateStats, GateStats]:
  """The zeroed statistics of a layer with U gated units (heads or channel groups): usage
  [U], prob [U], weight [U] and the router z-loss [], in the order record_gate takes them."""
  return (GateStats(jnp.zeros((num_units,), jnp.float32)),
          GateStats(jnp.zeros((num_units,), jnp.float32)),
          GateStats(jnp.zeros((num_units,), jnp.float32)),
          GateStats(jnp.zeros((), jnp.float32)))


def record_gate(usage: GateStats, prob: GateStats, weight: GateStats, z_loss: GateStats,
                logits_BxU: jax.Array, gate, has_router: bool) -> None:
  """Writes a layer's gate statistics over its U units (heads or channel groups): usage
  [U] (fraction of sequences with the unit open; of tokens, for a per-token gate), prob
  [U] (mean open probability), weight [U] (mean gate weight) and the router z-loss
  mean(logsumexp(logits)^2) (0 without a router)."""
  U = gate.weights_BxH.shape[-1]
  open_BxU = jax.lax.stop_gradient(gate.weights_BxH).reshape(-1, U) != 0
  # set_value, not `usage[...] = `: the indexed write asks a traced value for its sharding,
  # and under jit that error path scans every equation traced so far (quadratic tracing).
  usage.set_value(open_BxU.mean(axis=0, dtype=jnp.float32))
  prob.set_value(gate.probs_BxH.reshape(-1, U).mean(axis=0))
  weight.set_value(gate.weights_BxH.reshape(-1, U).mean(axis=0))
  if has_router:
    z_loss.set_value(jnp.mean(jax.nn.logsumexp(logits_BxU, axis=-1) ** 2))
  else:
    z_loss.set_value(jnp.zeros((), jnp.float32))
