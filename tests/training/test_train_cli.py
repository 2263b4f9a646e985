"""What `python -m experiments.train` prints at the end: the per-task test figures, and
after the default job the frozen rows of its benchmark and budget."""

import dataclasses

import pytest

from experiments import configs
from experiments import train as train_script
from gating.study import results


def summary(accuracy=0.5):
  block = lambda a: {'loss': 1.0, 'accuracy': a, 'exact_match': 0.1, 'sequences': 10}
  per_label = {'sum2_0': block(0.25), 'recall_0': block(0.75)}
  return {'tokens_seen': 1000, 'validation': {**block(accuracy), 'per_label': per_label},
          'test': {**block(accuracy), 'per_label': per_label}}


def test_the_summary_prints_the_test_figures_per_task(capsys):
  train_script.print_summary(summary())
  out = capsys.readouterr().out
  assert 'test: loss 1.0000  accuracy 0.5000  exact match 0.1000  (10 sequences' in out
  assert '  sum2_0           test accuracy 0.2500' in out
  assert '  recall_0         test accuracy 0.7500' in out


def frozen(path):
  rows = [{'point': f'{point}_s{seed}', 'status': 'done', 'split': 'test', 'data': 'synthetic',
           'rule': rule, 'K': k, 'regularizer': 'none', 'seed': seed,
           'test_accuracy': acc + seed / 100}
          for point, rule, k, acc in (('dense', 'dense', 8, 0.5), ('static_k2', 'static', 2, 0.2),
                                      ('topk_k2', 'topk', 2, 0.3))
          for seed in (0, 1, 2)]
  results.write_csv(rows, str(path))


def test_the_default_job_prints_the_frozen_rows_beside_its_result(tmp_path, capsys):
  frozen(tmp_path / 'default_job.csv')
  cfg = dataclasses.replace(configs.get(configs.DEFAULT), seed=1)
  train_script.print_reference(cfg, configs.DEFAULT, summary(0.312),
                               path=str(tmp_path / 'default_job.csv'))
  out = capsys.readouterr().out
  assert 'this run (seed 1): test accuracy 0.312 with 2 of 8 heads per layer' in out
  assert 'dense                  K = 8  accuracy 0.510 ± 0.010 over 3 seeds (0.500, 0.510, 0.520)' in out
  assert 'static hard-concrete   K = 2  accuracy 0.210 ± 0.010' in out
  assert 'dynamic top-k          K = 2  accuracy 0.310 ± 0.010' in out


@pytest.mark.parametrize('preset,change', [
    ('sums', {'steps': 20}), ('synthetic', {})])
def test_other_runs_print_no_frozen_rows(tmp_path, capsys, preset, change):
  frozen(tmp_path / 'default_job.csv')
  cfg = dataclasses.replace(configs.get(preset), **change)
  train_script.print_reference(cfg, preset, summary(), path=str(tmp_path / 'default_job.csv'))
  assert capsys.readouterr().out == ''


def test_without_the_reference_file_it_says_where_it_would_be(tmp_path, capsys):
  train_script.print_reference(configs.get(configs.DEFAULT), configs.DEFAULT, summary(),
                               path=str(tmp_path / 'absent.csv'))
  assert 'absent.csv of the repository, absent here' in capsys.readouterr().out
