"""Autoregressive decoding for GatedLM from a KV cache of the active heads only.

  prefill      The prompt runs through the model once. Every layer's gate reads the
               prompt's first P tokens, as in the full forward, and picks its heads once
               per sequence; the keys and values of the cached heads are written to the
               cache, and the logits of every prompt position come out.
  decode_step  One token per sequence, at that sequence's own position: its keys and
               values are written to the cache and it attends to positions <= its own.
  generate     prefill, then decode_step and sampling under one jit, in a
               lax.while_loop: no recompilation per generated token.

Decoding is inference: gates are deterministic and dropout is off, whatever the model's
train/eval mode.

The cache of a layer is k, v [B, N, S, Dh] with S = cache_length: N = K (the selected
heads) for a gathered layer (path='gathered' with K < H), so its memory is K/H of dense;
N = H for a masked or dense layer. Under grouped-query attention (G K/V heads) a masked
layer caches its G heads; a gathered one with unit='kv_group' caches the chosen groups'
K / (H/G) heads, again K/H of dense; with unit='query_head' it caches every group (each
selected query head reads its group's).

How a one-token step projects a gathered layer (`projection=`, see DESIGN 4):
  'weights'      The K heads' Q/K/V/O weights are gathered once per sequence at prefill
                 ([B, D, K, Dh], kept in the state) and every step projects with them:
                 a step reads B K/H times the layer's attention weight bytes.
  'activations'  Every step projects with the full weights, reading them once (1x), and
                 takes the K heads' q/k/v; the K outputs go back to their H slots (zeros
                 elsewhere) for the full output projection. Costs B (H - K) extra
                 multiply-adds per weight column, which is cheap when memory bound.
  'grouped'      Every step multiplies, for each head, the rows of all the (sequence,
                 head) pairs that chose it by that head's weights (the B K pairs sorted
                 by head once, at prefill); the output projection's per-pair rows are
                 weighted by the gate and summed back per sequence. On GPU and TPU one
                 ragged matmul (jax.lax.ragged_dot) per projection: the weights read
                 once (1x), the gathered path's FLOPs (B K/H of every head). The CPU has
                 no ragged-dot kernel (JAX's generic lowering multiplies every row by
                 every head), so there (GROUPED_TILES) the sorted pairs are cut at
                 prefill into N <= 2H tiles of one head each (gating.layers.tiles), each
                 tile's head weights gathered once and kept in the state (N/H of the
                 weight bytes, against B K/H for 'weights'), and a step is one batched
                 matmul over the tiles per projection.
  'auto'         'weights' when B K < H (it reads fewer bytes), else 'activations'; on
                 the CPU 'grouped' at B = 1, where it was measured faster than 'weights'
                 (1.04-1.14x tokens/s with heads alone, 1.39-1.59x with heads and
                 groups, docs/benchmarks.md), and nowhere else: mostly slower at B = 2, 3,
                 level with 'activations' at B = 16 and 64. No GPU or TPU has measured
                 'grouped' yet, so there it is never picked.
Masked and dense layers project every head with the full weights ('masked'). Prefill
computes a gathered layer with gathered weights whatever the step projection (with a
long prompt the gather pays). `DecodeState.projections` says what every layer does.

A model with gated MLP channel groups (mlp_groups=G, active_groups=Kf) decodes its MLPs
the same way. Prefill decides each sequence's group gate once, from the prompt's first P
tokens as the full forward does, and keeps it for every generated token; a step's MLP then
runs with one of (`DecodeState.mlp_projections`; the same `projection=` choice):
  'weights'      The Kf groups' W1 columns, b1 entries and W2 rows, gathered once at
                 prefill ([B, D, Kf, F/G], kept in the state): a step reads B Kf/G of the
                 MLP's weight bytes, and its FLOPs scale as Kf/G.
  'activations'  Full W1 and W2, the closed groups' activations zeroed (the masked
                 computation with the gate's weights on the Kf groups, 0 elsewhere).
  'grouped'      For each group, one matmul of W1's columns and one of W2's rows over the
                 (sequence, group) pairs that chose it (jax.lax.ragged_dot): the weights
                 read once, FLOPs Kf/G of the MLP's where ragged_dot has a kernel; on the
                 CPU as tiles, the hidden activations kept in the tiles between W1 and W2.
  'auto'         as for the heads, with Kf and G.
'grouped' needs a gathered layer: asked of a masked-path layer (path='masked'), it is
refused with a ValueError, as are attention weights with fewer K/V heads than query heads
(grouped-query attention); a layer that runs every unit (K = H, Kf = G) is 'masked'.
A masked MLP (path='masked', or Kf = G) computes every group times its gate weight
('masked'); an ungated MLP runs as in the block.

Batched prompts are left-aligned: sequence b is tokens_BxL[b, :lengths_B[b]]; the rest is
padding and is never read. Each sequence has its own positions (learned or rotary).

Contract: prefill's logits equal GatedLM's full causal forward over the prompt, and a
decode step's logits equal the full forward's at that position over the same tokens.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from flax.nnx.nn import dtypes

from gating.layers import compute, selection, tiles
from gating.layers.attention import GatedMultiHeadAttention, check_active_heads
from gating.layers.mlp import check_active_groups
from gating.layers.models import GatedLM, check_token_ids, padding_mask, per_layer, reads_slices
from gating.layers.router import router_kind_of

PROJECTIONS = ('auto', 'weights', 'activations', 'grouped')


class GatheredWeights(NamedTuple):
  """The K selected heads' weights of every sequence, gathered once at prefill. Under
  grouped-query attention the key/value fields hold the M = K / (H/G) chosen groups'
  heads (unit='kv_group'), or are None (unit='query_head': the full K/V weights)."""
  wq_BxDxKxDh: jax.Array
  wk_BxDxKxDh: jax.Array
  wv_BxDxKxDh: jax.Array
  wo_BxKxDhxDo: jax.Array
  bq_BxKxDh: jax.Array | None
  bk_BxKxDh: jax.Array | None
  bv_BxKxDh: jax.Array | None


class LayerCache(struct.PyTreeNode):
  """One layer's cache: the keys and values of its N cached heads, and its gate.

  projection: 'masked' (N = H, every head projected with the full weights), 'weights',
  'activations' or 'grouped' (N = K; see the module docstring).
  """
  k_BxNxSxDh: jax.Array
  v_BxNxSxDh: jax.Array
  weights_BxN: jax.Array           # gate weight of each cached head
  idx_BxK: jax.Array | None        # the cached heads, for a gathered layer
  gathered: GatheredWeights | None  # for projection='weights'
  projection: str = struct.field(pytree_node=False)
  groups: compute.PairGroups | None = None  # for projection='grouped': pairs sorted by head
  pair_tiles: tiles.PairTiles | None = None  # ... and tiled, where 'grouped' runs tiles
  tiled: tiles.TiledHeadWeights | None = None  # ... with every tile's head's weights


class GroupCache(struct.PyTreeNode):
  """One layer's MLP gate over channel groups, decided once per sequence at prefill.

  projection: 'masked' (N = G: every group, times its gate weight), 'weights' (N = Kf:
  the gathered groups' weights), 'activations' (N = G: the gate's weights on the Kf
  groups, 0 elsewhere) or 'grouped' (N = Kf; see the module docstring).
  """
  weights_BxN: jax.Array                         # gate weight of each group computed
  idx_BxK: jax.Array | None                      # the Kf groups, for a gathered MLP
  gathered: compute.GatheredMLPWeights | None    # for projection='weights'
  projection: str = struct.field(pytree_node=False)
  groups: compute.PairGroups | None = None       # for projection='grouped'
  pair_tiles: tiles.PairTiles | None = None      # ... and tiled, where 'grouped' runs tiles
  tiled: tiles.TiledMLPWeights | None = None     # ... with every tile's group's weights


class DecodeState(struct.PyTreeNode):
  """Every layer's cache and, per sequence, the position its next token takes.

  mlps: every layer's GroupCache, or None for an ungated MLP (all None without mlp_groups).
  """
  layers: tuple[LayerCache, ...]
  positions_B: jax.Array
  mlps: tuple[GroupCache | None, ...] = ()

  @property
  def cache_length(self) -> int:
    return self.layers[0].k_BxNxSxDh.shape[2]

  @property
  def projections(self) -> tuple[str, ...]:
    return tuple(layer.projection for layer in self.layers)

  @property
  def mlp_projections(self) -> tuple[str | None, ...]:
    """Every layer's MLP step projection (None: an ungated MLP)."""
    return tuple(None if mlp is None else mlp.projection for mlp in self.mlps)

  @property
  def kv_bytes(self) -> int:
    """Bytes held by the keys and values of every layer."""
    return sum(layer.k_BxNxSxDh.nbytes + layer.v_BxNxSxDh.nbytes for layer in self.layers)


