"""Selection rules: unit logits_BxH -> Gate(weights_BxH, idx_BxK | None, probs_BxH).

Every rule is one registered unit, `RULES[name]`: its math (a function of the logits),
its options with their defaults, and its properties (whether it samples in training,
whether it needs a budget K, its default temperature, whether it reads a router, and the
one-line meaning that eval prints). The layers, the config, `--set`, eval, the sweep
tables and Linen read these properties from here; adding a rule is one function, one
`register(Rule(...))` and its tests.

`weights_BxH` multiply each head's output (0 for a closed head). `idx_BxK` are the K heads
that the gathered path computes, when a static budget K is given. `probs_BxH` is the rule's
open probability of each head, for the regularizers and the load balance (DESIGN 4).

Rules (t is the temperature, a traced input):
  dense          every head open, weight 1.
  topk           idx = top_k(logits, K) without gradient; p = softmax(logits / t).
  hard_concrete  Louizos et al. (2018). Training: u ~ U(0,1),
                   s = sigmoid((log u - log(1-u) + log_alpha) / beta),
                 eval: s = sigmoid(log_alpha); then z = clip(s (zeta - gamma) + gamma, 0, 1),
                 open iff z > 0; p = P(z > 0) = sigmoid(log_alpha - beta log(-gamma/zeta)),
                 the expected L0 of the head. beta = t (default 2/3), (gamma, zeta) = (-0.1, 1.1).
  sigmoid        p = sigmoid(logits / t); open iff p > threshold.
  static         hard_concrete on a static router's logits (Voita et al. 2019): the same
                 math; the attention layer pairs this name with `StaticRouter`.
  token_topk     topk's math on each token's logits_BxLxH (MoH; Jin et al. 2024), read by the
                 'token' router kind: a per-token reference, masked path only (K/V and
                 every head computed; no FLOPs saved). Its Gate per token is
                 weights_BxLxH; what a layer returns and records is the mean over the
                 valid tokens (`per_sequence`).
  top_p          p = softmax(logits / t); open the fewest heads, in order of p, whose
                 probabilities sum to at least `p` (option, default 0.9): head j is open
                 iff the mass of the heads ranked above it is < p. With a budget K
                 (active_heads=K, the gathered path) at most K of them stay open, and
                 scaled weights are normalised over those.
  slices         no router: the caller assigns each sequence a slice e (`slice_B`, the
                 same in every layer; c-BTM, SmallTalk). The R = H - S routed heads make
                 E = R / (K - S) disjoint slices, slice e = heads S + e (K - S) ..
                 S + (e + 1) (K - S) - 1; open iff the head is in the sequence's slice
                 (or shared), weight exactly 1, no gradient (the assignment is data).

Options (`gate_options`): sigmoid `threshold` (0.5); hard_concrete and static `gamma`,
`zeta` (the stretch, -0.1 and 1.1); top_p `p` (0.9); slices `assigner` (a name: 'label',
the data's label, 'cluster', balanced k-means, or 'prefix_loss', SmallTalk's; and
`rounds`, prefix_loss's reassignments, 2; `start`, its first assignment, 'random' or
'cluster'; gating.training.slices).

Weights of open heads are exactly 1 in value by default, with the gradient of p
(straight-through):  w = open + (p - stop_gradient(p))  for every head, so a closed head
weighs 0 but, on the masked path, still learns whether opening it would help. For
hard_concrete p is the sample z (closed heads are clipped, so they get no gradient there;
the L0 term trains them). `scaled_weights=True` uses the values instead: topk
w = K softmax(logits / t) over the selected heads (MoH), sigmoid w = p (SwitchHead),
hard_concrete w = z (Louizos; Voita), each times `open`.

A budget K (any rule) keeps the K heads of highest score, the rule's deterministic
propensity to open a head (the logits; for hard_concrete log_alpha, not its noisy sample),
and gives zero weight to those of them that are closed. Ranking by the sample instead
would pick a random set in training while the log_alphas are close (the logistic noise
has a standard deviation of 1.8), and the heads would never specialize. In eval mode,
and for sigmoid, "highest score" and "open first" pick the same heads.

Exploration noise on the logits in training (off when deterministic): 'gumbel' adds
scale * Gumbel(0, 1); 'jitter' adds scale * N(0, 1) (noisy top-k, Shazeer et al. 2017).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gating.layers import names

NOISES = (None, 'gumbel', 'jitter')
PATHS = ('masked', 'gathered')
HARD_CONCRETE_STRETCH = (-0.1, 1.1)  # (gamma, zeta), Louizos et al. 2018


class Gate(NamedTuple):
  weights_BxH: jax.Array        # multiplies each head's output; 0 for a closed head
  idx_BxK: jax.Array | None     # heads computed on the gathered path (int32); None without K
  probs_BxH: jax.Array          # open probability of each head (regularizers, load balance)


class Decision(NamedTuple):
  """What a rule's math returns; `select` turns it into a Gate."""
  open_BxH: jax.Array     # bool: the rule opens the head
  p_BxH: jax.Array        # an open head's weight carries the gradient of p (straight-through)
  scaled_BxH: jax.Array   # the weight of an open head with scaled_weights=True
  score_BxH: jax.Array    # deterministic propensity: a budget K keeps the K highest
  probs_BxH: jax.Array    # open probability (regularizers, load balance)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One selection rule: its math, its options and its properties.

  `fn(logits_BxH, *, k, temperature, deterministic, rng, **options) -> Decision`, where
  `rng` is a PRNG key when `samples` and not deterministic (else None) and `options`
  holds every name of `options` (defaults filled in).
  """
  name: str
  fn: Callable[..., Decision]
  meaning: str                   # what the rule's own (unbudgeted) gate opens; eval prints it
  label: str                     # its name in results tables and plots
  samples: bool = False          # draws a sample in training (needs the 'dropout' stream)
  budget: str = 'optional'       # 'required' (needs K) | 'optional' | 'none' (all units open)
  temperature: float = 1.0       # default temperature
  router: str | None = 'input'   # 'input': a router that reads the sequence (any kind);
                                 # 'input_free': the input-free router only (StaticRouter);
                                 # 'assignment': no router: the caller assigns each
                                 # sequence its slice (`slice_B`; the slices rule);
                                 # None: no router at all
  options: Mapping[str, float | str] = dataclasses.field(default_factory=dict)  # defaults
  check_options: Callable[[Mapping[str, float | str]], None] | None = None  # ValueError
                                 # naming a bad value (after the kinds are checked)
  per_token: bool = False        # decides per token (logits_BxLxU, the 'token' router
                                 # kind): the masked path only, no gathered compute

  @property
  def needs_k(self) -> bool:
    return self.budget == 'required'

  def resolve_options(self, given: Mapping[str, float | str] | None = None
                      ) -> dict[str, float | str]:
    """The rule's options with `given` applied; a ValueError names an unknown option, or
    a value of the wrong kind (an option whose default is a name takes a name, any other
    a number)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(self.options))
    if unknown:
      known = ', '.join(sorted(self.options)) or 'none'
      raise ValueError(f'gate {self.name!r} has no option(s) {unknown}; its options: {known}')
    out = dict(self.options)
    for name, value in given.items():
      if isinstance(self.options[name], str):
        if not isinstance(value, str):
          raise ValueError(f'gate option {name}={value!r} of {self.name!r} must be a name')
        out[name] = value
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'gate option {name}={value!r} of {self.name!r} must be a number')
      out[name] = float(value)
    if self.check_options is not None:
      self.check_options(out)
    return out


