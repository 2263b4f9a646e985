"""Evaluating a finished (or interrupted) run: reload it, then score it on either compute
path at any budget K.

`load_run(workdir)` rebuilds what a run folder describes: the resolved config
(config.json), the data splits, the model's graphdef and the state restored from the
latest checkpoint. `evaluate_run(run, paths, ks, split)` scores the model on a split for
every (path, K): loss, accuracy, bits per token, exact match, head usage, overall and per
label (task or domain), and XLA's FLOP count of the compiled eval step. A model trained
with a budget K runs at another K without retraining: K is the budget knob.

The training gate. Besides the budgeted evaluations, `evaluate_run` scores the rule's own
gate on the masked path, without a budget, and reports its gap to the gathered path with
the hard top-K budget (the path that saves compute). Per rule, "the rule's own gate" is
its deterministic eval-mode gate (no exploration noise, no hard-concrete sampling):
  dense          every head (no router); the gap is 0 by construction.
  topk           the top-K heads by router logit: top-k has no gate without its budget, so
                 both sides run the same heads and the gap is only the numerical
                 difference of the two compute paths (the DESIGN contract says ~0).
  hard_concrete  every head whose deterministic gate z = clip(sigmoid(log_alpha)
                 (zeta - gamma) + gamma, 0, 1) is > 0 (log_alpha > log(-gamma/zeta) ~ -2.4),
                 per sequence: it may open more or fewer heads than K.
  static         the same as hard_concrete, but the same heads for every sequence.
  sigmoid        every head with sigmoid(logit / t) > threshold.
The gathered side keeps the K open heads of highest score (a sequence with fewer than K
open heads keeps the closed slots at weight 0). So the gap measures what enforcing the
budget costs a model whose training gate was not exactly K-sparse.

FLOPs: `cost_analysis()['flops']` of the compiled eval step (the forward pass of one eval
batch, gate and loss included; XLA counts a multiply-add as 2 FLOPs and does not count
transcendentals), divided by the batch's B x L token positions.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from gating import data
from gating.layers.selection import get_rule
from gating.study.results import scored_path
from gating.training import checkpoint, slices
from gating.training import loop as train
from gating.training.config import PATHS, TrainConfig, override, read_config

SPLITS = ('test', 'validation')



class Run(NamedTuple):
  """A run folder, reloaded: what `evaluate_run` needs."""
  workdir: str
  config: TrainConfig
  splits: data.Splits
  graphdef: Any
  state: Any          # the (Learner, nnx.Optimizer) state restored from the checkpoint
  step: int           # the checkpoint's step


def load_run(workdir: str, step: int | None = None, data_overrides: Sequence[str] = ()) -> Run:
  """Rebuilds the run in `workdir` from its config.json and its latest checkpoint (or the
  checkpoint at `step`, e.g. an intact one when the latest is corrupt).

  `data_overrides` ('data.KEY=VALUE') say where the data is now, e.g. after the run folder
  and its text files moved: data.sources=/new/path. The data must still be the same
  content (its fingerprint without paths), or the checkpoint is refused.

  Raises FileNotFoundError naming the paths it looked at when the folder holds no config
  or no checkpoint, and checkpoint.CheckpointError when the checkpoint is corrupt (naming
  the intact earlier steps) or does not match the config or the data.
  """
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'no run in {workdir}: {config_path} does not exist '
                            '(python -m experiments.train --workdir DIR writes it)')
  cfg = read_config(config_path)
  for assignment in data_overrides:
    if not assignment.strip().startswith('data.'):
      raise ValueError(f'{assignment!r}: only data.* keys can be overridden when loading a '
                       'run (the model is the checkpoint\'s)')
  cfg = override(cfg, list(data_overrides))
  checkpoints = os.path.join(workdir, 'checkpoints')
  mngr = checkpoint.manager(checkpoints) if os.path.isdir(checkpoints) else None
  if mngr is None or mngr.latest_step() is None:
    if mngr is not None:
      mngr.close()
    raise FileNotFoundError(f'no checkpoint in {workdir}: looked for complete orbax step '
                            f'folders in {checkpoints} and found none (was the run '
                            'stopped before its first checkpoint?)')
  try:
    splits = train.load_data(cfg, workdir)
    graphdef, state = train.create(cfg, splits.info)
    step, state, _ = checkpoint.load(
        mngr, state, step=step, where=workdir,
        check=lambda meta: train.check_compatible(meta, cfg, splits.info, workdir))
  finally:
    mngr.close()
  state = train.with_trained_temperature(cfg, graphdef, state, step)
  if slices.is_prefix_loss(cfg.model):   # routed by the restored model's prefix losses
    score = slices.prefix_scorer(graphdef, slices.slice_count(cfg.model))
    splits = slices.route_by_prefix_loss(splits, score, state,
                                         train.gate_prefix_len(cfg.model, splits.info),
                                         cfg.batch_size, whole=True)
  return Run(workdir, cfg, splits, graphdef, state, step)


def calibration_batches(dataset, batch_size: int, batches: int) -> list[dict]:
  """`batches` full batches of `dataset` for measuring unit means: a fixed random sample
  of batches x batch_size of its rows (`data.sample_rows`), in the split's order, not
  its first rows, since a split may be ordered by label (the text splits: python, then
  pydoc, then shakespeare). A split with fewer full batches is a ValueError."""
  if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
    raise ValueError(f'compensate: the number of calibration batches must be an int >= 1, '
                     f'got {batches!r}')
  rows = list(itertools.islice(
      (b for b in data.eval_batches(dataset, batch_size, max_rows=batches * batch_size)
       if len(b['tokens']) == batch_size), batches))
  if len(rows) < batches:
    raise ValueError(f'compensate: the training split has {len(rows)} full batches of '
                     f'{batch_size}, fewer than the {batches} asked for')
  return rows


def compensated(run: Run, batches: int) -> Run:
  """The run with dropped-unit compensation (gating.training.compensation): every gated
  layer's unit means measured with the full model on `batches` full batches of the
  *training* split (never the split it will be scored on), drawn by
  `calibration_batches`."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gating.training import compensation  # pylint: disable=import-outside-toplevel
  rows = calibration_batches(run.splits.train, run.config.batch_size, batches)
  learner, optimizer = nnx.merge(run.graphdef, run.state)
  means = compensation.unit_means(learner.model, [train.model_inputs(b) for b in rows],
                                  train.model_outputs)
  compensation.compensate(learner.model, means)
  graphdef, state = nnx.split((learner, optimizer))
  return run._replace(graphdef=graphdef, state=state)


