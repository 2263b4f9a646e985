"""TensorBoard event files: the scalars of metrics.jsonl, read back from the event records."""

import dataclasses
import glob
import os
import shutil

import pytest

from gating.training import tensorboard
from gating.training import loop as train
from gating.training.metrics_file import read_metrics
from tests.training.test_train import TINY


def _jsonl(workdir):
  return read_metrics(os.path.join(workdir, 'metrics.jsonl'))


@pytest.mark.slow
def test_event_files_hold_the_metrics_and_a_resume_purges_later_steps(tmp_path):
  cfg = dataclasses.replace(TINY, steps=10, checkpoint_every=5, eval_every=5)
  train.train(cfg, str(tmp_path), progress=False)
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 1
  board = tensorboard.read_scalars(str(tmp_path))
  records = _jsonl(tmp_path)
  trained = [r for r in records if r['kind'] == 'train']
  assert sorted(board['train/loss']) == list(range(1, 11))
  for r in trained:
    assert board['train/loss'][r['step']] == pytest.approx(r['loss'], rel=1e-6)
    assert board['train/accuracy'][r['step']] == pytest.approx(r['accuracy'], rel=1e-6)
    assert board['train/active_heads/0'][r['step']] == pytest.approx(r['active_heads'][0])
  val = [r for r in records if r['kind'] == 'eval' and r['split'] == 'validation']
  assert board['validation/loss'][5] == pytest.approx(val[0]['loss'], rel=1e-6)
  test = [r for r in records if r['kind'] == 'eval' and r['split'] == 'test'][-1]
  assert board['test/accuracy'] == {10: pytest.approx(test['accuracy'], rel=1e-6)}
  label, block = next(iter(test['per_label'].items()))
  assert board[f'test/{label}/loss'][10] == pytest.approx(block['loss'], rel=1e-6)
  assert not any('usage' == tag.split('/')[1] for tag in board)  # lists of lists stay out

  # Killed after its checkpoint of step 5, having logged up to step 10: the resumed
  # sitting (stopped at 7 here) hides steps 6-10 of the first one, as metrics.jsonl does.
  shutil.rmtree(tmp_path / 'checkpoints' / '10')
  (tmp_path / 'summary.json').unlink()
  assert train.train(cfg, str(tmp_path), progress=False, stop_after=7) is None
  board = tensorboard.read_scalars(str(tmp_path))
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 2
  assert sorted(board['train/loss']) == list(range(1, 8))
  assert sorted(board['validation/loss']) == [5]
  assert 'test/accuracy' not in board or not board['test/accuracy']
  resumed = {r['step']: r['loss'] for r in _jsonl(tmp_path) if r['kind'] == 'train'}
  assert board['train/loss'] == pytest.approx(resumed, rel=1e-6)


def test_scalars_name_train_and_eval_records():
  train_record = {'step': 3, 'kind': 'train', 'loss': 1.5, 'active_heads': [2.0, 1.0],
                  'usage': [[1.0, 0.0]], 'K': 2, 'time': 12.0}
  assert dict(tensorboard.scalars(train_record)) == {
      'train/loss': 1.5, 'train/active_heads/0': 2.0, 'train/active_heads/1': 1.0,
      'train/K': 2.0}
  eval_record = {'step': 3, 'kind': 'eval', 'split': 'test', 'path': 'gathered',
                 'loss': 0.5, 'accuracy': 0.75, 'sequences': 4, 'usage': [[1.0]],
                 'per_label': {'recall_0': {'loss': 0.25, 'accuracy': 1.0, 'usage': None}}}
  assert dict(tensorboard.scalars(eval_record)) == {
      'test/loss': 0.5, 'test/accuracy': 0.75, 'test/recall_0/loss': 0.25,
      'test/recall_0/accuracy': 1.0}
