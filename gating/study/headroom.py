"""The headroom oracle: an estimate of how much a per-sequence router could win over static
pruning on a trained model, layer by layer, and how sure the estimate is.

For one attention layer n of a trained run (gated or dense) and a budget K, every K-subset
S of its H heads is forced in turn (the layer runs top-K on a static router whose logits
open exactly S, weights 1; every other layer runs as the model runs it), and the model's
loss is measured per sequence and per scored position. Each sequence's scored positions
are split in two:

  choice positions (even-numbered targets)  pick the subset,
  score positions  (odd-numbered targets)   measure it,

so the estimate never scores on the positions it chose with. Reported per layer, as mean
cross-entropy per score-position token:

  dense      layer n with all H heads open
  static     the single subset with the lowest choice loss over all sequences (the best
             static pruning of this layer, given the rest of the model)
  by_label   for each task or domain its own subset (lowest choice loss over its
             sequences): what routing by the label could win. A label has many choice
             positions (all of its sequences'), so this choice is reliable.
  oracle     for every sequence its own subset with the lowest choice loss, scored on the
             held-out positions. NOT a ceiling: a sequence with few choice positions
             picks its subset with noise, and a noisy pick scores worse on the held-out
             positions than the sequence's truly best subset would. So the oracle runs
             high (its headroom low) when sequences are short, and a router that
             generalises across sequences can beat it.
  oracle_in_sample  the same choice scored on the choice positions themselves: it fits
             the noise, so it runs low (its headroom high). Where there is one best
             subset per sequence, its held-out loss is expected between oracle_in_sample
             and oracle; the two together bracket the per-sequence headroom.
  oracle_split_half  the held-out oracle with the roles of the two halves also swapped
             (choose on the odd targets, score on the even), averaged: a second sample of
             the same estimate; the gap between the two halves shows its noise
  router     the run's own gate, unchanged (a gated run at its own K only)
  headroom   static - oracle (held-out), with `headroom_ci95`: the 2.5 and 97.5
             percentiles over 1000 bootstrap resamples of the sequences
  headroom_in_sample  static - oracle_in_sample: the optimistic bound
  oracle_closes, by_label_closes   (static - x) / (static - dense): the share of static's
             gap to dense that the held-out oracle, or routing by label, closes
  captured   (static - router) / (static - oracle): the router's gain against the held-out
             oracle's (above 1 when the router beats the noisy per-sequence choice)
  router_recall   mean over sequences of |router's heads & oracle's subset| / K (own K only)
  choice_positions  per sequence: the minimum and the median count; with a median under
             MIN_CHOICE_POSITIONS the report carries a warning that the per-sequence
             figures are dominated by the choice's noise

A slices model (gate='slices': every sequence runs one of E slices of heads and MLP groups
in every layer, `slice_oracle`) also gets the same figures over its E slices instead of
one layer's subsets: one slice for all (static), each label's, each sequence's (the
oracle), the run's own assignment (router) and the whole sequence's assignment (whole).
For the cluster assigner it also routes every sequence by prefixes of other lengths P'
(`by_prefix`, PREFIXES), each scored only where the prefix reads no scored token; every
report gives the run's own loss on those same positions (`after_prefix`).

The search is exhaustive over the C(H, K) subsets of one layer at a time (28 for K = 2 of
8, 70 for K = 4 of 8); the other layers are not searched jointly, so no figure here bounds
a router that changes several layers together. Under grouped-query attention with
unit='kv_group' the units are the G KV groups: the C(G, K / (H/G)) subsets of groups are
searched (subsets, static_subset and by_label_subsets then name groups), K still counting
query heads.
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
from gating.layers import models
from gating.layers.attention import GatedMultiHeadAttention
from gating.layers.router import StaticRouter
from gating.study.evaluation import Run
from gating.training import loop as train
from gating.training import slices

FORCE_LOGIT = 30.0   # a forced subset's logits: +30 open, -30 closed (every rule agrees)
MIN_CHOICE_POSITIONS = 8   # below this median per sequence, the per-sequence figures warn
BOOTSTRAP = 1000           # resamples of the sequences for headroom_ci95
PREFIXES = (8, 16, 32, 48, 64, 96)   # the cluster assigner's prefix lengths P' in by_prefix


def split_positions(weight_BxL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(choice_BxL, score_BxL): the scored positions of each sequence, alternately: the
  first, third, ... target choose, the second, fourth, ... score. Disjoint by design."""
  scored_BxL = weight_BxL > 0
  rank_BxL = np.cumsum(scored_BxL, axis=1) - 1
  choice_BxL = scored_BxL & (rank_BxL % 2 == 0)
  return choice_BxL, scored_BxL & ~choice_BxL


