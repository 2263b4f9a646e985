import json

import pytest

from experiments import plots
from gating.study import results
from gating.training.config import ModelConfig, TrainConfig

LABELS = ('python', 'pydoc', 'shakespeare')


def _write_run(run_dir, steps=20, layers=2, heads=4):
  """A run folder by hand: config.json and metrics.jsonl with train and eval lines."""
  cfg = TrainConfig(model=ModelConfig(num_layers=layers, features=32, num_heads=heads,
                                      active_heads=2), steps=steps)
  (run_dir / 'config.json').write_text(cfg.to_json())
  usage = [[1.0, 0.5, 0.5, 0.0]] * layers
  lines = []
  for step in range(1, steps + 1):
    lines.append({'step': step, 'kind': 'train', 'loss': 3.0 - step * 0.05,
                  'task_loss': 2.9 - step * 0.05, 'accuracy': step / (2 * steps),
                  'active_heads': [2.0] * layers, 'K': 2})
    if step % 10 == 0:
      lines.append({'step': step, 'kind': 'eval', 'split': 'validation', 'path': 'gathered',
                    'loss': 2.5, 'accuracy': step / (2 * steps), 'usage': usage,
                    'per_label': {name: {'accuracy': 0.4, 'usage': usage} for name in LABELS}})
  (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))


def test_run_plots_render_from_a_metrics_file(tmp_path):
  _write_run(tmp_path)
  written = plots.plot_run(str(tmp_path))
  names = sorted(p.rsplit('/', 1)[1] for p in written)
  assert names == ['routing_diversity.png', 'training_curves.png', 'usage_by_label.png',
                   'usage_heatmap.png']
  for path in written:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert (tmp_path / 'plots' / path.rsplit('/', 1)[1]).stat().st_size > 1000


def _sweep_rows():
  """results.csv rows of a text sweep: dense, static and topk at K=1, 2, two seeds each."""
  rows = []
  for rule, ks in (('dense', (4,)), ('static', (1, 2)), ('topk', (1, 2))):
    for k in ks:
      for seed in (0, 1):
        bits = 2.0 + (4 - k) * (0.3 if rule == 'static' else 0.1) + 0.01 * seed
        row = {'point': f'{rule}_k{k}_s{seed}', 'status': 'done', 'data': 'text',
               'rule': rule, 'K': k,
               'regularizer': 'target=K/H' if rule == 'static' else 'none',
               'seed': seed, 'steps': 100, 'tokens_seen': 409600,
               'test_loss': bits * 0.693, 'test_accuracy': 0.4, 'test_exact_match': 0.0,
               'test_bits_per_token': bits, 'active_fraction': k / 4,
               'flops_per_token': 1e5 * (1 + k / 4), 'gap_bits_per_token': 0.0,
               'train_wall_s': 60.0}
        row.update({f'bits_per_token/{name}': bits + i for i, name in enumerate(LABELS)})
        row.update({f'accuracy/{name}': 0.4 for name in LABELS})
        rows.append(row)
  rows.append({'point': 'topk_k4_s0', 'status': 'unfinished'})
  return rows


def test_sweep_plots_and_table_render_from_results(tmp_path, capsys):
  rows = _sweep_rows()
  results.write_csv(rows, str(tmp_path / 'results.csv'))
  (tmp_path / 'sweep.json').write_text(json.dumps({'sweep': 'text', 'runs': {}}))
  plots.main([str(tmp_path)])
  printed = capsys.readouterr().out.split()
  for name in ('pareto.png', 'pareto_flops.png', 'per_label.png'):
    assert str(tmp_path / 'plots' / name) in printed
    assert (tmp_path / 'plots' / name).stat().st_size > 1000


def test_a_run_killed_mid_line_still_plots(tmp_path):
  _write_run(tmp_path)
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 21, "kind": "train", "lo')   # killed (or still running) mid-line
  train, evals = plots.read_metrics(str(tmp_path))
  assert [r['step'] for r in train] == list(range(1, 21)) and len(evals) == 2
  assert len(plots.plot_run(str(tmp_path))) == 4


def test_plots_refuses_a_folder_that_is_neither(tmp_path):
  with pytest.raises(SystemExit, match='neither a run folder .* nor a sweep folder'):
    plots.main([str(tmp_path)])