class Generation(NamedTuple):
  tokens_BxT: jax.Array   # T = L + max_new_tokens; sequence b is tokens[b, :lengths[b]], then 0
  lengths_B: jax.Array    # prompt + generated tokens (up to and including eos_id)
  projections: tuple[str, ...]  # every layer's step projection (see the module docstring)
  mlp_projections: tuple[str | None, ...] = ()  # every layer's MLP one (None: ungated)


# -- the plan: K, path and projection of every layer ------------------------------------------

GROUPED_TILES = frozenset({'cpu'})   # the backends where projection='grouped' runs tiles


def grouped_runs_tiles() -> bool:
  """Whether projection='grouped' runs as tiles (gating.layers.tiles) here: on a backend
  in GROUPED_TILES (the CPU, which has no ragged-dot kernel), else as ragged_dot."""
  return jax.default_backend() in GROUPED_TILES


def choose_projection(batch: int, active_heads: int, num_heads: int,
                      groupable: bool = True) -> str:
  """'weights' when gathering weights reads fewer bytes than the full weights (B K < H;
  for MLP groups, B Kf < G), else 'activations'; 'grouped' at B = 1 where it runs tiles
  (the CPU), the one place it was measured faster (see the module docstring), unless the
  layer cannot be grouped (`groupable` False: grouped-query attention)."""
  if batch * active_heads < num_heads:
    grouped = groupable and batch == 1 and grouped_runs_tiles()
    return 'grouped' if grouped else 'weights'
  return 'activations'


def layer_plan(model: GatedLM, batch: int, *, path=None, active_heads=None,
               projection: str = 'auto') -> list[tuple[int | None, str]]:
  """(K, projection) of every layer, with the call overrides `path` and `active_heads`."""
  if projection not in PROJECTIONS:
    raise ValueError(f'projection must be one of {PROJECTIONS}, got {projection!r}')
  plan = []
  for block, k in zip(model.blocks, per_layer(active_heads, len(model.blocks))):
    attn = block.attention
    k = attn.active_heads if k is None else k
    layer_path = attn.path if path is None else path
    check_active_heads(k, attn.num_heads, attn.gate_rule, layer_path)
    plan.append((k, _projection(layer_path, k, attn.num_heads, batch, projection,
                                groupable=attn.num_kv_heads == attn.num_heads)))
  return plan


def _projection(layer_path: str, k, num_units: int, batch: int, projection: str,
                unit: str = 'head', groupable: bool = True) -> str:
  """How a layer of `num_units` (heads or groups) with budget k projects each step:
  'masked' on the masked path or when every unit runs, else `projection` ('auto':
  choose_projection). 'grouped' on the masked path is refused: it needs the K units
  each sequence selected, which only a gathered layer has."""
  if projection == 'grouped' and layer_path == 'masked':
    raise ValueError(f"projection='grouped' needs the gathered path (it multiplies each "
                     f"{unit}'s weights by the sequences that selected it); this layer "
                     f"runs path='masked', which computes every {unit}: use path='gathered' "
                     "or another projection")
  if layer_path == 'masked' or k == num_units:
    return 'masked'
  if projection == 'auto':
    return choose_projection(batch, k, num_units, groupable)
  return projection


