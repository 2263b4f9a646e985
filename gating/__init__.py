"""headgate: dynamic, per-sequence attention-head gating for Flax NNX.

Shape legend (tensor names carry their shape; einsum strings use the same letters):
  B batch, L sequence length, S key length, D model width, H heads, K active heads
  (static), Dh head width, V vocabulary, P gate prefix length, N layers, C classes.

Importing `gating` needs only jax, flax, optax and numpy. Submodules: `gating.decode`
(prefill, decode_step, generate for GatedLM) and `gating.linen` (Linen factories).
"""

from gating import decode, linen
from gating.attention import GatedMultiHeadAttention
from gating.block import GatedTransformerBlock
from gating.compute import HeadWeights, gathered_attention, masked_attention
from gating.convert import PruneReport, gate_heads, prune
from gating.models import EncoderOutput, GatedEncoder, GatedLM, LMOutput
from gating.router import HeadRouter, StaticRouter
from gating.selection import RULES, Gate, select
from gating.state import GateStats, GateTemperature, gate_stats, set_temperature

__all__ = [
    'EncoderOutput', 'Gate', 'GateStats', 'GateTemperature', 'GatedEncoder', 'GatedLM',
    'GatedMultiHeadAttention', 'GatedTransformerBlock', 'HeadRouter', 'LMOutput',
    'HeadWeights', 'PruneReport', 'RULES', 'StaticRouter', 'gate_heads', 'gate_stats',
    'gathered_attention', 'masked_attention', 'prune', 'select', 'set_temperature',
]