def _per_sequence(choice_SxB, score_SxB, tokens, chooses_B, fallback: int):
  """(best subset per sequence, its summed score loss per sequence / tokens). A sequence
  with no choosing position (`chooses_B` False: one too short to hold any) has nothing
  to choose by and gets `fallback` (the static subset), not subset 0."""
  best_B = np.where(chooses_B, np.argmin(choice_SxB, axis=0), fallback)
  return best_B, score_SxB[best_B, np.arange(best_B.size)] / tokens


def oracle_from_losses(ce_SxBxL: np.ndarray, choice_BxL: np.ndarray, score_BxL: np.ndarray,
                       router_ce_BxL: np.ndarray | None = None,
                       dense_ce_BxL: np.ndarray | None = None,
                       label_B: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
  """The dense, static, by-label, oracle (held-out, in-sample, split-half) and router
  losses, the headroom with its bootstrap interval, and the choice positions (see the
  module docstring), from the per-position cross-entropy (times the position's weight) of
  every forced subset s (ce_SxBxL), of the router and of the dense layer.

  Only `choice_BxL` positions pick subsets for the held-out figures; only `score_BxL`
  positions are reported (the in-sample oracle alone picks and scores on the choice
  positions, and the split-half one also swaps the roles). A sequence with no position
  to pick by takes the static subset; `chooses_B` marks the others, which alone the
  per-sequence diagnostics (recall, subset counts, agreement) count.
  """
  if (choice_BxL & score_BxL).any():
    raise ValueError('choice and score positions must be disjoint')
  choice_SxB = (ce_SxBxL * choice_BxL).sum(axis=2)
  score_SxB = (ce_SxBxL * score_BxL).sum(axis=2)
  tokens = max(float(score_BxL.sum()), 1.0)
  choice_tokens = max(float(choice_BxL.sum()), 1.0)
  static = int(np.argmin(choice_SxB.sum(axis=1)))
  chooses_B = choice_BxL.any(axis=1)
  best_B, oracle_B = _per_sequence(choice_SxB, score_SxB, tokens, chooses_B, static)
  static_B = score_SxB[static] / tokens
  # in sample: chosen and scored on the choice positions (optimistic)
  in_sample = float(choice_SxB.min(axis=0).sum()) / choice_tokens
  static_in_sample = float(choice_SxB[static].sum()) / choice_tokens
  # split half: the roles swapped, averaged with the held-out figure
  _, swapped_B = _per_sequence(score_SxB, choice_SxB, choice_tokens, score_BxL.any(axis=1),
                               static)
  per_seq = choice_BxL.sum(axis=1)
  out = {'static_subset': static,
         'static': float(static_B.sum()),
         'oracle_subsets_B': best_B,
         'chooses_B': chooses_B,
         'oracle': float(oracle_B.sum()),
         'oracle_in_sample': in_sample,
         'oracle_split_half': (float(oracle_B.sum()) + float(swapped_B.sum())) / 2,
         'score_tokens': int(tokens), 'choice_tokens': int(choice_BxL.sum()),
         'choice_positions': {'min': int(per_seq.min()), 'median': float(np.median(per_seq))}}
  out['headroom'] = out['static'] - out['oracle']
  out['headroom_in_sample'] = static_in_sample - in_sample
  out['headroom_ci95'] = _bootstrap_ci(static_B * tokens, oracle_B * tokens,
                                       score_BxL.sum(axis=1), seed)
  if np.median(per_seq) < MIN_CHOICE_POSITIONS:
    out['warning'] = (f'sequences have a median of {np.median(per_seq):g} choice positions '
                      f'(under {MIN_CHOICE_POSITIONS}): the per-sequence oracle picks with '
                      'noise, so its held-out figure runs high and its headroom low; see '
                      'oracle_in_sample for the other side')
  if label_B is not None:
    by_label_B = np.empty_like(best_B)
    out['by_label_subsets'] = {}
    for label in np.unique(label_B):
      members = label_B == label
      by_label_B[members] = np.argmin(choice_SxB[:, members].sum(axis=1))
      out['by_label_subsets'][int(label)] = int(by_label_B[members][0])
    out['by_label'] = float(score_SxB[by_label_B, np.arange(best_B.size)].sum()) / tokens
  if dense_ce_BxL is not None:
    out['dense'] = float((dense_ce_BxL * score_BxL).sum()) / tokens
    gap = out['static'] - out['dense']
    out['oracle_closes'] = (out['static'] - out['oracle']) / gap if gap > 0 else None
    if label_B is not None:
      out['by_label_closes'] = (out['static'] - out['by_label']) / gap if gap > 0 else None
  if router_ce_BxL is not None:
    out['router'] = float((router_ce_BxL * score_BxL).sum()) / tokens
    out['captured'] = ((out['static'] - out['router']) / out['headroom']
                       if out['headroom'] > 0 else None)
  return out


def _bootstrap_ci(static_sum_B, oracle_sum_B, tokens_B, seed: int) -> list[float]:
  """The 2.5 and 97.5 percentiles of the headroom (static - oracle, per score token) over
  BOOTSTRAP resamples of the sequences, with a fixed seed."""
  rng = np.random.default_rng(seed)
  idx_RxB = rng.integers(0, len(tokens_B), size=(BOOTSTRAP, len(tokens_B)))
  diff_R = ((static_sum_B - oracle_sum_B)[idx_RxB].sum(axis=1)
            / np.maximum(tokens_B[idx_RxB].sum(axis=1), 1.0))
  return [float(np.percentile(diff_R, 2.5)), float(np.percentile(diff_R, 97.5))]


def oracle_recall(router_open_BxH: np.ndarray, subsets, best_B: np.ndarray) -> float:
  """Mean over sequences b of |router's open heads & subsets[best_B[b]]| / K."""
  oracle_BxH = np.zeros_like(router_open_BxH, dtype=bool)
  for b, s in enumerate(best_B):
    oracle_BxH[b, list(subsets[s])] = True
  k = len(subsets[0])
  return float((router_open_BxH.astype(bool) & oracle_BxH).sum() / (k * len(best_B)))


def attention_layers(model: nnx.Module) -> list[tuple[str, GatedMultiHeadAttention]]:
  return [('/'.join(map(str, p)), m) for p, m in nnx.iter_graph(model)
          if isinstance(m, GatedMultiHeadAttention)]


def headroom(run: Run, *, ks: Sequence[int] | None = None, layers: Sequence[int] | None = None,
             split: str = 'validation', max_sequences: int | None = 512,
             prefixes: Sequence[int] = PREFIXES) -> dict[str, Any]:
  """The oracle for each attention layer of a run (all, or those in `layers`) at every
  budget in `ks` (default: the run's own K; a dense run needs `ks`), on `max_sequences`
  sequences of `split` drawn at random (`data.sample_rows`; None: all); a cluster-assigned
  slices model is also routed by the `prefixes` shorter than its sequences."""
  learner, _ = nnx.merge(run.graphdef, run.state)
  model = learner.model
  found = attention_layers(model)
  if not found:
    raise ValueError(f'{run.workdir}: the model has no attention layer to search')
  if run.config.model.kind != 'lm':
    raise ValueError(f'{run.workdir}: headroom needs a language model (positions to choose '
                     f'a subset on and others to score it), got model.kind='
                     f'{run.config.model.kind!r}')
  layers = list(range(len(found))) if layers is None else list(layers)
  for n in layers:
    if not 0 <= n < len(found):
      raise ValueError(f'layer {n} does not exist: the model has {len(found)} attention '
                       'layers')
  if not layers and not models.reads_slices(model):
    raise ValueError(f'{run.workdir}: no layer to search, and the model has no slices '
                     "(gate='slices') whose assignment could be searched instead")
  # Units: heads, or KV groups under unit='kv_group' (a subset of groups opens all their
  # query heads); K always counts query heads.
  own = {n: found[n][1].active_heads for n in layers}
  if ks is not None and not ks:   # a search of nothing would replace headroom.json
    raise ValueError('ks=[]: give at least one budget K (ks=None: the run\'s own K)')
  if ks is None:
    if None in own.values():
      raise ValueError(f'{run.workdir}: the run has no budget K (gate='
                       f'{run.config.model.gate!r}); pass the budgets to search (--k 2,4)')
  for k in ks or ():
    if not 1 <= k < min(found[n][1].num_heads for n in layers):
      raise ValueError(f'K={k} must be in [1, H) for every searched layer')
    for n in layers:
      size = found[n][1].unit_size
      if k % size:
        raise ValueError(f"K={k}: layer {n} opens whole KV groups of {size} query heads "
                         f"(unit='kv_group'), so K must be a multiple of {size}")
  if max_sequences is not None and max_sequences < 1:
    raise ValueError(f'max_sequences={max_sequences} must be at least 1 (None: all rows)')
  rows, whole_B = _rows(getattr(run.splits, split), max_sequences)
  graphdef, state = nnx.split(model)
  router_ce_BxL, weight_BxL, router_open_BxNxH = map(
      np.asarray, _forward(graphdef, state, rows, None, None, None))
  choice_BxL, score_BxL = split_positions(weight_BxL)
  report = {'workdir': run.workdir, 'step': run.step, 'split': split, 'gate': run.config.model.gate,
            'sequences': int(weight_BxL.shape[0]),
            'sequences_per_label': {name: int((rows['label'] == i).sum())
                                    for i, name in enumerate(run.splits.info.label_names)},
            'layers': [],
            'after_prefix': after_prefix(router_ce_BxL, score_BxL, prefixes)}
  if models.reads_slices(model):
    E = models.num_slices(model)
    prefix_routes = None
    if slices.assigner_of(run.config.model) == 'cluster':   # the run's stored centroids
      fitted, _ = slices.load_or_fit(run.splits, E, run.config.seed, run.workdir,
                                     slices.balance_of(run.config.model))
      L = rows['tokens'].shape[1]
      prefix_routes = {p: slices.route_by_prefix(rows['tokens'], rows['valid'], fitted, p)
                       for p in prefixes if p < L - 1}
    report['slices'] = slice_oracle(graphdef, state, rows, E, choice_BxL, score_BxL,
                                    router_ce_BxL, whole_B, run.splits.info.label_names,
                                    prefix_routes)
  for n in layers:
    name, attn = found[n]
    H, U, size = attn.num_heads, attn.num_units, attn.unit_size
    dense_ce_BxL = np.asarray(_forward(graphdef, state, rows, name, jnp.zeros((U,)), H)[0])
    for k in ([own[n]] if ks is None else ks):
      subsets = list(itertools.combinations(range(U), k // size))
      ce_SxBxL = np.stack([np.asarray(_forward(graphdef, state, rows, name, _open(U, s), k)[0])
                           for s in subsets])
      result = oracle_from_losses(
          ce_SxBxL, choice_BxL, score_BxL,
          router_ce_BxL=router_ce_BxL if k == own[n] else None, dense_ce_BxL=dense_ce_BxL,
          label_B=rows['label'])
      # the per-sequence diagnostics count the sequences that chose (have a position to)
      chooses_B = result.pop('chooses_B')
      best_B = result.pop('oracle_subsets_B')[chooses_B]
      result['by_label_subsets'] = {
          run.splits.info.label_names[label]: list(subsets[s])
          for label, s in result['by_label_subsets'].items()}
      counts = np.bincount(best_B, minlength=len(subsets))
      if k == own[n]:
        open_BxU = router_open_BxNxH[chooses_B, n, :H].reshape(-1, U, size).any(axis=-1)
        result['router_recall'] = oracle_recall(open_BxU, subsets, best_B)
      report['layers'].append({
          'layer': n, 'path': name, 'K': k, 'unit': attn.unit, 'units': U,
          'num_subsets': len(subsets), **result,
          'static_subset': list(subsets[result['static_subset']]),
          'oracle_distinct_subsets': int((counts > 0).sum()),
          'oracle_top_subsets': [[list(subsets[i]), int(counts[i])]
                                 for i in np.argsort(-counts)[:5] if counts[i] > 0]})
  return report


def score_after_prefix(score_BxL: np.ndarray, prefix: int) -> np.ndarray:
  """The score positions t >= P' - 1: position t predicts token t + 1, so a router that
  reads the first P' tokens reads none of the tokens scored there."""
  return score_BxL & (np.arange(score_BxL.shape[1]) >= prefix - 1)[None, :]


def after_prefix(ce_BxL: np.ndarray, score_BxL: np.ndarray,
                 prefixes: Sequence[int]) -> list[dict[str, Any]]:
  """The run's own loss on the score positions t >= P' - 1 for each P' in `prefixes`
  that leaves one (the positions `by_prefix` scores a P'-token routing on, so that any
  model, a thin dense one say, can be read on the same tokens)."""
  out = []
  for prefix in prefixes:
    after_BxL = score_after_prefix(score_BxL, prefix)
    if prefix < score_BxL.shape[1] - 1 and after_BxL.any():
      out.append({'prefix': prefix, 'score_tokens': int(after_BxL.sum()),
                  'loss': float((ce_BxL * after_BxL).sum() / after_BxL.sum())})
  return out


def _open(num_units: int, subset) -> jax.Array:
  return jnp.full((num_units,), -FORCE_LOGIT).at[jnp.array(subset)].set(FORCE_LOGIT)


def _rows(dataset, max_sequences):
  """(the model's inputs of the drawn rows, their whole-sequence slice or None)."""
  rows = next(data.eval_batches(dataset, len(dataset), max_sequences))
  whole_B = np.asarray(rows['slice_whole']) if 'slice_whole' in rows else None
  return {k: np.asarray(v) for k, v in train.model_inputs(rows).items()}, whole_B


def slice_oracle(graphdef, state, rows, num_slices: int, choice_BxL, score_BxL,
                 router_ce_BxL, whole_B=None, label_names=(),
                 prefix_routes: dict[int, np.ndarray] | None = None) -> dict[str, Any]:
  """The assignment oracle of a slices model: every sequence is run in each of its E
  slices in turn (in every layer, as the model runs it), and `oracle_from_losses` reads
  the E per-position losses as it reads a layer's forced subsets:

    static     one slice for every sequence (the best on the choice positions)
    by_label   each task or domain its own best slice
    oracle     each sequence its own best slice, chosen on its choice positions and
               scored on the others (held out; in sample and split half as for heads)
    router     the run's own assignment (the label, the prefix's cluster or prefix loss)
    whole      with a `whole_B`: the assignment the whole sequence gets (the cluster
               assigner's nearest centroid of the whole sequence, prefix loss's lowest
               loss over it), which the prefix's routing approximates. Prefix loss's
               choice reads the loss at the score positions too: in sample, optimistic

  and `captured` = (static - router) / (static - oracle). The oracle is the ceiling of any
  per-sequence assignment to this model's trained slices (not to slices trained on
  another assignment), within its choice noise.

  prefix_routes {P': slice_B}, the assignment from each sequence's first P' tokens, give
  `by_prefix`: for each P', its agreement with `whole_B` and, on the score positions
  t >= P' - 1 only (position t predicts token t + 1, so no scored token lies in the
  prefix), the loss of that assignment (route), of the run's own (router) and of the
  whole sequence's (whole) over the same positions."""
  ce_ExBxL = np.stack([
      np.asarray(_forward(graphdef, state, {**rows, 'slice': np.full_like(rows['slice'], e)},
                          None, None, None)[0]) for e in range(num_slices)])
  out = oracle_from_losses(ce_ExBxL, choice_BxL, score_BxL, router_ce_BxL=router_ce_BxL,
                           label_B=rows['label'])
  out['num_slices'] = num_slices
  out['static_slice'] = out.pop('static_subset')
  chooses_B = out.pop('chooses_B')    # the oracle's counts: the sequences that chose
  best_B = out.pop('oracle_subsets_B')
  out['oracle_sequences_per_slice'] = np.bincount(best_B[chooses_B],
                                                  minlength=num_slices).tolist()
  out['router_sequences_per_slice'] = np.bincount(rows['slice'],
                                                  minlength=num_slices).tolist()
  out['router_agreement'] = float(np.mean(rows['slice'][chooses_B] == best_B[chooses_B]))
  out['by_label_slices'] = {label_names[label]: e
                            for label, e in out.pop('by_label_subsets').items()}
  if whole_B is not None:
    tokens = max(float(score_BxL.sum()), 1.0)
    whole_ce_BxL = ce_ExBxL[whole_B, np.arange(whole_B.size)]
    out['whole'] = float((whole_ce_BxL * score_BxL).sum()) / tokens
  if prefix_routes:
    out['by_prefix'] = []
    for prefix, route_B in sorted(prefix_routes.items()):
      after_BxL = score_after_prefix(score_BxL, prefix)
      tokens = max(float(after_BxL.sum()), 1.0)
      loss = lambda ce_BxL: float((ce_BxL * after_BxL).sum()) / tokens
      by_B = lambda slice_B: ce_ExBxL[slice_B, np.arange(slice_B.size)]
      out['by_prefix'].append({
          'prefix': prefix, 'score_tokens': int(after_BxL.sum()),
          'agreement': float(np.mean(route_B == whole_B)), 'route': loss(by_B(route_B)),
          'router': loss(router_ce_BxL), 'whole': loss(by_B(whole_B))})
  return out


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _forward(graphdef, state, rows, layer_path, logits_H, k):
  """(ce * weight, weight) per position [B, L] and the open heads [B, N, H]; with
  `layer_path`, that layer runs top-k with weights 1 on a static router with `logits_H`
  (the forced subset)."""
  model = nnx.merge(graphdef, state, copy=True)
  if layer_path is not None:
    attn = dict(attention_layers(model))[layer_path]
    attn.gate_rule, attn.active_heads, attn.gate_options = 'topk', k, ()
    attn.noise, attn.scaled_weights, attn.shared_heads = None, False, 0  # search every unit
    attn.router = StaticRouter(attn.num_units)
    attn.router.logits_H[...] = logits_H
    if not models.reads_slices(model):
      rows = {k: v for k, v in rows.items() if k != 'slice'}   # no slices layer is left
  ce, _, weight, gate_weights_BxNxH = train.task_outputs(model, rows, deterministic=True)
  return ce * weight, weight, gate_weights_BxNxH != 0
