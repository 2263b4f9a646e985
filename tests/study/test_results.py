import json

import pytest

from gating.study import results
from gating.training.config import LossConfig, ModelConfig, TrainConfig


def _row(rule, k, seed, bits, status='done'):
  return {'point': f'{rule}_k{k}_s{seed}', 'status': status, 'data': 'text', 'rule': rule,
          'K': k, 'regularizer': 'none', 'seed': seed, 'steps': 10, 'tokens_seen': 1280,
          'test_loss': bits * 0.693, 'test_bits_per_token': bits, 'test_accuracy': 0.5,
          'active_fraction': k / 8, 'flops_per_token': 1000.0 * k,
          'gap_bits_per_token': 0.0, 'bits_per_token/python': bits + 1,
          'accuracy/python': 0.5}


ROWS = [_row('topk', 2, 0, 2.0), _row('topk', 2, 1, 2.2), _row('topk', 4, 0, 1.9),
        _row('dense', 8, 0, 1.8), {'point': 'static_k2_s0', 'status': 'unfinished'}]


def test_aggregate_is_mean_and_sample_std_over_seeds():
  groups = results.aggregate(ROWS)
  assert [(g['point'], g['rule'], g['K'], g['seeds']) for g in groups] == [
      ('topk_k2', 'topk', 2, 2), ('topk_k4', 'topk', 4, 1), ('dense_k8', 'dense', 8, 1)]
  mean, std, n = groups[0]['test_bits_per_token']
  assert (mean, n) == (pytest.approx(2.1), 2) and std == pytest.approx(0.2 / 2 ** 0.5)
  assert groups[1]['test_bits_per_token'] == (1.9, 0.0, 1)


def test_csv_round_trip_and_markdown(tmp_path):
  path = str(tmp_path / 'results.csv')
  results.write_csv(ROWS, path)
  back = results.read_csv(path)
  assert back[0]['K'] == 2 and back[0]['test_bits_per_token'] == 2.0
  assert back[-1] == {**{k: None for k in back[0]}, 'point': 'static_k2_s0',
                      'status': 'unfinished'}
  table = results.markdown(back, 'text: a test')
  assert table.startswith('# text: a test') and '4 of 5 points finished' in table
  assert ('| topk_k2 | dynamic top-k | none | 2 | 2 | 0.250 ± 0.000 | 2,000 | 2.100 ± 0.141 |'
          in table)
  assert '| dense_k8 | dense | none | 8 | 1 | 1.000 |' in table
  assert '| point | rule | K | python |' in table
  assert '| topk_k2 | dynamic top-k (none) | 2 | 3.100 ± 0.141 |' in table


def test_per_label_table_holds_every_points_labels():
  """Points on different data (here: other domains) each keep their per-label figures."""
  other = {**_row('dense', 8, 0, 1.5), 'point': 'dense_other_s0', 'steps': 20,
           'bits_per_token/python': None, 'bits_per_token/latin': 4.25}
  table = results.markdown([_row('dense', 8, 0, 1.8), other])
  assert '| point | rule | K | python | latin |' in table
  assert '| dense_k8 | dense (none) | 8 | 2.800 | - |' in table
  assert '| dense_other | dense (none) | 8 | - | 4.250 |' in table


def test_points_that_differ_beyond_their_labels_are_not_averaged():
  """Two points with the same rule and K but other settings (here: steps) are two rows."""
  longer = [{**_row('dense', 8, s, 1.5), 'point': f'dense_long_s{s}', 'steps': 20}
            for s in (0, 1)]
  groups = results.aggregate([_row('dense', 8, 0, 1.8), _row('dense', 8, 1, 2.0), *longer])
  assert [(g['point'], g['seeds'], g['steps'][0]) for g in groups] == [
      ('dense_k8', 2, 10), ('dense_long', 2, 20)]
  assert groups[0]['test_bits_per_token'][0] == pytest.approx(1.9)


@pytest.mark.parametrize('loss,k,expected', [
    (LossConfig(), 2, 'none'),
    (LossConfig(target_fraction=0.25), 2, 'target=K/H'),
    (LossConfig(target_fraction=0.25), 4, 'target=0.25'),
    (LossConfig(l0_weight=0.05, load_balance_weight=0.01), 2, 'l0=0.05+balance=0.01'),
])
def test_regularizer_label(loss, k, expected):
  assert results.regularizer_label(loss, k, 8) == expected


def test_point_row_of_an_unfinished_run(tmp_path):
  assert results.point_row(str(tmp_path), 'p') == {'point': 'p', 'status': 'not started',
                                                  'split': 'test'}
  cfg = TrainConfig(model=ModelConfig(num_heads=8, active_heads=2),
                    loss=LossConfig(target_fraction=0.25), seed=3)
  (tmp_path / 'config.json').write_text(cfg.to_json())
  row = results.point_row(str(tmp_path), 'p')
  assert row['status'] == 'unfinished' and row['regularizer'] == 'target=K/H'
  assert (row['rule'], row['K'], row['seed']) == ('topk', 2, 3) and 'test_loss' not in row
  (tmp_path / 'summary.json').write_text(json.dumps({'tokens_seen': 5}))
  assert results.point_row(str(tmp_path), 'p')['status'] == 'trained, not evaluated'
  (tmp_path / 'eval.json').write_text('{"results": [')
  with pytest.raises(ValueError, match=f'^{tmp_path}/eval.json: not JSON .*run the sweep '
                                       'again'):
    results.point_row(str(tmp_path), 'p')


