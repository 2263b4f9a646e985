"""Elastic (slimmable) training over head subsets: the sandwich rule, in-place distillation.

Every step trains the full model (every head of every layer open) and one sub-model per K
in `loss.elastic_ks`, in which each sequence runs a uniformly random K-subset of every
attention layer's heads, with weight 1 (Slimmable networks and US-Nets, Yu et al. 2019;
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
from gating.layers.router import StaticRouter


def random_subsets(model: nnx.Module, k: int) -> nnx.Module:
  """Makes every gated attention layer of `model` (in place; use on a copy inside the loss)
  run a uniformly random K-subset of its heads per sequence, with weight 1. Shared heads
  stay on and count towards K."""
  for _, attn in nnx.iter_graph(model):
    if not isinstance(attn, GatedMultiHeadAttention):
      continue
    if not attn.shared_heads < k <= attn.num_heads:
      raise ValueError(f'elastic K={k} must be in ({attn.shared_heads}, '
                       f'num_heads={attn.num_heads}]')
    attn.gate_rule, attn.active_heads, attn.gate_options = 'topk', k, ()
    attn.noise, attn.noise_scale, attn.scaled_weights = 'gumbel', 1.0, False
    attn.router = StaticRouter(attn.num_heads - attn.shared_heads)
  return model


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