def group_plan(model: GatedLM, batch: int, *, path=None, active_groups=None,
               projection: str = 'auto') -> list[tuple[int | None, str] | None]:
  """(Kf, projection) of every layer's MLP (None for an ungated MLP), with the call
  overrides `path` and `active_groups` (an int or one per layer)."""
  if projection not in PROJECTIONS:
    raise ValueError(f'projection must be one of {PROJECTIONS}, got {projection!r}')
  if active_groups is not None and model.trunk.mlp_groups is None:
    raise ValueError('active_groups needs a model built with mlp_groups')
  plan = []
  for block, kf in zip(model.blocks,
                       per_layer(active_groups, len(model.blocks), 'active_groups')):
    mlp = block.gated_mlp
    if mlp is None:
      if kf is not None:
        raise ValueError('active_groups needs a block built with mlp_groups')
      plan.append(None)
      continue
    kf = mlp.active_groups if kf is None else kf
    layer_path = mlp.path if path is None else path
    check_active_groups(kf, mlp.num_groups, mlp.gate_rule, layer_path)
    plan.append((kf, _projection(layer_path, kf, mlp.num_groups, batch, projection,
                                 'group')))
  return plan


# -- prefill ------------------------------------------------------------------------------------

def _check_model(model):
  if not isinstance(model, GatedLM):
    raise ValueError(f'decoding needs a GatedLM, got {type(model).__name__}')
  for block in model.blocks:
    rule = selection.RULES[block.attention.gate_rule]
    if rule.per_token:
      raise ValueError(f'cached decoding decides each layer\'s gate once per sequence, at '
                       f'prefill; gate={rule.name!r} decides per token: use the full forward')
    # Prefill decides each layer's gate once, from the prompt: only a router that reads no
    # token after the prefix gives the gate that the full causal forward gives.
    if not block.attention.causal_safe:
      raise ValueError('decoding needs causal-safe routers (router.ROUTERS[kind].causal); '
                       f'a layer has router kind {router_kind_of(block.attention.router).name!r}')
  if any(getattr(m, 'unit_mean_UxD', None) is not None for _, m in nnx.iter_graph(model)):
    raise ValueError('decoding does not support dropped-unit compensation (compensate): '
                     'turn it off with gating.training.compensation.compensate(model, None)')


def _rotate(attn: GatedMultiHeadAttention, x_BxLxNxDh, positions_BxL):
  if attn.rotary_base is None:
    return x_BxLxNxDh
  return compute.rotate(x_BxLxNxDh, positions_BxL, attn.rotary_base, attn.rotary_inv_freq)


def _norm_and_rotate(attn, w: compute.HeadWeights, q_BxLxNxDh, k_BxLxMxDh, positions_BxL):
  """The QK norm (if the layer has one), then RoPE, as the layer's call applies them."""
  if w.q_norm_Dh is not None:
    q_BxLxNxDh = compute.rms_norm_heads(q_BxLxNxDh, w.q_norm_Dh, attn.norm_eps)
    k_BxLxMxDh = compute.rms_norm_heads(k_BxLxMxDh, w.k_norm_Dh, attn.norm_eps)
  return _rotate(attn, q_BxLxNxDh, positions_BxL), _rotate(attn, k_BxLxMxDh, positions_BxL)


def _kv_heads(attn: GatedMultiHeadAttention, idx_BxK):
  """The K/V heads a gathered layer computes and caches for its K query heads idx_BxK:
  each head's own (no GQA); under grouped-query attention with unit='kv_group' the chosen
  groups, M = K / (H/G) of them (idx_BxK holds whole groups, in order: query head j of
  the K reads cached head j // (H/G)); with unit='query_head', None: every group."""
  size = attn.group_size
  if size == 1:
    return idx_BxK
  return idx_BxK[:, ::size] // size if attn.unit == 'kv_group' else None


