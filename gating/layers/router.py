"""Routers: a sequence -> one logit per attention head.

Dynamic router (`HeadRouter`):

    s_BxD      = pool(x_BxLxD) over valid tokens         (padding never moves the gate)
    logits_BxH = W2 gelu(W1 LayerNorm(s_BxD) + b1) + b2

Pooling: 'mean' (mean over valid tokens; bidirectional models), 'prefix' (mean over the
valid tokens among the first P; causal models, so the gate reads only tokens 0..P-1), or
'first' (the first valid token, e.g. a [CLS] or task token).

Static router (`StaticRouter`): `logits_H` is a parameter broadcast over the batch; it
ignores x. With the hard-concrete rule this is the static pruning baseline of Voita et
al. (2019), in the same API as the dynamic gate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gating.layers.selection import get_rule

POOLS = ('mean', 'prefix', 'first')
ROUTERS = POOLS + ('static',)


def pool_valid(x_BxLxD: jax.Array, valid_BxL: jax.Array | None, pool: str,
               prefix_len: int | None = None) -> jax.Array:
  """Pools a sequence into s_BxD using only valid tokens (and, for 'prefix', t < P)."""
  B, L, _ = x_BxLxD.shape
  if valid_BxL is None:
    valid_BxL = jnp.ones((B, L), bool)
  if pool == 'prefix':
    valid_BxL = valid_BxL & (jnp.arange(L) < prefix_len)[None, :]
  if pool == 'first':
    first_B = jnp.argmax(valid_BxL, axis=1)
    return jnp.take_along_axis(x_BxLxD, first_B[:, None, None], axis=1)[:, 0, :]
  count_Bx1 = jnp.maximum(valid_BxL.sum(axis=1, keepdims=True), 1).astype(x_BxLxD.dtype)
  # `where`, not a multiply: padding that holds inf or nan cannot leak into the sum.
  x_BxLxD = jnp.where(valid_BxL[:, :, None], x_BxLxD, 0)
  return x_BxLxD.sum(axis=1) / count_Bx1


class HeadRouter(nnx.Module):
  """Per-sequence router: x_BxLxD (+ valid_BxL) -> logits_BxH.

  Args:
    in_features: D, the width of the sequence it reads.
    num_heads: H, one logit per head.
    pool: 'mean' | 'prefix' | 'first' (see the module docstring).
    prefix_len: P, required for pool='prefix': the gate reads tokens 0..P-1 only.
    hidden_features: width of the MLP's hidden layer (default: in_features).
    init_logit: initial value of every logit's bias (the output layer starts near zero
      weights, so all heads start with logit ~= init_logit).
    param_dtype: dtype of the router's parameters. The router always computes in float32.

  A block whose MLP groups share this router (GatedTransformerBlock(mlp_router='shared'))
  adds a second output layer `group_logits` [F, G] that reads the same `features`.
  """

  def __init__(self, in_features: int, num_heads: int, *, pool: str = 'mean',
               prefix_len: int | None = None, hidden_features: int | None = None,
               init_logit: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {pool!r}')
    if pool == 'prefix' and (prefix_len is None or prefix_len < 1):
      raise ValueError(f"pool='prefix' needs prefix_len >= 1, got prefix_len={prefix_len!r}")
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
    block's MLP groups can read them too: mlp_router='shared')."""
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
  """The router name a layer of rule `gate` uses: `router`, or its default ('static' for a
  rule that pairs with StaticRouter, else 'mean'); a ValueError names a bad combination."""
  rule = get_rule(gate)
  router = router or ('static' if rule.router == 'static' else 'mean')
  if router not in ROUTERS:
    raise ValueError(f'router must be one of {ROUTERS}, got {router!r}')
  if router == 'prefix' and (prefix_len is None or prefix_len < 1):
    raise ValueError(f"router='prefix' needs prefix_len=P >= 1 (the gate reads tokens "
                     f'0..P-1), got prefix_len={prefix_len!r}')
  if rule.router == 'static' and router != 'static':
    raise ValueError(f"gate={gate!r} uses the static router; got router={router!r}")
  return router


def build_router(gate: str, router: str, num_units: int, in_features: int, *,
                 prefix_len: int | None, hidden_features: int | None, init_logit: float,
                 rngs: nnx.Rngs) -> HeadRouter | StaticRouter | None:
  """The router module of a layer with `num_units` gated units (heads, channel groups):
  None for a rule without one (dense), StaticRouter, or a HeadRouter pooling as `router`."""
  if get_rule(gate).router is None:
    return None
  if router == 'static':
    return StaticRouter(num_units, init_logit=init_logit, rngs=rngs)
  return HeadRouter(in_features, num_units, pool=router, prefix_len=prefix_len,
                    hidden_features=hidden_features, init_logit=init_logit, rngs=rngs)