def test_routing_measures_that_move_when_the_count_is_fixed():
  same = {'a': {'usage': [[1.0, 1.0, 0.0, 0.0]]}, 'b': {'usage': [[1.0, 1.0, 0.0, 0.0]]}}
  apart = {'a': {'usage': [[1.0, 1.0, 0.0, 0.0]]}, 'b': {'usage': [[0.0, 0.0, 1.0, 1.0]]}}
  assert plots.label_divergence(same)[0] == pytest.approx(0.0)
  assert plots.label_divergence(apart)[0] == pytest.approx(1.0)
  assert plots.label_divergence({'a': same['a']}) is None
  assert plots.usage_entropy([[0.5, 0.5, 0.5, 0.5]])[0] == pytest.approx(1.0)
  assert plots.usage_entropy([[1.0, 1.0, 0.0, 0.0]])[0] == pytest.approx(0.5)   # log 2 / log 4


def test_the_total_loss_line_is_drawn_only_when_it_differs(tmp_path, monkeypatch):
  _write_run(tmp_path)
  drawn = []
  original = plots._smooth  # pylint: disable=protected-access
  monkeypatch.setattr(plots, '_smooth', lambda v, w: drawn.append(len(v)) or original(v, w))
  train, evals = plots.read_metrics(str(tmp_path))
  plots.plot_training_curves(str(tmp_path), train, evals, str(tmp_path / 'a.png'))
  with_regularizer = len(drawn)
  for r in train:
    r['loss'] = r['task_loss']
  drawn.clear()
  plots.plot_training_curves(str(tmp_path), train, evals, str(tmp_path / 'b.png'))
  assert len(drawn) == with_regularizer - 1


def test_the_final_validation_is_a_point_of_its_own(tmp_path, monkeypatch):
  import matplotlib.axes  # pylint: disable=import-outside-toplevel
  _write_run(tmp_path)                            # periodic validations at steps 10 and 20
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 20, 'kind': 'eval', 'split': 'validation', 'loss': 2.0,
                        'accuracy': 0.6, 'final': True}) + '\n')
  train, evals = plots.read_metrics(str(tmp_path))
  periodic, final = plots.validation_records(evals)
  assert [r['step'] for r in periodic] == [10, 20] and [r['loss'] for r in final] == [2.0]
  assert plots.periodic_validation(str(tmp_path)) == {10: 2.5, 20: 2.5}
  drawn = {}
  original = matplotlib.axes.Axes.plot
  monkeypatch.setattr(matplotlib.axes.Axes, 'plot', lambda ax, x, y, **kw: drawn.setdefault(
      kw.get('label'), (list(x), list(y))) and original(ax, x, y, **kw))
  plots.plot_training_curves(str(tmp_path), train, evals, str(tmp_path / 'a.png'))
  assert drawn['validation loss'] == ([10, 20], [2.5, 2.5])
  assert drawn['final validation loss (whole split)'] == ([20], [2.0])
  # A run written before the mark: its final evaluation is the one on more sequences.
  old = [{'step': s, 'split': 'validation', 'sequences': n, 'loss': 1.0}
         for s, n in ((10, 64), (20, 64), (20, 2000))]
  assert [r['sequences'] for r in plots.validation_records(old)[1]] == [2000]


def _write_sweep(folder, name, rows):
  folder.mkdir()
  results.write_csv(rows, str(folder / 'results.csv'))
  (folder / 'sweep.json').write_text(json.dumps({'sweep': name, 'runs': {}}))


def test_sweeps_drawn_together_plot_the_rows_of_both(tmp_path, monkeypatch, capsys):
  rows = [r for r in _sweep_rows() if r['status'] == 'done']
  _write_sweep(tmp_path / 'a', 'a', [r for r in rows if r['rule'] != 'topk'])
  _write_sweep(tmp_path / 'b', 'b', [r for r in rows if r['rule'] == 'topk'])
  drawn = []
  original = plots._pareto  # pylint: disable=protected-access
  monkeypatch.setattr(plots, '_pareto', lambda ax, groups, x, y: drawn.append(
      sorted({g['rule'] for g in groups})) or original(ax, groups, x, y))
  plots.main(['--together', str(tmp_path / 'both'), str(tmp_path / 'a'), str(tmp_path / 'b')])
  assert drawn[0] == ['dense', 'static', 'topk']
  printed = capsys.readouterr().out.split()
  for name in ('pareto.png', 'pareto_flops.png', 'per_label.png'):
    assert str(tmp_path / 'both' / name) in printed
  assert not (tmp_path / 'a' / 'plots').exists()