RULES: dict[str, Rule] = {}


def older_spellings(rule: Rule, options: Mapping[str, float] | None,
                    threshold: float | None = None,
                    stretch: tuple[float, float] | None = None) -> dict[str, float]:
  """`options` with the older keyword spellings folded in: threshold= is the option
  'threshold', stretch=(gamma, zeta) the options 'gamma' and 'zeta' (an option given by
  name wins). A rule without that option refuses it, naming the rule and its options,
  rather than ignore it."""
  options = dict(options or {})
  for keyword, value, option_names in (('threshold', threshold, ('threshold',)),
                                       ('stretch', stretch, ('gamma', 'zeta'))):
    if value is None:
      continue
    if not set(option_names) <= set(rule.options):
      known = ', '.join(sorted(rule.options)) or 'none'
      raise ValueError(f'{keyword}={value!r}: gate {rule.name!r} has no option '
                       f"{' or '.join(option_names)} (its options: {known})")
    for name, v in zip(option_names, (value,) if keyword == 'threshold' else value):
      options.setdefault(name, v)
  return options


def register(rule: Rule) -> Rule:
  """Adds a rule to RULES (its name must be new)."""
  if rule.name in RULES:
    raise ValueError(f'a rule named {rule.name!r} is already registered')
  if rule.budget not in ('required', 'optional', 'none'):
    raise ValueError(f"Rule.budget must be 'required', 'optional' or 'none', got {rule.budget!r}")
  if rule.router == 'static':       # the older spelling of 'input_free'
    names.renamed('Rule.router', 'static', 'input_free')
    rule = dataclasses.replace(rule, router='input_free')
  if rule.router not in ('input', 'input_free', 'assignment', None):
    raise ValueError("Rule.router must be 'input', 'input_free', 'assignment' or None, got "
                     f'{rule.router!r}')
  RULES[rule.name] = rule
  return rule


