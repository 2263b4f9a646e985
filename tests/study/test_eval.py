import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

from experiments import eval as eval_script
from experiments import headroom as headroom_script
from gating.study import evaluation
from gating.training import loop as train
from gating.training.config import DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig
from tests.training.test_integrity import SMALL

TINY = TrainConfig(
    model=ModelConfig(num_layers=1, features=32, num_heads=4, gate='topk', active_heads=2,
                      noise='gumbel'),
    data=DataConfig(num_tasks=4, input_len=6, num_digits=6, num_recall_tasks=1,
                    num_induction_tasks=1, num_train=256, num_validation=32, num_test=48),
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
    steps=6, batch_size=16, eval_batches=1, eval_every=6, checkpoint_every=6)
HARD_CONCRETE = dataclasses.replace(
    TINY, model=dataclasses.replace(TINY.model, gate='hard_concrete', noise=None),
    loss=LossConfig(target_fraction=0.5))


@pytest.mark.slow
def test_eval_writes_both_paths_at_several_k(tmp_path, capsys, trained_run):
  shutil.copytree(trained_run(SMALL), tmp_path, dirs_exist_ok=True)
  eval_script.main(['--workdir', str(tmp_path), '--k', '1,2,4'])
  report = json.load(open(tmp_path / 'eval.json'))
  assert report['split'] == 'test' and report['own_K'] == 2
  got = {(r['path'], r['K']): r for r in report['results']}
  assert set(got) == {(p, k) for p in ('masked', 'gathered') for k in (1, 2, 4)}
  for (path, k), r in got.items():
    assert r['sequences'] == SMALL.data.num_test
    assert r['active_fraction'] == pytest.approx(k / 4)
    assert set(r['per_label']) == {'permute_0', 'permute_1', 'permute_2', 'permute_3',
                                   'recall_0', 'induction_0'}
    assert r['bits_per_token'] == pytest.approx(r['loss'] / np.log(2))
  # The gathered path computes fewer heads (XLA's count), and matches the masked path.
  assert got['gathered', 1]['flops_per_token'] < got['masked', 1]['flops_per_token']
  for k in (1, 2):
    assert got['gathered', k]['loss'] == pytest.approx(got['masked', k]['loss'], abs=1e-5)
  # Top-k's own gate is its top-K: the gap is only the two paths' rounding.
  assert report['training_gate']['K'] == 2 and report['training_gate']['path'] == 'masked'
  assert abs(report['gap']['loss']) < 1e-5 and report['gap']['K'] == 2
  assert 'gap (gathered at K=2' in capsys.readouterr().out
  # Dropped-unit compensation: nothing changes with every head open, K = 1 moves, and
  # the plain report stays as it was.
  eval_script.main(['--workdir', str(tmp_path), '--k', '1,4', '--paths', 'gathered',
                    '--compensate', '2'])
  assert 'dropped units compensated (means of 2 training batches)' in capsys.readouterr().out
  comp = json.load(open(tmp_path / 'eval_compensated.json'))
  assert comp['compensated_on_batches'] == 2
  comp = {r['K']: r for r in comp['results']}
  assert comp[4]['loss'] == pytest.approx(got['gathered', 4]['loss'], abs=1e-5)
  assert abs(comp[1]['loss'] - got['gathered', 1]['loss']) > 1e-4
  assert json.load(open(tmp_path / 'eval.json')) == report
  for n, match in ((0, 'must be an int >= 1'), (99, 'has 16 full batches of 16, fewer than')):
    with pytest.raises(SystemExit, match=f'error: compensate: .*{match}'):
      eval_script.main(['--workdir', str(tmp_path), '--compensate', str(n)])
  with pytest.raises(SystemExit, match='error: max_batches=0 must be at least 1'):
    eval_script.main(['--workdir', str(tmp_path), '--max-batches', '0'])
  # --out in a folder not made yet: made, as the file is written.
  out = tmp_path / 'new' / 'sub' / 'k2.json'
  eval_script.main(['--workdir', str(tmp_path), '--k', '2', '--paths', 'gathered', '--out',
                    str(out)])
  assert [r['K'] for r in json.load(open(out))['results']] == [2]


def test_compensation_calibrates_on_a_sample_of_every_label_not_the_first_rows():
  """A split ordered by label (as the text splits are, domain by domain): the calibration
  batches are full, fixed, and hold rows of every label, where its first 2 x 8 rows would
  all be label 0."""
  from gating.data import rows as data_rows  # pylint: disable=import-outside-toplevel
  ones_NxL = np.ones((96, 4), bool)
  split = data_rows._rows(np.arange(96 * 4).reshape(96, 4), ones_NxL, ones_NxL,
                          np.repeat(np.arange(3), 32))
  rows = evaluation.calibration_batches(split, 8, 2)
  assert [len(b['tokens']) for b in rows] == [8, 8]
  labels = np.concatenate([b['label'] for b in rows])
  assert set(labels) == {0, 1, 2}
  assert len({tuple(t) for b in rows for t in b['tokens']}) == 16       # no row twice
  again = evaluation.calibration_batches(split, 8, 2)
  assert all((a['tokens'] == b['tokens']).all() for a, b in zip(rows, again))
  with pytest.raises(ValueError, match='has 12 full batches of 8, fewer than the 13'):
    evaluation.calibration_batches(split, 8, 13)


