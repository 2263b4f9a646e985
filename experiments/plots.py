"""PNG plots of a run folder or a sweep folder: python -m experiments.plots DIR [DIR ...]

For a run (a folder with metrics.jsonl) it writes into DIR/plots/:
  training_curves.png   train loss and task loss per step, validation loss and accuracy
                        (the final evaluation of the whole split as a point of its own)
  routing_diversity.png how the gate spreads its choices, per layer: the mean active heads
                        per sequence over training (for a fixed-count rule such as top-k,
                        whose count is K by construction: the label divergence instead,
                        how differently tasks or domains route) and the usage entropy (how
                        evenly the heads are used); both measures are defined on the figure
  usage_heatmap.png     per-layer x per-head usage at the last validation evaluation
                        (fraction of sequences that run each head)
  usage_by_label.png    the same heatmap split by task (synthetic) or domain (text), with
                        each label's validation accuracy

For a sweep (a folder with sweep.json and results.csv, see experiments/sweep.py) it writes
into DIR/plots/:
  pareto.png            test (or validation) quality (accuracy for synthetic data, bits per token for text)
                        vs the active-head fraction, one line per gate rule over K, error
                        bars = std over seeds; dense as a point and a dashed reference
  pareto_flops.png      the same against XLA's FLOPs per token of the eval forward
  per_label.png         the quality of every task (synthetic) or domain (text) vs the
                        active-head fraction, one panel per label

python -m experiments.plots --together OUT DIR [DIR ...] draws these three plots for the
rows of several sweeps at once (one study split over sweeps, same split and data) into OUT/.

python -m experiments.plots --budgets OUT [--reference POINT] DIR [DIR ...] reads sweeps of
one study at several token budgets (the same points, other steps; same split and data)
and writes into OUT/ (each DIR a sweep folder or a sweep's report table: the results.csv
that `experiments.sweep --report` writes, such as a copy kept in docs/results/):
  budgets.png           test (or validation) loss for text, accuracy for synthetic data, vs
                        the training tokens, one line per point, error bars = std over
                        seeds; with --reference, a second panel: each point's mean relative
                        to the reference point's at the same budget, in percent (where a
                        line crosses zero, the point overtakes the reference)
  budgets.md            the same figures as a table: one row per point, one column per
                        budget, mean ± std over seeds and the difference to the reference
  curves.png, curves.md with --reference, for text, where the sweeps hold their points' run
                        folders (a report table holds none): inside each budget's runs,
                        every point's periodic
                        validation loss (the fixed subset it evaluates every eval_every
                        steps) against the reference's of the same seed, 100 (loss /
                        reference's - 1), the mean over the seeds both finished, at each
                        evaluated step
"""

from __future__ import annotations

import argparse
import collections
import json
import textwrap
import os

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def read_metrics(run_dir: str, need_train: bool = True) -> tuple[list[dict], list[dict]]:
  """(train lines, eval lines) of a run's metrics.jsonl; ValueError where it holds no
  training step, unless need_train is False (a kept record holds its eval lines only,
  gating/study/records.py)."""
  from gating.training.metrics_file import read_metrics as read_records
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no metrics.jsonl in {run_dir}')
  train, evals = [], []
  for record in read_records(path):   # a run killed or still running: its last line cut
    (evals if record.get('kind') == 'eval' else train).append(record)
  if need_train and not train:
    raise ValueError(f'{path} holds no training steps')
  return train, evals


def _config(run_dir: str) -> dict | None:
  try:
    return json.load(open(os.path.join(run_dir, 'config.json')))
  except (OSError, json.JSONDecodeError):
    return None


def _title(run_dir: str) -> str:
  cfg = _config(run_dir)
  try:
    m = cfg['model']
    return (f"{os.path.basename(os.path.normpath(run_dir))}: {m['gate']} K={m['active_heads']} "
            f"of H={m['num_heads']}, {m['num_layers']} layers, D={m['features']}")
  except (TypeError, KeyError):
    return os.path.basename(os.path.normpath(run_dir))


def _fixed_count(run_dir: str) -> bool:
  """True when the run's rule opens a fixed number of heads (top-k): its active-head
  count is K by construction and says nothing."""
  from gating.layers.selection import RULES
  cfg = _config(run_dir)
  try:
    rule = RULES.get(cfg['model']['gate'])
  except (TypeError, KeyError):
    return False
  return rule is not None and rule.budget in ('required', 'none')


