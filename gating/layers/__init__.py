"""What a user puts in a model: routers, selection rules, compute paths, the gated
attention layer, the gated MLP (channel groups), blocks, models, gate state and cached
decoding.

Imports nothing from `gating.data`, `gating.training` or `gating.study`.
"""
