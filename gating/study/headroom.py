"""The headroom oracle: how much could any per-sequence router win over static pruning?

For one gated attention layer n of a trained run with budget K, every K-subset S of its H
heads is forced in turn (the layer's router is replaced by a static one whose logits open
exactly S; every other layer keeps its own gate), and the model's loss is measured per
sequence and per scored position. Each sequence's scored positions are split in two:

  choice positions (even-numbered targets)  pick the subset,
  score positions  (odd-numbered targets)   measure it,

so the oracle never scores on the positions it chose with. Reported per layer, as mean
cross-entropy per score-position token:

  static     the single subset with the lowest choice loss over all sequences (the best
             static pruning of this layer, given the rest of the model)
  oracle     for every sequence its own subset with the lowest choice loss: the ceiling
             of a per-sequence router on this model
  router     the run's own gate, unchanged
  headroom   static - oracle: what a per-sequence router could win at most
  captured   (static - router) / (static - oracle): the share of it the router wins

Where the headroom is small, no router can win much on this model and data: the ceiling
is the model's, not the router's (RESEARCH.md, "measure the ceiling first").
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gating import data
from gating.layers.attention import GatedMultiHeadAttention
from gating.layers.router import StaticRouter
from gating.study.evaluation import Run
from gating.training import loop as train

FORCE_LOGIT = 30.0   # a forced subset's logits: +30 open, -30 closed (every rule agrees)


def split_positions(weight_BxL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(choice_BxL, score_BxL): the scored positions of each sequence, alternately: the
  first, third, ... target choose, the second, fourth, ... score. Disjoint by design."""
  scored_BxL = weight_BxL > 0
  rank_BxL = np.cumsum(scored_BxL, axis=1) - 1
  choice_BxL = scored_BxL & (rank_BxL % 2 == 0)
  return choice_BxL, scored_BxL & ~choice_BxL


def oracle_from_losses(ce_SxBxL: np.ndarray, choice_BxL: np.ndarray, score_BxL: np.ndarray,
                       router_ce_BxL: np.ndarray | None = None) -> dict[str, Any]:
  """The static, oracle and router losses (see the module docstring) from the per-position
  cross-entropy of every forced subset s (ce_SxBxL) and of the router (router_ce_BxL).

  Only `choice_BxL` positions pick subsets; only `score_BxL` positions are reported.
  """
  if (choice_BxL & score_BxL).any():
    raise ValueError('choice and score positions must be disjoint')
  choice_SxB = (ce_SxBxL * choice_BxL).sum(axis=2)
  score_SxB = (ce_SxBxL * score_BxL).sum(axis=2)
  tokens = max(float(score_BxL.sum()), 1.0)
  static = int(np.argmin(choice_SxB.sum(axis=1)))
  best_B = np.argmin(choice_SxB, axis=0)
  out = {'static_subset': static,
         'static': float(score_SxB[static].sum()) / tokens,
         'oracle_subsets_B': best_B,
         'oracle': float(score_SxB[best_B, np.arange(best_B.size)].sum()) / tokens,
         'score_tokens': int(tokens), 'choice_tokens': int(choice_BxL.sum())}
  out['headroom'] = out['static'] - out['oracle']
  if router_ce_BxL is not None:
    out['router'] = float((router_ce_BxL * score_BxL).sum()) / tokens
    out['captured'] = ((out['static'] - out['router']) / out['headroom']
                       if out['headroom'] > 0 else None)
  return out


def gated_layers(model: nnx.Module) -> list[tuple[str, GatedMultiHeadAttention]]:
  return [('/'.join(map(str, p)), m) for p, m in nnx.iter_graph(model)
          if isinstance(m, GatedMultiHeadAttention) and m.router is not None]


def headroom(run: Run, *, layers: Sequence[int] | None = None, split: str = 'validation',
             max_sequences: int | None = 512) -> dict[str, Any]:
  """The oracle for each gated attention layer of a run (all, or those in `layers`), on the
  first `max_sequences` sequences of `split` (None: all), at the run's own budget K."""
  learner, _ = nnx.merge(run.graphdef, run.state)
  model = learner.model
  found = gated_layers(model)
  if not found:
    raise ValueError(f'{run.workdir}: the model has no gated attention layer with a router '
                     f'(gate={run.config.model.gate!r}); headroom needs one')
  if run.config.model.kind != 'lm':
    raise ValueError(f'{run.workdir}: headroom needs a language model (positions to choose '
                     f'a subset on and others to score it), got model.kind='
                     f'{run.config.model.kind!r}')
  layers = list(range(len(found))) if layers is None else list(layers)
  for n in layers:
    if not 0 <= n < len(found):
      raise ValueError(f'layer {n} does not exist: the model has {len(found)} gated layers')
  if found[0][1].active_heads is None:
    raise ValueError(f'{run.workdir}: headroom compares K-subsets; the gate has no budget K '
                     '(model.active_heads)')
  rows = _rows(getattr(run.splits, split), max_sequences)
  router_ce_BxL, weight_BxL = _per_position(model, rows, None, None)
  choice_BxL, score_BxL = split_positions(weight_BxL)
  report = {'workdir': run.workdir, 'step': run.step, 'split': split,
            'sequences': int(weight_BxL.shape[0]), 'layers': []}
  for n in layers:
    name, attn = found[n]
    subsets = list(itertools.combinations(range(attn.num_heads), attn.active_heads))
    ce_SxBxL = np.stack([_per_position(model, rows, name, s)[0] for s in subsets])
    result = oracle_from_losses(ce_SxBxL, choice_BxL, score_BxL, router_ce_BxL)
    counts = np.bincount(result.pop('oracle_subsets_B'), minlength=len(subsets))
    report['layers'].append({
        'layer': n, 'path': name, 'K': attn.active_heads, 'num_subsets': len(subsets),
        **result, 'static_subset': list(subsets[result['static_subset']]),
        'oracle_distinct_subsets': int((counts > 0).sum()),
        'oracle_top_subsets': [[list(subsets[i]), int(counts[i])]
                               for i in np.argsort(-counts)[:5] if counts[i] > 0]})
  return report


def _rows(dataset, max_sequences):
  rows = next(data.eval_batches(dataset, len(dataset)))
  if max_sequences is not None:
    rows = {k: v[:max_sequences] for k, v in rows.items()}
  return {k: rows[k] for k in ('tokens', 'valid', 'target_mask', 'label')}


def _per_position(model, rows, layer_path, subset):
  """(ce * weight, weight) per position [B, L] with `subset` forced on `layer_path`."""
  graphdef, state = nnx.split(model)
  logits_H = None
  if layer_path is not None:
    attn = dict(gated_layers(model))[layer_path]
    logits_H = jnp.full((attn.num_heads,), -FORCE_LOGIT).at[jnp.array(subset)].set(FORCE_LOGIT)
  ce, weight = _forward(graphdef, state, rows, layer_path, logits_H)
  return np.asarray(ce), np.asarray(weight)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, rows, layer_path, logits_H):
  model = nnx.merge(graphdef, state, copy=True)
  if layer_path is not None:
    attn = dict(gated_layers(model))[layer_path]
    attn.router = StaticRouter(attn.num_heads)
    attn.router.logits_H[...] = logits_H
  ce, _, weight, _ = train.task_outputs(model, rows, deterministic=True)
  if ce.ndim == 1:   # an encoder: one loss per sequence
    ce, weight = ce[:, None], weight[:, None]
  return ce * weight, weight
