import csv
import json
import os
import shutil

import pytest

from experiments import sweep as sweep_script
from gating.study import records
from gating.study import sweep
from gating.study.sweep import SweepError


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

  # Kept again later, the record takes the points finished since.
  (out / 'topk_k2_s0' / 'eval.json').write_text(
      (finished_sweep('tiny') / 'topk_k2_s0' / 'eval.json').read_text())
  sweep_script.main(['tiny', '--out', str(out), '--keep', str(record)])
  assert 'kept 3 of 3 points' in capsys.readouterr().out
  assert (record / 'topk_k2_s0' / 'eval.json').exists()


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