def own_budget(cfg: TrainConfig):
  """The run's trained budget: model.active_heads (an int, or one K per layer); H if None."""
  m = cfg.model
  return m.num_heads if m.active_heads is None else m.active_heads


def training_gate_budget(cfg: TrainConfig):
  """The K that runs the rule's own gate: H (no budget), or K for top-k (see module doc)."""
  return own_budget(cfg) if get_rule(cfg.model.gate).needs_k else cfg.model.num_heads


def default_ks(cfg: TrainConfig) -> list:
  """Powers of two up to H, H itself, and the run's own K (an int, or one K per layer)."""
  H = cfg.model.num_heads
  ks = sorted({2 ** i for i in range(int(math.log2(H)) + 1)} | {H})
  own = own_budget(cfg)
  return ks if own in ks else ks + [own]


def unsupported(cfg: TrainConfig, path: str, k) -> str | None:
  """Why (path, K) cannot run on this model, or None; a ValueError for a bad path or K."""
  m = cfg.model
  if path not in PATHS:
    raise ValueError(f'path must be one of {PATHS}, got {path!r}')
  ks = k if isinstance(k, tuple) else (k,)
  for one in ks:
    if not isinstance(one, int) or not 1 <= one <= m.num_heads:
      raise ValueError(f'K={k!r}: every K must be an int in [1, num_heads={m.num_heads}]')
  if m.shared_heads and any(one <= m.shared_heads for one in ks):
    return (f'K must exceed the {m.shared_heads} shared heads (K counts them); '
            f'K={k} cannot run')
  if get_rule(m.gate).budget == 'none' and any(one != m.num_heads for one in ks):
    return f'the {m.gate!r} gate opens all {m.num_heads} heads; it runs at K={m.num_heads} only'
  if get_rule(m.gate).per_token and path == 'gathered':
    return f'the {m.gate!r} gate decides per token: it runs on the masked path only'
  if get_rule(m.gate).router == 'assignment' and k != own_budget(cfg):
    return (f'the {m.gate!r} gate runs the slice each sequence was assigned, of the size it '
            f'trained with: K={own_budget(cfg)} only')
  return None


def _first_batch(dataset, batch_size):
  rows = next(data.eval_batches(dataset, batch_size))
  n = len(rows['label'])
  if n < batch_size:
    rows = {k: np.resize(v, (batch_size,) + v.shape[1:]) for k, v in rows.items()}
  return train.model_inputs(rows)