def whole_report(step=6, scored=64, total=64, max_batches=None):
  """An eval.json of a 6-step run: its own K's gathered result scored `scored` sequences."""
  result = {'path': 'gathered', 'K': 2, 'sequences': scored, 'loss': 1.0, 'accuracy': 0.5,
            'exact_match': 0.1, 'bits_per_token': 1.4, 'active_fraction': 0.25,
            'flops_per_token': 1e4, 'per_label': {}}
  return {'step': step, 'final_step': 6, 'split': 'test', 'split_sequences': total,
          'max_batches': max_batches, 'own_K': 2, 'results': [result],
          'training_gate': result, 'gap': {**result, 'bits_per_token': 0.0}}


@pytest.mark.parametrize('report,why', [
    (whole_report(scored=16, max_batches=1), 'scored on 16 of the 64 sequences of the test split'),
    (whole_report(step=4), 'scored at step 4 of 6'),
    ({**whole_report(scored=16), 'split_sequences': None, 'max_batches': None},
     'scored on 16 of the 64 sequences of the test split'),   # an older eval.json: summary.json
])
def test_a_row_scored_on_part_of_the_split_or_an_earlier_step_is_not_done(tmp_path, report,
                                                                            why):
  cfg = TrainConfig(model=ModelConfig(num_heads=8, active_heads=2), steps=6)
  (tmp_path / 'config.json').write_text(cfg.to_json())
  summary = {'steps': 6, 'tokens_seen': 5, 'test': {'sequences': 64}}
  (tmp_path / 'summary.json').write_text(json.dumps(summary))
  if report.get('split_sequences') is None:
    report = {k: v for k, v in report.items() if k not in ('split_sequences', 'max_batches')}
  (tmp_path / 'eval.json').write_text(json.dumps(report))
  row = results.point_row(str(tmp_path), 'p_s0')
  assert row['status'] == f'partial: {why}'
  assert results.aggregate([row]) == []                       # never averaged
  assert f'Left out of the means, not whole: p_s0 {why}' in results.markdown([row])
  marked = results.point_row(str(tmp_path), 'p_s0', allow_partial=True)
  assert marked['status'] == 'done' and marked['partial'] == why
  assert len(results.aggregate([marked])) == 1
  assert f'Not whole (reported with --allow-partial): p_s0 {why}' in results.markdown([marked])
  (tmp_path / 'eval.json').write_text(json.dumps(whole_report()))
  assert results.point_row(str(tmp_path), 'p_s0')['status'] == 'done'


def test_recipe_rule_names_the_gated_width_and_thin_models():
  from gating.study.results import recipe_rule  # pylint: disable=import-outside-toplevel

  reference = ModelConfig(features=64, num_heads=8)

  def rule(source=None, **model):
    model = {'features': 64, 'num_heads': 8, **model}
    return recipe_rule(TrainConfig(model=ModelConfig(**model)), source, reference)
  assert rule() == 'topk'                                     # heads, no groups: as before
  assert rule(gate='dense', active_heads=None) == 'dense'
  assert rule(gate='dense', active_heads=None, num_heads=4, head_dim=8) == 'dense (thin)'
  assert rule(gate='dense', active_heads=None, mlp_features=128) == 'dense (thin)'
  # narrower than D, but the sweep's own model (the synthetic preset: 8 heads of 4, D = 64)
  narrow = ModelConfig(features=64, num_heads=8, head_dim=4, gate='dense', active_heads=None)
  assert recipe_rule(TrainConfig(model=narrow), None, narrow) == 'dense'
  assert recipe_rule(TrainConfig(model=narrow)) == 'dense'    # no reference: never thin
  assert rule(mlp_groups=8, active_groups=2) == 'topk [heads + groups]'
  assert rule(mlp_groups=8, active_groups=8) == 'topk [heads]'
  assert rule(active_heads=8, mlp_groups=8, active_groups=1) == 'topk [groups]'
  assert (rule(mlp_groups=8, active_groups=2, group_router='attention')
          == 'topk [heads + groups, shared router]')
  elastic = TrainConfig(model=ModelConfig(gate='dense', active_heads=None),
                        loss=LossConfig(elastic_ks=(2, 4)))
  assert rule(elastic, mlp_groups=8, active_groups=2) == 'elastic + topk [heads + groups]'
  # shared units are part of the rule: a row with them is never averaged with one without
  assert rule(shared_heads=1) == 'topk S=1'
  assert (rule(mlp_groups=8, active_groups=3, shared_groups=2)
          == 'topk [heads + groups] Sf=2')