def test_sweeps_of_different_splits_or_data_are_not_drawn_together(tmp_path):
  rows = [r for r in _sweep_rows() if r['status'] == 'done']
  _write_sweep(tmp_path / 'a', 'a', [dict(r, split='test') for r in rows])
  _write_sweep(tmp_path / 'b', 'b', [dict(r, split='validation') for r in rows])
  with pytest.raises(SystemExit, match='different splits'):
    plots.main(['--together', str(tmp_path / 'both'), str(tmp_path / 'a'), str(tmp_path / 'b')])
  _write_sweep(tmp_path / 'c', 'c', [dict(r, split='test', data='synthetic') for r in rows])
  with pytest.raises(SystemExit, match='different data'):
    plots.main(['--together', str(tmp_path / 'both'), str(tmp_path / 'a'), str(tmp_path / 'c')])
  with pytest.raises(SystemExit, match='not a sweep folder'):
    plots.main(['--together', str(tmp_path / 'both'), str(tmp_path / 'a'), str(tmp_path)])
  assert not (tmp_path / 'both').exists()
  _write_sweep(tmp_path / 'none', 'none', [])      # no point finished: nothing to draw
  with pytest.raises(SystemExit, match='^error: the sweeps hold no finished point'):
    plots.main(['--together', str(tmp_path / 'both'), str(tmp_path / 'none')])
  assert not (tmp_path / 'both').exists()
  file = tmp_path / 'a' / 'sweep.json'
  with pytest.raises(SystemExit, match=f'^error: --together {file}: exists and is not a '):
    plots.main(['--together', str(file), str(tmp_path / 'a'), str(tmp_path / 'b')])


def test_sweeps_drawn_together_count_each_run_once_and_one_budget(tmp_path):
  """The same run in two sweeps counted twice (its spread shrank), and one point at two
  step counts was averaged into a budget no run had: both refused."""
  rows = [r for r in _sweep_rows() if r['status'] == 'done']
  _write_sweep(tmp_path / 'a', 'a', rows)
  _write_sweep(tmp_path / 'b', 'b', [r for r in rows if r['rule'] == 'dense'])
  with pytest.raises(SystemExit, match="^error: run 'dense_k4_s0' .2 run.s. in all. is in "
                                       'two of the sweeps'):
    plots.main(['--together', str(tmp_path / 'both'), str(tmp_path / 'a'), str(tmp_path / 'b')])
  _write_sweep(tmp_path / 'c', 'c', [dict(r, point=r['point'].replace('_s', '_s2'), seed=2,
                                          steps=1000) for r in rows if r['rule'] == 'dense'])
  with pytest.raises(SystemExit, match="^error: point 'dense_k4' has runs of different step "
                                       'counts across the sweeps'):
    plots.main(['--together', str(tmp_path / 'both'), str(tmp_path / 'a'), str(tmp_path / 'c')])
  assert not (tmp_path / 'both').exists()


def test_points_of_one_rule_at_the_same_budget_are_lines_of_their_own():
  """Three slices assigners at K = 4 were one zig-zag line with one label; one rule's
  points at different K stay one line."""
  group = lambda point, k: {'point': point, 'rule': 'slices', 'regularizer': 'none', 'K': k,
                            'Kf': None, 'seeds': 2, 'x': (k / 8, 0.0), 'y': (1.0, 0.1)}
  same = plots._pareto_lines([group('label', 4), group('cluster', 4)], 'x', 'y')  # pylint: disable=protected-access
  assert sorted(same) == [('slices', 'none', 'cluster'), ('slices', 'none', 'label')]
  over_k = plots._pareto_lines([group('k2', 2), group('k4', 4)], 'x', 'y')  # pylint: disable=protected-access
  assert list(over_k) == [('slices', 'none')] and len(over_k['slices', 'none']) == 2


def test_a_cut_report_table_or_a_sweep_with_nothing_finished_is_one_error_line(tmp_path):
  rows = [r for r in _sweep_rows() if r['status'] == 'done']
  _write_sweep(tmp_path / 'cut', 'cut', rows)
  table = tmp_path / 'cut' / 'results.csv'
  table.write_text(table.read_text()[:-40])     # the last row cut short
  with pytest.raises(ValueError, match=f'{len(rows) + 1} has fewer fields than the header'):
    results.read_csv(str(table))
  with pytest.raises(SystemExit, match='^error: .*fewer fields than the header'):
    plots.main([str(tmp_path / 'cut')])
  _write_sweep(tmp_path / 'none', 'none', [])
  with pytest.raises(SystemExit, match='^error: .*none: the sweep holds no finished point'):
    plots.main([str(tmp_path / 'none')])


