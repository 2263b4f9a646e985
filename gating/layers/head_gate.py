"""HeadGating: the per-sequence gate over an attention layer's heads, as a mixin.

Every gated attention module, ours (GatedMultiHeadAttention) or an adapter of another
family's (gating/adapters/), decides its heads the same way: a router (router.ROUTERS)
reads the sequence and scores the units, a selection rule (selection.RULES) turns the
scores into a Gate over the H query heads, the S shared heads always open; under
grouped-query attention with unit='kv_group' the units are the G KV groups and a group
opens or closes with its H/G query heads (selection.expand_units). The gate's state is
the module's own attributes (so parameter paths stay where they were): `router`, the
temperature, the statistics `head_usage`, `head_prob`, `head_weight`, `router_z_loss`
(state.py), the rng stream and a forced gate for analysis tools.

A module mixes it in (`class M(HeadGating, nnx.Module)`), validates its gate arguments
with `check_gate` before it builds its weights, and builds the gate with `init_gate`
after them (the order of the random draws, so that adding the gate changes no weight).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gating.layers import compute, selection
from gating.layers.router import (HeadRouter, StaticRouter, build_router, resolve_router,
                                  router_kind_of)
from gating.layers.state import (GateTemperature, check_temperature, new_gate_stats,
                                 record_gate)


def check_active_heads(active_heads, num_heads: int, gate: str, path: str) -> None:
  """Validates a budget K against H, the rule and the path (ValueError naming the problem)."""
  selection.check_budget(active_heads, num_heads, gate, path)


def check_shared_heads(shared_heads: int, active_heads, num_heads: int, gate: str) -> None:
  """S always-on heads: 0 <= S < H, S < K (K counts them), and a rule with a budget."""
  selection.check_shared(shared_heads, active_heads, num_heads, gate)


def check_kv_units(num_heads: int, num_kv_heads, unit, active_heads=None,
                   shared_heads=0) -> str:
  """The gate unit of a layer with G = num_kv_heads K/V heads (ValueError naming the
  problem): G must divide H; unit 'kv_group' (the default when G < H: a group opens or
  closes with its H/G query heads) or 'query_head' (the default when G = H); under
  'kv_group' the budget K and the shared heads S count query heads, so both must be
  multiples of H/G."""
  if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, (int, np.integer)) \
      or num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(f'num_kv_heads must be an int >= 1 that divides num_heads={num_heads} '
                     f'(grouped-query attention), got {num_kv_heads!r}')
  if unit is None:
    unit = 'kv_group' if num_kv_heads < num_heads else 'query_head'
  if unit not in compute.UNITS:
    raise ValueError(f'unit must be one of {compute.UNITS}, got {unit!r}')
  size = num_heads // num_kv_heads if unit == 'kv_group' else 1
  for name, k in (('active_heads', active_heads), ('shared_heads', shared_heads)):
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k % size:
      raise ValueError(f"{name}={k}: with unit='kv_group' a gate opens whole groups of "
                       f'{size} query heads (H / G = {num_heads} / {num_kv_heads}), so '
                       f'{name} counts query heads in multiples of {size}')
  return unit


def check_gate(*, num_heads: int, num_kv_heads: int, unit, gate: str, active_heads, path: str,
               shared_heads: int, router, prefix_len, noise, gate_options=None,
               threshold=None, stretch=None) -> tuple[str, str, dict[str, float]]:
  """Validates a gate's arguments before anything is built (a ValueError names the
  argument). -> (unit, router kind, the rule's resolved options)."""
  rule = selection.get_rule(gate)
  options = rule.resolve_options(
      selection.older_spellings(rule, gate_options, threshold, stretch))
  unit = check_kv_units(num_heads, num_kv_heads, unit, active_heads, shared_heads)
  check_active_heads(active_heads, num_heads, gate, path)
  check_shared_heads(shared_heads, active_heads, num_heads, gate)
  router = resolve_router(gate, router, prefix_len)
  if noise not in selection.NOISES:
    raise ValueError(f'noise must be one of {selection.NOISES}, got {noise!r}')
  if rule.router == 'assignment':
    size = num_heads // num_kv_heads if unit == 'kv_group' else 1
    slice_count(num_heads // size, shared_heads // size, active_heads // size, size)
  return unit, router, options


def slice_count(num_units: int, shared_units: int, k_units: int, size: int) -> int:
  """E, the slices of gate='slices' over `num_units` units of `size` query heads with
  `shared_units` shared and a budget of `k_units` (a ValueError naming active_heads)."""
  return selection.num_slices(num_units - shared_units, k_units - shared_units,
                              units=unit_name(size))


def unit_name(size: int) -> str:
  """What a gate unit of `size` query heads is called in an error message."""
  return 'heads' if size == 1 else f'KV groups (of {size} query heads)'


class HeadGating:
  """The gate of a module over its `num_heads` query heads (see the module docstring).

  The module sets `num_heads`, `num_kv_heads`, `dropout_rate` and `deterministic` itself;
  `init_gate` sets the rest."""

  def init_gate(self, *, in_features: int, unit: str, gate: str, active_heads, path: str,
                shared_heads: int, router: str, prefix_len, options: Mapping[str, float],
                router_hidden_features=None, router_init_logit: float = 0.0,
                temperature=None, noise=None, noise_scale: float = 1.0,
                scaled_weights: bool = False, keep_rngs: bool = True, rngs: nnx.Rngs):
    """Builds the gate's state (after the module's weights: see the module docstring)."""
    self.unit = unit
    self.gate_rule = gate
    self.active_heads = active_heads
    self.shared_heads = int(shared_heads)
    self.path = path
    self.noise = noise
    self.noise_scale = noise_scale
    self.scaled_weights = scaled_weights
    self.gate_options = tuple(sorted(options.items()))   # hashable: part of the graphdef
    router_module = build_router(
        gate, router, self.num_units - self.shared_units, in_features,
        prefix_len=prefix_len, hidden_features=router_hidden_features,
        init_logit=router_init_logit, rngs=rngs)
    self.router: HeadRouter | StaticRouter | None = (
        nnx.data(None) if router_module is None else router_module)
    default_t = selection.get_rule(gate).temperature
    if temperature is not None:
      check_temperature(temperature)   # <= 0 would invert the gate or give NaN gradients
    self.temperature = GateTemperature(jnp.asarray(
        default_t if temperature is None else temperature, jnp.float32))
    self.head_usage, self.head_prob, self.head_weight, self.router_z_loss = new_gate_stats(
        self.num_heads)
    needs_rng = self.dropout_rate > 0 or self.stochastic_gate
    self.rngs = rngs.dropout.fork() if keep_rngs and needs_rng else nnx.data(None)
    # Analysis tools (gating.training.importance) force a gate here; see `force_gate`.
    self.forced_weights_BxH = nnx.data(None)

  @property
  def group_size(self) -> int:
    """H / G: the query heads that share one K/V head (1 without grouped-query attention)."""
    return self.num_heads // self.num_kv_heads

  @property
  def unit_size(self) -> int:
    """The query heads one gate unit opens: H / G for KV groups, else 1."""
    return self.group_size if self.unit == 'kv_group' else 1

  @property
  def num_units(self) -> int:
    """What the router scores: the G KV groups (unit='kv_group') or the H query heads."""
    return self.num_heads // self.unit_size

  @property
  def shared_units(self) -> int:
    return self.shared_heads // self.unit_size

  @property
  def num_slices(self) -> int | None:
    """E, the slices of gate='slices' at the layer's budget K (None for another rule)."""
    if selection.RULES[self.gate_rule].router != 'assignment':
      return None
    size = self.unit_size
    return slice_count(self.num_units, self.shared_units, self.active_heads // size, size)

  @property
  def causal_safe(self) -> bool:
    """True when the gate reads no token after a fixed prefix (the router kind's `causal`;
    no router at all is safe): the layer may run causally."""
    kind = router_kind_of(self.router)
    return kind is None or kind.causal

  @property
  def stochastic_gate(self) -> bool:
    """True when the gate samples in training (hard-concrete, or noise on the logits)."""
    return selection.RULES[self.gate_rule].samples or self.noise is not None

  def router_logits(self, inputs_q, valid_BxL=None, slice_B=None, k=None):
    """logits_BxR (float32) of the R routed units (heads, or KV groups under
    unit='kv_group', less the shared ones); zeros for the dense gate, which has no router;
    for gate='slices', the indicator of each sequence's slice `slice_B` at budget k
    (selection.slice_indicator); another rule ignores slice_B (a model whose layers mix
    rules passes it to every layer; the models refuse it when no layer reads it)."""
    if selection.RULES[self.gate_rule].router == 'assignment':
      k = self.active_heads if k is None else k
      size = self.unit_size
      return selection.assigned_logits(slice_B, inputs_q.shape[0],
                                       self.num_units - self.shared_units,
                                       k // size - self.shared_units, units=unit_name(size))
    if self.router is None:
      return jnp.zeros((inputs_q.shape[0], self.num_units), jnp.float32)
    return self.router(inputs_q, valid_BxL)

  def _select(self, logits_BxR, k, deterministic, rng) -> selection.Gate:
    """The rule on the routed units' logits; the S shared units are prepended, open with
    weight 1: weights_BxU = [1_S, w_routed], idx_BxK = [0..S-1, S + idx_routed]. Under
    unit='kv_group' the Gate over G groups is then spread over their query heads
    (`selection.expand_units`), so that the Gate is always over the H query heads."""
    size = self.unit_size
    gate = selection.select_routed(
        self.gate_rule, logits_BxR, k=None if k is None else k // size,
        shared=self.shared_units, temperature=self.temperature[...],
        deterministic=deterministic, rng=rng, noise=self.noise, noise_scale=self.noise_scale,
        scaled_weights=self.scaled_weights, options=dict(self.gate_options))
    return selection.expand_units(gate, size)

  def force_gate(self, weights_BxH: jax.Array | None) -> None:
    """Replaces the rule's decision by the given gate weights (None: the rule again).

    While set, every call runs the masked path with y = sum_h w_bh * head_h(x_b) + bias,
    w = weights_BxH exactly (differentiable in w, any real values), the router still runs,
    and its logits [B, H - S] and the layer's output [B, L, D] are sown as
    nnx.Intermediate 'router_logits' and 'output' (read them with nnx.pop). For analysis
    on a copy of a model: head-importance labels, router fitting; not for training.
    """
    self.forced_weights_BxH = weights_BxH

  def _record(self, logits_BxH, gate: selection.Gate) -> None:
    record_gate(self.head_usage, self.head_prob, self.head_weight, self.router_z_loss,
                logits_BxH, gate, self.router is not None)

  def _deterministic(self, deterministic):
    if not (self.dropout_rate > 0 or self.stochastic_gate):
      return True
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic is None:
      raise ValueError(f'{type(self).__name__} with dropout or a stochastic gate needs '
                       '`deterministic` (as a call argument, constructor argument, or via '
                       'model.train() / model.eval())')
    return deterministic

  def _rng(self, rngs, deterministic):
    if deterministic:
      return None
    if rngs is None:
      rngs = self.rngs
    if rngs is None:
      raise ValueError(f'{type(self).__name__} needs `rngs` at call time when built with '
                       'keep_rngs=False and run with deterministic=False')
    return rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs

  def _gate_rng(self, rngs, deterministic):
    """The PRNG key of a stochastic gate's sample (None when deterministic or not
    stochastic)."""
    if deterministic or not self.stochastic_gate:
      return None
    return self._rng(rngs, deterministic)()

  def decide(self, x_BxLxD, valid_BxL, k, deterministic, rngs=None, gate_rng=None,
             record: bool = True, slice_B=None) -> tuple[jax.Array, selection.Gate]:
    """(router logits, the Gate over the H heads) of one call, the forced gate if one is
    set; records the statistics unless record=False (a caller that changes the gate
    records it itself with `_record`). `gate_rng`: the sample's key, if the caller drew
    it. `slice_B`: each sequence's slice, for gate='slices' (and only then)."""
    logits_BxU = self.router_logits(x_BxLxD, valid_BxL, slice_B, k)
    if self.forced_weights_BxH is not None:
      gate = selection.forced(self.forced_weights_BxH, x_BxLxD.shape[0], self.num_heads,
                              'num_heads')
    else:
      rng = gate_rng if gate_rng is not None else self._gate_rng(rngs, deterministic)
      gate = self._select(logits_BxU, k, deterministic, rng)
    if record:
      self._record(logits_BxU, gate)
    return logits_BxU, gate