def _kv_for_queries(attn, idx_BxK, x_BxSxMxDh):
  """Keys or values [B, S, M, Dh] as the K selected query heads read them: unchanged, but
  with unit='query_head' under GQA (every group cached) each head's group's, [B, S, K, Dh]."""
  if idx_BxK is None or _kv_heads(attn, idx_BxK) is not None:
    return x_BxSxMxDh
  return jnp.take_along_axis(x_BxSxMxDh, (idx_BxK // attn.group_size)[:, None, :, None],
                             axis=2)


def _weights(attn: GatedMultiHeadAttention, xn_BxLxD):
  """The layer's input and weights promoted to its compute dtype, as in its call."""
  xn_BxLxD, *weights = dtypes.promote_dtype((xn_BxLxD, *attn.head_weights()), dtype=attn.dtype)
  return xn_BxLxD, compute.HeadWeights(*weights)


def _embed(model: GatedLM, tokens_BxL, positions_BxL):
  x_BxLxD = model.trunk.token_embed(tokens_BxL)
  if model.trunk.position_embed is not None:
    x_BxLxD = x_BxLxD + model.trunk.position_embed(positions_BxL)
  return x_BxLxD


def _check_slices(model: GatedLM, slice_B, batch: int):
  """gate='slices' decodes each sequence in the slice it is given (ids checked where
  concrete); other models take none."""
  if reads_slices(model):
    if slice_B is None:
      raise ValueError("gate='slices': decoding needs each sequence's slice, slice_B (int "
                       "[B], its assigner's ids, e.g. from the prompt's prefix)")
    selection.check_slice_ids(slice_B, batch, model.blocks[0].attention.num_slices)
  elif slice_B is not None:
    raise ValueError("slice_B is for gate='slices'; no layer of this model reads it (gate "
                     f'{model.blocks[0].attention.gate_rule!r})')


def _prefill_attention(attn, xn_BxLxD, mask_Bx1xLxL, positions_BxL, k, projection, S,
                       slice_B=None):
  gate = attn.gate(xn_BxLxD, mask=mask_Bx1xLxL, deterministic=True, active_heads=k,
                   slice_B=slice_B)
  xn_BxLxD, w = _weights(attn, xn_BxLxD)
  if projection == 'grouped':
    compute.check_grouped_heads(w)
  p = attn.precision
  if projection == 'masked':
    idx_BxK, gathered = None, None
    weights_BxN = gate.weights_BxH
    q_BxLxNxDh = compute.project_all(xn_BxLxD, w.wq_DxHxDh, w.bq_HxDh, p)
    k_BxLxNxDh = compute.project_all(xn_BxLxD, w.wk_DxHxDh, w.bk_HxDh, p)
    v_BxLxNxDh = compute.project_all(xn_BxLxD, w.wv_DxHxDh, w.bv_HxDh, p)
  else:
    idx_BxK = gate.idx_BxK
    kv_BxM = _kv_heads(attn, idx_BxK)
    weights_BxN = jnp.take_along_axis(gate.weights_BxH, idx_BxK, axis=1)
    gather_kv = lambda x: None if kv_BxM is None else compute.gather_heads(x, kv_BxM)
    take_kv = lambda x: None if kv_BxM is None else compute.take_heads(x, kv_BxM)
    g = GatheredWeights(
        compute.gather_heads(w.wq_DxHxDh, idx_BxK), gather_kv(w.wk_DxHxDh),
        gather_kv(w.wv_DxHxDh), compute.take_heads(w.wo_HxDhxDo, idx_BxK),
        compute.take_heads(w.bq_HxDh, idx_BxK), take_kv(w.bk_HxDh), take_kv(w.bv_HxDh))
    gathered = g if projection == 'weights' else None
    q_BxLxNxDh = compute.project_gathered(xn_BxLxD, g.wq_BxDxKxDh, g.bq_BxKxDh, p)
    if kv_BxM is None:   # unit='query_head' under GQA: every group's K/V
      k_BxLxNxDh = compute.project_all(xn_BxLxD, w.wk_DxHxDh, w.bk_HxDh, p)
      v_BxLxNxDh = compute.project_all(xn_BxLxD, w.wv_DxHxDh, w.bv_HxDh, p)
    else:
      k_BxLxNxDh = compute.project_gathered(xn_BxLxD, g.wk_BxDxKxDh, g.bk_BxKxDh, p)
      v_BxLxNxDh = compute.project_gathered(xn_BxLxD, g.wv_BxDxKxDh, g.bv_BxKxDh, p)
  q_BxLxNxDh, k_BxLxNxDh = _norm_and_rotate(attn, w, q_BxLxNxDh, k_BxLxNxDh, positions_BxL)
  o_BxLxNxDh = compute.attend(q_BxLxNxDh, _kv_for_queries(attn, idx_BxK, k_BxLxNxDh),
                              _kv_for_queries(attn, idx_BxK, v_BxLxNxDh),
                              compute.AttendOptions(mask=mask_Bx1xLxL, precision=p))
  if projection == 'masked':
    y_BxLxD = compute.output_all(o_BxLxNxDh, weights_BxN, w.wo_HxDhxDo, w.bo_Do, p)
  else:
    y_BxLxD = compute.output_gathered(o_BxLxNxDh, weights_BxN, g.wo_BxKxDhxDo, w.bo_Do, p)
  L = xn_BxLxD.shape[1]
  to_cache = lambda x_BxLxNxDh: jnp.pad(x_BxLxNxDh.transpose(0, 2, 1, 3),
                                        ((0, 0), (0, 0), (0, S - L), (0, 0)))
  cache = LayerCache(to_cache(k_BxLxNxDh), to_cache(v_BxLxNxDh), weights_BxN, idx_BxK,
                     gathered, projection)
  return y_BxLxD, _sort_pairs(cache, attn.num_heads, partial(tiles.tile_heads, w))


def _sort_pairs(cache: LayerCache | GroupCache, num_units: int, tile_weights):
  """A 'grouped' cache with its (sequence, unit) pairs sorted by unit and, where
  'grouped' runs tiles (`grouped_runs_tiles`), tiled, with `tile_weights(pair_tiles)` the
  tiles' weights; any other cache as it is."""
  if cache.projection != 'grouped':
    return cache
  unit = 'head' if isinstance(cache, LayerCache) else 'group'
  groups = compute.group_pairs(cache.idx_BxK, num_units, unit=unit)
  if not grouped_runs_tiles():
    return cache.replace(groups=groups, pair_tiles=None, tiled=None)
  pair_tiles = tiles.tile_pairs(groups, num_units)
  return cache.replace(groups=groups, pair_tiles=pair_tiles, tiled=tile_weights(pair_tiles))


def sort_pairs(model: GatedLM, state: DecodeState) -> DecodeState:
  """`state` with the pairs of its 'grouped' layers sorted (and tiled) anew from their
  idx_BxK: for a state whose sequences were rearranged (taken, repeated or reordered along
  the batch axis), whose sorted pairs no longer match its sequences."""
  layers = tuple(_sort_pairs(cache, block.attention.num_heads,
                             partial(tiles.tile_heads, _weights(block.attention, None)[1]))
                 for block, cache in zip(model.blocks, state.layers))
  mlps = tuple(None if cache is None else _sort_pairs(
      cache, block.gated_mlp.num_groups,
      partial(tiles.tile_mlp, block.gated_mlp.promoted(None)[1],
              num_groups=block.gated_mlp.num_groups))
               for block, cache in zip(model.blocks, state.mlps))
  return state.replace(layers=layers, mlps=mlps)


def _prefill_mlp(block, h_BxLxD, valid_BxL, k, projection, group_logits_BxG=None,
                 slice_B=None):
  """The block's MLP half over the prompt; its group gate decided here, once. -> (out, cache).
  group_logits_BxG: the groups' logits when the block shares its attention router."""
  mlp = block.gated_mlp
  if mlp is None:
    return block.feed_forward(h_BxLxD, deterministic=True), None
  xn_BxLxD = block.mlp_norm(h_BxLxD)
  gate = mlp.gate(xn_BxLxD, valid_BxL, deterministic=True, active_groups=k,
                  logits_BxG=group_logits_BxG, slice_B=slice_B)
  xn_BxLxD, w = mlp.promoted(xn_BxLxD)
  G, p = mlp.num_groups, mlp.precision
  if projection == 'masked':
    cache = GroupCache(gate.weights_BxH, None, None, projection)
    y_BxLxD = compute.masked_mlp(xn_BxLxD, w, gate.weights_BxH, G, mlp.activation,
                                 precision=p)
  else:
    idx_BxK = gate.idx_BxK
    weights_BxK = jnp.take_along_axis(gate.weights_BxH, idx_BxK, axis=1)
    g = compute.gather_mlp(w, idx_BxK, G)
    y_BxLxD = compute.mlp_gathered_weights(xn_BxLxD, g, weights_BxK, w.b2_D, mlp.activation,
                                           precision=p)
    if projection == 'weights':
      cache = GroupCache(weights_BxK, idx_BxK, g, projection)
    elif projection == 'grouped':
      cache = _sort_pairs(GroupCache(weights_BxK, idx_BxK, None, projection), G,
                          lambda pair_tiles: tiles.tile_mlp(w, pair_tiles, G))
    else:
      cache = GroupCache(compute.scatter_groups(weights_BxK, idx_BxK, G), idx_BxK, None,
                         projection)
  return h_BxLxD + y_BxLxD, cache


def prefill(model: GatedLM, tokens_BxL, lengths_B=None, *, cache_length: int, path=None,
            active_heads=None, projection: str = 'auto', active_groups=None, slice_B=None):
  """Runs the prompt through `model` and fills the cache. -> (logits_BxLxV, DecodeState).

  Args:
    model: a GatedLM.
    tokens_BxL: int prompts, left-aligned; positions >= lengths_B are padding.
    lengths_B: every prompt's length (default: all L). Each must be >= P.
    cache_length: S, the positions the cache holds (>= L, <= the model's max_length).
    path, active_heads, active_groups: overrides, as in GatedLM's call (an int or one per
      layer; active_groups needs mlp_groups).
    projection: how steps project gathered layers (attention and MLP groups alike):
      'auto' | 'weights' | 'activations' | 'grouped'.
    slice_B: each sequence's slice (int [B]), for gate='slices' (and only then): its
      heads and groups, with the shared ones, are the sequence's for every step.

  logits_BxLxV[b, t] for t < lengths_B[b] equal the full forward's. Traceable (jit it with
  nnx.jit, or use `generate`); with concrete `lengths_B` they are checked.
  """
  _check_model(model)
  if tokens_BxL.ndim != 2:
    raise ValueError(f'tokens must have shape [batch, length], got {tokens_BxL.shape}')
  B, L = tokens_BxL.shape
  _check_slices(model, slice_B, B)
  P, max_length = model.prefix_len, model.trunk.max_length
  if L < P:
    raise ValueError(f'prompt of length {L} is shorter than the gate prefix P={P}: the gate '
                     'reads the first P tokens')
  if cache_length > max_length:
    raise ValueError(f'cache_length {cache_length} exceeds the model max_length {max_length}')
  if L > cache_length:
    raise ValueError(f'prompt of length {L} is longer than the cache (cache_length='
                     f'{cache_length})')
  if lengths_B is None:
    lengths_B = jnp.full((B,), L, jnp.int32)
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  if lengths_B.shape != (B,):
    raise ValueError(f'lengths_B must have shape [{B}], got {lengths_B.shape}')
  if not isinstance(lengths_B, jax.core.Tracer):
    lengths = np.asarray(lengths_B)
    if lengths.min() < P or lengths.max() > L:
      raise ValueError(f'every prompt length must be in [P={P}, L={L}], got {lengths.tolist()}')
    if not isinstance(tokens_BxL, jax.core.Tracer):   # the prompts' ids (not the padding)
      check_token_ids(np.asarray(tokens_BxL)[np.arange(L)[None, :] < lengths[:, None]],
                      model.vocab_size, 'prompts')
  plan = layer_plan(model, B, path=path, active_heads=active_heads, projection=projection)
  mlp_plan = group_plan(model, B, path=path, active_groups=active_groups,
                        projection=projection)

  valid_BxL = jnp.arange(L)[None, :] < lengths_B[:, None]
  positions_BxL = jnp.broadcast_to(jnp.arange(L)[None, :], (B, L))
  x_BxLxD = _embed(model, jnp.where(valid_BxL, tokens_BxL, 0), positions_BxL)
  mask_Bx1xLxL = padding_mask(valid_BxL, is_causal=True)
  layers, mlps = [], []
  for block, (k, layer_projection), mlp_step in zip(model.blocks, plan, mlp_plan):
    xn_BxLxD = block.attention_norm(x_BxLxD)
    y_BxLxD, cache = _prefill_attention(block.attention, xn_BxLxD, mask_Bx1xLxL,
                                        positions_BxL, k, layer_projection, cache_length,
                                        slice_B)
    kf, mlp_projection = (None, None) if mlp_step is None else mlp_step
    x_BxLxD, mlp_cache = _prefill_mlp(block, x_BxLxD + y_BxLxD, valid_BxL, kf,
                                      mlp_projection,
                                      block.shared_group_logits(xn_BxLxD, valid_BxL), slice_B)
    layers.append(cache)
    mlps.append(mlp_cache)
  logits_BxLxV = model.logits(model.trunk.final_norm(x_BxLxD))
  return logits_BxLxV, DecodeState(tuple(layers), lengths_B, tuple(mlps))


# -- one token ------------------------------------------------------------------------------------

def _step_attention(attn, cache: LayerCache, xn_Bx1xD, positions_B, mask_Bx1x1xS):
  xn_Bx1xD, w = _weights(attn, xn_Bx1xD)
  p = attn.precision
  if cache.projection == 'weights':
    g = cache.gathered
    q_Bx1xNxDh = compute.project_gathered(xn_Bx1xD, g.wq_BxDxKxDh, g.bq_BxKxDh, p)
    if g.wk_BxDxKxDh is None:   # unit='query_head' under GQA: every group's K/V
      k_Bx1xNxDh = compute.project_all(xn_Bx1xD, w.wk_DxHxDh, w.bk_HxDh, p)
      v_Bx1xNxDh = compute.project_all(xn_Bx1xD, w.wv_DxHxDh, w.bv_HxDh, p)
    else:
      k_Bx1xNxDh = compute.project_gathered(xn_Bx1xD, g.wk_BxDxKxDh, g.bk_BxKxDh, p)
      v_Bx1xNxDh = compute.project_gathered(xn_Bx1xD, g.wv_BxDxKxDh, g.bv_BxKxDh, p)
  elif cache.projection == 'grouped' and cache.pair_tiles is not None:
    t, tw = cache.pair_tiles, cache.tiled
    q_Bx1xNxDh = tiles.project_tiled(xn_Bx1xD, tw.wq_NxDxDh, tw.bq_NxDh, t, p)
    k_Bx1xNxDh = tiles.project_tiled(xn_Bx1xD, tw.wk_NxDxDh, tw.bk_NxDh, t, p)
    v_Bx1xNxDh = tiles.project_tiled(xn_Bx1xD, tw.wv_NxDxDh, tw.bv_NxDh, t, p)
  elif cache.projection == 'grouped':
    q_Bx1xNxDh = compute.project_grouped(xn_Bx1xD, w.wq_DxHxDh, w.bq_HxDh, cache.groups, p)
    k_Bx1xNxDh = compute.project_grouped(xn_Bx1xD, w.wk_DxHxDh, w.bk_HxDh, cache.groups, p)
    v_Bx1xNxDh = compute.project_grouped(xn_Bx1xD, w.wv_DxHxDh, w.bv_HxDh, cache.groups, p)
  else:
    q_Bx1xNxDh = compute.project_all(xn_Bx1xD, w.wq_DxHxDh, w.bq_HxDh, p)
    k_Bx1xNxDh = compute.project_all(xn_Bx1xD, w.wk_DxHxDh, w.bk_HxDh, p)
    v_Bx1xNxDh = compute.project_all(xn_Bx1xD, w.wv_DxHxDh, w.bv_HxDh, p)
    if cache.projection == 'activations':
      take = lambda x_Bx1xHxDh, idx_BxN: jnp.take_along_axis(
          x_Bx1xHxDh, idx_BxN[:, None, :, None], axis=2)
      q_Bx1xNxDh = take(q_Bx1xNxDh, cache.idx_BxK)
      kv_BxM = _kv_heads(attn, cache.idx_BxK)
      if kv_BxM is not None:
        k_Bx1xNxDh, v_Bx1xNxDh = take(k_Bx1xNxDh, kv_BxM), take(v_Bx1xNxDh, kv_BxM)
  q_Bx1xNxDh, k_Bx1xNxDh = _norm_and_rotate(attn, w, q_Bx1xNxDh, k_Bx1xNxDh,
                                            positions_B[:, None])
  batch_B = jnp.arange(xn_Bx1xD.shape[0])
  k_BxNxSxDh = cache.k_BxNxSxDh.at[batch_B, :, positions_B].set(k_Bx1xNxDh[:, 0])
  v_BxNxSxDh = cache.v_BxNxSxDh.at[batch_B, :, positions_B].set(v_Bx1xNxDh[:, 0])
  read = lambda x_BxNxSxDh: _kv_for_queries(attn, cache.idx_BxK,
                                            x_BxNxSxDh.transpose(0, 2, 1, 3))
  o_Bx1xNxDh = compute.attend(q_Bx1xNxDh, read(k_BxNxSxDh), read(v_BxNxSxDh),
                              compute.AttendOptions(mask=mask_Bx1x1xS, precision=p))
  if cache.projection == 'masked':
    y_Bx1xD = compute.output_all(o_Bx1xNxDh, cache.weights_BxN, w.wo_HxDhxDo, w.bo_Do, p)
  elif cache.projection == 'weights':
    y_Bx1xD = compute.output_gathered(o_Bx1xNxDh, cache.weights_BxN, g.wo_BxKxDhxDo,
                                      w.bo_Do, p)
  elif cache.projection == 'grouped' and cache.pair_tiles is not None:
    y_Bx1xD = tiles.output_tiled(o_Bx1xNxDh, cache.weights_BxN, cache.tiled.wo_NxDhxDo,
                                 w.bo_Do, cache.pair_tiles, p)
  elif cache.projection == 'grouped':
    y_Bx1xD = compute.output_grouped(o_Bx1xNxDh, cache.weights_BxN, w.wo_HxDhxDo, w.bo_Do,
                                     cache.groups, p)
  else:  # back to the H slots, zeros elsewhere, for the full output projection
    onehot_BxKxH = jax.nn.one_hot(cache.idx_BxK, w.wo_HxDhxDo.shape[0], dtype=o_Bx1xNxDh.dtype)
    o_Bx1xHxDh = jnp.einsum('BLKE,BKH->BLHE', o_Bx1xNxDh, onehot_BxKxH, precision=p)
    weights_BxH = jnp.einsum('BK,BKH->BH', cache.weights_BxN, onehot_BxKxH, precision=p)
    y_Bx1xD = compute.output_all(o_Bx1xHxDh, weights_BxH, w.wo_HxDhxDo, w.bo_Do, p)
  return y_Bx1xD, cache.replace(k_BxNxSxDh=k_BxNxSxDh, v_BxNxSxDh=v_BxNxSxDh)


def _step_mlp(block, cache: GroupCache | None, h_Bx1xD):
  """The block's MLP half for one token, with the group gate decided at prefill."""
  if cache is None:
    return block.feed_forward(h_Bx1xD, deterministic=True)
  mlp = block.gated_mlp
  xn_Bx1xD, w = mlp.promoted(block.mlp_norm(h_Bx1xD))
  if cache.projection == 'weights':
    y_Bx1xD = compute.mlp_gathered_weights(xn_Bx1xD, cache.gathered, cache.weights_BxN,
                                           w.b2_D, mlp.activation, precision=mlp.precision)
  elif cache.projection == 'grouped' and cache.pair_tiles is not None:
    y_Bx1xD = tiles.mlp_tiled(xn_Bx1xD, cache.tiled, cache.pair_tiles, cache.weights_BxN,
                              w.b2_D, mlp.activation, precision=mlp.precision)
  elif cache.projection == 'grouped':
    y_Bx1xD = compute.mlp_grouped(xn_Bx1xD, w, cache.groups, cache.weights_BxN,
                                  mlp.num_groups, mlp.activation, precision=mlp.precision)
  else:  # 'masked' or 'activations': every group with the full weights, times its weight
    y_Bx1xD = compute.masked_mlp(xn_Bx1xD, w, cache.weights_BxN, mlp.num_groups,
                                 mlp.activation, precision=mlp.precision)
  return h_Bx1xD + y_Bx1xD


def decode_step(model: GatedLM, state: DecodeState, tokens_B):
  """Feeds one token per sequence at state.positions_B. -> (logits_BxV, next state).

  logits_BxV[b] predicts the token after tokens_B[b]; they equal the full forward's logits
  at that position. Every position must stay below the cache length (`generate` sees to it;
  with concrete positions this is checked).
  """
  _check_model(model)
  positions_B = state.positions_B
  S = state.cache_length
  if not isinstance(positions_B, jax.core.Tracer) and int(np.max(positions_B)) >= S:
    raise ValueError(f'the cache is full: position {int(np.max(positions_B))} is beyond '
                     f'cache_length {S}')
  check_token_ids(tokens_B, model.vocab_size)   # concrete ids only; see GatedLM
  x_Bx1xD = _embed(model, tokens_B[:, None], positions_B[:, None])
  mask_Bx1x1xS = (jnp.arange(S)[None, :] <= positions_B[:, None])[:, None, None, :]
  layers = []
  mlps = state.mlps or (None,) * len(state.layers)
  for block, cache, mlp_cache in zip(model.blocks, state.layers, mlps):
    y_Bx1xD, cache = _step_attention(block.attention, cache, block.attention_norm(x_Bx1xD),
                                     positions_B, mask_Bx1x1xS)
    x_Bx1xD = _step_mlp(block, mlp_cache, x_Bx1xD + y_Bx1xD)
    layers.append(cache)
  logits_BxV = model.logits(model.trunk.final_norm(x_Bx1xD))[:, 0]
  return logits_BxV, DecodeState(tuple(layers), positions_B + 1, state.mlps)


# -- sampling and the loop ----------------------------------------------------------------------

def sample(logits_BxV, rng, temperature=0.0, top_p=1.0):
  """The next token of every sequence: greedy (argmax) when temperature == 0, else a sample
  of softmax(logits / temperature) restricted to the nucleus: the most probable tokens
  whose probabilities, in decreasing order, sum to top_p (at least one token; top-p
  sampling, Holtzman et al. 2020). temperature and top_p may be traced.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  scaled_BxV = logits_BxV / jnp.where(temperature > 0, temperature, 1.0)
  sorted_BxV, _ = jax.lax.top_k(scaled_BxV, scaled_BxV.shape[-1])
  p_sorted_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(p_sorted_BxV, axis=-1) - p_sorted_BxV
  keep_sorted_BxV = mass_before_BxV < top_p
  keep_sorted_BxV = keep_sorted_BxV.at[:, 0].set(True)
  threshold_B = jnp.min(jnp.where(keep_sorted_BxV, sorted_BxV, jnp.inf), axis=-1)
  nucleus_BxV = jnp.where(scaled_BxV >= threshold_B[:, None], scaled_BxV, -jnp.inf)
  sampled_B = jax.random.categorical(rng, nucleus_BxV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'cache_length', 'eos_id',
                                   'path', 'active_heads', 'projection', 'active_groups'))
def _generate(graphdef, model_state, tokens_BxL, lengths_B, rng, temperature, top_p, slice_B,
              *, max_new_tokens, cache_length, eos_id, path, active_heads, projection,
              active_groups):
  model = nnx.merge(graphdef, model_state)
  B, L = tokens_BxL.shape
  logits_BxLxV, state = prefill(model, tokens_BxL, lengths_B, cache_length=cache_length,
                                path=path, active_heads=active_heads, projection=projection,
                                active_groups=active_groups, slice_B=slice_B)
  logits_BxV = jnp.take_along_axis(logits_BxLxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  valid_BxL = jnp.arange(L)[None, :] < lengths_B[:, None]
  out_BxT = jnp.zeros((B, L + max_new_tokens), jnp.int32)
  out_BxT = out_BxT.at[:, :L].set(jnp.where(valid_BxL, tokens_BxL, 0).astype(jnp.int32))
  batch_B = jnp.arange(B)

  def emit(i, logits_BxV, out_BxT, lengths_B, done_B):
    token_B = sample(logits_BxV, jax.random.fold_in(rng, i), temperature, top_p)
    token_B = jnp.where(done_B, 0, token_B)
    out_BxT = out_BxT.at[batch_B, lengths_B].set(token_B)
    lengths_B = lengths_B + (~done_B).astype(jnp.int32)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    return token_B, out_BxT, lengths_B, done_B

  token_B, out_BxT, lengths_B, done_B = emit(0, logits_BxV, out_BxT, lengths_B,
                                             jnp.zeros((B,), bool))

  def cond(carry):
    i, _, _, _, _, done_B = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, state, token_B, out_BxT, lengths_B, done_B = carry
    logits_BxV, state = decode_step(model, state, token_B)
    token_B, out_BxT, lengths_B, done_B = emit(i, logits_BxV, out_BxT, lengths_B, done_B)
    return i + 1, state, token_B, out_BxT, lengths_B, done_B

  carry = (jnp.asarray(1, jnp.int32), state, token_B, out_BxT, lengths_B, done_B)
  *_, out_BxT, lengths_B, _ = jax.lax.while_loop(cond, body, carry)
  return out_BxT, lengths_B


def generate(model: GatedLM, tokens_BxL, lengths_B=None, *, max_new_tokens: int, rng=None,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None,
             cache_length: int | None = None, path=None, active_heads=None,
             projection: str = 'auto', active_groups=None, slice_B=None) -> Generation:
  """Generates up to max_new_tokens tokens after every prompt, compiled once per shape.

  Args:
    model: a GatedLM (run as in eval mode).
    tokens_BxL: int prompts, left-aligned; lengths_B (default all L) gives each length,
      which must be >= P. Token ids must be in [0, vocab_size).
    max_new_tokens: tokens to generate per sequence (a sequence stops after eos_id).
    rng: PRNG key, needed when temperature > 0.
    temperature, top_p: 0 is greedy; see `sample`. Changing them never recompiles.
    eos_id: a token that ends a sequence (it is kept; later slots are 0).
    cache_length: S (default L + max_new_tokens - 1, every position the model reads);
      at most the model's max_length.
    path, active_heads, projection, active_groups, slice_B: as in `prefill`.

  Call it outside jit (it checks concrete inputs, then runs one jitted function).
  """
  _check_model(model)
  tokens = np.asarray(tokens_BxL)
  if tokens.ndim != 2:
    raise ValueError(f'tokens must have shape [batch, length], got {tokens.shape}')
  B, L = tokens.shape
  _check_slices(model, slice_B, B)
  V = model.vocab_size
  lengths = np.full((B,), L, np.int32) if lengths_B is None else np.asarray(lengths_B, np.int32)
  if lengths.shape != (B,):
    raise ValueError(f'lengths_B must have shape [{B}], got {lengths.shape}')
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
      or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be an int >= 1, got {max_new_tokens!r}')
  valid = np.arange(L)[None, :] < lengths[:, None]
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'tokens must be integer ids, got dtype {tokens.dtype}')
  if valid.any() and (tokens[valid].min() < 0 or tokens[valid].max() >= V):
    raise ValueError(f'prompt token ids must be in the vocabulary [0, {V}), got ids in '
                     f'[{tokens[valid].min()}, {tokens[valid].max()}]')
  if eos_id is not None and not 0 <= eos_id < V:
    raise ValueError(f'eos_id must be in the vocabulary [0, {V}), got {eos_id}')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  if temperature > 0 and rng is None:
    raise ValueError('sampling (temperature > 0) needs rng=jax.random.key(...)')
  if L < model.prefix_len:
    raise ValueError(f'prompt of length {L} is shorter than the gate prefix '
                     f'P={model.prefix_len}: the gate reads the first P tokens')
  needed = L + max_new_tokens - 1
  cache_length = needed if cache_length is None else cache_length
  if L > cache_length:
    raise ValueError(f'prompt of length {L} is longer than the cache (cache_length='
                     f'{cache_length})')
  if needed > cache_length:
    raise ValueError(f'prompt length {L} + max_new_tokens {max_new_tokens} - 1 = {needed} '
                     f'positions do not fit in cache_length {cache_length}')
  if cache_length > model.trunk.max_length:
    raise ValueError(f'prompt length {L} + max_new_tokens {max_new_tokens} - 1 = {needed} '
                     f'positions exceed the model max_length {model.trunk.max_length}'
                     if cache_length == needed else
                     f'cache_length {cache_length} exceeds the model max_length '
                     f'{model.trunk.max_length}')
  if isinstance(active_heads, list):
    active_heads = tuple(active_heads)
  if isinstance(active_groups, list):
    active_groups = tuple(active_groups)
  plan = layer_plan(model, B, path=path, active_heads=active_heads, projection=projection)
  mlp_plan = group_plan(model, B, path=path, active_groups=active_groups,
                        projection=projection)
  if lengths.min() < model.prefix_len or lengths.max() > L:
    raise ValueError(f'every prompt length must be in [P={model.prefix_len}, L={L}] (the gate '
                     f'reads the first P tokens), got {lengths.tolist()}')
  graphdef, model_state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  tokens_BxT, lengths_B = _generate(
      graphdef, model_state, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths), rng,
      jnp.float32(temperature), jnp.float32(top_p),
      None if slice_B is None else jnp.asarray(slice_B, jnp.int32),
      max_new_tokens=max_new_tokens,
      cache_length=cache_length, eos_id=eos_id, path=path, active_heads=active_heads,
      projection=projection, active_groups=active_groups)
  return Generation(tokens_BxT, lengths_B, tuple(p for _, p in plan),
                    tuple(None if step is None else step[1] for step in mlp_plan))