def get_rule(name: str) -> Rule:
  """RULES[name], or a ValueError listing the known rules."""
  if name not in RULES:
    raise ValueError(f'gate must be one of {tuple(RULES)}, got {name!r}')
  return RULES[name]


def check_budget(k, num_units: int, gate: str, path: str, *, name: str = 'active_heads',
                 count: str = 'num_heads', units: str = 'heads', symbol: str = 'K') -> None:
  """Validates a budget `k` (K heads, Kf groups: any unit) against the unit count, the
  rule and the compute path; the ValueError names the argument (`name`)."""
  if k is not None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise ValueError(f'{name} must be an int ({symbol}), got {k!r}')
    if not 1 <= k <= num_units:
      raise ValueError(f'{name} must be in [1, {count}={num_units}], got {k}')
  if path not in PATHS:
    raise ValueError(f'path must be one of {PATHS}, got {path!r}')
  if k is None and path == 'gathered':
    raise ValueError(f"path='gathered' needs a static budget: pass {name}={symbol}")
  rule = get_rule(gate)
  if rule.per_token and path == 'gathered':
    raise ValueError(f"gate={gate!r} decides per token: it runs on path='masked' only "
                     '(every head is computed; there is no gathered compute to save)')
  if k is None and rule.budget == 'required':
    raise ValueError(f'gate={gate!r} needs a budget: pass {name}={symbol}')
  if rule.budget == 'none' and k not in (None, num_units):
    raise ValueError(f'gate={gate!r} opens all {num_units} {units}; {name} must be None '
                     f'or {num_units}, got {k}')


def check_shared(shared, active, num_units: int, gate: str, *, name: str = 'shared_heads',
                 budget: str = 'active_heads', count: str = 'num_heads',
                 units: str = 'heads') -> None:
  """S always-on units (heads, channel groups): 0 <= S < U, S < K (K counts them), and a
  rule with a budget; the ValueError names the argument (`name`)."""
  if isinstance(shared, bool) or not isinstance(shared, (int, np.integer)) or shared < 0:
    raise ValueError(f'{name} must be an int >= 0, got {shared!r}')
  if not shared:
    return
  if get_rule(gate).budget == 'none':
    raise ValueError(f'{name}={shared}: gate={gate!r} opens every {units[:-1]} already')
  if shared >= num_units:
    raise ValueError(f'{name}={shared} must be < {count}={num_units}')
  if active is not None and shared >= active:
    raise ValueError(f'{name}={shared} must be < {budget}={active}: the budget counts the '
                     f'shared {units}, so at least one must be routed')


