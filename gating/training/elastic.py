"""Elastic (slimmable) training over head and channel-group subsets: the sandwich rule,
in-place distillation.

Every step trains the full model (every head and MLP group of every layer open) and one
sub-model per K in `loss.elastic_ks`, in which each sequence runs a uniformly random
K-subset of every attention layer's heads (and, in a model with MLP groups, a random
Kf-subset of every MLP's groups: Kf from `loss.elastic_group_ks`, by default the same
fraction K G / H), with weight 1 (Slimmable networks and US-Nets, Yu et al. 2019;
MatFormer; SortedNet). The set always holds the smallest K the model will run at, so the
narrowest and the widest model train every step (the sandwich rule). Each sub-model learns
both the targets and the full pass's predictions, taken with stop-gradient (in-place
distillation):

  L = CE(full) + (1 / M) sum_{K in ks} [ (1 - a) CE(sub_K) + a KL(sg(p_full) || p_sub_K) ]

with a = `loss.distill_weight` and the KL per scored position. The routers are not used
(the subsets are random), so this stage trains the heads for any subset a router may pick
later: use it on a dense model (gate='dense'), then train routers on the result.

A random K-subset per sequence is top-K of i.i.d. Gumbel noise on equal logits: the
layer runs top-k on a static, all-zero router with Gumbel exploration noise, so the
gathered and masked paths, shared heads and the KV cache work as for any gate.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gating.layers.attention import GatedMultiHeadAttention
from gating.layers.mlp import GatedMLP
from gating.layers.router import StaticRouter


def random_subsets(model: nnx.Module, k: int, kf: int | None = None) -> nnx.Module:
  """Makes every gated attention layer of `model` (in place; use on a copy inside the loss)
  run a uniformly random K-subset of its heads per sequence, with weight 1, and with `kf`
  every GatedMLP a random Kf-subset of its channel groups. Shared heads and shared groups
  stay on and count towards K and Kf."""
  for _, layer in nnx.iter_graph(model):
    if isinstance(layer, GatedMultiHeadAttention):
      if not layer.shared_heads < k <= layer.num_heads:
        raise ValueError(f'elastic K={k} must be in ({layer.shared_heads}, '
                         f'num_heads={layer.num_heads}]')
      layer.active_heads = k
      layer.router = StaticRouter(layer.num_heads - layer.shared_heads)
    elif isinstance(layer, GatedMLP) and kf is not None:
      if not layer.shared_groups < kf <= layer.num_groups:
        raise ValueError(f'elastic Kf={kf} must be in ({layer.shared_groups}, '
                         f'num_groups={layer.num_groups}]')
      if layer.logits_from_attention:
        raise ValueError("elastic training draws random groups; a GatedMLP with "
                         "router='shared' takes its logits from the attention router")
      layer.active_groups = kf
      layer.router = StaticRouter(layer.routed_groups)
    else:
      continue
    layer.gate_rule, layer.gate_options = 'topk', ()
    layer.noise, layer.noise_scale, layer.scaled_weights = 'gumbel', 1.0, False
  return model


def group_ks(ks: Sequence[int], group_ks: Sequence[int], num_heads: int,
             num_groups: int | None, shared_groups: int = 0) -> tuple[int | None, ...]:
  """Kf of each elastic sub-model, paired with `ks` in their order: `group_ks`, or, when
  empty and the model has MLP groups, the same fraction of the groups, Kf = K G / H (which
  must be a whole number). Each Kf must exceed the Sf shared groups. None for every
  sub-model of a model without groups."""
  ks, group_ks = tuple(ks), tuple(group_ks)
  if num_groups is None:
    if group_ks:
      raise ValueError(f'loss.elastic_group_ks={group_ks} needs model.mlp_groups')
    return (None,) * len(ks)
  if not group_ks:
    bad = [k for k in ks if k * num_groups % num_heads]
    if bad:
      raise ValueError(f'loss.elastic_group_ks: K G / H is not whole for K={bad} (G='
                       f'{num_groups}, H={num_heads}); give one Kf per K')
    group_ks = tuple(k * num_groups // num_heads for k in ks)
    bad = [kf for kf in group_ks if kf <= shared_groups]
    if bad:
      raise ValueError(f'loss.elastic_ks: Kf = K G / H = {bad} must exceed the '
                       f'{shared_groups} shared groups (model.shared_groups); give '
                       'loss.elastic_group_ks')
    return group_ks
  if len(group_ks) != len(ks):
    raise ValueError(f'loss.elastic_group_ks has {len(group_ks)} entries for '
                     f'{len(ks)} elastic_ks (one Kf per K)')
  for kf in group_ks:
    if isinstance(kf, bool) or not isinstance(kf, int) or not shared_groups < kf <= num_groups:
      raise ValueError(f'loss.elastic_group_ks: Kf={kf!r} must be an int in '
                       f'({shared_groups}, mlp_groups={num_groups}]')
  return group_ks


def distillation(student_logits, teacher_logits, weight):
  """Mean over weighted positions of KL(sg(p_teacher) || p_student) (nats)."""
  teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32))
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32))
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return jnp.sum(kl * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def check_ks(ks: Sequence[int], num_heads: int, shared_heads: int = 0) -> tuple[int, ...]:
  """The K set, sorted: each K in (shared_heads, num_heads], no repeats."""
  ks = tuple(ks)
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, int) or not shared_heads < k <= num_heads:
      raise ValueError(f'loss.elastic_ks: K={k!r} must be an int in ({shared_heads}, '
                       f'num_heads={num_heads}]')
  if len(set(ks)) != len(ks):
    raise ValueError(f'loss.elastic_ks: {ks} repeats a K')
  return tuple(sorted(ks))