def evaluate_one(run: Run, path: str, k, split: str = 'test',
                 max_batches: int | None = None, groups=None) -> dict[str, Any]:
  """Scores the run on `split` on one path at budget K (an int or one K per layer) and,
  for a model with MLP channel groups, at its own Kf or `groups` (the budget knob Kf).

  Returns train.summarize_eval's block (loss, accuracy, exact_match, bits_per_token,
  sequences, usage [N][H], per_label; group_usage [N][G] with groups) plus path, K,
  active_fraction (the mean fraction of heads with a non-zero weight, over layers and
  sequences), active_heads_per_layer, with groups Kf, active_group_fraction and
  active_groups_per_layer, and flops_per_token (see the module docstring).
  """
  cfg = run.config
  if groups is not None and cfg.model.mlp_groups is None:
    raise ValueError(f'{run.workdir}: the model has no MLP channel groups (model.mlp_groups '
                     'is unset); a groups budget Kf cannot apply')
  if (groups is None and path == 'gathered' and cfg.model.mlp_groups is not None
      and cfg.model.active_groups is None):
    groups = cfg.model.mlp_groups   # no budget (e.g. the dense gate): every group, as K = H
  dataset = getattr(run.splits, split)
  fn = jax.jit(functools.partial(train.eval_step, graphdef=run.graphdef, path=path,
                                 active_heads=k, active_groups=groups))
  batch = _first_batch(dataset, cfg.batch_size)
  compiled = fn.lower(run.state, batch).compile()
  cost = compiled.cost_analysis()
  flops = cost.get('flops') if isinstance(cost, dict) else None
  result = train.evaluate(compiled, run.state, dataset, run.splits.info, cfg.batch_size,
                          max_batches)
  if not math.isfinite(result['loss']):
    raise FloatingPointError(
        f'evaluating {run.workdir} (step {run.step}) on {split}, path {path}, K={k} gave a '
        f'non-finite loss ({result["loss"]}); no result is written')
  usage_NxH = np.asarray(result['usage'])
  if 'group_usage' in result:
    usage_NxG = np.asarray(result['group_usage'])
    own_kf = cfg.model.active_groups
    kf = own_kf if groups is None else groups
    result = {'Kf': list(kf) if isinstance(kf, tuple) else kf,
              'active_group_fraction': float(usage_NxG.mean()),
              'active_groups_per_layer': usage_NxG.sum(axis=1).tolist(), **result}
  return {'path': path, 'K': list(k) if isinstance(k, tuple) else k,
          'active_fraction': float(usage_NxH.mean()),
          'active_heads_per_layer': usage_NxH.sum(axis=1).tolist(),
          'flops_per_token': None if flops is None else flops / batch['tokens'].size,
          **result}


def evaluate_run(run: Run, *, paths: Sequence[str] = PATHS, ks: Sequence | None = None,
                 split: str = 'test', max_batches: int | None = None,
                 groups: int | None = None) -> dict[str, Any]:
  """Every (path, K) of paths x ks (default: default_ks), the training gate and the gap;
  a model with MLP channel groups runs its own Kf everywhere, or `groups`.

  Returns {'workdir', 'step' (the checkpoint's), 'final_step' (the run's steps),
  'split', 'split_sequences' (the split's rows), 'max_batches' (None: every row), 'gate',
  'num_heads', 'own_K', 'results': [one
  evaluate_one block per (path, K), or {'path', 'K', 'skipped': reason}],
  'training_gate': {'meaning', 'path': 'masked', 'K', **evaluate_one block},
  'gap': {'K', 'loss', 'accuracy', 'bits_per_token', 'active_fraction'} (gathered at the
  run's own K minus the training gate)}.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  if max_batches is not None and max_batches < 1:
    raise ValueError(f'max_batches={max_batches} must be at least 1 (None: every row)')
  if not paths or (ks is not None and not ks):   # a report of nothing would replace eval.json
    raise ValueError(f'paths={list(paths)}, ks={ks}: give at least one path of {PATHS} and '
                     'one K (ks=None: the default budgets)')
  cfg = run.config
  G = cfg.model.mlp_groups
  if groups is not None and (G is None or not 1 <= groups <= G):
    raise ValueError(f'groups Kf={groups}: ' + (
        'the model has no MLP channel groups (model.mlp_groups is unset)' if G is None else
        f'must be in [1, mlp_groups={G}]'))
  Sf = cfg.model.shared_groups
  if groups is not None and groups <= Sf:
    raise ValueError(f'groups Kf={groups}: must exceed the {Sf} shared groups (Kf counts '
                     'them)')
  ks = default_ks(cfg) if ks is None else [tuple(k) if isinstance(k, list) else k
                                            for k in ks]
  for path in paths:
    for k in ks:
      unsupported(cfg, path, k)   # bad input fails before any compile
  done: dict[tuple, dict] = {}

  def once(path, k):
    key = (path, json.dumps(k))
    if key not in done:
      done[key] = evaluate_one(run, path, k, split, max_batches, groups)
    return done[key]

  results = []
  for path in paths:
    for k in ks:
      reason = unsupported(cfg, path, k)
      results.append({'path': path, 'K': k, 'skipped': reason} if reason else once(path, k))
  gate = cfg.model.gate
  reference = once('masked', training_gate_budget(cfg))
  own = own_budget(cfg)
  own_json = list(own) if isinstance(own, tuple) else own
  # A per-token gate has no gathered path: its gap is taken on the masked path (0).
  gap_path = scored_path(gate)
  budgeted = once(gap_path, own)
  gap = {'K': own_json, 'path': gap_path, **{name: budgeted[name] - reference[name] for name in
                           ('loss', 'accuracy', 'bits_per_token', 'exact_match',
                            'active_fraction')}}
  return {'workdir': run.workdir, 'step': run.step, 'final_step': cfg.steps, 'split': split,
          'split_sequences': len(getattr(run.splits, split)), 'max_batches': max_batches,
          'gate': gate, 'num_heads': cfg.model.num_heads, 'own_K': own_json,
          'flops_counted_as': 'XLA cost_analysis flops of the compiled eval step / (B*L)',
          'results': results,
          'training_gate': {'meaning': get_rule(gate).meaning, **reference},
          'gap': {'meaning': f'{gap_path} path at the run\'s own K minus the masked path '
                             'with the training gate', **gap}}
