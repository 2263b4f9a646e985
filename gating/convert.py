"""Retrofit and export: gate the heads (and MLP channels) of a trained model; prune the
heads it never uses.

gate_heads(model, rngs=..., causal=False, **gate_kwargs)
    A copy of any NNX model in which every attention module that a registered adapter
    recognises (gating.adapters: `nnx.MultiHeadAttention` -> `GatedMultiHeadAttention`
    via `from_dense`; flax's NNX Gemma example attention -> `GatedGemmaAttention`) is
    replaced by its gated form carrying its weights. With gate='dense' the outputs do not
    change. Weights placed on a device mesh keep their placement and
    sharding metadata; the new state (router, temperature, statistics) is replicated on
    the same mesh, which is what `nnx.get_partition_spec` says for variables without
    sharding metadata. Cross-attention (inputs_k/inputs_v, in_kv_features) is supported:
    the gate reads the query sequence.

gate_mlps(model, num_groups=G, where=..., rngs=..., causal=False, **gate_kwargs)
    A copy of any NNX model in which the MLP output projections that `where` selects
    (nnx.Linear layers, by a path pattern or a callback) are `GatedChannels`: their input
    channels (the MLP's hidden channels) are gated per sequence in G groups, on the
    masked path only (the activation sits in the model's own code). With gate='dense' the
    outputs do not change. `prune` does not export these; our own blocks (GatedMLP) do.

set_path(model, path, active_heads=None)
    Switches every gated attention layer of a model (ours or an adapter's) to the masked
    or gathered path (and a budget).

prune(model, usage_or_threshold, ...)
    A thin static copy of a gated model: every GatedMultiHeadAttention becomes a dense
    one (gate='dense', no router) that holds only the heads its layer keeps, with their
    Q/K/V/O weights and biases (Dh unchanged). GatedLM and GatedEncoder come back as the
    same class built with `num_heads=[H_1, ..., H_N]` and `head_dim=Dh`, so a checkpoint
    of the pruned model restores onto `nnx.eval_shape` of that constructor.
    Equality: a layer's output is the same as the gated layer's for every sequence whose
    gate opens exactly the kept heads with weight 1 (the default straight-through weights
    are exactly 1). With scaled_weights=True on a static router the weights are the same
    for every sequence and are folded into the kept heads' output weights, so the pruned
    layer equals the gated one on every input; with a per-sequence router and
    scaled_weights the pruned heads weigh 1 and equal the gated layer only where its
    weights are 1.
    Gated MLP channel groups (GatedMLP) are pruned the same way: a block keeps the W1
    columns, b1 entries and W2 rows of its kept groups in an ordinary ungated MLP
    (`mlp_in`, `mlp_out`), so a pruned GatedLM or GatedEncoder is the model its
    constructor builds with `mlp_features=[F_1, ..., F_N]` and no mlp_groups (a GatedMLP
    outside a block becomes a dense GatedMLP of its kept groups).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gating import adapters
from gating.layers.attention import GatedMultiHeadAttention, causal_router, check_active_heads
from gating.layers.head_gate import HeadGating
from gating.layers.block import GatedTransformerBlock
from gating.layers.channels import GatedChannels
from gating.layers.mlp import GatedMLP
from gating.layers.models import GatedEncoder, GatedLM
from gating.layers.router import StaticRouter
from gating.layers.selection import get_rule


# -- gate_heads -------------------------------------------------------------------------------

def _path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def _mesh_of(module: nnx.Module):
  """The mesh of the module's first array placed with a NamedSharding, or None."""
  for _, leaf in nnx.to_flat_state(nnx.state(module)):
    sharding = getattr(leaf[...], 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def _replicate_new_state(module: nnx.Module, mesh) -> None:
  """Places every array of `module` not already on `mesh` replicated on it (in place)."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(x):
    sharding = getattr(x, 'sharding', None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return x
    return jax.device_put(x, replicated)
  nnx.update(module, jax.tree.map(place, nnx.state(module)))


def gate_heads(model: nnx.Module, *, rngs: nnx.Rngs, causal: bool = False,
               **gate_kwargs) -> nnx.Module:
  """A copy of `model` with every attention module an adapter recognises gated.

  Args:
    model: any NNX module (the original is not changed).
    rngs: initializes the routers (its 'params' stream) and, for dropout or stochastic
      gates, the layers' 'dropout' stream.
    causal: the model is causal (a causal LM, whether it passes is_causal=True or a causal
      mask). The routers then read no token after the prefix: router='prefix' when
      prefix_len=P is given, else 'first' (token 0); router='mean' is refused. Without
      it, the default router pools every token, and a later token would move the outputs
      at earlier positions; is_causal=True with such a router is refused at call time,
      but a causal *mask* cannot be inspected under jit, so say causal=True.
    **gate_kwargs: the gate's arguments for every replaced layer (gate=, active_heads=,
      path=, router=, prefix_len=, unit=, noise=, ...; see GatedMultiHeadAttention);
      gate='dense' leaves the outputs unchanged.

  The modules replaced are those of the families in `gating.adapters.ADAPTERS`; a model
  with none of them is a ValueError that lists the supported families.
  """
  found = [path for path, node in nnx.iter_graph(model)
           if adapters.adapter_for(node) is not None]
  if not found:
    raise ValueError(f'gate_heads found no attention module it can gate in '
                     f'{type(model).__name__}; supported families: {adapters.supported()}')

  def replace(path, node):
    adapter = adapters.adapter_for(node)
    if adapter is None:
      return node
    gated = adapter.gate(node, rngs=rngs, causal=causal, **gate_kwargs)
    mesh = _mesh_of(node)
    if mesh is not None:
      _replicate_new_state(gated, mesh)
    return gated
  return nnx.recursive_map(replace, nnx.clone(model))


def gate_mlps(model: nnx.Module, *, num_groups: int, where, rngs: nnx.Rngs,
              causal: bool = False, **gate_kwargs) -> nnx.Module:
  """A copy of `model` whose selected MLP output projections gate their input channels.

  Args:
    model: any NNX module (the original is not changed).
    num_groups: G, the channel groups of each selected layer (a divisor of its in_features).
    where: which nnx.Linear layers are MLP output projections (W2, whose inputs are the
      hidden channels): a glob pattern over the '/'-joined attribute path (e.g.
      'blocks/*/mlp/fc2'; fnmatch, '*' also crosses '/'), or a callback
      `where(path: str, linear: nnx.Linear) -> bool`.
    rngs: initializes the routers (and a stochastic gate's 'dropout' stream).
    causal: the model is causal: the routers read no token after the prefix, as in
      gate_heads ('prefix' with prefix_len=P, else 'first'; 'mean' refused).
    **gate_kwargs: GatedChannels arguments (gate=, active_groups=, router=, prefix_len=,
      noise=, ...); gate='dense' leaves the outputs unchanged.

  A `where` that selects nothing, or selects a layer that is not an nnx.Linear, is a
  ValueError naming the pattern and the layers it saw.
  """
  if causal:
    gate_kwargs = causal_router(gate_kwargs)
  if isinstance(where, str):
    pattern = where
    select = lambda path, node: fnmatch.fnmatchcase(path, pattern)
  elif callable(where):
    select = where
  else:
    raise ValueError(f'where must be a path pattern or a callable, got {where!r}')
  chosen = [(_path_str(p), node) for p, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module) and p and select(_path_str(p), node)]
  if not chosen:
    linears = [_path_str(p) for p, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Linear)]
    raise ValueError(f'gate_mlps: where={where!r} selects no layer of '
                     f'{type(model).__name__}; its nnx.Linear layers are {linears}')
  for name, node in chosen:
    if not isinstance(node, nnx.Linear):
      raise ValueError(f'gate_mlps: where={where!r} selects {name!r}, a '
                       f'{type(node).__name__}; it must select nnx.Linear layers (the '
                       "MLPs' output projections)")
  names = {name for name, _ in chosen}

  def replace(path, node):
    if not (isinstance(node, nnx.Linear) and _path_str(path) in names):
      return node
    gated = GatedChannels(node, num_groups, rngs=rngs, **gate_kwargs)
    mesh = _mesh_of(node)
    if mesh is not None:
      _replicate_new_state(gated, mesh)
    return gated
  return nnx.recursive_map(replace, nnx.clone(model))


def set_path(model: nnx.Module, path: str, active_heads: int | None = None) -> nnx.Module:
  """Sets the compute path (and, if given, the budget K) of every gated attention layer
  of `model`, in place; returns `model`. The sibling of `gating.set_temperature`, for
  models (a retrofit, a Linen-free user model) whose call does not pass `path=`.

  path='gathered' needs a budget: each layer's own K, or `active_heads`. Every layer is
  checked before any is changed, so a refusal (ValueError naming the layer) changes
  nothing. Takes effect at the next trace: a function jitted before keeps its path.
  """
  layers = [(_path_str(p), m) for p, m in nnx.iter_graph(model)
            if isinstance(m, HeadGating)]
  if not layers:
    raise ValueError(f'set_path found no gated attention layer in {type(model).__name__} '
                     '(gating.gate_heads makes them)')
  for name, attn in layers:
    k = attn.active_heads if active_heads is None else active_heads
    try:
      check_active_heads(k, attn.num_heads, attn.gate_rule, path)
    except ValueError as e:
      raise ValueError(f'layer {name!r}: {e}') from None
  for _, attn in layers:
    attn.path = path
    if active_heads is not None:
      attn.active_heads = active_heads
  return model


# -- prune ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PruneReport:
  """What prune kept and what it saved.

  kept_heads: {layer path: the kept head indices of the gated layer, in order}.
  kept_groups: {MLP layer path: the kept channel-group indices}, for GatedMLP layers.
  mlp_features: the kept MLP width of every layer of a GatedLM/GatedEncoder with gated
    groups (rebuild with mlp_features=mlp_features and no mlp_groups), else None.
  num_heads: the kept head count of every layer, in model order (GatedLM/GatedEncoder
    rebuild with num_heads=num_heads and head_dim=head_dim).
  num_kv_heads: with grouped-query attention, the K/V heads every layer keeps (rebuild
    with num_kv_heads=num_kv_heads as well); None when each kept head has its own.
  params_before/after: elements of every nnx.Param.
  flops_before/after: XLA's cost analysis ('flops') of the jitted forward pass in eval
    mode on `flops_input_shape` (the gated model on its own path, router included); None
    when no input was given for a model that is not a GatedLM or GatedEncoder.
  """
  kept_heads: dict[str, tuple[int, ...]]
  num_heads: tuple[int, ...]
  head_dim: int | None   # None when the layers' head widths differ
  params_before: int
  params_after: int
  flops_before: float | None
  flops_after: float | None
  flops_input_shape: tuple[int, ...] | None
  kept_groups: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  mlp_features: tuple[int, ...] | None = None
  num_kv_heads: tuple[int, ...] | None = None

  def __str__(self):
    lines = [f'prune: heads per layer {list(self.num_heads)} (Dh={self.head_dim})'
             + ('' if self.num_kv_heads is None else
                f', K/V heads per layer {list(self.num_kv_heads)}')]
    if self.kept_groups:
      lines.append(f'  MLP groups per layer {[len(g) for g in self.kept_groups.values()]}'
                   + ('' if self.mlp_features is None else
                      f', MLP widths {list(self.mlp_features)}'))
    lines += [
             f'  params {self.params_before:,} -> {self.params_after:,} '
             f'({self.params_after / self.params_before:.3f}x)']
    if self.flops_before is not None:
      lines.append(f'  forward FLOPs (XLA cost analysis, input {self.flops_input_shape}) '
                   f'{self.flops_before:,.0f} -> {self.flops_after:,.0f} '
                   f'({self.flops_after / self.flops_before:.3f}x)')
    return '\n'.join(lines)


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward_flops(model: nnx.Module, *inputs) -> float:
  """XLA's FLOP count of the compiled forward `model(*inputs)` in eval mode (no dropout)."""
  graphdef, state = nnx.split(model)

  def forward(state, *inputs):
    module = nnx.merge(graphdef, state, copy=True)
    module.eval()
    return module(*inputs)
  return float(jax.jit(forward).lower(state, *inputs).compile().cost_analysis()['flops'])


def _gated_layers(model) -> dict:
  """{path: layer} of every GatedMultiHeadAttention and GatedMLP, in model order."""
  return {_path_str(p): m for p, m in nnx.iter_graph(model)
          if isinstance(m, (GatedMultiHeadAttention, GatedMLP))}


def _units(layer) -> tuple[int, str]:
  if isinstance(layer, GatedMLP):
    return layer.num_groups, 'groups'
  return layer.num_heads, 'heads'


def _usage_by_layer(model, usage_or_threshold, threshold) -> tuple[dict[str, np.ndarray], float]:
  layers = _gated_layers(model)
  if not layers:
    raise ValueError(f'prune found no GatedMultiHeadAttention in {type(model).__name__}')
  if isinstance(usage_or_threshold, Mapping):
    usage = {path: np.asarray(u) for path, u in usage_or_threshold.items()}
    threshold = 0.0 if threshold is None else threshold
  else:
    if threshold is not None:
      raise ValueError('pass the threshold once: prune(model, threshold) reads the usage from '
                       'the model; prune(model, usage, threshold=t) takes it from `usage`')
    threshold = float(usage_or_threshold)
    usage = {path: np.asarray((m.group_usage if isinstance(m, GatedMLP) else m.head_usage)[...])
             for path, m in layers.items()}
  missing, unknown = sorted(set(layers) - set(usage)), sorted(set(usage) - set(layers))
  if missing or unknown:
    raise ValueError(f'usage must have one entry per gated layer {sorted(layers)}; missing '
                     f'{missing}, unknown {unknown}')
  for path, u in usage.items():
    n, unit = _units(layers[path])
    if u.shape != (n,):
      raise ValueError(f'usage of {path!r} has shape {u.shape}; that layer has {n} {unit}')
  return usage, threshold


def _kept_kv_heads(attn: GatedMultiHeadAttention, kept: np.ndarray) -> np.ndarray:
  """The K/V heads the thin layer holds, one per its KV head: with grouped-query attention
  the groups of the kept heads when each keeps equally many (always so for whole KV
  groups, unit='kv_group'), so that the thin layer is grouped-query attention too;
  otherwise each kept head's group's K/V once per head (num_kv_heads = its heads)."""
  group_K = kept // attn.group_size
  groups, counts = np.unique(group_K, return_counts=True)
  if len(set(counts.tolist())) == 1:
    return groups
  return group_K


def _thin_layer(attn: GatedMultiHeadAttention, kept: np.ndarray) -> GatedMultiHeadAttention:
  """A dense GatedMultiHeadAttention with only the heads `kept` of `attn` (and the K/V
  heads they read, `_kept_kv_heads`), its norms, biases and RoPE unchanged."""
  h = len(kept)
  kv_kept = _kept_kv_heads(attn, kept)
  thin = GatedMultiHeadAttention(
      h, attn.in_features, qkv_features=h * attn.head_dim, out_features=attn.out_features,
      num_kv_heads=len(kv_kept), in_kv_features=attn.in_kv_features, gate='dense',
      rotary_base=attn.rotary_base, qk_norm=attn.query_norm is not None,
      norm_eps=attn.norm_eps, out_bias=attn.out_bias,
      dtype=attn.dtype, param_dtype=attn.param_dtype, broadcast_dropout=attn.broadcast_dropout,
      dropout_rate=attn.dropout_rate, deterministic=attn.deterministic,
      precision=attn.precision, use_bias=attn.use_bias, keep_rngs=attn.rngs is not None,
      rngs=nnx.Rngs(0))
  thin.rotary_inv_freq = attn.rotary_inv_freq
  if thin.rngs is not None:  # its dropout stream continues the gated layer's
    thin.rngs = nnx.clone(attn.rngs)
  if attn.query_norm is not None:
    thin.query_norm, thin.key_norm = nnx.clone(attn.query_norm), nnx.clone(attn.key_norm)
  out_scale_H = np.ones(attn.num_heads, np.float32)
  if attn.scaled_weights and isinstance(attn.router, StaticRouter):
    # A static router weighs every sequence alike: fold its weights into Wo.
    gate = attn.gate(jnp.zeros((1, 1, attn.in_features)), deterministic=True)
    out_scale_H = np.asarray(gate.weights_BxH[0], np.float32)
  for name, kept_idx, head_axis in (('query', kept, 1), ('key', kv_kept, 1),
                                    ('value', kv_kept, 1), ('out', kept, 0)):
    src, dst = getattr(attn, name), getattr(thin, name)
    kernel = jnp.take(src.kernel[...], jnp.asarray(kept_idx), axis=head_axis)
    if name == 'out':
      scale_h = jnp.asarray(out_scale_H[kept], kernel.dtype)
      kernel = kernel * scale_h[:, None, None]
    dst.kernel = src.kernel.replace(kernel)
    if src.bias is not None:
      bias = (src.bias[...] if name == 'out' else
              jnp.take(src.bias[...], jnp.asarray(kept_idx), axis=0))
      dst.bias = src.bias.replace(bias)
  return thin


def _thin_mlp(mlp: GatedMLP, kept: np.ndarray) -> GatedMLP:
  """A dense GatedMLP (no router) with only the channel groups `kept` of `mlp`."""
  Fg = mlp.hidden_features // mlp.num_groups
  thin = GatedMLP(mlp.in_features, len(kept) * Fg, len(kept), gate='dense', dtype=mlp.dtype,
                  param_dtype=mlp.linear_in.kernel[...].dtype, precision=mlp.precision,
                  kind=mlp.kind, use_bias=mlp.linear_in.bias is not None, rngs=nnx.Rngs(0))
  scale_G = np.ones(mlp.num_groups, np.float32)
  if mlp.scaled_weights and isinstance(mlp.router, StaticRouter):
    # A static router weighs every sequence alike: fold its weights into W2.
    gate = mlp.gate(jnp.zeros((1, 1, mlp.in_features)), deterministic=True)
    scale_G = np.asarray(gate.weights_BxH[0], np.float32)
  channels = jnp.asarray((kept[:, None] * Fg + np.arange(Fg)[None, :]).reshape(-1))
  for name in ('linear_in', 'linear_up'):   # W1 (and SwiGLU's W3): the kept columns
    src, dst = getattr(mlp, name), getattr(thin, name)
    if src is None:
      continue
    dst.kernel = src.kernel.replace(jnp.take(src.kernel[...], channels, axis=1))
    if src.bias is not None:
      dst.bias = src.bias.replace(jnp.take(src.bias[...], channels, axis=0))
  src_out = mlp.linear_out
  scale_F = jnp.asarray(np.repeat(scale_G[kept], Fg), src_out.kernel[...].dtype)
  thin.linear_out.kernel = src_out.kernel.replace(
      jnp.take(src_out.kernel[...], channels, axis=0) * scale_F[:, None])
  if src_out.bias is not None:
    thin.linear_out.bias = src_out.bias.replace(src_out.bias[...])
  return thin


def _kept_units(path, usage_U, threshold, budget, layer: str, unit: str, budget_name: str,
                units: str, budget_field: str | None = None) -> tuple[int, ...]:
  """The units (heads or channel groups) of one layer whose usage exceeds the threshold;
  a ValueError if none would be left, or fewer than the layer's budget opens."""
  kept = np.flatnonzero(np.asarray(usage_U) > threshold)
  usage = np.asarray(usage_U).tolist()
  if len(kept) == 0:
    raise ValueError(f'{layer} {path!r} would keep no {unit} (usage {usage} <= threshold '
                     f'{threshold}); lower the threshold')
  if budget is not None and budget > len(kept):
    raise ValueError(f'{layer} {path!r} has a budget of {budget_name}={budget} {units} but '
                     f'only {len(kept)} would be left after pruning (usage {usage}, threshold '
                     f'{threshold}); lower the threshold or the budget '
                     f'({budget_field or budget_name})')
  return tuple(int(u) for u in kept)


def prune(model: nnx.Module, usage_or_threshold, *, threshold: float | None = None,
          inputs: tuple | None = None) -> tuple[nnx.Module, PruneReport]:
  """Exports a thin static copy of a gated model without the heads it (almost) never uses.

  Args:
    model: a model holding GatedMultiHeadAttention layers (GatedLM, GatedEncoder, or any
      NNX model, e.g. one from gate_heads). It is not changed.
    usage_or_threshold: either a float t, and head h of a layer is kept if the layer's
      recorded `head_usage` (GateStats of its last call: run the model in eval mode on
      representative data first) exceeds t; or a mapping {layer path: usage [H]} (paths
      as in `gating.gate_stats`, e.g. usage averaged over an evaluation set; for a
      GatedLM, `(out.gate_weights_BxNxH != 0).mean(0)` gives it per layer), and a head is
      kept if its usage exceeds `threshold` (default 0: every head ever used).
    threshold: see above.
    inputs: arguments of `model(*inputs)` for the FLOP count (default for GatedLM and
      GatedEncoder: int tokens of shape [1, max_length]).

  Gated MLP layers (GatedMLP, with mlp_groups) are pruned alike from their group usage
  (`group_usage`; in a usage mapping, their paths such as 'trunk/blocks/0/mlp').

  Returns (pruned model, PruneReport). Raises ValueError if a layer would keep fewer
  heads than its budget K, or groups than its active_groups (its gate always opens that
  many, so sequences would use removed units), or none at all.
  """
  if any(getattr(m, 'unit_mean_UxD', None) is not None for _, m in nnx.iter_graph(model)):
    raise ValueError('prune does not export dropped-unit compensation (compensate): turn '
                     'it off first with gating.training.compensation.compensate(model, None)')
  usage, threshold = _usage_by_layer(model, usage_or_threshold, threshold)
  kept_groups = {}
  for path, mlp in ((p, m) for p, m in _gated_layers(model).items() if isinstance(m, GatedMLP)):
    k = mlp.num_groups if get_rule(mlp.gate_rule).budget == 'none' else mlp.active_groups
    kept_groups[path] = _kept_units(path, usage[path], threshold, k, 'MLP layer',
                                    'channel group', 'active_groups', 'groups')
  kept_heads, counts, kv_counts, head_dims = {}, [], [], set()
  for path, attn in ((_path_str(p), m) for p, m in nnx.iter_graph(model)
                     if isinstance(m, GatedMultiHeadAttention)):
    k = attn.num_heads if get_rule(attn.gate_rule).budget == 'none' else attn.active_heads
    kept_heads[path] = _kept_units(path, usage[path], threshold, k, 'layer', 'head', 'K',
                                   'heads', budget_field='active_heads')
    counts.append(len(kept_heads[path]))
    kv_counts.append(len(_kept_kv_heads(attn, np.asarray(kept_heads[path]))))
    head_dims.add(attn.head_dim)

  def replace(path, node):
    if isinstance(node, GatedMultiHeadAttention):
      return _thin_layer(node, np.asarray(kept_heads[_path_str(path)]))
    if isinstance(node, GatedMLP):
      return _thin_mlp(node, np.asarray(kept_groups[_path_str(path)]))
    if isinstance(node, GatedTransformerBlock) and node.gated_mlp is not None:
      # Children are mapped first: its MLP is already thin and dense; make it the
      # block's ordinary MLP (mlp_in, mlp_out), as a block without mlp_groups holds it.
      node.mlp_in, node.mlp_out = node.mlp.linear_in, node.mlp.linear_out
      node.mlp_up = node.mlp.linear_up if node.mlp.linear_up is not None else nnx.data(None)
      del node.mlp
    return node
  pruned = nnx.recursive_map(replace, nnx.clone(model))
  head_dim = next(iter(head_dims)) if len(head_dims) == 1 else None
  mlp_features = None
  if isinstance(pruned, (GatedLM, GatedEncoder)):  # as their constructor records them
    pruned.trunk.num_heads = tuple(counts)
    pruned.trunk.num_kv_heads = None if kv_counts == counts else tuple(kv_counts)
    pruned.trunk.head_dim = head_dim
    if kept_groups:
      mlp_features = tuple(int(b.mlp_in.kernel.shape[1]) for b in pruned.blocks)
      pruned.trunk.mlp_features = mlp_features
      pruned.trunk.mlp_groups = None

  if inputs is None and isinstance(model, (GatedLM, GatedEncoder)):
    inputs = (jnp.zeros((1, model.trunk.max_length), jnp.int32),)
  flops = (None, None) if inputs is None else (forward_flops(model, *inputs),
                                               forward_flops(pruned, *inputs))
  report = PruneReport(
      kept_heads=kept_heads, num_heads=tuple(counts), head_dim=head_dim,
      params_before=count_params(model), params_after=count_params(pruned),
      flops_before=flops[0], flops_after=flops[1],
      flops_input_shape=None if inputs is None else tuple(np.shape(inputs[0])),
      kept_groups=kept_groups, mlp_features=mlp_features,
      num_kv_heads=None if kv_counts == counts else tuple(kv_counts))
  return pruned, report
