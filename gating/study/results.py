"""Results of a sweep: one row per point (results.csv), mean +- std over seeds (results.md).

A row reads the point's run folder: config.json (rule, K, regularizer, seed), summary.json
(steps, tokens seen; a warm start's steps and tokens are added, as they count toward the
budget), eval.json (test metrics on the gathered path at the point's own K,
the training-gate gap, FLOPs per token; see gating/study/evaluation.py) and wall_time.json
(seconds of the train and eval subprocesses, start-up, compilation, the train script's
own evaluations and plots included, summed over sittings; a sitting killed together with
the sweep process records nothing).
Per-label columns are `accuracy/<label>` and `bits_per_token/<label>` (synthetic tasks or
text domains). Rows of unfinished points carry their status and empty metrics.
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from gating.layers.selection import RULES
from gating.training.config import LossConfig, ModelConfig, TrainConfig, from_dict

_DEFAULT_LOSS = LossConfig()
# Rows of one point (its name without the seed suffix) over seeds are averaged; the other
# keys name the row. Kf: MLP channel groups (or None).
GROUP = ('point', 'data', 'rule', 'regularizer', 'K', 'Kf')


def point_of(run_name: str) -> str:
  """The sweep point a run folder belongs to: 'static_k2_s1' -> 'static_k2'."""
  return re.sub(r'_s\d+$', '', run_name)


def rule_label(rule: str) -> str:
  """A rule's name in tables and plots (its registered label), e.g. 'dynamic top-k'."""
  return RULES[rule].label if rule in RULES else rule


def recipe_rule(cfg: TrainConfig, source: TrainConfig | None = None,
                reference: ModelConfig | None = None) -> str:
  """The row's rule: the gate's name, or for the recipes of elastic training and router
  fitting what was trained, e.g. 'elastic', 'elastic + router fit (grad_x_act, bce)',
  'elastic + static fit (grad_x_act, bce)', '... S=1' with shared heads (' Sf=1' with
  shared MLP groups), 'elastic + topk'
  (routed end to end after an elastic warm start). With MLP groups the gated units follow
  in brackets ('topk [heads + groups]', with ', shared router' when the groups share the
  attention's); a dense model with fewer attention or MLP channels than `reference` (the
  model of the sweep's preset, when given) is 'dense (thin)'."""
  loss = cfg.loss
  if loss.elastic_ks:
    return 'elastic'
  if not loss.router_labels:
    label = cfg.model.gate + _width_label(cfg.model, reference) + _shared_label(cfg.model)
  else:
    kind = 'static' if cfg.model.router == 'input_free' else 'router'
    label = f'{kind} fit ({loss.router_labels}, {loss.router_loss})' + _shared_label(cfg.model)
  return f'elastic + {label}' if source is not None and source.loss.elastic_ks else label


def _shared_label(m) -> str:
  """' S=1' with a shared head, ' Sf=2' with two shared MLP groups, both, or ''."""
  return ''.join(f' {name}={n}' for name, n in (('S', m.shared_heads),
                                                 ('Sf', m.shared_groups)) if n)