def forced(weights_BxU: jax.Array, batch: int, num_units: int, count: str) -> Gate:
  """The Gate of weights forced from outside (force_gate: analysis tools): the weights
  exactly, no budget (idx None), probabilities = weights. A ValueError unless they are
  [batch, num_units] (`count` names U, e.g. 'num_heads')."""
  if weights_BxU.shape != (batch, num_units):
    raise ValueError(f'forced gate weights of shape {weights_BxU.shape}: expected '
                     f'{(batch, num_units)} (batch, {count})')
  return Gate(weights_BxU, None, weights_BxU)


def select_routed(rule: str, logits_BxR: jax.Array, *, k: int | None, shared: int,
                  budget: str = 'active_heads', shared_name: str = 'shared_heads',
                  **select_kwargs) -> Gate:
  """`select` on the R routed units' logits at budget K - S, then the S shared units
  prepended (`with_shared`): the Gate over all S + R units of a layer with shared units.
  K counts the shared units, so K <= S is refused (a ValueError naming `budget`)."""
  if shared and k is not None and k <= shared:
    raise ValueError(f'{budget}={k} must be > {shared_name}={shared} (the budget counts '
                     'the shared units)')
  gate = select(rule, logits_BxR, k=None if k is None else k - shared, **select_kwargs)
  return with_shared(gate, shared)


def with_shared(gate: Gate, shared: int) -> Gate:
  """The Gate over all U = S + R units from the rule's Gate over the R routed ones: the S
  shared units come first, open with weight 1 (MoH's shared heads):
  weights_BxU = [1_S, w_routed], idx_BxK = [0..S-1, S + idx_routed], probs_BxU = [1_S, p]."""
  if not shared:
    return gate
  lead = gate.weights_BxH.shape[:-1]       # [B], or [B, L] for a per-token rule
  ones_BxS = jnp.ones((*lead, shared), gate.weights_BxH.dtype)
  idx_BxK = None if gate.idx_BxK is None else jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(shared, dtype=gate.idx_BxK.dtype), (*lead, shared)),
       gate.idx_BxK + shared], axis=-1)
  return Gate(jnp.concatenate([ones_BxS, gate.weights_BxH], axis=-1), idx_BxK,
              jnp.concatenate([ones_BxS.astype(gate.probs_BxH.dtype), gate.probs_BxH],
                              axis=-1))


def per_sequence(gate: Gate, valid_BxL: jax.Array | None) -> Gate:
  """The per-sequence summary of a per-token Gate (weights_BxLxH): each head's weight and
  probability averaged over the sequence's valid tokens, no indices. A per-sequence Gate
  is returned as it is."""
  if gate.weights_BxH.ndim == 2:
    return gate
  B, L, _ = gate.weights_BxH.shape
  if valid_BxL is None:
    valid_BxL = jnp.ones((B, L), bool)
  w_BxLx1 = valid_BxL[:, :, None].astype(gate.weights_BxH.dtype)
  count_Bx1 = jnp.maximum(w_BxLx1.sum(axis=1), 1)
  mean = lambda a_BxLxH: (a_BxLxH * w_BxLx1.astype(a_BxLxH.dtype)).sum(axis=1) / count_Bx1
  return Gate(mean(gate.weights_BxH), None, mean(gate.probs_BxH))


def expand_units(gate: Gate, size: int) -> Gate:
  """The Gate over G units of `size` consecutive heads each (the KV groups of grouped-query
  attention) as a Gate over their H = G size heads: every head takes its unit's weight and
  probability, and the unit idx_BxKu becomes its heads, in order:
  idx_BxK[b, j size + r] = idx_BxKu[b, j] size + r. size 1: the Gate unchanged."""
  if size == 1:
    return gate
  idx_BxK = None
  if gate.idx_BxK is not None:
    *lead, Ku = gate.idx_BxK.shape
    offsets = jnp.arange(size, dtype=gate.idx_BxK.dtype).reshape((1,) * (len(lead) + 1) + (size,))
    idx_BxK = (gate.idx_BxK[..., None] * size + offsets).reshape(*lead, Ku * size)
  return Gate(jnp.repeat(gate.weights_BxH, size, axis=-1), idx_BxK,
              jnp.repeat(gate.probs_BxH, size, axis=-1))


