"""Adapters: how `gating.gate_heads` gates an attention module family it did not build.

An adapter is one registered unit, `ADAPTERS[name]`: a test that recognises a module of
its family (by its structure: the attributes and parameter shapes the family's code has)
and a function that returns the gated module carrying the original's weights and keeping
its call signature. `gate_heads` replaces every module that an adapter recognises; a
model in which none does is refused with the list of supported families. Adding a
family is one small module here with its `register_adapter(Adapter(...))`, and its tests.

Registered:
  nnx.MultiHeadAttention   flax's own layer -> GatedMultiHeadAttention (adapters/mha.py)
  gemma                    the attention of flax's NNX Gemma example (q_einsum + kv_einsum
                           or qkv_einsum, attn_vec_einsum; call (x, segment_pos, cache,
                           attn_mask) -> (cache, out)) -> GatedGemmaAttention
                           (adapters/gemma.py)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One family of attention modules: `matches(module)` recognises one; `gate(module, *,
  rngs, causal, **gate_kwargs)` returns the gated module that replaces it (same call
  signature, the original's weights; gate='dense' leaves its outputs unchanged)."""
  name: str
  matches: Callable[[nnx.Module], bool]
  gate: Callable[..., nnx.Module]
  description: str


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
  """Adds an adapter to ADAPTERS (its name must be new)."""
  if adapter.name in ADAPTERS:
    raise ValueError(f'an adapter named {adapter.name!r} is already registered')
  ADAPTERS[adapter.name] = adapter
  return adapter


def adapter_for(module: Any) -> Adapter | None:
  """The registered adapter that recognises `module`, or None."""
  if not isinstance(module, nnx.Module):
    return None
  return next((a for a in ADAPTERS.values() if a.matches(module)), None)


def supported() -> str:
  """The registered families, one phrase each (for error messages)."""
  return '; '.join(f'{a.name} ({a.description})' for a in ADAPTERS.values())


# The built-in families register themselves on import, in this order (flax's own first).
from gating.adapters import mha  # noqa: E402,F401,I001  pylint: disable=wrong-import-position
from gating.adapters import gemma  # noqa: E402,F401  pylint: disable=wrong-import-position
