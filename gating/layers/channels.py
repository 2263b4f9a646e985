"""GatedChannels: per-sequence channel-group gating of an outside model's MLP (masked only).

A model of someone else's has its MLP in its own code: h = act(x W1 + b1), y = h W2 + b2,
with whatever activation. `gating.gate_mlps` wraps the output projection (the
`nnx.Linear` W2) of each MLP it is pointed at in a GatedChannels, which gates the
linear's *input* channels, split into G contiguous groups of F / G:

  s_BxF      = pool(h_BxLxF)                       (the router reads the hidden channels)
  w_BxG      = rule(router(s_BxF))                 (any selection rule, its budget Kf)
  y_BxLxD    = (h_BxLxF * w_BxG expanded to F) W2 + b2

so a closed group contributes nothing, whatever the activation was, and with every group
open at weight 1 (gate='dense') y is exactly the original linear's output. This is the
masked path: the whole MLP is still computed, so it saves no FLOPs; it trains and
measures a channel gate on a model whose MLP code is not ours. Our own blocks use
GatedMLP, whose gathered path computes only the Kf groups.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gating.layers import selection
from gating.layers.mlp import check_active_groups, check_groups, check_shared_groups
from gating.layers.router import HeadRouter, StaticRouter, build_router, resolve_router
from gating.layers.state import (GateTemperature, check_temperature, new_gate_stats,
                                 record_gate)


class GatedChannels(nnx.Module):
  """An nnx.Linear whose input channels are gated per sequence in G groups.

  Args:
    linear: the wrapped nnx.Linear (kept as it is, with its weights: `self.linear`).
    num_groups: G, a divisor of the linear's in_features F.
    gate, active_groups: the selection rule and its budget Kf (as GatedMLP).
    router: the router kind ('mean' | 'prefix' | 'first' | 'input_free', or a registered
      one); 'prefix' needs prefix_len.
    shared_groups: Sf groups (the first Sf) always open; Kf counts them (as GatedMLP).
    router_hidden_features, router_init_logit, temperature, noise, noise_scale,
      scaled_weights, gate_options, deterministic: as in GatedMLP.
    rngs: initializes the router; a stochastic gate draws from its 'dropout' stream.

  State: GateStats `group_usage`, `group_prob`, `group_weight`, `router_z_loss`, as
  GatedMLP (so `gating.gate_stats` and the sparsity regularizers see the groups).
  """

  def __init__(self, linear: nnx.Linear, num_groups: int, *, gate: str = 'topk',
               active_groups: int | None = None, router: str | None = None,
               prefix_len: int | None = None, shared_groups: int = 0,
               router_hidden_features: int | None = None,
               router_init_logit: float = 0.0, temperature: float | None = None,
               noise: str | None = None, noise_scale: float = 1.0,
               scaled_weights: bool = False, gate_options=None,
               deterministic: bool | None = None, rngs: nnx.Rngs):
    if not isinstance(linear, nnx.Linear):
      raise ValueError(f'GatedChannels wraps an nnx.Linear, got {type(linear).__name__}')
    F = linear.in_features
    check_groups(F, num_groups)
    check_active_groups(active_groups, num_groups, gate, 'masked')
    check_shared_groups(shared_groups, active_groups, num_groups, gate)
    if noise not in selection.NOISES:
      raise ValueError(f'noise must be one of {selection.NOISES}, got {noise!r}')
    rule = selection.get_rule(gate)
    if rule.per_token or rule.router == 'assignment':
      raise ValueError(f'gate={gate!r} decides per token or by an assignment the caller '
                       'passes; GatedChannels needs a per-sequence rule that its router '
                       'decides (or dense, static)')
    router = resolve_router(gate, router, prefix_len)
    self.linear = linear
    self.num_groups = num_groups
    self.shared_groups = int(shared_groups)
    self.gate_rule = gate
    self.active_groups = active_groups
    self.noise = noise
    self.noise_scale = noise_scale
    self.scaled_weights = scaled_weights
    self.gate_options = tuple(sorted(rule.resolve_options(gate_options).items()))
    self.deterministic = deterministic
    router_module = build_router(
        gate, router, num_groups - self.shared_groups, F, prefix_len=prefix_len,
        hidden_features=router_hidden_features, init_logit=router_init_logit, rngs=rngs)
    self.router: HeadRouter | StaticRouter | None = (
        nnx.data(None) if router_module is None else router_module)
    if temperature is not None:
      check_temperature(temperature)   # <= 0 would invert the gate or give NaN gradients
    self.temperature = GateTemperature(jnp.asarray(
        rule.temperature if temperature is None else temperature, jnp.float32))
    self.group_usage, self.group_prob, self.group_weight, self.router_z_loss = (
        new_gate_stats(num_groups))
    stochastic = rule.samples or noise is not None
    self.rngs = rngs.dropout.fork() if stochastic else nnx.data(None)

  @property
  def stochastic_gate(self) -> bool:
    return selection.RULES[self.gate_rule].samples or self.noise is not None

  def set_view(self, deterministic: bool | None = None, **_):
    """For model.train() / model.eval() / nnx.view: sets deterministic."""
    if deterministic is not None:
      self.deterministic = deterministic

  def gate(self, h_BxLxF, *, deterministic: bool | None = None, rngs=None) -> selection.Gate:
    """The per-sequence decision over the G groups (writes no state)."""
    return self._decide(h_BxLxF, deterministic, rngs)[1]

  def __call__(self, h_BxLxF, *, deterministic: bool | None = None, rngs=None):
    """y = (h * w expanded over each group's channels) W + b; h is [..., L, F]."""
    logits_BxG, gate = self._decide(h_BxLxF, deterministic, rngs)
    self._record(logits_BxG, gate)
    *lead, L, F = h_BxLxF.shape
    G = self.num_groups
    h_BxLxGxFg = h_BxLxF.reshape((*lead, L, G, F // G))
    w_Bx1xGx1 = gate.weights_BxH[..., None, :, None].astype(h_BxLxF.dtype)
    return self.linear((h_BxLxGxFg * w_Bx1xGx1).reshape(h_BxLxF.shape))

  def _decide(self, h_BxLxF, deterministic, rngs):
    F = self.linear.in_features
    if h_BxLxF.ndim < 3 or h_BxLxF.shape[-1] != F:
      raise ValueError(f'GatedChannels expects hidden channels [..., length, {F}], got shape '
                       f'{h_BxLxF.shape}')
    h_BxLxF_flat = h_BxLxF.reshape((-1, *h_BxLxF.shape[-2:]))
    if self.router is None:
      logits_BxG = jnp.zeros((h_BxLxF_flat.shape[0], self.num_groups - self.shared_groups),
                             jnp.float32)
    else:
      logits_BxG = self.router(h_BxLxF_flat)
    deterministic = self._deterministic(deterministic)
    rng = None
    if not deterministic and self.stochastic_gate:
      rngs = self.rngs if rngs is None else rngs
      rng = (rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs)()
    gate = selection.select_routed(
        self.gate_rule, logits_BxG, k=self.active_groups, shared=self.shared_groups,
        budget='active_groups', shared_name='shared_groups', temperature=self.temperature[...],
        deterministic=deterministic, rng=rng, noise=self.noise, noise_scale=self.noise_scale,
        scaled_weights=self.scaled_weights, options=dict(self.gate_options))
    batch = h_BxLxF.shape[:-2]
    gate = selection.Gate(*(None if a is None else a.reshape((*batch, *a.shape[1:]))
                            for a in gate))
    return logits_BxG, gate

  def _record(self, logits_BxG, gate: selection.Gate) -> None:
    flat = selection.Gate(*(None if a is None else a.reshape((-1, a.shape[-1])) for a in gate))
    record_gate(self.group_usage, self.group_prob, self.group_weight, self.router_z_loss,
                logits_BxG, flat, self.router is not None)

  def _deterministic(self, deterministic):
    if not self.stochastic_gate:
      return True
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic is None:
      raise ValueError('GatedChannels with a stochastic gate needs `deterministic` (at '
                       'construction, or via model.train() / model.eval())')
    return deterministic

