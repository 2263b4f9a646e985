"""Gated Transformer models: a causal LM (GatedLM) and a bidirectional encoder (GatedEncoder).

GatedLM's gate reads a prefix of P tokens, and causality is a contract: any logit at
position t that is scored or sampled depends only on tokens <= t. Every layer's router
pools tokens 0..P-1 of its input, so the gate (and through it every position's output)
depends on tokens 0..P-1. The logit at position t predicts token t+1 and is scored only if
t >= P-1: then t's dependencies, tokens <= t and the prefix 0..P-1, are all <= t. Earlier
positions are context. `LMOutput.scored_BxL` marks the scored positions.

GatedEncoder's gate reads all valid tokens (mean pooling); it returns the classification
logits of the mean-pooled final states and the per-token states.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gating.layers import names
from gating.layers.block import GatedTransformerBlock, make_norm
from gating.layers.router import ROUTERS, get_router
from gating.layers.selection import get_rule

POSITIONS = ('learned', 'rotary')


class LMOutput(NamedTuple):
  logits_BxLxV: jax.Array   # logits at position t predict token t+1
  scored_BxL: jax.Array     # bool: position t is scored (t >= P-1, target t+1 is valid)
  gate_weights_BxNxH: jax.Array  # every layer's gate weights per sequence (N = layers;
                                 # with per-layer head counts, padded with 0 to max H)
  group_weights_BxNxG: jax.Array | None = None  # the MLP channel groups' gate weights,
                                 # the twin of gate_weights_BxNxH (None without mlp_groups)


class EncoderOutput(NamedTuple):
  class_logits_BxC: jax.Array   # classification of the mean-pooled final states
  hidden_BxLxD: jax.Array       # per-token final states (after the final LayerNorm)
  gate_weights_BxNxH: jax.Array
  group_weights_BxNxG: jax.Array | None = None



def _default_router(gate: str, pool: str) -> str:
  """The model's router kind: `pool`, or 'input_free' for a rule that pairs with
  StaticRouter, or 'token' for a per-token rule."""
  rule = get_rule(gate)
  return 'input_free' if rule.router == 'input_free' else 'token' if rule.per_token else pool


def per_layer(value, num_layers: int, name: str = 'active_heads') -> list:
  """An int (or None) for every layer, or a list with one entry per layer."""
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != num_layers:
      raise ValueError(f'{name} has {len(value)} entries for {num_layers} layers')
    return list(value)
  return [value] * num_layers


def stack_weights(weights: list[jax.Array]) -> jax.Array:
  """Per-layer gate weights [B, H_n] -> [B, N, max H_n]; a layer with fewer heads
  (a pruned model's) fills its first H_n entries and weighs the rest 0."""
  width = max(w.shape[-1] for w in weights)
  return jnp.stack([jnp.pad(w, ((0, 0), (0, width - w.shape[-1]))) for w in weights], axis=1)


def padding_mask(valid_BxL, is_causal: bool):
  """Attention mask [B, 1, L, L]: a query attends to valid keys (and to keys <= it if causal)."""
  mask_Bx1xLxL = valid_BxL[:, None, :, None] & valid_BxL[:, None, None, :]
  if is_causal:
    L = valid_BxL.shape[1]
    mask_Bx1xLxL = mask_Bx1xLxL & jnp.tril(jnp.ones((L, L), bool))[None, None]
  return mask_Bx1xLxL


def num_slices(model: nnx.Module) -> int:
  """E, the slices of a gate='slices' model's layers (0 for a model without slices)."""
  return max((getattr(m, 'num_slices', None) or 0 for _, m in nnx.iter_graph(model)),
             default=0)


def reads_slices(model: nnx.Module) -> bool:
  """Whether any layer of `model` takes each sequence's slice (gate='slices')."""
  return num_slices(model) > 0


def check_token_ids(tokens, vocab_size: int, name: str = 'tokens') -> None:
  """A ValueError unless concrete token ids are in [0, vocab_size); traced ones (under
  jit) pass unchecked."""
  if isinstance(tokens, jax.core.Tracer) or np.size(tokens) == 0:
    return
  values = np.asarray(tokens)
  low, high = int(values.min()), int(values.max())
  if low < 0 or high >= vocab_size:
    raise ValueError(f'{name} hold ids in [{low}, {high}], outside the vocabulary [0, '
                     f'{vocab_size}) of this model')


class _Trunk(nnx.Module):
  """Token embeddings, positions, N gated blocks and a final LayerNorm (shared by both)."""

  def __init__(self, vocab_size: int, *, num_layers: int, features: int, num_heads,
               head_dim: int | None, max_length: int, positions: str, mlp_features: int | None,
               dropout_rate: float, attention_dropout_rate: float, active_heads,
               rotary_base: float, dtype, param_dtype, rngs: nnx.Rngs, mlp_groups=None,
               active_groups=None, group_router: str | None = None, shared_groups: int = 0,
               mlp_router: str | None = None, norm: str = 'layer',
               norm_eps: float | None = None, mlp: str = 'gelu', mlp_bias: bool = True,
               num_kv_heads=None, **attention_kwargs):
    group_router = names.group_router_keyword(group_router, mlp_router)
    if positions not in POSITIONS:
      raise ValueError(f'positions must be one of {POSITIONS}, got {positions!r}')
    for name, value in (('vocab_size', vocab_size), ('num_layers', num_layers),
                        ('features', features), ('max_length', max_length)):
      if value < 1:
        raise ValueError(f'{name} must be >= 1, got {value}')
    heads = per_layer(num_heads, num_layers, 'num_heads')
    if any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in heads):
      raise ValueError(f'num_heads must be an int >= 1 or a list of them, got {num_heads!r}')
    heads = [int(h) for h in heads]
    kv_heads = per_layer(num_kv_heads, num_layers, 'num_kv_heads')
    if mlp_groups is None and active_groups is not None:
      raise ValueError(f'active_groups={active_groups!r} needs mlp_groups (the number of '
                       'channel groups G of each MLP)')
    if shared_groups and mlp_groups is None:
      raise ValueError(f'shared_groups={shared_groups!r} needs mlp_groups (the number of '
                       'channel groups G of each MLP)')
    if group_router != 'own' and mlp_groups is None:
      raise ValueError(f'group_router={group_router!r} needs mlp_groups (the number of '
                       'channel groups G of each MLP)')
    groups = per_layer(mlp_groups, num_layers, 'mlp_groups')
    widths = per_layer(mlp_features, num_layers, 'mlp_features')
    if any(f is not None and (isinstance(f, bool) or not isinstance(f, (int, np.integer))
                              or f < 1) for f in widths):
      raise ValueError(f'mlp_features must be an int >= 1 or a list of them, got '
                       f'{mlp_features!r}')
    group_ks = per_layer(active_groups, num_layers, 'active_groups')
    if head_dim is None and len(set(heads)) > 1:
      raise ValueError('num_heads differs between layers: pass head_dim (Dh) explicitly')
    if head_dim is not None and head_dim < 1:
      raise ValueError(f'head_dim must be >= 1, got {head_dim}')
    self.vocab_size = vocab_size
    self.max_length = max_length
    self.num_heads = heads[0] if isinstance(num_heads, (int, np.integer)) else tuple(heads)
    self.num_kv_heads = (num_kv_heads if num_kv_heads is None or isinstance(
        num_kv_heads, (int, np.integer)) else tuple(kv_heads))
    self.head_dim = head_dim
    self.positions = positions
    self.mlp_features = mlp_features if mlp_features is None or isinstance(
        mlp_features, (int, np.integer)) else tuple(widths)
    self.mlp_groups = mlp_groups if mlp_groups is None or isinstance(
        mlp_groups, (int, np.integer)) else tuple(groups)
    self.token_embed = nnx.Embed(vocab_size, features, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.position_embed = (
        nnx.Embed(max_length, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if positions == 'learned' else nnx.data(None))
    self.blocks = nnx.List([
        GatedTransformerBlock(
            features, h, mlp_features=f, dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate, active_heads=k,
            qkv_features=None if head_dim is None else h * head_dim,
            rotary_base=rotary_base if positions == 'rotary' else None, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs, norm=norm, norm_eps=norm_eps, mlp=mlp,
            mlp_bias=mlp_bias, num_kv_heads=kv,
            **({} if g is None else dict(mlp_groups=g, active_groups=kf,
                                         group_router=group_router,
                                         shared_groups=shared_groups)),
            **attention_kwargs)
        for h, kv, k, f, g, kf in zip(heads, kv_heads, per_layer(active_heads, num_layers),
                                      widths, groups, group_ks)])
    self.final_norm = make_norm(norm, features, norm_eps, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def check_tokens(self, tokens_BxL, valid_BxL):
    """Shapes always; the ids' range [0, V) only when they are concrete (an eager call):
    under jit they cannot be read, and an id outside [0, V) gives NaN logits (nnx.Embed
    fills rows past its table with NaN). The training and evaluation data are checked
    when they are loaded (gating.data.check_tokens)."""
    if tokens_BxL.ndim != 2:
      raise ValueError(f'tokens must have shape [batch, length], got {tokens_BxL.shape}')
    check_token_ids(tokens_BxL, self.vocab_size)
    if tokens_BxL.shape[1] > self.max_length:
      raise ValueError(f'sequence length {tokens_BxL.shape[1]} exceeds max_length '
                       f'{self.max_length}')
    if valid_BxL is not None and valid_BxL.shape != tokens_BxL.shape:
      raise ValueError(f'valid_BxL shape {valid_BxL.shape} != tokens shape {tokens_BxL.shape}')

  def __call__(self, tokens_BxL, valid_BxL, *, is_causal, deterministic, rngs, path,
               active_heads, active_groups=None, positions_BxL=None, slice_B=None):
    """-> (final states h_BxLxD, gate_weights_BxNxH, group_weights_BxNxG or None).
    slice_B: each sequence's slice (gate='slices'), the same in every layer."""
    if active_groups is not None and self.mlp_groups is None:
      raise ValueError('active_groups needs a model built with mlp_groups')
    if slice_B is not None and not reads_slices(self):
      raise ValueError("slice_B is for gate='slices'; no layer of this model reads it (gate "
                       f'{self.blocks[0].attention.gate_rule!r})')
    B, L = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L)[None, :], (B, L))
    x_BxLxD = self.token_embed(tokens_BxL)
    if self.position_embed is not None:
      x_BxLxD = x_BxLxD + self.position_embed(positions_BxL)
    x_BxLxD = self.dropout(x_BxLxD, deterministic=deterministic, rngs=rngs)
    mask = None if valid_BxL is None else padding_mask(valid_BxL, is_causal)
    weights, group_weights = [], []
    for layer, k, kf in zip(self.blocks, per_layer(active_heads, len(self.blocks)),
                            per_layer(active_groups, len(self.blocks), 'active_groups')):
      x_BxLxD, (gate, group_gate) = layer(
          x_BxLxD, mask=mask, is_causal=is_causal and mask is None,
          deterministic=deterministic, rngs=rngs, path=path, active_heads=k,
          positions=positions_BxL if self.positions == 'rotary' else None,
          active_groups=kf, return_gates=True, slice_B=slice_B)
      weights.append(gate.weights_BxH)
      if group_gate is not None:
        group_weights.append(group_gate.weights_BxH)
    return (self.final_norm(x_BxLxD), stack_weights(weights),
            stack_weights(group_weights) if group_weights else None)


class GatedLM(nnx.Module):
  """A causal decoder whose every layer gates its heads from the first P tokens.

  Args:
    vocab_size: V.
    num_layers, features: N and D.
    num_heads: H, an int or a list with one per layer (as `gating.prune` exports).
    head_dim: Dh, each head's width (default features // H; required when the layers'
      head counts differ). The attention's qkv_features is then H Dh.
    max_length: the longest sequence (learned positions are a table of this size).
    prefix_len: P, the tokens every layer's gate reads; positions < P-1 are not scored.
    positions: 'learned' or 'rotary'.
    tie_embeddings: the output projection is the token embedding (transposed).
    mlp_features: the MLP's hidden width F (default 4 D), or a list with one per layer (as
      `gating.prune` exports).
    dropout_rate, attention_dropout_rate: as in GatedTransformerBlock.
    gate, active_heads, path: the gate rule, K (an int, or a list with one K per layer),
      and the compute path; see GatedMultiHeadAttention.
    mlp_groups, active_groups: gate each MLP's hidden channels in G groups with a budget
      of Kf open groups (each an int, or a list with one per layer); the MLP's router is
      built like the attention's (the same rule, path and prefix P). None (the default):
      ungated MLPs with today's parameter names.
    group_router: 'own' (each MLP routes its groups itself) or 'attention' (the attention
      router's hidden features also give the groups' logits; see GatedTransformerBlock).
      Older spelling: mlp_router='own' | 'shared'.
    shared_groups: Sf always-open groups in every gated MLP (Kf counts them), as
      shared_heads=S are for the attention.
    rotary_base: RoPE base for positions='rotary' (with rotary_scaling=, a Hugging Face
      `rope_scaling` mapping such as Llama 3's, passed to the attention).
    norm, norm_eps, mlp, mlp_bias: the blocks' norms ('layer' or 'rms', also the final
      norm) and MLP ('gelu' or 'swiglu'); see GatedTransformerBlock. A Llama- or
      Qwen-style model is norm='rms', mlp='swiglu', mlp_bias=False, use_bias=False (the
      attention's; Qwen2 keeps q/k/v biases: use_bias=True, out_bias=False),
      num_kv_heads=G (grouped-query attention, an int or one per layer as `gating.prune`
      exports; unit= chooses what the gate opens), qk_norm
      (Qwen3), positions='rotary' and tie_embeddings as the checkpoint says
      (`gating.load_pretrained` builds one from a checkpoint).
    **attention_kwargs: other GatedMultiHeadAttention arguments (noise=, temperature=,
      scaled_weights=, router_hidden_features=, ...). The router kind (router=) must be
      causal-safe (router.ROUTERS[kind].causal: 'prefix', the default; 'first';
      'input_free', the default of gate='static'), so a later token never moves the gate.
  """

  def __init__(self, vocab_size: int, *, num_layers: int, features: int, num_heads,
               max_length: int, prefix_len: int, head_dim: int | None = None, positions: str = 'learned',
               tie_embeddings: bool = True, mlp_features: int | None = None,
               dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0,
               gate: str = 'topk', active_heads=None, path: str = 'masked',
               mlp_groups=None, active_groups=None,
               rotary_base: float = 10_000.0, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs, **attention_kwargs):
    if not 1 <= prefix_len <= max_length:
      raise ValueError(f'prefix_len must be in [1, max_length={max_length}], got {prefix_len}')
    if attention_kwargs.get('router') is None:  # absent or None: the model's default
      attention_kwargs['router'] = _default_router(gate, 'prefix')
    kind = get_router(attention_kwargs['router'])
    if not kind.causal:
      safe = [name for name, k in ROUTERS.items() if k.causal]
      raise ValueError(f"GatedLM is causal: its router must read no token after a fixed "
                       f"prefix (a causal-safe kind: {safe}); router={kind.name!r} reads "
                       f'{kind.meaning}')
    attention_kwargs['router'] = kind.name
    self.prefix_len = prefix_len
    self.tie_embeddings = tie_embeddings
    self.trunk = _Trunk(
        vocab_size, num_layers=num_layers, features=features, num_heads=num_heads,
        head_dim=head_dim, max_length=max_length, positions=positions, mlp_features=mlp_features,
        dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate,
        active_heads=active_heads, rotary_base=rotary_base, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs, gate=gate, path=path, prefix_len=prefix_len,
        mlp_groups=mlp_groups, active_groups=active_groups, **attention_kwargs)
    self.unembed = (nnx.data(None) if tie_embeddings else
                    nnx.Linear(features, vocab_size, use_bias=False, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs))

  @property
  def vocab_size(self) -> int:
    return self.trunk.vocab_size

  @property
  def blocks(self):
    return self.trunk.blocks

  def logits(self, h_BxLxD):
    if self.unembed is not None:
      return self.unembed(h_BxLxD)
    return self.trunk.token_embed.attend(h_BxLxD)

  def __call__(self, tokens_BxL, *, valid_BxL=None, deterministic: bool | None = None,
               rngs=None, path: str | None = None, active_heads=None,
               active_groups=None, slice_B=None) -> LMOutput:
    """tokens_BxL (int) -> LMOutput. valid_BxL marks real tokens (default: all).

    Sequences are left-aligned: token 0 is the first of the prefix. `path`,
    `active_heads` and `active_groups` (an int or a list per layer) override the
    constructor's. `slice_B` (int [B]): each sequence's slice, for gate='slices' (its
    assigner's ids; the same slice in every layer).
    """
    self.trunk.check_tokens(tokens_BxL, valid_BxL)
    if tokens_BxL.shape[1] < self.prefix_len:
      raise ValueError(f'sequence length {tokens_BxL.shape[1]} is shorter than the gate '
                       f'prefix P={self.prefix_len}')
    h_BxLxD, weights_BxNxH, groups_BxNxG = self.trunk(
        tokens_BxL, valid_BxL, is_causal=True, deterministic=deterministic, rngs=rngs,
        path=path, active_heads=active_heads, active_groups=active_groups, slice_B=slice_B)
    return LMOutput(self.logits(h_BxLxD), self.scored(tokens_BxL, valid_BxL), weights_BxNxH,
                    groups_BxNxG)

  def scored(self, tokens_BxL, valid_BxL=None):
    """scored_BxL: t >= P-1, t < L-1 and token t+1 is valid (position t predicts it)."""
    B, L = tokens_BxL.shape
    t_L = jnp.arange(L)
    scored_L = (t_L >= self.prefix_len - 1) & (t_L < L - 1)
    scored_BxL = jnp.broadcast_to(scored_L[None, :], (B, L))
    if valid_BxL is not None:
      next_valid_BxL = jnp.concatenate([valid_BxL[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
      scored_BxL = scored_BxL & next_valid_BxL & valid_BxL
    return scored_BxL


class GatedEncoder(nnx.Module):
  """A bidirectional encoder with gated heads, a pooled classifier and per-token states.

  Args as GatedLM (mlp_groups and active_groups included), plus num_classes (C) for the
  classification head; `router` is a router kind that needs no prefix length: 'mean'
  (all valid tokens; the default), 'first', 'input_free' or a registered one.
  """

  def __init__(self, vocab_size: int, *, num_layers: int, features: int, num_heads,
               max_length: int, num_classes: int, head_dim: int | None = None, positions: str = 'learned',
               mlp_features: int | None = None, dropout_rate: float = 0.0,
               attention_dropout_rate: float = 0.0, gate: str = 'topk', active_heads=None,
               path: str = 'masked', mlp_groups=None, active_groups=None,
               rotary_base: float = 10_000.0, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **attention_kwargs):
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    if attention_kwargs.get('router') is None:  # absent or None: the model's default
      attention_kwargs['router'] = _default_router(gate, 'mean')
    kind = get_router(attention_kwargs['router'])
    if kind.needs_prefix:
      raise ValueError(f"GatedEncoder has no prefix length: router={kind.name!r} reads a "
                       'prefix, which is for causal models (GatedLM, prefix_len=P)')
    attention_kwargs['router'] = kind.name
    self.trunk = _Trunk(
        vocab_size, num_layers=num_layers, features=features, num_heads=num_heads,
        head_dim=head_dim, max_length=max_length, positions=positions, mlp_features=mlp_features,
        dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate,
        active_heads=active_heads, rotary_base=rotary_base, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs, gate=gate, path=path, mlp_groups=mlp_groups,
        active_groups=active_groups, **attention_kwargs)
    self.classifier = nnx.Linear(features, num_classes, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

  @property
  def vocab_size(self) -> int:
    return self.trunk.vocab_size

  @property
  def blocks(self):
    return self.trunk.blocks

  def __call__(self, tokens_BxL, *, valid_BxL=None, deterministic: bool | None = None,
               rngs=None, path: str | None = None, active_heads=None,
               active_groups=None, slice_B=None) -> EncoderOutput:
    self.trunk.check_tokens(tokens_BxL, valid_BxL)
    h_BxLxD, weights_BxNxH, groups_BxNxG = self.trunk(
        tokens_BxL, valid_BxL, is_causal=False, deterministic=deterministic, rngs=rngs,
        path=path, active_heads=active_heads, active_groups=active_groups, slice_B=slice_B)
    if valid_BxL is None:
      pooled_BxD = h_BxLxD.mean(axis=1)
    else:
      w_BxL = valid_BxL.astype(h_BxLxD.dtype)
      pooled_BxD = (jnp.einsum('BLD,BL->BD', h_BxLxD, w_BxL)
                    / jnp.maximum(w_BxL.sum(axis=1, keepdims=True), 1))
    return EncoderOutput(self.classifier(pooled_BxD), h_BxLxD, weights_BxNxH, groups_BxNxG)
