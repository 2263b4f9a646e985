"""The adapter of flax's own nnx.MultiHeadAttention: GatedMultiHeadAttention.from_dense."""

from __future__ import annotations

from flax import nnx

from gating.adapters import Adapter, register_adapter
from gating.layers.attention import GatedMultiHeadAttention


def gate(module: nnx.MultiHeadAttention, *, rngs: nnx.Rngs, causal: bool = False,
         **gate_kwargs) -> GatedMultiHeadAttention:
  return GatedMultiHeadAttention.from_dense(module, rngs=rngs, causal=causal, **gate_kwargs)


register_adapter(Adapter(
    'nnx.MultiHeadAttention', lambda m: isinstance(m, nnx.MultiHeadAttention), gate,
    description='flax.nnx.MultiHeadAttention, grouped-query attention included'))
