import csv
import json
import os
import shutil

import pytest

from experiments import sweep as sweep_script
from gating import data
from gating.study import records
from gating.study import sweep
from gating.study.sweep import SweepError
from gating.training import config
from gating.training import loop as train


def _rows(out):
  with open(out / 'results.csv', newline='') as f:
    return {row['point']: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_a_kept_record_reports_and_resumes_like_the_sweep_folder(tmp_path, capsys,
                                                                 finished_sweep):
  out = tmp_path / 'tiny'
  shutil.copytree(finished_sweep('tiny'), out)
  shutil.rmtree(out / 'dense_s0' / 'checkpoints', ignore_errors=True)
  (out / 'topk_k2_s0' / 'eval.json').unlink()      # trained, not evaluated: not kept
  record = tmp_path / 'record'
  sweep_script.main(['tiny', '--out', str(out), '--keep', str(record)])
  assert 'kept 2 of 3 points' in capsys.readouterr().out
  assert sorted(os.listdir(record)) == ['dense_s0', 'sweep.json', 'warm_s0']
  assert sorted(os.listdir(record / 'dense_s0')) == sorted(
      [*records.KEPT_FILES, records.METRICS_FILE])
  kinds = {json.loads(line)['kind'] for line in open(record / 'dense_s0' / 'metrics.jsonl')}
  kept_lines = (record / 'dense_s0' / 'metrics.jsonl').read_text().splitlines()
  assert kinds == {'eval'} and kept_lines == [
      line for line in (out / 'dense_s0' / 'metrics.jsonl').read_text().splitlines()
      if json.loads(line)['kind'] == 'eval']

  # Copied into a fresh folder, the record reports as the sweep folder does, and its
  # points are finished as the sweep judges it (run_point skips them).
  elsewhere = tmp_path / 'elsewhere'
  shutil.copytree(record, elsewhere)
  assert all(sweep.is_finished(str(elsewhere / n)) for n in ('dense_s0', 'warm_s0'))
  sweep_script.main(['tiny', '--out', str(elsewhere), '--report'])
  assert 'sweep tiny: 2 of 3 points finished' in capsys.readouterr().out
  sweep_script.main(['tiny', '--out', str(out), '--report'])
  original, restored = _rows(out)['dense_s0'], _rows(elsewhere)['dense_s0']
  assert restored == original and restored['status'] == 'done'
  assert _rows(elsewhere)['topk_k2_s0']['status'] == 'not started'
  # A warm start whose checkpoints are gone, while a point that starts from it is not
  # finished, could not be resumed from a record: refused, nothing written.
  bare = tmp_path / 'bare'
  shutil.copytree(out, bare, ignore=shutil.ignore_patterns('checkpoints'))
  with pytest.raises(SystemExit, match=r'error: .*bare/warm_s0 holds no checkpoint, and points '
                                       r'that start from it are not finished \(topk_k2_s0\)'):
    sweep_script.main(['tiny', '--out', str(bare), '--keep', str(tmp_path / 'bare_record')])
  assert not (tmp_path / 'bare_record').exists()
  # topk_k2_s0 is left to train there, from the warm start: its last checkpoint was kept.
  assert os.listdir(record / 'warm_s0' / 'checkpoints') == ['2']
  point = config.read_config(str(out / 'topk_k2_s0' / 'config.json'))
  info = data.DataInfo(**json.load(open(out / 'topk_k2_s0' / 'data_info.json')))
  graphdef, state = train.create(point, info)
  _, copied = train.warm_start(state, graphdef, str(elsewhere / 'warm_s0'))
  assert copied > 0

  # Kept again later, the record takes the points finished since.
  (out / 'topk_k2_s0' / 'eval.json').write_text(
      (finished_sweep('tiny') / 'topk_k2_s0' / 'eval.json').read_text())
  sweep_script.main(['tiny', '--out', str(out), '--keep', str(record)])
  assert 'kept 3 of 3 points' in capsys.readouterr().out
  assert (record / 'topk_k2_s0' / 'eval.json').exists()
  assert not (record / 'warm_s0' / 'checkpoints').exists()    # no point needs it now
  # Reported on another machine, where the absolute path of the warm start that its
  # config.json holds does not exist, the warm-started point finds its warm start beside it.
  other = tmp_path / 'other'
  shutil.copytree(record, other)
  point_config = other / 'topk_k2_s0' / 'config.json'
  trained_at = json.loads(point_config.read_text())['init_from']
  point_config.write_text(point_config.read_text().replace(
      trained_at, '/machine_a/runs/sweeps/tiny/warm_s0'))
  sweep_script.main(['tiny', '--out', str(other), '--report'])
  assert 'sweep tiny: 3 of 3 points finished' in capsys.readouterr().out
  assert _rows(other)['topk_k2_s0']['status'] == 'done'
  assert int(_rows(other)['topk_k2_s0']['warm_start_steps']) == 2


def test_a_record_is_not_mixed_with_another(tmp_path):
  out = tmp_path / 'sweep'
  out.mkdir()
  (out / 'sweep.json').write_text(json.dumps({'sweep': 'tiny', 'runs': {'a_s0': []}}))
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'sweep.json').write_text(json.dumps({'sweep': 'text', 'runs': {}}))
  with pytest.raises(SweepError, match='holds the record of another sweep or definition'):
    records.keep(str(out), str(other), ['a_s0'])
  stray = tmp_path / 'stray'
  stray.mkdir()
  (stray / 'notes.txt').write_text('mine')
  with pytest.raises(SweepError, match='is not empty and holds no sweep.json'):
    records.keep(str(out), str(stray), ['a_s0'])
  with pytest.raises(SweepError, match='is the sweep folder itself'):
    records.keep(str(out), str(out), ['a_s0'])
  with pytest.raises(SweepError, match=f'^--keep {stray}/notes.txt: exists and is not a '):
    records.keep(str(out), str(stray / 'notes.txt'), ['a_s0'])
  assert os.listdir(stray) == ['notes.txt'] and os.listdir(other) == ['sweep.json']
  assert records.keep(str(out), str(tmp_path / 'new'), ['a_s0']) == []
  assert os.listdir(tmp_path / 'new') == ['sweep.json']


def test_keep_runs_nothing_else(tmp_path):
  with pytest.raises(SystemExit, match='--keep writes the record of every finished point'):
    sweep_script.main(['tiny', '--out', str(tmp_path / 'o'), '--keep', str(tmp_path / 'r'),
                       '--points', 'dense'])
  with pytest.raises(SystemExit, match="holds no sweep.json: sweep 'tiny' has not been"):
    sweep_script.main(['tiny', '--out', str(tmp_path / 'o'), '--keep', str(tmp_path / 'r')])
  assert not (tmp_path / 'r').exists() and not (tmp_path / 'o').exists()