def test_an_out_that_cannot_be_written_is_refused_before_anything_is_read(tmp_path):
  # The workdir holds no run: the --out error comes first, so it was checked first.
  (tmp_path / 'notes.txt').write_text('mine')
  for out, why in ((tmp_path, 'is a folder; give the path of a file'),
                   (tmp_path / 'notes.txt' / 'eval.json', f'{tmp_path}/notes.txt is not a '
                                                          'folder')):
    for script in (eval_script, headroom_script):
      with pytest.raises(SystemExit) as exit_info:
        script.main(['--workdir', str(tmp_path / 'none'), '--out', str(out)])
      assert str(exit_info.value.code) == f'error: --out {out}: {why}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']
  # So are lists that are not integers, and empty ones, which would replace eval.json with
  # a report of nothing.
  for script, flag in ((eval_script, '--k'), (headroom_script, '--k'),
                       (headroom_script, '--layers')):
    with pytest.raises(SystemExit, match=f"^error: {flag} '2,x': expected comma-separated "):
      script.main(['--workdir', str(tmp_path / 'none'), flag, '2,x'])
  for paths, ks in (([], None), (['gathered'], [])):
    with pytest.raises(ValueError, match='give at least one path .* and one K'):
      evaluation.evaluate_run(None, paths=paths, ks=ks)
  # A damaged config.json is named, not a bare JSON message.
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'config.json').write_text('{"model": ')
  with pytest.raises(SystemExit, match=f'^error: {tmp_path}/bad/config.json: not JSON'):
    eval_script.main(['--workdir', str(tmp_path / 'bad')])


def test_hard_concrete_training_gate_has_no_budget():
  """A fresh hard-concrete model (log_alpha = 0: z = 0.5, every head open) as a Run."""
  splits = train.load_data(HARD_CONCRETE)
  graphdef, state = train.create(HARD_CONCRETE, splits.info)
  run = evaluation.Run('fresh', HARD_CONCRETE, splits, graphdef, state, 0)
  report = evaluation.evaluate_run(run, paths=('gathered',), ks=(2,), split='validation',
                                   max_batches=1)
  assert report['split'] == 'validation'
  assert [(r['path'], r['K']) for r in report['results']] == [('gathered', 2)]
  gate = report['training_gate']
  assert gate['K'] == 4 and 'z > 0' in gate['meaning']      # every open head, no budget
  assert gate['active_fraction'] == 1.0
  budgeted = report['results'][0]
  assert budgeted['active_fraction'] == 0.5                   # the hard top-2 of 4
  assert report['gap']['active_fraction'] == -0.5
  assert report['gap']['loss'] == pytest.approx(budgeted['loss'] - gate['loss'])


def test_dense_runs_at_k_equal_h_only():
  dense = dataclasses.replace(
      TINY, model=dataclasses.replace(TINY.model, active_heads=4, gate='dense', noise=None))
  assert 'runs at K=4 only' in evaluation.unsupported(dense, 'gathered', 2)
  assert evaluation.unsupported(dense, 'masked', 4) is None
  with pytest.raises(ValueError, match=r'K=5: every K must be an int in \[1, num_heads=4\]'):
    evaluation.unsupported(TINY, 'masked', 5)


def test_missing_checkpoint_says_where_it_looked(tmp_path):
  where = re.escape(str(tmp_path))
  with pytest.raises(SystemExit, match=f'{where}/config.json does not exist'):
    eval_script.main(['--workdir', str(tmp_path)])
  (tmp_path / 'config.json').write_text(TINY.to_json())
  with pytest.raises(SystemExit, match=f'no checkpoint in {where}: looked for .* in '
                                       f'{where}/checkpoints'):
    eval_script.main(['--workdir', str(tmp_path)])
  assert not (tmp_path / 'checkpoints').exists()   # looking creates nothing


def test_a_dense_model_with_mlp_groups_evaluates_every_group_on_the_gathered_path(trained_run):
  # The warm start of a sweep with groups: the dense gate has no Kf; gathered runs all G.
  dense = dataclasses.replace(TINY, model=dataclasses.replace(
      TINY.model, gate='dense', active_heads=None, noise=None, mlp_groups=4))
  run = evaluation.load_run(str(trained_run(dense)))
  report = evaluation.evaluate_run(run, paths=['gathered', 'masked'], ks=[4], max_batches=1,
                                   split='validation')
  gathered, masked = report['results']
  assert gathered['Kf'] == 4 and gathered['active_groups_per_layer'] == [4.0]
  assert masked['Kf'] is None and masked['active_groups_per_layer'] == [4.0]
  assert gathered['loss'] == pytest.approx(masked['loss'], abs=1e-5)
