"""Routers: a sequence -> one logit per gated unit (attention head, MLP channel group).

Dynamic router (`HeadRouter`):

    s_BxD      = pool(x_BxLxD) over valid tokens         (padding never moves the gate)
    logits_BxH = W2 gelu(W1 LayerNorm(s_BxD) + b1) + b2

Input-free router (`StaticRouter`): `logits_H` is a parameter broadcast over the batch; it
ignores x. With the hard-concrete rule this is the static pruning baseline of Voita et
al. (2019), in the same API as the dynamic gate (gate='static').

Every router kind is one registered unit, `ROUTERS[name]` (as every selection rule is
`selection.RULES[name]`): its pooling math, whether it is causal-safe (reads no token
after a fixed prefix of the sequence, so a causal model may use it), whether it needs
the prefix length P, and its one-line meaning. The layers, the models, decoding, the
retrofit and router fitting read these properties; adding a kind is one pooling
function and one `register_router(RouterKind(...))`. The kinds:

  mean        s = mean over the valid tokens                       (not causal-safe)
  prefix      s = mean over the valid tokens among the first P     (causal-safe; needs P)
  first       s = the first valid token, e.g. a [CLS] or task token (causal-safe for
              left-aligned sequences)
  token       no pooling: s_BxLxD = x, one logit per unit and token, for a per-token rule
              (selection's token_topk; causal-safe)
  input_free  no pooling: one learned logit per unit for every sequence (StaticRouter;
              causal-safe). Older spelling: 'static'.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gating.layers import names
from gating.layers.selection import get_rule


@dataclasses.dataclass(frozen=True)
class RouterKind:
  """One router kind: how a router reads a sequence.

  `pool(x_BxLxD, valid_BxL, *, prefix_len) -> s_BxD` (float32; valid_BxL is never None
  here) pools the tokens the router reads; None for an input-free kind (StaticRouter).
  """
  name: str
  pool: Callable[..., jax.Array] | None
  meaning: str                   # what it reads, in a few words (docs, error messages)
  causal: bool                   # reads no token after a fixed prefix: a causal LM may use it
  needs_prefix: bool = False     # reads the first P tokens: needs prefix_len=P >= 1

  @property
  def reads_input(self) -> bool:
    return self.pool is not None


ROUTERS: dict[str, RouterKind] = {}


def register_router(kind: RouterKind) -> RouterKind:
  """Adds a router kind to ROUTERS (its name must be new)."""
  if kind.name in ROUTERS or kind.name in names.ROUTER_KINDS:
    raise ValueError(f'a router kind named {kind.name!r} is already registered')
  ROUTERS[kind.name] = kind
  return kind


def get_router(name: str, argument: str = 'router') -> RouterKind:
  """ROUTERS[name] (older spellings accepted, with a notice), or a ValueError naming the
  `argument` and listing the known kinds."""
  name = names.router_kind(name)
  if name not in ROUTERS:
    raise ValueError(f'{argument} must be one of {tuple(ROUTERS)}, got {name!r}')
  return ROUTERS[name]


def _mean(x_BxLxD, valid_BxL, **_):
  count_Bx1 = jnp.maximum(valid_BxL.sum(axis=1, keepdims=True), 1).astype(x_BxLxD.dtype)
  # `where`, not a multiply: padding that holds inf or nan cannot leak into the sum.
  x_BxLxD = jnp.where(valid_BxL[:, :, None], x_BxLxD, 0)
  return x_BxLxD.sum(axis=1) / count_Bx1


def _prefix(x_BxLxD, valid_BxL, *, prefix_len, **_):
  L = x_BxLxD.shape[1]
  return _mean(x_BxLxD, valid_BxL & (jnp.arange(L) < prefix_len)[None, :])


def _first(x_BxLxD, valid_BxL, **_):
  first_B = jnp.argmax(valid_BxL, axis=1)
  return jnp.take_along_axis(x_BxLxD, first_B[:, None, None], axis=1)[:, 0, :]


register_router(RouterKind(
    'mean', _mean, causal=False, meaning='every token (the mean of the valid ones)'))
register_router(RouterKind(
    'prefix', _prefix, causal=True, needs_prefix=True,
    meaning='the first P tokens (the mean of the valid ones; prefix_len=P)'))
register_router(RouterKind(
    'first', _first, causal=True,
    meaning='the first valid token (token 0 of a left-aligned sequence)'))
def _token(x_BxLxD, valid_BxL, **_):
  return x_BxLxD


register_router(RouterKind(
    'token', _token, causal=True,
    meaning='each token itself, for a per-token rule (token_topk): logits_BxLxH'))
register_router(RouterKind(
    'input_free', None, causal=True,
    meaning='no token: one learned logit per unit, the same for every sequence'))

def pool_valid(x_BxLxD: jax.Array, valid_BxL: jax.Array | None, pool: str,
               prefix_len: int | None = None) -> jax.Array:
  """Pools a sequence into s_BxD with the router kind `pool`, reading only valid tokens."""
  B, L, _ = x_BxLxD.shape
  if valid_BxL is None:
    valid_BxL = jnp.ones((B, L), bool)
  return ROUTERS[pool].pool(x_BxLxD, valid_BxL, prefix_len=prefix_len)


class HeadRouter(nnx.Module):
  """Per-sequence router: x_BxLxD (+ valid_BxL) -> logits_BxH.

  Args:
    in_features: D, the width of the sequence it reads.
    num_heads: H, one logit per head.
    pool: a router kind that reads the input (ROUTERS: 'mean' | 'prefix' | 'first' | a
      registered one; see the module docstring).
    prefix_len: P, required by a kind that reads a prefix ('prefix': tokens 0..P-1).
    hidden_features: width of the MLP's hidden layer (default: in_features).
    init_logit: initial value of every logit's bias (the output layer starts near zero
      weights, so all heads start with logit ~= init_logit).
    param_dtype: dtype of the router's parameters. The router always computes in float32.

  A block whose MLP groups use this router (GatedTransformerBlock(group_router='attention'))
  adds a second output layer `group_logits` [F, G] that reads the same `features`.
  """

  def __init__(self, in_features: int, num_heads: int, *, pool: str = 'mean',
               prefix_len: int | None = None, hidden_features: int | None = None,
               init_logit: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kind = get_router(pool, 'pool')
    if not kind.reads_input:
      raise ValueError(f'HeadRouter reads the input; router kind {kind.name!r} does not '
                       '(that is StaticRouter)')
    if kind.needs_prefix and (prefix_len is None or prefix_len < 1):
      raise ValueError(f'pool={kind.name!r} needs prefix_len >= 1, got prefix_len='
                       f'{prefix_len!r}')
    pool = kind.name
    hidden_features = hidden_features or in_features
    self.num_heads = num_heads
    self.pool = pool
    self.prefix_len = prefix_len
    self.norm = nnx.LayerNorm(in_features, param_dtype=param_dtype, rngs=rngs)
    self.hidden = nnx.Linear(in_features, hidden_features, param_dtype=param_dtype, rngs=rngs)
    self.logits = logit_layer(hidden_features, num_heads, init_logit=init_logit,
                              param_dtype=param_dtype, rngs=rngs)

  @property
  def hidden_features(self) -> int:
    return self.hidden.out_features

  def features(self, x_BxLxD: jax.Array, valid_BxL: jax.Array | None = None) -> jax.Array:
    """h_BxF = gelu(W1 LayerNorm(pool(x)) + b1): the hidden features the logits read (a
    block's MLP groups can read them too: group_router='attention')."""
    s_BxD = pool_valid(x_BxLxD.astype(jnp.float32), valid_BxL, self.pool, self.prefix_len)
    return jax.nn.gelu(self.hidden(self.norm(s_BxD)))

  def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array | None = None) -> jax.Array:
    return self.logits(self.features(x_BxLxD, valid_BxL)).astype(jnp.float32)


