"""Linen factories: the gated attention, block and models inside a flax.linen model.

Each factory returns a Linen module built on `flax.nnx.bridge.ToLinen` (what
`bridge.to_linen` returns), so it takes part in `init`/`apply` like any Linen layer:

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x, train):
        attn = gating.linen.gated_attention(8, 64, gate='topk', active_heads=2, name='attn')
        return x + attn(x, deterministic=not train)

    variables = Model().init({'params': k1, 'dropout': k2}, x, False)
    y, updates = Model().apply(variables, x, True, rngs={'dropout': k3},
                               mutable=['gate_stats'])
    updates['gate_stats']['attn']['head_usage']   # [H]

Collections: parameters are in 'params'. The gate statistics (`GateStats`: head_usage
[H], head_prob [H], head_weight [H], router_z_loss []) are in 'gate_stats'; like
batch_stats, `apply` returns them only when asked: `apply(..., mutable=['gate_stats'])`
(a regularizer built from head_prob inside a loss keeps its gradient). The rule's
temperature is in 'gate_temperature'; pass the whole `variables` to apply to keep it, and
change it with `set_temperature(variables, t)`.

Rng streams: `init` needs 'params', plus 'dropout' for the block and the models (their
nnx.Dropout forks it at construction) and for an attention layer with dropout or a
stochastic gate (hard_concrete, static, or noise=...). `apply` with deterministic=False
draws dropout, gate noise and hard-concrete samples from 'dropout': pass
rngs={'dropout': key}. Without it flax's bridge would fall back to a fixed key, so the
factories refuse that with a ValueError instead, also when deterministic is left unset
(the block's and models' nnx.Dropout then run in training mode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.core import FrozenDict
from flax.nnx import bridge

from gating.layers.attention import GatedMultiHeadAttention
from gating.layers.block import GatedTransformerBlock
from gating.layers.models import GatedEncoder, GatedLM
from gating.layers.selection import get_rule
from gating.layers.state import check_temperature


def _stochastic(kwargs) -> bool:
  """True when the NNX module draws from the 'dropout' stream (needs it at init)."""
  return (get_rule(kwargs.get('gate', 'topk')).samples
          or kwargs.get('noise') is not None
          or kwargs.get('dropout_rate', 0.0) > 0
          or kwargs.get('attention_dropout_rate', 0.0) > 0)


class GatedToLinen(bridge.ToLinen):
  """bridge.ToLinen with clear errors when the 'dropout' rng stream is missing."""

  def __call__(self, *args, deterministic: bool | None = None, **kwargs):
    if 'dropout' not in self.scope.rngs:
      name = getattr(self.nnx_class, '__name__', 'module')
      # nnx.Dropout (in the block and the models) forks 'dropout' whatever its rate.
      if self.is_initializing() and (_stochastic(self.kwargs) or self.nnx_class in (
          GatedTransformerBlock, GatedLM, GatedEncoder)):
        raise ValueError(f'{name} forks the dropout stream when it is built: init needs '
                         "rngs={'params': key, 'dropout': key}")
      resolved = self.kwargs.get('deterministic') if deterministic is None else deterministic
      # unset (None) is training mode for the nnx.Dropout of blocks and models: refused too
      if _stochastic(self.kwargs) and resolved is not True:
        raise ValueError(f'{name} with deterministic={resolved!r} draws dropout and gate '
                         "noise from the 'dropout' stream (None: training mode, as "
                         "nnx.Dropout's default): pass apply(..., rngs={'dropout': key}), or "
                         'deterministic=True')
    return super().__call__(*args, deterministic=deterministic, **kwargs)


def _linen(nnx_class, args, kwargs, name):
  return GatedToLinen(nnx_class, args=args, kwargs=FrozenDict(kwargs), name=name)


def gated_attention(num_heads: int, in_features: int, qkv_features: int | None = None,
                    out_features: int | None = None, *, name: str | None = None, **kwargs):
  """A Linen `GatedMultiHeadAttention` (same arguments; `rngs` comes from Linen).

  Call it as the NNX layer: (inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
  deterministic=None, is_causal=False, path=None, active_heads=None, ...) -> y.
  """
  return _linen(GatedMultiHeadAttention, (num_heads, in_features, qkv_features, out_features),
                kwargs, name)


def gated_block(features: int, num_heads: int, *, name: str | None = None, **kwargs):
  """A Linen `GatedTransformerBlock` (same arguments; `rngs` comes from Linen)."""
  return _linen(GatedTransformerBlock, (features, num_heads), kwargs, name)


def gated_lm(vocab_size: int, *, name: str | None = None, **kwargs):
  """A Linen `GatedLM` (same arguments); apply returns its LMOutput."""
  return _linen(GatedLM, (vocab_size,), kwargs, name)


def gated_encoder(vocab_size: int, *, name: str | None = None, **kwargs):
  """A Linen `GatedEncoder` (same arguments); apply returns its EncoderOutput."""
  return _linen(GatedEncoder, (vocab_size,), kwargs, name)


PROJECTIONS = ('query', 'key', 'value', 'out')


def from_dense_params(gated_params, dense_params):
  """`gated_params` (of a `gated_attention`) with the projection weights of a trained Linen
  `nn.MultiHeadDotProductAttention` (its `params`): query, key, value and out carry over
  by name, as their shapes are the same ([D, H, Dh] and [H, Dh, D]); the router keeps its
  own. A missing projection or another shape is a ValueError naming it.
  """
  out = dict(gated_params)
  for name in PROJECTIONS:
    if name not in dense_params or name not in gated_params:
      raise ValueError(f'from_dense_params: {name!r} is missing from the '
                       f'{"dense" if name not in dense_params else "gated"} params')
    want = jax.tree.map(jnp.shape, dict(gated_params[name]))
    got = jax.tree.map(jnp.shape, dict(dense_params[name]))
    if want != got:
      raise ValueError(f'from_dense_params: {name} has shapes {got} in the dense params, '
                       f'the gated layer expects {want}')
    out[name] = dense_params[name]
  return type(gated_params)(out) if isinstance(gated_params, FrozenDict) else out


def set_temperature(variables, temperature: float | jax.Array):
  """A copy of Linen `variables` with every gated layer's temperature set (no recompile);
  it must be > 0."""
  check_temperature(temperature)
  variables = dict(variables)
  variables['gate_temperature'] = jax.tree.map(
      lambda t: jnp.full_like(t, temperature), variables['gate_temperature'])
  return variables