def straight_through(open_BxH: jax.Array, p_BxH: jax.Array) -> jax.Array:
  """open in value (exactly: p - stop_gradient(p) is exactly 0), gradient of p."""
  return open_BxH.astype(p_BxH.dtype) + (p_BxH - jax.lax.stop_gradient(p_BxH))


def one_hot_sum(idx_BxK: jax.Array, num_heads: int) -> jax.Array:
  """Boolean membership mask_BxH of the indices idx_BxK (or [..., K] -> [..., H])."""
  return jax.nn.one_hot(idx_BxK, num_heads, dtype=jnp.int32).sum(axis=-2) > 0


def add_noise(logits_BxH: jax.Array, noise: str | None, scale: float, rng) -> jax.Array:
  if noise is None:
    return logits_BxH
  if noise == 'gumbel':
    return logits_BxH + scale * jax.random.gumbel(rng, logits_BxH.shape, logits_BxH.dtype)
  if noise == 'jitter':
    return logits_BxH + scale * jax.random.normal(rng, logits_BxH.shape, logits_BxH.dtype)
  raise ValueError(f'noise must be one of {NOISES}, got {noise!r}')


# -- the rules ------------------------------------------------------------------------

def dense(logits_BxH, **_):
  ones_BxH = jnp.ones_like(logits_BxH)
  return Decision(ones_BxH > 0, ones_BxH, ones_BxH, ones_BxH, ones_BxH)


def topk(logits_BxH, *, k, temperature, **_):
  """idx = top_k(logits, K) without gradient; p = softmax(logits / t); scaled: K softmax
  over the selected (MoH)."""
  if k is None:
    raise ValueError("the 'topk' rule needs a budget: active_heads=K")
  H = logits_BxH.shape[-1]
  p_BxH = jax.nn.softmax(logits_BxH / temperature, axis=-1)
  _, idx_BxK = jax.lax.top_k(jax.lax.stop_gradient(logits_BxH), k)
  open_BxH = one_hot_sum(idx_BxK, H)
  selected_p_BxH = jax.nn.softmax(jnp.where(open_BxH, logits_BxH / temperature, -jnp.inf), -1)
  return Decision(open_BxH, p_BxH, k * selected_p_BxH, logits_BxH, p_BxH)


def hard_concrete(log_alpha_BxH, *, temperature, deterministic, rng, gamma, zeta, **_):
  """Louizos et al. (2018); the gradient of an open head's weight is that of its sample z
  (the reparameterization). A budget ranks heads by log_alpha, not by the sample."""
  beta = temperature
  if deterministic:
    s_BxH = jax.nn.sigmoid(log_alpha_BxH)
  else:
    u_BxH = jax.random.uniform(rng, log_alpha_BxH.shape, log_alpha_BxH.dtype, 1e-6, 1 - 1e-6)
    s_BxH = jax.nn.sigmoid((jnp.log(u_BxH) - jnp.log1p(-u_BxH) + log_alpha_BxH) / beta)
  stretched_BxH = s_BxH * (zeta - gamma) + gamma
  z_BxH = jnp.clip(stretched_BxH, 0.0, 1.0)
  p_open_BxH = jax.nn.sigmoid(log_alpha_BxH - beta * jnp.log(-gamma / zeta))
  return Decision(z_BxH > 0, z_BxH, z_BxH, log_alpha_BxH, p_open_BxH)


def sigmoid(logits_BxH, *, temperature, threshold, **_):
  """p = sigmoid(logits / t); open iff p > threshold; scaled: p (SwitchHead)."""
  p_BxH = jax.nn.sigmoid(logits_BxH / temperature)
  return Decision(p_BxH > threshold, p_BxH, p_BxH, p_BxH, p_BxH)