def logit_layer(hidden_features: int, num_units: int, *, init_logit: float,
                param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """A router's output layer: near-zero weights, so every unit starts at ~init_logit."""
  return nnx.Linear(hidden_features, num_units, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(stddev=0.02),
                    bias_init=nnx.initializers.constant(init_logit), rngs=rngs)


class StaticRouter(nnx.Module):
  """Input-free router: a parameter logits_H, broadcast to logits_BxH (same API)."""

  def __init__(self, num_heads: int, *, init_logit: float = 0.0, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # no randomness: every head starts at init_logit
    self.num_heads = num_heads
    self.logits_H = nnx.Param(jnp.full((num_heads,), init_logit, param_dtype))

  def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array | None = None) -> jax.Array:
    del valid_BxL
    return jnp.broadcast_to(self.logits_H[...].astype(jnp.float32),
                            (x_BxLxD.shape[0], self.num_heads))


def resolve_router(gate: str, router: str | None, prefix_len: int | None) -> str:
  """The router kind a layer of rule `gate` uses: `router` (older spellings accepted), or
  its default ('input_free' for a rule that pairs with StaticRouter, else 'mean'); a
  ValueError names a bad combination."""
  rule = get_rule(gate)
  if router is None:
    router = ('input_free' if rule.router == 'input_free' else 'token' if rule.per_token
              else 'mean')
  kind = get_router(router)
  if rule.per_token != (kind.name == 'token'):
    raise ValueError(f"gate={gate!r} with router={kind.name!r}: the 'token' router kind "
                     'reads each token for a per-token rule (token_topk), and a per-token '
                     'rule reads nothing else')
  if kind.needs_prefix and (prefix_len is None or prefix_len < 1):
    raise ValueError(f'router={kind.name!r} needs prefix_len=P >= 1 (the gate reads tokens '
                     f'0..P-1), got prefix_len={prefix_len!r}')
  if rule.router == 'input_free' and kind.reads_input:
    raise ValueError(f"gate={gate!r} uses the input-free router; got router={kind.name!r}")
  return kind.name


def build_router(gate: str, router: str, num_units: int, in_features: int, *,
                 prefix_len: int | None, hidden_features: int | None, init_logit: float,
                 rngs: nnx.Rngs) -> HeadRouter | StaticRouter | None:
  """The router module of a layer with `num_units` gated units (heads, channel groups):
  None for a rule without one (dense), a StaticRouter for an input-free kind, or a
  HeadRouter pooling as the kind `router`."""
  if get_rule(gate).router in (None, 'assignment'):
    return None
  if not get_router(router).reads_input:
    return StaticRouter(num_units, init_logit=init_logit, rngs=rngs)
  return HeadRouter(in_features, num_units, pool=router, prefix_len=prefix_len,
                    hidden_features=hidden_features, init_logit=init_logit, rngs=rngs)


def router_kind_of(router_module) -> RouterKind | None:
  """The kind of a built router module (HeadRouter: its pool; StaticRouter: input_free);
  None for no router."""
  if router_module is None:
    return None
  if isinstance(router_module, StaticRouter):
    return ROUTERS['input_free']
  return ROUTERS[router_module.pool]


def __getattr__(name):
  """POOLS, the names of the kinds that read the input, as a tuple (older code imported
  it; computed now, so registered kinds are in it)."""
  if name == 'POOLS':
    return tuple(n for n, kind in ROUTERS.items() if kind.reads_input)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