def _channels(m) -> tuple[int, int]:
  """(attention channels H x Dh, MLP channels F) of a model config."""
  return (m.head_dim or m.features // m.num_heads) * m.num_heads, m.mlp_features or 4 * m.features


def _width_label(m, reference=None) -> str:
  """' [heads]', ' [groups]', ' [heads + groups]' for a gated model with MLP groups (the
  units that run below their count), ' (thin)' for a dense model narrower than
  `reference` in attention or MLP channels, else ''."""
  if m.gate == 'dense':
    thin = reference is not None and any(
        mine < theirs for mine, theirs in zip(_channels(m), _channels(reference)))
    return ' (thin)' if thin else ''
  if m.mlp_groups is None:
    return ''
  ks = m.active_heads if isinstance(m.active_heads, tuple) else (m.active_heads,)
  kfs = m.active_groups if isinstance(m.active_groups, tuple) else (m.active_groups,)
  units = [name for name, some in (
      ('heads', any(k is not None and k < m.num_heads for k in ks)),
      ('groups', any(kf is not None and kf < m.mlp_groups for kf in kfs))) if some]
  shared = ', shared router' if m.group_router == 'attention' else ''
  return f" [{' + '.join(units) or 'every unit'}{shared}]"


def regularizer_label(loss: LossConfig, k=None, num_heads: int | None = None) -> str:
  """The sparsity terms that are on, e.g. 'target=K/H', 'l0=0.05+balance=0.01', 'none'.

  A Lagrangian target equal to the point's K/H reads 'target=K/H', so one rule with the
  same regularizer over several K is one group of lines (one line in the Pareto plot).
  """
  target = loss.target_fraction
  if target and isinstance(k, int) and num_heads and abs(target * num_heads - k) < 1e-9:
    target = 'K/H'
  terms = [('l0', loss.l0_weight), ('l1', loss.l1_weight), ('target', target),
           ('balance', loss.load_balance_weight), ('z', loss.z_loss_weight)]
  on = [f'{name}={value}' if isinstance(value, str) else f'{name}={value:g}'
        for name, value in terms if value]
  return '+'.join(on) or 'none'


def _k_label(k) -> str | int:
  return '/'.join(str(x) for x in k) if isinstance(k, (list, tuple)) else k


def _read(path):
  """The JSON in `path`, None where it is absent; ValueError naming a file that cannot be
  read (a sweep run again redoes the stage that wrote it: sweep.is_trained, is_evaluated)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f'{path}: not JSON ({e}); run the sweep again to redo the stage '
                       'that wrote it') from None


def scored_path(gate: str) -> str:
  """The path a point's row is read from: the gathered path at its own K, or the masked
  path for a per-token rule, which has no gathered path."""
  return 'masked' if RULES[gate].per_token else 'gathered'


def partial_evaluation(report: dict[str, Any], summary: dict[str, Any],
                       split: str) -> str | None:
  """Why an eval.json does not measure the whole run, or None when it does: it must score
  every row of `split` (its own K's gathered result counts as many sequences as the split
  holds) at the run's final step. Older eval.json files, without 'split_sequences', are
  checked against the final evaluation of summary.json, which read the whole split."""
  if report.get('split', 'test') != split:
    return f"scored the {report.get('split', 'test')} split, not the {split} split"
  final = summary['steps']
  if report.get('step') != final:
    return f"scored at step {report.get('step')} of {final}"
  total = report.get('split_sequences', summary.get(split, {}).get('sequences'))
  own = report.get('own_K')
  path = scored_path(report['gate']) if report.get('gate') in RULES else 'gathered'
  scored = next((r.get('sequences') for r in report.get('results', [])
                 if r.get('path') == path and r.get('K') == own and 'skipped' not in r),
                None)
  if report.get('max_batches') is not None or scored is None or scored != total:
    return f'scored on {scored} of the {total} sequences of the {split} split'
  return None


def warm_source(workdir: str, init_from: str) -> str:
  """The run folder a point started from: `init_from` as its config.json holds it (the
  absolute path the sweep made where it trained), or, where that holds no summary.json
  (the sweep folder moved, or its record was copied to another machine), the folder of
  the same name beside the point, where a sweep keeps its warm starts."""
  if os.path.exists(os.path.join(init_from, 'summary.json')):
    return init_from
  beside = os.path.join(os.path.dirname(os.path.abspath(workdir)),
                        os.path.basename(os.path.normpath(init_from)))
  return beside if os.path.exists(os.path.join(beside, 'summary.json')) else init_from


def point_row(workdir: str, name: str, split: str = 'test',
              reference: ModelConfig | None = None,
              allow_partial: bool = False) -> dict[str, Any]:
  """One results row for the run folder `workdir` of point `name`, its eval.json scored on
  `split` ('test' for a study, 'validation' for tuning): quality columns are named
  f'{split}_loss', f'{split}_accuracy', ... `reference`: the sweep's base model, against
  which a dense model is labelled thin (see `recipe_rule`).

  The row is 'done' (and `aggregate` averages it) only when its eval.json scored the
  whole split at the run's final step (`partial_evaluation`); otherwise its status says
  what it scored, and it is left out of the means. `allow_partial` marks such a row done
  all the same, with the reason in its 'partial' column (the tables show it)."""
  config = _read(os.path.join(workdir, 'config.json'))
  summary = _read(os.path.join(workdir, 'summary.json'))
  report = _read(os.path.join(workdir, 'eval.json'))
  wall = _read(os.path.join(workdir, 'wall_time.json')) or {}
  partial = partial_evaluation(report, summary, split) if summary and report else None
  status = ('trained, not evaluated' if summary and not report else
            'unfinished' if config and not summary else 'not started' if not config else
            'done' if partial is None or allow_partial else f'partial: {partial}')
  row: dict[str, Any] = {'point': name, 'status': status, 'split': split}
  if partial and allow_partial:
    row['partial'] = partial
  if config is None:
    return row
  cfg: TrainConfig = from_dict(config)
  k = cfg.model.num_heads if cfg.model.active_heads is None else cfg.model.active_heads
  init_from = warm_source(workdir, cfg.init_from) if cfg.init_from else None
  warm = _read(os.path.join(init_from, 'summary.json')) if init_from else None
  if init_from and warm is None:
    raise ValueError(f'{workdir} starts from {cfg.init_from}, which holds no summary.json '
                     '(nor does a folder of its name beside the point)')
  warm_steps = warm['steps'] if warm else 0
  source = _read(os.path.join(init_from, 'config.json')) if init_from else None
  rule = recipe_rule(cfg, None if source is None else from_dict(source), reference)
  row.update(data=cfg.data.kind, rule=rule, K=_k_label(k),
             regularizer=regularizer_label(cfg.loss, k, cfg.model.num_heads), seed=cfg.seed,
             steps=cfg.steps + warm_steps, warm_start_steps=warm_steps)
  if summary:
    row['tokens_seen'] = summary['tokens_seen'] + (warm['tokens_seen'] if warm else 0)
    # XLA's count of every step trained, the warm start's included (absent: not counted)
    flops = summary.get('train_flops_with_init' if cfg.init_from else 'train_flops')
    if flops is not None:
      row['train_flops'] = flops
  if report:
    if report['split'] != split:
      raise ValueError(f"{workdir}/eval.json scores the {report['split']} split; these "
                       f'results report the {split} split: evaluate with --split {split}')
    own = report['own_K']
    path = scored_path(cfg.model.gate)
    budgeted = next((r for r in report['results'] if r['path'] == path
                     and r['K'] == own and 'skipped' not in r), None)
    if budgeted is None:
      raise ValueError(f'{workdir}/eval.json has no {path}-path result at the run\'s own '
                       f'K={own}; evaluate with --paths {path} --k {own}')
    gate, gap = report['training_gate'], report['gap']
    row.update({f'{split}_{key}': budgeted[key]
                for key in ('loss', 'accuracy', 'exact_match', 'bits_per_token')})
    if 'active_group_fraction' in budgeted:
      row.update(Kf=_k_label(budgeted['Kf']),
                 active_group_fraction=budgeted['active_group_fraction'])
    row.update(active_fraction=budgeted['active_fraction'],
               flops_per_token=budgeted['flops_per_token'],
               training_gate_loss=gate['loss'], training_gate_accuracy=gate['accuracy'],
               training_gate_active_fraction=gate['active_fraction'],
               gap_loss=gap['loss'], gap_accuracy=gap['accuracy'],
               gap_bits_per_token=gap['bits_per_token'])
    for label, block in budgeted['per_label'].items():
      row[f'accuracy/{label}'] = block['accuracy']
      row[f'bits_per_token/{label}'] = block['bits_per_token']
  for stage in ('train', 'eval'):
    if f'{stage}_s' in wall:
      row[f'{stage}_wall_s'] = wall[f'{stage}_s']
  return row


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  """The rows as CSV; the columns are the union of the rows' keys, in first-seen order."""
  columns: list[str] = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  with open(path + '.tmp', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + '.tmp', path)


def read_csv(path: str) -> list[dict[str, Any]]:
  """results.csv back as rows; numbers become floats (ints where integral), '' is None."""
  def value(text):
    if text == '':
      return None
    try:
      number = float(text)
    except ValueError:
      return text
    return int(number) if number.is_integer() and '.' not in text else number
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  for n, row in enumerate(rows, start=2):   # line 1 is the header
    if None in row or None in row.values():
      raise ValueError(f'{path}: line {n} has {"more" if None in row else "fewer"} fields '
                       'than the header (a cut or damaged table?)')
  return [{k: value(v) for k, v in row.items()} for row in rows]


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Finished rows grouped by point (the run's name without its seed) and (data, rule,
  regularizer, K, Kf), in first-seen order: two points that differ in any other setting
  (steps, data, ...) stay two rows even where their labels agree.

  Every numeric column becomes (mean, std, n): std is the sample standard deviation
  over seeds (ddof=1; 0 for a single seed). Group keys stay as they are; 'seeds' is n.
  """
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    if row.get('status') == 'done':
      key = tuple(point_of(row['point']) if k == 'point' else row.get(k) for k in GROUP)
      groups.setdefault(key, []).append(row)
  out = []
  for key, members in groups.items():
    entry: dict[str, Any] = dict(zip(GROUP, key))
    entry['seeds'] = len(members)
    columns = [c for c in members[0] if c not in GROUP and c not in ('status', 'seed')]
    for column in columns:
      values = [m.get(column) for m in members]
      numbers = [float(v) for v in values if isinstance(v, (int, float))]
      if not numbers or len(numbers) != len(values):
        continue
      std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0
      entry[column] = (float(np.mean(numbers)), std, len(numbers))
    out.append(entry)
  return out


def split_of(rows: Sequence[dict[str, Any]]) -> str:
  """The split the rows report ('test' unless they say otherwise)."""
  return next((r['split'] for r in rows if r.get('split')), 'test')


def _pm(cell, digits=3) -> str:
  if cell is None:
    return '-'
  mean, std, n = cell
  return f'{mean:.{digits}f}' if n == 1 else f'{mean:.{digits}f} ± {std:.{digits}f}'


def _num(cell, fmt) -> str:
  return '-' if cell is None else format(cell[0], fmt)


def label_columns(groups: Sequence[dict[str, Any]], prefix: str) -> list[str]:
  """The labels of the `prefix<label>` columns of any group, in order of first appearance:
  points on other data (other tasks, other domains) add their own labels, not lose them."""
  return list(dict.fromkeys(c[len(prefix):] for g in groups for c in g if c.startswith(prefix)))


def _not_whole(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The table's notes on rows whose evaluation did not score the whole split at the
  run's final step: counted with --allow-partial, or left out of the means."""
  lines = []
  partial = [r for r in rows if r.get('partial') and r.get('status') == 'done']
  if partial:
    lines += ['', 'Not whole (reported with --allow-partial): ' + '; '.join(
        f"{r['point']} {r['partial']}" for r in partial) + '.']
  left_out = [r for r in rows if str(r.get('status', '')).startswith('partial: ')]
  if left_out:
    lines += ['', 'Left out of the means, not whole: ' + '; '.join(
        f"{r['point']} {r['status'][len('partial: '):]}" for r in left_out) + '.']
  return lines


def markdown(rows: Sequence[dict[str, Any]], title: str = '') -> str:
  """A Markdown report: the main table (mean ± std over seeds per rule x K) and a
  per-label table (accuracy per task for synthetic data, bits per token per domain)."""
  groups = aggregate(rows)
  done = sum(r.get('status') == 'done' for r in rows)
  split = split_of(rows)
  lines = [f'# {title}' if title else '# Sweep results', '',
           f'{done} of {len(rows)} points finished. Mean ± sample std over seeds, {split} split, '
           "gathered path at each point's own K (dense: all heads; a per-token rule: the "
           "masked path). Active fraction: mean "
           'fraction of heads with a non-zero gate, over layers and sequences. FLOPs per '
           "token: XLA's cost analysis of the compiled eval step / (B x L); train FLOPs: its "
           'count of the compiled train step times the steps, warm start included. Gap: '
           "gathered top-K minus the masked path with the rule's own gate (gating/study/evaluation.py).", '']
  if not groups:
    return '\n'.join(lines + ['No finished points yet.', *_not_whole(rows), ''])
  text = groups[0]['data'] == 'text'
  quality = ((f'{split}_bits_per_token', 'bits / token') if text else
             (f'{split}_accuracy', 'accuracy'))
  gap = ('gap_bits_per_token', 'gap (bits / token)') if text else ('gap_accuracy',
                                                                  'gap (accuracy)')
  with_groups = any(g.get('Kf') is not None for g in groups)
  header = ['point', 'rule', 'regularizer', 'K', *(['Kf', 'active groups'] if with_groups else []),
            'seeds', 'active fraction', 'FLOPs / token', quality[1], f'{split} loss (nats)']
  if not text:
    header.append('exact match')
  header += [gap[1], 'steps', 'tokens seen', 'train FLOPs', 'train wall (min)']
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for g in groups:
    cells = [g['point'], rule_label(g['rule']), str(g['regularizer']), str(g['K']),
             *([str(g.get('Kf') if g.get('Kf') is not None else '-'),
                _pm(g.get('active_group_fraction'))] if with_groups else []),
             str(g['seeds']), _pm(g.get('active_fraction')),
             _num(g.get('flops_per_token'), ',.0f'), _pm(g.get(quality[0])),
             _pm(g.get(f'{split}_loss'))]
    if not text:
      cells.append(_pm(g.get(f'{split}_exact_match')))
    wall = g.get('train_wall_s')
    cells += [_pm(g.get(gap[0]), 4), _num(g.get('steps'), '.0f'),
              _num(g.get('tokens_seen'), ',.0f'), _num(g.get('train_flops'), '.3g'),
              '-' if wall is None else _pm((wall[0] / 60, wall[1] / 60, wall[2]), 1)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += _not_whole(rows)
  prefix = 'bits_per_token/' if text else 'accuracy/'
  labels = label_columns(groups, prefix)
  if labels:
    lines += ['', f"Per {'domain: bits per token' if text else 'task: accuracy'} "
                  '(mean ± std over seeds).', '',
              '| point | rule | K | ' + ' | '.join(labels) + ' |',
              '|' + '---|' * (len(labels) + 3)]
    for g in groups:
      lines.append(f"| {g['point']} | {rule_label(g['rule'])} ({g['regularizer']}) | "
                   f"{g['K']} | " + ' | '.join(_pm(g.get(prefix + l)) for l in labels) + ' |')
  return '\n'.join(lines) + '\n'