def top_p(logits_BxH, *, temperature, p, k=None, **_):
  """p_h = softmax(logits / t); open the fewest heads whose p sum to >= `p`.

  Ranked by logit (the order of p, and the order a budget keeps), head j is open iff
  sum_{i ranked before j} p_i < p, so the most probable head is always open; with a
  budget K only the first K can be open. Scaled weights: n_open softmax over the heads
  that are open after the budget, so they sum to the number open, as topk's do to K.
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"the 'top_p' rule's option p must be in (0, 1], got {p}")
  H = logits_BxH.shape[-1]
  p_BxH = jax.nn.softmax(logits_BxH / temperature, axis=-1)
  _, order_BxH = jax.lax.top_k(jax.lax.stop_gradient(logits_BxH), H)
  sorted_p_BxH = jnp.take_along_axis(jax.lax.stop_gradient(p_BxH), order_BxH, axis=-1)
  mass_before_BxH = jnp.cumsum(sorted_p_BxH, axis=-1) - sorted_p_BxH
  open_sorted_BxH = mass_before_BxH < p
  if k is not None:
    rank_in_order_BxH = jax.lax.broadcasted_iota(jnp.int32, open_sorted_BxH.shape,
                                                 open_sorted_BxH.ndim - 1)
    open_sorted_BxH = open_sorted_BxH & (rank_in_order_BxH < k)
  rank_BxH = jnp.argsort(order_BxH, axis=-1)
  open_BxH = jnp.take_along_axis(open_sorted_BxH, rank_BxH, axis=-1)
  n_open_Bx1 = open_BxH.sum(axis=-1, keepdims=True).astype(p_BxH.dtype)
  open_p_BxH = jax.nn.softmax(jnp.where(open_BxH, logits_BxH / temperature, -jnp.inf), -1)
  return Decision(open_BxH, p_BxH, n_open_Bx1 * open_p_BxH, logits_BxH, p_BxH)


def slices(indicator_BxR, *, k, **_):
  """The units of the sequence's assigned slice open, weight exactly 1 and no gradient
  (the assignment is data, not a decision to learn): indicator_BxR is 1 on the units of
  the slice (`slice_indicator`), 0 elsewhere; the budget K - S is the slice's size."""
  if k is None:
    raise ValueError("the 'slices' rule needs a budget: active_heads=K")
  indicator_BxR = jax.lax.stop_gradient(indicator_BxR)
  return Decision(indicator_BxR > 0.5, indicator_BxR, indicator_BxR, indicator_BxR,
                  indicator_BxR)


SLICE_ASSIGNERS = ('label', 'cluster', 'prefix_loss')   # gating.training.slices
SLICE_STARTS = ('random', 'cluster')     # prefix_loss's first assignment


def _check_slice_options(options) -> None:
  if options['assigner'] not in SLICE_ASSIGNERS:
    raise ValueError(f"the 'slices' rule's option assigner must be one of {SLICE_ASSIGNERS}, "
                     f"got {options['assigner']!r}")
  if options['rounds'] < 1 or options['rounds'] != int(options['rounds']):
    raise ValueError(f"the 'slices' rule's option rounds (prefix_loss reassignments) must "
                     f"be a whole number >= 1, got {options['rounds']}")
  if options['start'] not in SLICE_STARTS:
    raise ValueError(f"the 'slices' rule's option start (prefix_loss's first assignment) "
                     f"must be one of {SLICE_STARTS}, got {options['start']!r}")
  if options['start'] != 'random' and options['assigner'] != 'prefix_loss':
    raise ValueError(f"the 'slices' rule's option start={options['start']} is the "
                     f"prefix_loss assigner's first assignment; assigner "
                     f"{options['assigner']!r} has none")
  if not options['balance'] >= 1:
    raise ValueError(f"the 'slices' rule's option balance (a slice takes at most "
                     f"ceil(balance N / E) training rows) must be >= 1, got {options['balance']}")


def num_slices(routed: int, routed_budget, *, budget: str = 'active_heads',
               shared_name: str = 'shared_heads', units: str = 'heads') -> int:
  """E = R / Kr: the disjoint slices of Kr = K - S units that the R = U - S routed units
  make (K and S counted in units). A ValueError, naming the budget, unless Kr divides R
  and E >= 2."""
  if routed_budget is None or routed_budget < 1 or routed % routed_budget:
    raise ValueError(f"gate='slices' splits the {routed} routed {units} into slices of "
                     f'{budget} - {shared_name} = {routed_budget} {units}: that must divide '
                     f'{routed} (E slices of equal size, no remainder)')
  if routed // routed_budget < 2:
    raise ValueError(f"gate='slices' needs at least 2 slices: {routed} routed {units} in "
                     f'slices of {routed_budget} make {routed // routed_budget}; lower '
                     f'{budget}')
  return routed // routed_budget