def _budget_rows(steps, losses):
  """results.csv rows of one budget: {point: (seed 0's loss, seed 1's)}."""
  return [{'point': f'{point}_s{seed}', 'status': 'done', 'split': 'test', 'data': 'text',
           'rule': 'dense' if point == 'thin' else 'slices', 'K': 4, 'regularizer': 'none',
           'seed': seed, 'steps': steps, 'tokens_seen': steps * 4096, 'test_loss': loss}
          for point, pair in losses.items() for seed, loss in enumerate(pair)]


def test_budgets_draw_each_point_against_the_tokens_and_the_reference(tmp_path, capsys):
  _write_sweep(tmp_path / 'small', 'small', _budget_rows(250, {'thin': (2.0, 2.2),
                                                              'label': (2.2, 2.2)}))
  _write_sweep(tmp_path / 'large', 'large', _budget_rows(2500, {'thin': (1.5, 1.5),
                                                               'label': (1.2, 1.4)}))
  plots.main(['--budgets', str(tmp_path / 'out'), '--reference', 'thin',
              str(tmp_path / 'large'), str(tmp_path / 'small')])
  printed = capsys.readouterr().out.split()
  assert printed == [str(tmp_path / 'out' / 'budgets.png'), str(tmp_path / 'out' / 'budgets.md')]
  assert (tmp_path / 'out' / 'budgets.png').stat().st_size > 1000
  table = (tmp_path / 'out' / 'budgets.md').read_text().splitlines()
  assert table[2] == '| point | 1.0M tokens | 10.2M tokens |'      # budgets in order
  assert table[4] == '| thin | 2.1000 ± 0.1414 (2) | 1.5000 ± 0.0000 (2) |'
  # label: 2.2 against thin's 2.1 (+4.8%), then 1.3 against 1.5 (-13.3%): it crosses over
  assert table[5] == '| label | 2.2000 ± 0.0000 (2) [+4.8%] | 1.3000 ± 0.1414 (2) [-13.3%] |'


def _write_validation(run_dir, losses, final, kept=False):
  """A run folder's metrics.jsonl: one train step, periodic validation on 8 sequences
  ({step: loss}) and the final evaluation of the whole split (`final`, 20 sequences) at a
  last step that is no multiple of the periodic evaluations'. kept: the evaluation lines
  only, as a sweep's kept record holds them (gating/study/records.py)."""
  run_dir.mkdir()
  last = max(losses) + 50
  lines = [] if kept else [{'step': 1, 'kind': 'train', 'loss': 3.0}]
  lines += [{'step': step, 'kind': 'eval', 'split': 'validation', 'loss': loss, 'sequences': 8}
            for step, loss in losses.items()]
  lines += [{'step': last, 'kind': 'eval', 'split': split, 'loss': final, 'sequences': 20}
            for split in ('validation', 'test')]
  (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))


def test_budgets_curves_compare_each_seed_inside_the_runs_with_the_reference(tmp_path,
                                                                             capsys):
  _write_sweep(tmp_path / 'small', 'small', _budget_rows(250, {'thin': (2.0, 2.2),
                                                              'label': (2.2, 2.2)}))
  large = tmp_path / 'large'
  _write_sweep(large, 'large', _budget_rows(2500, {'thin': (1.5, 1.5), 'label': (1.2, 1.4)}))
  _write_validation(large / 'thin_s0', {100: 2.0, 200: 1.0}, final=9.0)
  _write_validation(large / 'thin_s1', {100: 4.0, 200: 2.0}, final=9.0)
  _write_validation(large / 'label_s0', {100: 1.8, 200: 1.1}, final=0.1)
  _write_validation(large / 'label_s1', {100: 3.6, 200: 2.4}, final=0.1)
  plots.main(['--budgets', str(tmp_path / 'out'), '--reference', 'thin', str(large),
              str(tmp_path / 'small')])
  out = tmp_path / 'out'
  assert capsys.readouterr().out.split() == [str(out / name) for name in (
      'budgets.png', 'budgets.md', 'curves.png', 'curves.md')]
  table = (out / 'curves.md').read_text().splitlines()
  # Only the sweep with run folders; the final evaluations (9.0, 0.1) are left out.
  assert table[2:] == ['## large', '', '| point | step 100 | step 200 |', '|---|---|---|',
                       '| thin | +0.0% | +0.0% |',
                       # seed 0: 1.8/2.0 - 1 = -10%, 1.1/1.0 - 1 = +10%; seed 1: -10%, +20%
                       '| label | -10.0% | +15.0% |']
  assert (out / 'curves.png').stat().st_size > 1000