def _smooth(values, window: int):
  """Moving average over `window` steps (the train curves are noisy per batch)."""
  values = np.asarray(values, float)
  if window <= 1 or len(values) < window:
    return values
  kernel = np.ones(window) / window
  head = np.cumsum(values[:window - 1]) / np.arange(1, window)
  return np.concatenate([head, np.convolve(values, kernel, mode='valid')])


def plot_training_curves(run_dir, train, evals, out):
  plt = _pyplot()
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  steps = [r['step'] for r in train]
  window = max(1, len(train) // 50)
  total = np.asarray([r['loss'] for r in train], float)
  task = np.asarray([r['task_loss'] for r in train], float)
  ax_loss.plot(steps, task, lw=0.5, alpha=0.25, color='C0')
  ax_loss.plot(steps, _smooth(task, window), lw=1.2, color='C0',
               label=f'train task loss ({window}-step mean)')
  if np.abs(total - task).max() > 1e-6:
    ax_loss.plot(steps, _smooth(total, window), lw=1.2, color='C1',
                 label='train total loss (task + regularizers)')
    loss_title = 'loss'
  else:
    loss_title = 'loss (total = task: no regularizer is on)'
  # A router fit (loss.router_labels) trains on labels, not targets: its recall instead.
  key, name = (('accuracy', 'train accuracy') if 'accuracy' in train[0] else
               ('router/recall', "train: router's recall of the labels' top-K"))
  accuracy = [r[key] for r in train]
  ax_acc.plot(steps, accuracy, lw=0.5, alpha=0.2, color='C0')
  ax_acc.plot(steps, _smooth(accuracy, window), lw=1.2, color='C0',
              label=f'{name} ({window}-step mean)')
  periodic, final = validation_records(evals)
  if periodic:
    style = dict(marker='o', ms=6, lw=2, color='C3', mec='k', zorder=5)
    ax_loss.plot([r['step'] for r in periodic], [r['loss'] for r in periodic],
                 label='validation loss', **style)
    ax_acc.plot([r['step'] for r in periodic], [r['accuracy'] for r in periodic],
                label='validation accuracy', **style)
  if final:   # another sample (the whole split): a point of its own, not the line's end
    style = dict(marker='*', ms=13, ls='none', color='C2', mec='k', zorder=6)
    ax_loss.plot([r['step'] for r in final], [r['loss'] for r in final],
                 label='final validation loss (whole split)', **style)
    ax_acc.plot([r['step'] for r in final], [r['accuracy'] for r in final],
                label='final validation accuracy (whole split)', **style)
  ax_loss.set(xlabel='step', ylabel='cross-entropy (nats per target token)', title=loss_title)
  ax_acc.set(xlabel='step', ylabel='next-token accuracy on targets', title='accuracy',
             ylim=(0, 1.02))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(_title(run_dir))
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def usage_entropy(usage_NxH) -> np.ndarray:
  """Per layer, the entropy of the head-usage distribution over heads, divided by log H:
  1 when every head is used equally often, log(K)/log(H) when the same K heads run for
  every sequence (routing collapsed onto a static subset)."""
  usage = np.asarray(usage_NxH, float)
  p = usage / np.maximum(usage.sum(axis=1, keepdims=True), 1e-12)
  entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
  return entropy / np.log(usage.shape[1])


def label_divergence(per_label) -> np.ndarray | None:
  """Per layer, the mean over pairs of labels (tasks or domains) of half the L1 distance
  between their head-usage vectors, divided by the mean active heads: 0 when every label
  runs the same heads, 1 when any two labels share none."""
  usages = [np.asarray(b['usage'], float) for b in per_label.values()
            if b.get('usage') is not None]
  if len(usages) < 2:
    return None
  active = np.mean([u.sum(axis=1) for u in usages], axis=0)
  pairs = [np.abs(a - b).sum(axis=1) / 2 for i, a in enumerate(usages) for b in usages[i + 1:]]
  return np.mean(pairs, axis=0) / np.maximum(active, 1e-12)


DEFINITIONS = (
    'usage entropy: per layer, the entropy of the heads\' usage (the fraction of sequences '
    'that run each head, normalized to sum to 1) / log H; 1 = every head used equally '
    'often, log K / log H = the same K heads for every sequence.',
    'label divergence: per layer, the mean over pairs of labels (tasks or domains) of half '
    'the L1 distance between their head-usage vectors / the mean active heads; 0 = every '
    'label runs the same heads, 1 = no two labels share a head.')


def plot_routing_diversity(run_dir, train, evals, out):
  """How the gate spreads its choices: active heads per sequence over training; for a
  rule whose count is fixed (top-k) the count is K by construction, so the plot shows
  what moves instead: how evenly the heads are used (`usage_entropy`) and how differently
  tasks or domains route (`label_divergence`), at every validation evaluation. The two
  measures are defined under the panels."""
  plt = _pyplot()
  val = [r for r in evals if r.get('split') == 'validation' and r.get('usage') is not None]
  fixed = _fixed_count(run_dir)
  fig, (ax_left, ax_right) = plt.subplots(1, 2, figsize=(11, 4))
  if fixed:
    divergence = [(r['step'], label_divergence(r.get('per_label', {}))) for r in val]
    divergence = [(s, d) for s, d in divergence if d is not None]
    if divergence:
      d_SxN = np.asarray([d for _, d in divergence])
      for layer in range(d_SxN.shape[1]):
        ax_left.plot([s for s, _ in divergence], d_SxN[:, layer], 'o-', label=f'layer {layer}')
    ax_left.set(xlabel='step', ylim=(0, 1.02),
                ylabel='label divergence (0: same heads for all)',
                title='how differently labels route (validation)')
  else:
    active = np.asarray([r['active_heads'] for r in train])  # [steps, layers]
    steps = [r['step'] for r in train]
    for layer in range(active.shape[1]):
      ax_left.plot(steps, active[:, layer], lw=1, label=f'layer {layer}')
    if train[-1].get('K') is not None:
      ks = [r['K'] if isinstance(r['K'], (int, float)) else np.mean(r['K']) for r in train]
      ax_left.plot(steps, ks, 'k--', lw=1, label='budget K')
    ax_left.set(xlabel='step', ylabel='active heads per sequence (mean over the batch)',
                title='active heads over training (train batches)', ylim=(0, None))
  if val:
    e_SxN = np.asarray([usage_entropy(r['usage']) for r in val])
    for layer in range(e_SxN.shape[1]):
      ax_right.plot([r['step'] for r in val], e_SxN[:, layer], 'o-', label=f'layer {layer}')
  ax_right.set(xlabel='step', ylabel='usage entropy / log H', ylim=(0, 1.02),
               title='how evenly heads are used (validation)')
  for ax in (ax_left, ax_right):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  note = ' (top-k: K heads per sequence by construction)' if fixed else ''
  fig.suptitle(_title(run_dir) + note, fontsize=9)
  shown = DEFINITIONS if fixed else DEFINITIONS[:1]
  fig.text(0.01, 0.01, '\n'.join(textwrap.fill(d, 150) for d in shown), fontsize=7,
           va='bottom')
  fig.tight_layout(rect=(0, 0.05 * len(shown) + 0.03, 1, 1))
  fig.savefig(out, dpi=110)
  plt.close(fig)


def _heatmap(ax, usage_NxH, title, unit='head'):
  image = ax.imshow(np.asarray(usage_NxH, float), vmin=0, vmax=1, cmap='viridis', aspect='auto')
  ax.set(xlabel=unit, ylabel='layer', title=title)
  ax.set_xticks(range(np.shape(usage_NxH)[1]))
  ax.set_yticks(range(np.shape(usage_NxH)[0]))
  return image


def plot_usage(run_dir, evals, out_all, out_by_label):
  plt = _pyplot()
  val = [r for r in evals if r.get('split') == 'validation' and r.get('usage') is not None]
  if not val:
    return []
  last = val[-1]
  groups = last.get('group_usage')     # MLP channel groups, beside the heads
  fig, axes = plt.subplots(1, 2 if groups else 1, figsize=(11 if groups else 6, 3.5),
                           squeeze=False, layout='constrained')
  image = _heatmap(axes[0, 0], last['usage'], f"head usage, validation split, step "
                                               f"{last['step']} ({last['path']} path)")
  if groups:
    _heatmap(axes[0, 1], groups, 'MLP channel-group usage', unit='channel group')
  fig.colorbar(image, ax=axes[0].tolist(), label='fraction of sequences using the unit')
  fig.suptitle(_title(run_dir), fontsize=9)
  fig.savefig(out_all, dpi=110)
  plt.close(fig)
  labels = {k: v for k, v in last.get('per_label', {}).items() if v.get('usage') is not None}
  if not labels:
    return [out_all]
  cols = min(4, len(labels))
  rows = int(np.ceil(len(labels) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False,
                           layout='constrained')
  for ax, (name, block) in zip(axes.flat, labels.items()):
    image = _heatmap(ax, block['usage'], f"{name} (val. accuracy {block['accuracy']:.2f})")
  for ax in list(axes.flat)[len(labels):]:
    ax.axis('off')
  fig.colorbar(image, ax=axes, label='fraction of sequences using the head', shrink=0.8)
  fig.suptitle(f"head usage by label, validation split, step {last['step']}: "
               f"{_title(run_dir)}", fontsize=9)
  fig.savefig(out_by_label, dpi=110, bbox_inches='tight')
  plt.close(fig)
  return [out_all, out_by_label]


def plot_run(run_dir: str) -> list[str]:
  """Writes the run's plots into run_dir/plots and returns their paths."""
  train, evals = read_metrics(run_dir)
  out = os.path.join(run_dir, 'plots')
  os.makedirs(out, exist_ok=True)
  written = [os.path.join(out, 'training_curves.png'),
             os.path.join(out, 'routing_diversity.png')]
  plot_training_curves(run_dir, train, evals, written[0])
  plot_routing_diversity(run_dir, train, evals, written[1])
  written += plot_usage(run_dir, evals, os.path.join(out, 'usage_heatmap.png'),
                        os.path.join(out, 'usage_by_label.png'))
  return written


# -- sweeps --------------------------------------------------------------------------------------

def _quality(text: bool, prefix: str = 'test_'):
  if text:
    return prefix + 'bits_per_token', 'bits per token (lower is better)'
  return prefix + 'accuracy', 'accuracy on target tokens (higher is better)'


def _pareto_lines(groups, x_key, y_key) -> dict[tuple, list[dict]]:
  """The lines of a quality plot: one per (rule, regularizer) over its budgets (K, Kf);
  where two of a line's points share a budget (they differ in another setting, e.g. the
  slices' assigners), each of its points is a line of its own, keyed by its name too."""
  lines = {}
  for g in groups:
    if g.get(x_key) is not None and g.get(y_key) is not None:
      lines.setdefault((g['rule'], g['regularizer']), []).append(g)
  out = {}
  for key, members in lines.items():
    budgets = [(g['K'], g.get('Kf')) for g in members]
    if len(set(budgets)) == len(budgets):
      out[key] = members
    else:
      out.update({key + (g['point'],): [g] for g in members})
  return out


def _pareto(ax, groups, x_key, y_key):
  """One line per (rule, regularizer) over K (`_pareto_lines`), error bars over seeds;
  dense as a reference."""
  from gating.layers.selection import RULES
  from gating.study.results import rule_label
  for (rule, regularizer, *point), members in _pareto_lines(groups, x_key, y_key).items():
    members.sort(key=lambda g: g[x_key][0])
    xs = [g[x_key][0] for g in members]
    ys = [g[y_key][0] for g in members]
    label = rule_label(rule) + ('' if regularizer == 'none' else f' ({regularizer})')
    label += f' [{point[0]}]' if point else ''
    fewest, most = min(g['seeds'] for g in members), max(g['seeds'] for g in members)
    label += (f', {most} seed{"s" if most > 1 else ""}' if fewest == most else
              f', {fewest}-{most} seeds')
    reference = rule in RULES and RULES[rule].budget == 'none'   # dense: every head open
    if reference:
      line = ax.errorbar(xs, ys, xerr=[g[x_key][1] for g in members],
                         yerr=[g[y_key][1] for g in members], fmt='k*', ms=12, capsize=3,
                         label=label)
      ax.axhline(ys[0], color='k', ls='--', lw=0.8, alpha=0.6)
    else:
      line = ax.errorbar(xs, ys, xerr=[g[x_key][1] for g in members],
                         yerr=[g[y_key][1] for g in members], fmt='o-', capsize=3, label=label)
    for g, x, y in zip(members, xs, ys):
      if not reference:
        name = f"K={g['K']}" + (f", Kf={g['Kf']}" if g.get('Kf') is not None else '')
        ax.annotate(name, (x, y), textcoords='offset points', xytext=(4, 4),
                    fontsize=7, color=line[0].get_color())
  ax.grid(alpha=0.3)


def is_report(path: str) -> bool:
  """Whether `path` is a sweep's report table (a .csv file) rather than its folder."""
  return path.endswith('.csv') and os.path.isfile(path)


def _sweep_name(sweep_dir: str) -> str:
  if is_report(sweep_dir):   # results.csv is named by its folder; a kept copy by itself
    name = os.path.basename(sweep_dir)[:-len('.csv')]
    return name if name != 'results' else os.path.basename(os.path.dirname(
        os.path.abspath(sweep_dir)))
  try:
    return json.load(open(os.path.join(sweep_dir, 'sweep.json')))['sweep']
  except (OSError, KeyError, json.JSONDecodeError):
    return os.path.basename(os.path.normpath(sweep_dir))


def plot_sweep(sweep_dir: str) -> list[str]:
  """Writes the sweep's plots (see the module docstring) into sweep_dir/plots."""
  return plot_sweeps([sweep_dir], os.path.join(sweep_dir, 'plots'))


def sweep_rows(sweep_dir: str) -> list[dict]:
  """The rows of a sweep's results.csv (FileNotFoundError, saying how to make it, if absent);
  `sweep_dir` may also be the report table itself."""
  from gating.study import results
  if is_report(sweep_dir):
    return results.read_csv(sweep_dir)
  path = os.path.join(sweep_dir, 'results.csv')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no results.csv in {sweep_dir}: run python -m experiments.sweep '
                            'first, it writes the results at the end (--report: so far)')
  return results.read_csv(path)


def plot_sweeps(sweep_dirs: list[str], out: str) -> list[str]:
  """The sweep plots of several sweeps' rows drawn together into out/: one study whose rows
  come from more than one sweep (say dense, static and top-k from one, the recipes from
  another). The sweeps must report the same split and the same kind of data."""
  from gating.study import results
  rows_per_sweep = [sweep_rows(sweep_dir) for sweep_dir in sweep_dirs]
  splits = {results.split_of(sweep_rows) for sweep_rows in rows_per_sweep}
  if len(splits) > 1:
    raise ValueError(f'the sweeps report different splits ({", ".join(sorted(splits))}): '
                     'plot each on its own')
  rows = [r for sweep_rows in rows_per_sweep for r in sweep_rows]
  kinds = {r['data'] for r in rows if r.get('data')}
  if len(sweep_dirs) > 1 and len(kinds) > 1:   # (one sweep's rows are drawn as they are)
    raise ValueError(f'the sweeps hold different data ({", ".join(sorted(kinds))}): '
                     'plot each on its own')
  runs = collections.Counter(tuple(r.get(k) for k in results.GROUP + ('seed',)) for r in rows
                             if r.get('status') == 'done')
  twice = [key for key, count in runs.items() if count > 1]
  if twice:
    raise ValueError(f'run {twice[0][0]!r} ({len(twice)} run(s) in all) is in two of the '
                     'sweeps: each would count twice')
  groups = results.aggregate(rows)
  mixed = [g['point'] for g in groups if g.get('steps') and g['steps'][1] > 0]
  if mixed:
    raise ValueError(f'point {mixed[0]!r} has runs of different step counts across the '
                     'sweeps: --together draws one budget (--budgets draws several)')
  split = splits.pop()
  if not groups:
    return []
  os.makedirs(out, exist_ok=True)
  name = ' + '.join(_sweep_name(d) for d in sweep_dirs)
  text = groups[0]['data'] == 'text'
  y_key, y_label = _quality(text, f'{split}_')
  seeds = max(g['seeds'] for g in groups)
  subtitle = (f'{split} split, gathered path at each K; mean ± std over up to {seeds} '
              f'seed{"s" if seeds > 1 else ""}')
  plt = _pyplot()
  written = []
  for x_key, x_label, file in (
      ('active_fraction', 'active-head fraction (heads with a non-zero gate / H, mean '
                          'over layers and sequences)', 'pareto.png'),
      ('flops_per_token', "FLOPs per token of the eval forward (XLA cost analysis)",
       'pareto_flops.png')):
    fig, ax = plt.subplots(figsize=(7.5, 5))
    _pareto(ax, groups, x_key, y_key)
    versus = 'active heads' if x_key == 'active_fraction' else 'compute'
    ax.set(xlabel=x_label, ylabel=f'{split} {y_label}', title=f'{name}: quality vs {versus}')
    if x_key == 'active_fraction':
      ax.set_xlim(0, 1.05)
    ax.legend(fontsize=8)
    fig.text(0.5, 0.005, subtitle, ha='center', fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    written.append(os.path.join(out, file))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
  prefix = 'bits_per_token/' if text else 'accuracy/'
  labels = results.label_columns(groups, prefix)
  if labels:
    cols = min(4, len(labels))
    rows = int(np.ceil(len(labels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
      _pareto(ax, groups, 'active_fraction', prefix + label)
      ax.set(title=label, xlim=(0, 1.05), xlabel='active-head fraction')
    for ax in list(axes.flat)[len(labels):]:
      ax.axis('off')
    for ax in axes[:, 0]:
      ax.set_ylabel('bits per token' if text else 'accuracy')
    legend = {}   # every panel's lines: a rule may be missing from the first label's panel
    for ax in axes.flat:
      for handle, line_name in zip(*ax.get_legend_handles_labels()):
        legend.setdefault(line_name, handle)
    handles, names = list(legend.values()), list(legend)
    fig.legend(handles, names, loc='lower center', ncol=min(4, len(names)), fontsize=8)
    fig.suptitle(f'{name}: {split} {y_label} per {"domain" if text else "task"} vs '
                 f'active-head fraction ({subtitle})', fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    written.append(os.path.join(out, 'per_label.png'))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
  return written


def budget_groups(sweep_dirs: list[str]) -> tuple[list[dict], str, bool]:
  """(every point of every sweep aggregated over its seeds, sorted by its training tokens;
  the split; whether the data is text). The sweeps must report the same split and data,
  and a point may appear once per budget."""
  from gating.study import results
  groups, seen = [], set()
  for sweep_dir in sweep_dirs:
    rows = sweep_rows(sweep_dir)
    for g in results.aggregate(rows):
      key = (g['point'], g['tokens_seen'][0])
      if key in seen:
        raise ValueError(f"point {g['point']!r} at {g['tokens_seen'][0]:.0f} tokens appears "
                         'in two of the sweeps: give one sweep per budget')
      seen.add(key)
      groups.append({**g, 'sweep': _sweep_name(sweep_dir), 'split': results.split_of(rows)})
  splits = {g['split'] for g in groups}
  kinds = {g['data'] for g in groups}
  if len(splits) > 1 or len(kinds) > 1:
    raise ValueError(f'the sweeps report different splits or data ({", ".join(sorted(splits))}; '
                     f'{", ".join(sorted(kinds))}): one study, one split, one kind of data')
  if not groups:
    raise ValueError('the sweeps hold no finished point')
  return sorted(groups, key=lambda g: g['tokens_seen'][0]), splits.pop(), kinds.pop() == 'text'


def relative_to(groups: list[dict], reference: str, y_key: str) -> dict[tuple[str, float], float]:
  """{(point, tokens): 100 (mean - reference's mean) / reference's mean} wherever the
  reference point finished at the same budget."""
  ref = {g['tokens_seen'][0]: g[y_key][0] for g in groups if g['point'] == reference}
  return {(g['point'], g['tokens_seen'][0]): 100 * (g[y_key][0] - ref[g['tokens_seen'][0]])
          / ref[g['tokens_seen'][0]] for g in groups if g['tokens_seen'][0] in ref}


def plot_budgets(sweep_dirs: list[str], out: str, reference: str | None = None) -> list[str]:
  """budgets.png and budgets.md (module docstring) of sweeps at several token budgets."""
  groups, split, text = budget_groups(sweep_dirs)
  y_key = f'{split}_loss' if text else f'{split}_accuracy'
  y_label = 'loss, nats per token (lower is better)' if text else 'accuracy (higher is better)'
  points = list(dict.fromkeys(g['point'] for g in groups))
  if reference is not None and reference not in points:
    raise ValueError(f'--reference {reference!r} is no point of these sweeps; the points: '
                     f'{", ".join(points)}')
  relative = relative_to(groups, reference, y_key) if reference else {}
  budgets = sorted({g['tokens_seen'][0] for g in groups})
  os.makedirs(out, exist_ok=True)
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2 if reference else 1, figsize=(13 if reference else 7.5, 5),
                           squeeze=False)
  for point in points:
    members = [g for g in groups if g['point'] == point and g.get(y_key)]
    seeds = '/'.join(str(g['seeds']) for g in members)
    line = axes[0, 0].errorbar([g['tokens_seen'][0] for g in members],
                               [g[y_key][0] for g in members],
                               yerr=[g[y_key][1] for g in members], fmt='o-', capsize=3,
                               label=f'{point} ({seeds} seeds)')
    if reference:
      kept = [g for g in members if (point, g['tokens_seen'][0]) in relative]
      axes[0, 1].plot([g['tokens_seen'][0] for g in kept],
                      [relative[(point, g['tokens_seen'][0])] for g in kept], 'o-',
                      color=line[0].get_color(), label=point)
  axes[0, 0].set(xscale='log', xlabel='training tokens', ylabel=f'{split} {y_label}',
                 title='quality vs training tokens')
  axes[0, 0].legend(fontsize=7)
  if reference:
    axes[0, 1].axhline(0, color='k', ls='--', lw=0.8)
    axes[0, 1].set(xscale='log', xlabel='training tokens',
                   ylabel=f'% of {reference} at the same budget',
                   title=f'against {reference} (below 0: better)' if text else
                   f'against {reference} (above 0: better)')
  for ax in axes.flat:
    ax.minorticks_off()   # only the budgets are labelled on the log axis
    ax.set_xticks(budgets, [f'{b / 1e6:.1f}M' for b in budgets])
    ax.margins(x=0.08)
    ax.grid(alpha=0.3)
  name = ' + '.join(_sweep_name(d) for d in sweep_dirs)
  fig.suptitle(f'{name}: {split} split, mean ± std over seeds', fontsize=9)
  fig.tight_layout()
  written = [os.path.join(out, 'budgets.png')]
  fig.savefig(written[0], dpi=110)
  plt.close(fig)
  header = ['point', *(f'{b / 1e6:.1f}M tokens' for b in budgets)]
  lines = [f'# {name}: {split} {y_label} by training tokens (mean ± std over seeds'
           + (f'; in brackets, against {reference})' if reference else ')'), '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  by = {(g['point'], g['tokens_seen'][0]): g for g in groups}
  for point in points:
    cells = []
    for b in budgets:
      g = by.get((point, b))
      if g is None or not g.get(y_key):
        cells.append('')
        continue
      cell = f'{g[y_key][0]:.4f} ± {g[y_key][1]:.4f} ({g["seeds"]})'
      if (point, b) in relative and point != reference:
        cell += f' [{relative[(point, b)]:+.1f}%]'
      cells.append(cell)
    lines.append('| ' + ' | '.join([point, *cells]) + ' |')
  written.append(os.path.join(out, 'budgets.md'))
  with open(written[1], 'w') as f:
    f.write('\n'.join(lines) + '\n')
  if reference and text:
    written += plot_curves(sweep_dirs, out, reference)
  return written


def validation_records(evals: list[dict]) -> tuple[list[dict], list[dict]]:
  """(periodic, final): a run's validation records split into its periodic evaluations,
  on the subset its first validation evaluated, and its final evaluation of the whole
  split (marked 'final' by the train loop; in runs written before the mark, a record on
  another number of sequences than the first)."""
  val = [r for r in evals if r.get('split') == 'validation']
  periodic, final = [], []
  for r in val:
    is_final = r.get('final') or r.get('sequences') != val[0].get('sequences')
    (final if is_final else periodic).append(r)
  return periodic, final


def periodic_validation(run_dir: str) -> dict[int, float]:
  """{step: validation loss} of a run's periodic evaluations (`validation_records`; the
  final evaluation of the whole split is left out)."""
  _, evals = read_metrics(run_dir, need_train=False)
  curve: dict[int, float] = {}
  for r in validation_records(evals)[0]:
    curve.setdefault(r['step'], r['loss'])
  return curve


def relative_curves(sweep_dir: str, reference: str) -> dict[str, dict[int, float]]:
  """{point: {step: 100 (loss / reference's - 1)}} inside one sweep's runs, each seed
  against the reference of the same seed, the mean over the seeds both finished; points
  (and seeds) without a metrics.jsonl in the sweep folder are left out."""
  from gating.study import results
  curves: dict[str, dict[int, dict[int, float]]] = {}   # point -> seed -> curve
  for row in sweep_rows(sweep_dir):
    run_dir = os.path.join(sweep_dir, row['point'])
    if row.get('status') == 'done' and os.path.exists(os.path.join(run_dir, 'metrics.jsonl')):
      curves.setdefault(results.point_of(row['point']), {})[row['seed']] = \
          periodic_validation(run_dir)
  ref = curves.get(reference, {})
  relative = {}
  for point, by_seed in curves.items():
    per_step: dict[int, list[float]] = {}
    for seed, curve in by_seed.items():
      for step, loss in curve.items():
        if step in ref.get(seed, {}):
          per_step.setdefault(step, []).append(100 * (loss / ref[seed][step] - 1))
    if per_step:
      relative[point] = {step: float(np.mean(v)) for step, v in sorted(per_step.items())}
  return relative


def plot_curves(sweep_dirs: list[str], out: str, reference: str) -> list[str]:
  """curves.png and curves.md (module docstring): one panel and one table per sweep whose
  run folders hold the reference and another point; nothing when none does."""
  per_sweep = [(d, relative_curves(d, reference)) for d in sweep_dirs if not is_report(d)]
  per_sweep = [(d, c) for d, c in per_sweep if len(c) > 1]
  if not per_sweep:
    return []
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(per_sweep), figsize=(6.5 * len(per_sweep), 4.5),
                           squeeze=False)
  lines = [f'# validation loss inside the runs against {reference} of the same seed, in % '
           '(mean over seeds; below 0: better)']
  for ax, (sweep_dir, curves) in zip(axes.flat, per_sweep):
    steps = sorted({step for curve in curves.values() for step in curve})
    for point, curve in curves.items():
      ax.plot(list(curve), list(curve.values()), 'o-', ms=3, label=point)
    ax.axhline(0, color='k', ls='--', lw=0.8)
    ax.set(xlabel='step', ylabel=f'% of {reference}, same seed',
           title=f'{_sweep_name(sweep_dir)}: periodic validation loss')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    lines += ['', f'## {_sweep_name(sweep_dir)}', '',
              '| point | ' + ' | '.join(f'step {step}' for step in steps) + ' |',
              '|' + '---|' * (len(steps) + 1)]
    for point, curve in curves.items():
      cells = [f'{curve[step]:+.1f}%' if step in curve else '' for step in steps]
      lines.append('| ' + ' | '.join([point, *cells]) + ' |')
  fig.tight_layout()
  written = [os.path.join(out, 'curves.png'), os.path.join(out, 'curves.md')]
  fig.savefig(written[0], dpi=110)
  plt.close(fig)
  with open(written[1], 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return written


def is_sweep(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, 'sweep.json'))


def plot(directory: str) -> list[str]:
  """plot_sweep for a sweep folder (with sweep.json), plot_run for a run folder."""
  if is_sweep(directory):
    return plot_sweep(directory)
  if os.path.exists(os.path.join(directory, 'metrics.jsonl')):
    return plot_run(directory)
  raise FileNotFoundError(f'{directory} is neither a run folder (no metrics.jsonl) nor a '
                          'sweep folder (no sweep.json)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('dirs', nargs='+',
                      help='run folders (with metrics.jsonl) or sweep folders (with sweep.json)')
  parser.add_argument('--together', metavar='OUT',
                      help='draw the sweep plots of all the given sweep folders together, '
                           'as one study, into the folder OUT')
  parser.add_argument('--budgets', metavar='OUT',
                      help='draw the given sweeps (folders or their report tables, '
                           'results.csv), one study at several token budgets, against their '
                           'training tokens into the folder OUT')
  parser.add_argument('--reference', metavar='POINT',
                      help='with --budgets: the point every other is compared with at each '
                           'budget (e.g. thin_dense)')
  args = parser.parse_args(argv)
  if args.reference and not args.budgets:
    raise SystemExit('error: --reference is for --budgets')
  if args.together and args.budgets:
    raise SystemExit('error: choose --together or --budgets')
  if args.together or args.budgets:
    flag = '--budgets' if args.budgets else '--together'
    from gating.training.folders import check_output_folder
    try:
      check_output_folder(args.budgets or args.together, flag)
      for directory in args.dirs:
        if args.budgets and is_report(directory):
          continue
        if not is_sweep(directory):
          what = ("is neither a sweep folder (no sweep.json) nor a sweep's report table "
                  '(a .csv file)' if args.budgets else
                  'is not a sweep folder (no sweep.json)')
          raise FileNotFoundError(f'{directory} {what}: {flag} draws sweeps only')
      written = (plot_budgets(args.dirs, args.budgets, args.reference) if args.budgets else
                 plot_sweeps(args.dirs, args.together))
      if not written:
        raise ValueError('the sweeps hold no finished point: nothing to draw')
    except (FileNotFoundError, ValueError) as e:
      raise SystemExit(f'error: {e}')
    print('\n'.join(written))
    return
  for directory in args.dirs:
    try:
      written = plot(directory)
      if not written and is_sweep(directory):
        raise ValueError(f'{directory}: the sweep holds no finished point: nothing to draw')
    except (FileNotFoundError, ValueError) as e:
      raise SystemExit(f'error: {e}')
    for path in written:
      print(path)


if __name__ == '__main__':
  main()