def slice_indicator(slice_B: jax.Array, routed: int, routed_budget: int) -> jax.Array:
  """indicator_BxR (float32): 1 where routed unit r belongs to the sequence's slice,
  r // Kr == slice_B[b] (slice e holds units e Kr .. (e + 1) Kr - 1), else 0. A slice id
  outside [0, E) opens no routed unit; callers check the ids where they are concrete
  (`check_slice_ids`)."""
  slice_R = jnp.arange(routed) // routed_budget
  return (slice_R[None, :] == jnp.asarray(slice_B)[:, None]).astype(jnp.float32)


def assigned_logits(slice_B, batch: int, routed: int, routed_budget: int,
                    **error_names) -> jax.Array:
  """indicator_BxR of each sequence's slice (`slice_indicator`), after the slice count
  (`num_slices`, its ValueError naming `error_names`: budget, shared_name, units) and the
  ids (`check_slice_ids`) are checked: what a slices layer reads instead of a router's
  logits."""
  count = num_slices(routed, routed_budget, **error_names)
  check_slice_ids(slice_B, batch, count)
  return slice_indicator(slice_B, routed, routed_budget)


def check_slice_ids(slice_B, batch: int, count: int) -> None:
  """A ValueError unless slice_B is [batch] integers in [0, count) (checked only where
  the ids are concrete: under jit a bad id opens no routed unit)."""
  if slice_B is None:
    raise ValueError("gate='slices' needs each sequence's slice: pass slice_B (int [batch]), "
                     'the assigner\'s slice ids')
  if np.shape(slice_B) != (batch,):
    raise ValueError(f'slice_B must have shape ({batch},) (one slice per sequence), got '
                     f'{np.shape(slice_B)}')
  if not jnp.issubdtype(jnp.asarray(slice_B).dtype, jnp.integer):
    raise ValueError(f'slice_B must hold integer slice ids, got dtype {jnp.asarray(slice_B).dtype}')
  if not isinstance(slice_B, jax.core.Tracer):
    ids = np.asarray(slice_B)
    if ids.size and (ids.min() < 0 or ids.max() >= count):
      raise ValueError(f'slice_B holds slice ids in [{ids.min()}, {ids.max()}]; this layer '
                       f'has {count} slices (ids 0..{count - 1})')


_STRETCH = types.MappingProxyType(
    {'gamma': HARD_CONCRETE_STRETCH[0], 'zeta': HARD_CONCRETE_STRETCH[1]})


def _check_stretch(options) -> None:
  """Hard concrete stretches (0, 1) to (gamma, zeta) and clips: gamma < 0 < 1 < zeta, or
  P(open) = sigmoid(log_alpha - beta log(-gamma / zeta)) is NaN and no gate is ever 0 or 1."""
  if not options['gamma'] < 0 < 1 < options['zeta']:
    raise ValueError(f"hard concrete needs gamma < 0 and zeta > 1, got gamma="
                     f"{options['gamma']}, zeta={options['zeta']}")
register(Rule(
    'dense', dense, budget='none', router=None, label='dense',
    meaning='all heads (the dense gate has no router); the gap is 0 by construction'))
register(Rule(
    'topk', topk, budget='required', label='dynamic top-k',
    meaning='the top-K heads by router logit (top-k has no gate without its budget): '
            'the gap is only the numerical difference of the masked and gathered paths'))
register(Rule(
    'hard_concrete', hard_concrete, samples=True, temperature=2 / 3, options=_STRETCH,
    check_options=_check_stretch,
    label='dynamic hard-concrete',
    meaning='every head with deterministic hard-concrete gate z > 0 '
            '(log_alpha > log(-gamma/zeta)), per sequence, no budget'))