def test_budgets_read_a_sweeps_report_table_as_they_read_its_folder(tmp_path, capsys):
  """A report table kept without its runs (docs/results/NAME.csv) draws the same budgets
  as the sweep folder it came from; it has no run folders, so no curves of its own. A
  sweep folder restored from a kept record (evaluation lines only) draws its curves."""
  _write_sweep(tmp_path / 'small', 'small', _budget_rows(250, {'thin': (2.0, 2.2),
                                                              'label': (2.2, 2.2)}))
  large = tmp_path / 'large'
  _write_sweep(large, 'large', _budget_rows(2500, {'thin': (1.5, 1.5), 'label': (1.2, 1.4)}))
  _write_validation(large / 'thin_s0', {100: 2.0, 200: 1.0}, final=9.0, kept=True)
  _write_validation(large / 'label_s0', {100: 1.8, 200: 1.1}, final=0.1, kept=True)
  kept = tmp_path / 'kept' / 'small_study.csv'
  kept.parent.mkdir()
  kept.write_text((tmp_path / 'small' / 'results.csv').read_text())
  for name, small in (('folders', tmp_path / 'small'), ('table', kept)):
    plots.main(['--budgets', str(tmp_path / name), '--reference', 'thin', str(small),
                str(large)])
  capsys.readouterr()
  assert ((tmp_path / 'table' / 'budgets.md').read_text().splitlines()[1:] ==
          (tmp_path / 'folders' / 'budgets.md').read_text().splitlines()[1:])
  assert (tmp_path / 'table' / 'budgets.md').read_text().startswith('# small_study + large:')
  assert ((tmp_path / 'table' / 'curves.md').read_text() ==
          (tmp_path / 'folders' / 'curves.md').read_text())   # large's runs only, both times
  # (large's runs are a kept record's: evaluation lines only)
  assert (tmp_path / 'table' / 'curves.md').read_text().splitlines()[-1] == \
      '| label | -10.0% | +10.0% |'
  other = tmp_path / 'kept' / 'notes.txt'
  other.write_text('thin 2.0')
  with pytest.raises(SystemExit, match="notes.txt is neither a sweep folder .* nor a sweep's "
                                       'report table'):
    plots.main(['--budgets', str(tmp_path / 'out'), str(other), str(large)])
  with pytest.raises(SystemExit, match='small_study.csv is not a sweep folder'):
    plots.main(['--together', str(tmp_path / 'out'), str(kept), str(large)])
  assert not (tmp_path / 'out').exists()


def test_budgets_refuse_what_they_cannot_compare(tmp_path):
  _write_sweep(tmp_path / 'a', 'a', _budget_rows(250, {'thin': (2.0, 2.2)}))
  _write_sweep(tmp_path / 'b', 'b', _budget_rows(250, {'thin': (2.0, 2.2)}))
  _write_sweep(tmp_path / 'v', 'v', [dict(r, split='validation')
                                     for r in _budget_rows(800, {'thin': (2.0, 2.2)})])
  out = str(tmp_path / 'out')
  with pytest.raises(SystemExit, match="error: point 'thin' at 1024000 tokens appears in two"):
    plots.main(['--budgets', out, str(tmp_path / 'a'), str(tmp_path / 'b')])
  with pytest.raises(SystemExit, match='error: the sweeps report different splits or data'):
    plots.main(['--budgets', out, str(tmp_path / 'a'), str(tmp_path / 'v')])
  with pytest.raises(SystemExit, match="error: --reference 'wide' is no point of these "
                                       'sweeps; the points: thin'):
    plots.main(['--budgets', out, '--reference', 'wide', str(tmp_path / 'a')])
  with pytest.raises(SystemExit, match='error: --reference is for --budgets'):
    plots.main(['--reference', 'thin', str(tmp_path / 'a')])
  with pytest.raises(SystemExit, match='error: choose --together or --budgets'):
    plots.main(['--budgets', out, '--together', out, str(tmp_path / 'a')])
  assert not (tmp_path / 'out').exists()
