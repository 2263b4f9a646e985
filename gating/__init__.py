"""headgate: dynamic, per-sequence attention-head gating for Flax NNX.

Shape legend (tensor names carry their shape; einsum strings use the same letters):
  B batch, L sequence length, S key length, D model width, H heads, K active heads
  (static), Dh head width, V vocabulary, P gate prefix length, N layers, C classes;
  F MLP hidden width, G MLP channel groups, Kf active groups (static), Fg = F / G.

Layout (the folders are the architecture):
  gating.layers    what a user puts in a model (router, selection, compute, attention,
                   mlp, channels, block, models, state, decode); imports nothing below
  gating.convert   gate_heads (retrofit, causal-safe), gate_mlps (outside MLPs' channels,
                   masked), set_path, prune (thin export)
  gating.linen     Linen factories through flax.nnx.bridge
  gating.data      the synthetic benchmark (tasks), the text corpus (corpus), batches
  gating.training  config, losses, the train loop, checkpoints, provenance
  gating.study     evaluation of run folders, sweeps, results tables

Importing `gating` needs only jax, flax, optax and numpy: `gating.data`, `gating.training`
and `gating.study` (datasets, orbax) load when first named. `gating.decode` (prefill,
decode_step, generate for GatedLM) and `gating.linen` are attributes of the package.
"""

import importlib

from gating import linen
from gating.convert import PruneReport, gate_heads, gate_mlps, prune, set_path
from gating.pretrained import load_pretrained
from gating.layers import decode
from gating.layers.attention import GatedMultiHeadAttention
from gating.layers.block import GatedTransformerBlock
from gating.layers.channels import GatedChannels
from gating.layers.compute import (HeadWeights, MLPWeights, gathered_attention, gathered_mlp,
                                   masked_attention, masked_mlp)
from gating.layers.mlp import GatedMLP
from gating.layers.models import EncoderOutput, GatedEncoder, GatedLM, LMOutput
from gating.layers.router import ROUTERS, HeadRouter, RouterKind, StaticRouter
from gating.layers.selection import RULES, Gate, select
from gating.layers.state import GateStats, GateTemperature, gate_stats, set_temperature

__all__ = [
    'EncoderOutput', 'Gate', 'GateStats', 'GateTemperature', 'GatedChannels', 'GatedEncoder',
    'GatedLM',
    'GatedMLP', 'GatedMultiHeadAttention', 'GatedTransformerBlock', 'HeadRouter', 'LMOutput',
    'HeadWeights', 'MLPWeights', 'PruneReport', 'ROUTERS', 'RULES', 'RouterKind', 'StaticRouter',
    'gate_heads', 'gate_mlps', 'load_pretrained',
    'gate_stats', 'gathered_attention', 'gathered_mlp', 'masked_attention', 'masked_mlp',
    'prune', 'select', 'set_path', 'set_temperature',
]

# Modules that lived directly under gating/ before the layout of subpackages: the name
# `gating.<old>` (as in `from gating import train`) still resolves, to its new module.
# Heavy ones (datasets, orbax) load only when named, so `import gating` stays light.
_MOVED = {
    'router': 'gating.layers.router', 'selection': 'gating.layers.selection',
    'compute': 'gating.layers.compute', 'attention': 'gating.layers.attention',
    'block': 'gating.layers.block', 'models': 'gating.layers.models',
    'state': 'gating.layers.state',
    'config': 'gating.training.config', 'losses': 'gating.training.losses',
    'train': 'gating.training.loop', 'checkpoint': 'gating.training.checkpoint',
    'provenance': 'gating.training.provenance',
    'evaluation': 'gating.study.evaluation', 'sweep': 'gating.study.sweep',
    'results': 'gating.study.results',
}


def __getattr__(name):
  if name in _MOVED:
    return importlib.import_module(_MOVED[name])
  raise AttributeError(f"module 'gating' has no attribute {name!r}")