register(Rule(
    'sigmoid', sigmoid, options=types.MappingProxyType({'threshold': 0.5}),
    label='dynamic sigmoid',
    meaning='every head with sigmoid(logit / t) > threshold, per sequence, no budget'))
register(Rule(
    'static', hard_concrete, samples=True, temperature=2 / 3, options=_STRETCH,
    check_options=_check_stretch,
    router='input_free', label='static hard-concrete',
    meaning='every head with static hard-concrete gate z > 0 (the same heads for every '
            'sequence), no budget'))
register(Rule(
    'top_p', top_p, options=types.MappingProxyType({'p': 0.9}), label='dynamic top-p',
    meaning='the fewest heads whose router probabilities sum to p, per sequence, no budget'))

register(Rule(
    'slices', slices, budget='required', router='assignment', label='slices',
    options=types.MappingProxyType({'assigner': 'label', 'rounds': 2.0, 'balance': 1.0,
                                    'start': 'random'}),
    check_options=_check_slice_options,
    meaning='the heads of the slice assigned to the sequence (E = (H - S) / (K - S) disjoint '
            'slices plus the S shared heads), the same slice in every layer'))

register(Rule(
    'token_topk', topk, budget='required', per_token=True, label='per-token top-k',
    meaning='per token, the top-K heads by the token\'s router logits (MoH; K/V computed '
            'for every head), masked path only'))

DEFAULT_TEMPERATURE = types.MappingProxyType({n: r.temperature for n, r in RULES.items()})


def select(rule: str, logits_BxH: jax.Array, *, k: int | None = None,
           temperature: float | jax.Array | None = None, deterministic: bool = True,
           rng: jax.Array | None = None, noise: str | None = None, noise_scale: float = 1.0,
           scaled_weights: bool = False, options: Mapping[str, float] | None = None,
           threshold: float | None = None,
           stretch: tuple[float, float] | None = None) -> Gate:
  """Applies `rule` to logits_BxH (float32) and returns its Gate.

  Args:
    rule: a name in RULES.
    logits_BxH: router output (log_alpha for hard_concrete and static).
    k: static budget K (required for topk and for the gathered path), or None.
    temperature: softmax temperature (topk, sigmoid, top_p) or beta (hard_concrete,
      static); default the rule's. May be traced.
    deterministic: eval mode: no noise and no sampling.
    rng: PRNG key, needed when not deterministic and the rule or noise is stochastic.
    noise, noise_scale: exploration noise on the logits in training (see module docstring).
    scaled_weights: weights carry the rule's values instead of exactly 1.
    options: the rule's options (e.g. {'threshold': 0.7} for sigmoid, {'p': 0.8} for
      top_p); unknown names are refused.
    threshold, stretch: older spellings of the options threshold (sigmoid) and
      (gamma, zeta) (hard_concrete, static); refused for a rule without them.
  """
  spec = get_rule(rule)
  options = spec.resolve_options(older_spellings(spec, options, threshold, stretch))
  if temperature is None:
    temperature = spec.temperature
  stochastic = not deterministic and (noise is not None or spec.samples)
  if stochastic and rng is None:
    raise ValueError(f'the {rule!r} gate needs an rng when deterministic=False')
  noise_rng, sample_rng = jax.random.split(rng) if stochastic else (None, None)
  if not deterministic:
    logits_BxH = add_noise(logits_BxH, noise, noise_scale, noise_rng)

  decision = spec.fn(logits_BxH, k=k, temperature=temperature, deterministic=deterministic,
                     rng=sample_rng, **options)
  open_BxH = decision.open_BxH
  idx_BxK = None
  if k is not None:
    # Keep the K heads of highest score; those of them that are closed keep weight 0.
    _, idx_BxK = jax.lax.top_k(jax.lax.stop_gradient(decision.score_BxH), k)
    open_BxH = open_BxH & one_hot_sum(idx_BxK, logits_BxH.shape[-1])

  if scaled_weights:
    weights_BxH = jnp.where(open_BxH, decision.scaled_BxH, 0.0)
  else:
    weights_BxH = straight_through(open_BxH, decision.p_BxH)
  return Gate(weights_BxH, idx_BxK, decision.probs_BxH)
