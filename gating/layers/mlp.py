"""GatedMLP: an MLP whose hidden channel groups are gated per sequence.

The hidden width F is split into G groups of F / G contiguous channels (compute.py). A
router reads each sequence and scores the G groups; a selection rule (any rule of
selection.RULES, with its options) turns the scores into a Gate over groups, exactly as
for attention heads; the layer then runs on one of two paths:

  masked:    y = sum_g w_bg gelu(x W1_g + b1_g) W2_g + b2     every group computed
  gathered:  only the Kf selected groups of each sequence, their W1 columns, b1 entries
             and W2 rows gathered once: FLOPs scale as Kf / G

With kind='swiglu' (Llama's and Qwen's MLP) the hidden channels are a gated linear unit,
h = silu(x W1) * (x W3), W1 the gate projection (`linear_in`) and W3 the up projection
(`linear_up`): a group holds the same channels of both, and W2's rows.

Contract: masked equals gathered on the same gate; with every group open at weight 1 the
layer equals the ungated MLP  W2 gelu(W1 x + b1) + b2  carrying the same weights (the
parameters `linear_in` [D, F] and `linear_out` [F, D] are ordinary nnx.Linear layers).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

from gating.layers import compute, names, selection
from gating.layers.router import HeadRouter, StaticRouter, build_router, resolve_router
from gating.layers.state import (GateTemperature, check_temperature, new_gate_stats,
                                 record_gate)

PATHS = selection.PATHS
KINDS = ('gelu', 'swiglu')         # the MLP: gelu(x W1 + b1) W2, or silu(x W1) * (x W3) W2
# How a slices error names the MLP's budget and units (selection.num_slices).
SLICE_NAMES = dict(budget='active_groups', shared_name='shared_groups', units='groups')
# The gate arguments a block passes to its MLP as well as to its attention.
GATE_KWARGS = ('gate', 'path', 'router', 'prefix_len', 'router_hidden_features',
               'router_init_logit', 'temperature', 'noise', 'noise_scale', 'scaled_weights',
               'gate_options', 'deterministic')


def check_groups(hidden_features: int, num_groups, name: str = 'num_groups') -> None:
  """G must be an int >= 1 that divides F (ValueError naming the argument)."""
  if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
      or num_groups < 1:
    raise ValueError(f'{name} must be an int >= 1, got {num_groups!r}')
  if hidden_features % num_groups:
    raise ValueError(f'{name}={num_groups} must divide the MLP hidden width '
                     f'F={hidden_features}')


def check_shared_groups(shared_groups, active_groups, num_groups: int, gate: str) -> None:
  """Sf always-open groups: 0 <= Sf < G, Sf < Kf (Kf counts them), a rule with a budget."""
  selection.check_shared(shared_groups, active_groups, num_groups, gate, name='shared_groups',
                         budget='active_groups', count='num_groups', units='groups')


def check_active_groups(active_groups, num_groups: int, gate: str, path: str,
                        name: str = 'active_groups') -> None:
  """Validates a budget Kf against G, the rule and the path (ValueError naming `name`)."""
  selection.check_budget(active_groups, num_groups, gate, path, name=name, count='G',
                         units='groups', symbol='Kf')


class GatedMLP(nnx.Module):
  """y_BxLxD = W2 (w_group * gelu(W1 x + b1)) + b2, with G channel groups gated per sequence.

  Args:
    in_features: D.
    hidden_features: F, the MLP's hidden width.
    num_groups: G, a divisor of F; each group holds F / G contiguous channels.
    gate, active_groups, path: the selection rule (a name in selection.RULES), the static
      budget Kf (required by 'topk' and by path='gathered') and the compute path
      ('masked' | 'gathered'; at Kf = G the gathered path computes every group with the
      shared weights). `path` and `active_groups` are also call-time overrides.
    router: the router kind (router.ROUTERS: 'mean' | 'prefix' | 'first' | 'input_free'
      or a registered kind; default 'input_free' for gate='static', else 'mean');
      'prefix' needs prefix_len=P (causal models: the gate reads tokens 0..P-1 only).
      'attention' (older spelling 'shared'): no router of its own; every call takes the
      group logits (`logits_BxG=`) from outside, from the block's attention router
      (GatedTransformerBlock(group_router='attention')). It needs a rule whose router
      reads the input.
    shared_groups: Sf groups (the first Sf) always open, as shared heads are (MoH): the
      router scores the other G - Sf, and Kf counts the shared groups (Sf < Kf), so the
      layer runs Sf shared + (Kf - Sf) routed groups. With router='attention' the logits
      given are those of the G - Sf routed groups.
    router_hidden_features, router_init_logit, temperature, noise, noise_scale,
      scaled_weights, gate_options: as in GatedMultiHeadAttention.
    kind: 'gelu' (the default; parameters linear_in, linear_out) or 'swiglu' (also
      linear_up; see the module docstring).
    use_bias: biases on the MLP's projections (default True; Llama and Qwen have none).
    dtype, param_dtype, precision: as in nnx.Linear.
    rngs: nnx.Rngs; a stochastic gate draws from its 'dropout' stream.

  State: GateStats `group_usage` [G] (fraction of sequences using each group),
  `group_prob` [G], `group_weight` [G] and `router_z_loss` [], written on every call, as
  GatedMultiHeadAttention writes its heads' (`gating.gate_stats` collects both).
  """

  def __init__(self, in_features: int, hidden_features: int, num_groups: int, *,
               gate: str = 'topk', active_groups: int | None = None, path: str = 'masked',
               router: str | None = None, prefix_len: int | None = None,
               shared_groups: int = 0,
               router_hidden_features: int | None = None, router_init_logit: float = 0.0,
               temperature: float | None = None, noise: str | None = None,
               noise_scale: float = 1.0, scaled_weights: bool = False,
               gate_options: Mapping[str, float] | None = None, kind: str = 'gelu',
               use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, precision: jax.lax.PrecisionLike = None,
               deterministic: bool | None = None, rngs: nnx.Rngs):
    if kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    check_groups(hidden_features, num_groups)
    check_active_groups(active_groups, num_groups, gate, path)
    check_shared_groups(shared_groups, active_groups, num_groups, gate)
    rule = selection.get_rule(gate)
    if rule.per_token:
      raise ValueError(f'gate={gate!r} decides per token and gates attention heads only; '
                       "a GatedMLP's groups need a per-sequence rule")
    router = names.group_router_value(router)      # 'shared' -> 'attention'
    self.logits_from_attention = router == 'attention'
    if self.logits_from_attention and rule.router != 'input':
      raise ValueError(f"router='attention' takes the group logits from the attention's "
                       f'router; gate={gate!r} has no router that reads the input')
    if not self.logits_from_attention:
      router = resolve_router(gate, router, prefix_len)
    if noise not in selection.NOISES:
      raise ValueError(f'noise must be one of {selection.NOISES}, got {noise!r}')
    if rule.router == 'assignment':
      selection.num_slices(num_groups - shared_groups, active_groups - shared_groups,
                           **SLICE_NAMES)
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.num_groups = num_groups
    self.shared_groups = int(shared_groups)
    self.gate_rule = gate
    self.active_groups = active_groups
    self.path = path
    self.noise = noise
    self.noise_scale = noise_scale
    self.scaled_weights = scaled_weights
    self.gate_options = tuple(sorted(rule.resolve_options(gate_options).items()))
    self.dtype = dtype
    self.precision = precision
    self.deterministic = deterministic
    self.kind = kind
    dense = dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
                 use_bias=use_bias, rngs=rngs)
    self.linear_in = nnx.Linear(in_features, hidden_features, **dense)
    self.linear_up = (nnx.Linear(in_features, hidden_features, **dense) if kind == 'swiglu'
                      else nnx.data(None))
    self.linear_out = nnx.Linear(hidden_features, in_features, **dense)
    router_module = None if self.logits_from_attention else build_router(
        gate, router, num_groups - self.shared_groups, in_features, prefix_len=prefix_len,
        hidden_features=router_hidden_features, init_logit=router_init_logit, rngs=rngs)
    self.router: HeadRouter | StaticRouter | None = (
        nnx.data(None) if router_module is None else router_module)
    if temperature is not None:
      check_temperature(temperature)   # <= 0 would invert the gate or give NaN gradients
    self.temperature = GateTemperature(jnp.asarray(
        rule.temperature if temperature is None else temperature, jnp.float32))
    self.group_usage, self.group_prob, self.group_weight, self.router_z_loss = (
        new_gate_stats(num_groups))
    self.rngs = rngs.dropout.fork() if self.stochastic_gate else nnx.data(None)
    # Analysis tools (gating.training.importance) force a gate here; see `force_gate`.
    self.forced_weights_BxG = nnx.data(None)
    self.unit_mean_UxD = nnx.data(None)   # dropped-group compensation; see `compensate`

  @property
  def routed_groups(self) -> int:
    """G - Sf: the groups the router scores."""
    return self.num_groups - self.shared_groups

  @property
  def num_slices(self) -> int | None:
    """E, the slices of gate='slices' at the layer's budget Kf (None for another rule)."""
    if selection.RULES[self.gate_rule].router != 'assignment':
      return None
    return selection.num_slices(self.routed_groups, self.active_groups - self.shared_groups,
                                **SLICE_NAMES)

  @property
  def stochastic_gate(self) -> bool:
    """True when the gate samples in training (hard-concrete, or noise on the logits)."""
    return selection.RULES[self.gate_rule].samples or self.noise is not None

  @property
  def activation(self):
    """The hidden channels' activation: gelu, or silu of SwiGLU's gate projection."""
    return jax.nn.silu if self.kind == 'swiglu' else jax.nn.gelu

  def mlp_weights(self) -> compute.MLPWeights:
    bias = lambda lin: None if lin.bias is None else lin.bias[...]
    up = self.linear_up
    return compute.MLPWeights(self.linear_in.kernel[...], self.linear_out.kernel[...],
                              bias(self.linear_in), bias(self.linear_out),
                              None if up is None else up.kernel[...],
                              None if up is None else bias(up))

  def promoted(self, x_BxLxD):
    """(x_BxLxD, MLPWeights) promoted to the layer's compute dtype, as its call computes."""
    x_BxLxD, *weights = dtypes.promote_dtype((x_BxLxD, *self.mlp_weights()), dtype=self.dtype)
    return x_BxLxD, compute.MLPWeights(*weights)

  def gate(self, x_BxLxD, valid_BxL=None, *, deterministic: bool | None = None, rngs=None,
           active_groups: int | None = None, logits_BxG=None,
           slice_B=None) -> selection.Gate:
    """The per-sequence decision over groups: Gate(weights_BxG, idx_BxKf | None, probs_BxG).

    Writes no state. valid_BxL marks real tokens (padding never moves the gate).
    logits_BxG: the routed groups' logits [B, G - Sf], with router='attention' (and only
    then).
    """
    k = self.active_groups if active_groups is None else active_groups
    check_active_groups(k, self.num_groups, self.gate_rule, 'masked')
    deterministic = self._deterministic(deterministic)
    return self._select(self._logits(x_BxLxD, valid_BxL, logits_BxG, slice_B, k), k,
                        deterministic, self._gate_rng(rngs, deterministic))

  def force_gate(self, weights_BxG: jax.Array | None) -> None:
    """Replaces the rule's decision by the given group weights (None: the rule again).

    While set, every call runs the masked path with y = sum_g w_bg act(x W1_g + b1_g) W2_g
    + b2, w = weights_BxG exactly (differentiable in w), the router still runs, and its
    logits [B, G - Sf] and the layer's output [B, L, D] are sown as nnx.Intermediate
    'router_logits' and 'output'. For analysis on a copy of a model (importance labels,
    router fitting), as GatedMultiHeadAttention.force_gate.
    """
    self.forced_weights_BxG = weights_BxG

  def __call__(self, x_BxLxD, valid_BxL=None, *, deterministic: bool | None = None,
               rngs=None, path: str | None = None, active_groups: int | None = None,
               return_gate: bool = False, logits_BxG=None, slice_B=None):
    """x_BxLxD -> y_BxLxD (and the Gate over groups when return_gate). logits_BxG: the
    group logits, with router='attention' (and only then); slice_B: each sequence's
    slice, with gate='slices' (and only then)."""
    if x_BxLxD.ndim != 3 or x_BxLxD.shape[-1] != self.in_features:
      raise ValueError(f'GatedMLP expects inputs [batch, length, {self.in_features}], got '
                       f'shape {x_BxLxD.shape}')
    path = self.path if path is None else path
    k = self.active_groups if active_groups is None else active_groups
    check_active_groups(k, self.num_groups, self.gate_rule, path)
    deterministic = self._deterministic(deterministic)
    logits_BxG = self._logits(x_BxLxD, valid_BxL, logits_BxG, slice_B, k)
    forced = self.forced_weights_BxG
    if forced is None:
      gate = self._select(logits_BxG, k, deterministic, self._gate_rng(rngs, deterministic))
    else:
      gate = selection.forced(forced, x_BxLxD.shape[0], self.num_groups, 'num_groups')
      path = 'masked'
      self.sow(nnx.Intermediate, 'router_logits', logits_BxG)
    self._record(logits_BxG, gate)

    x_BxLxD, w = self.promoted(x_BxLxD)
    if path == 'masked' or k == self.num_groups:
      y = compute.masked_mlp(x_BxLxD, w, gate.weights_BxH, self.num_groups,
                             self.activation, precision=self.precision)
    else:
      weights_BxK = jnp.take_along_axis(gate.weights_BxH, gate.idx_BxK, axis=1)
      y = compute.gathered_mlp(x_BxLxD, w, gate.idx_BxK, weights_BxK, self.num_groups,
                               self.activation, precision=self.precision)
    if forced is not None:
      self.sow(nnx.Intermediate, 'output', y)
    elif self.unit_mean_UxD is not None:
      y = y + compute.dropped_mean(gate.weights_BxH, self.unit_mean_UxD).astype(y.dtype)
    return (y, gate) if return_gate else y

  def compensate(self, mean_GxD: jax.Array | None) -> None:
    """Dropped-group compensation (None: off, the default): each call adds
    sum_g (1 - w_bg) m_g, m = mean_GxD, so that a closed group contributes its mean output
    instead of 0, as GatedMultiHeadAttention.compensate does for heads."""
    if mean_GxD is not None and mean_GxD.shape != (self.num_groups, self.in_features):
      raise ValueError(f'compensate: mean of shape {mean_GxD.shape}, expected '
                       f'{(self.num_groups, self.in_features)} (num_groups, features)')
    self.unit_mean_UxD = mean_GxD

  # -- helpers ---------------------------------------------------------------------------

  def _logits(self, x_BxLxD, valid_BxL, logits_BxG=None, slice_B=None, k=None):
    if selection.RULES[self.gate_rule].router == 'assignment':
      k = self.active_groups if k is None else k
      return selection.assigned_logits(slice_B, x_BxLxD.shape[0], self.routed_groups,
                                       k - self.shared_groups, **SLICE_NAMES)
    if self.logits_from_attention:
      expected = (x_BxLxD.shape[0], self.routed_groups)
      if logits_BxG is None or logits_BxG.shape != expected:
        got = None if logits_BxG is None else logits_BxG.shape
        raise ValueError(f"this GatedMLP has router='attention': pass its group logits "
                         f'logits_BxG of shape {expected}, got {got}')
      return logits_BxG.astype(jnp.float32)
    if logits_BxG is not None:
      raise ValueError("logits_BxG is only taken by a GatedMLP built with "
                       "router='attention'; this one has its own router")
    if self.router is None:
      return jnp.zeros((x_BxLxD.shape[0], self.routed_groups), jnp.float32)
    return self.router(x_BxLxD, valid_BxL)

  def _select(self, logits_BxR, k, deterministic, rng) -> selection.Gate:
    """The rule on the routed groups' logits, the Sf shared groups prepended (open)."""
    return selection.select_routed(
        self.gate_rule, logits_BxR, k=k, shared=self.shared_groups, budget='active_groups',
        shared_name='shared_groups', temperature=self.temperature[...],
        deterministic=deterministic, rng=rng, noise=self.noise, noise_scale=self.noise_scale,
        scaled_weights=self.scaled_weights, options=dict(self.gate_options))

  def _record(self, logits_BxG, gate: selection.Gate) -> None:
    record_gate(self.group_usage, self.group_prob, self.group_weight, self.router_z_loss,
                logits_BxG, gate, self.router is not None or self.logits_from_attention)

  def _deterministic(self, deterministic):
    if not self.stochastic_gate:
      return True
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic is None:
      raise ValueError('GatedMLP with a stochastic gate needs `deterministic` (as a call '
                       'argument, constructor argument, or via model.train() / model.eval())')
    return deterministic

  def _gate_rng(self, rngs, deterministic):
    if deterministic or not self.stochastic_gate:
      return None
    rngs = self.rngs if rngs is None else rngs
    return (rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs)()
