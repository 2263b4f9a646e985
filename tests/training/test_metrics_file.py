import json

import pytest

from gating.training.metrics_file import MetricsLog, read_metrics


def _log(path, steps):
  log = MetricsLog(str(path))
  for step in steps:
    log.write({'step': step, 'kind': 'train', 'loss': 1.0 / step})
  return log


def test_the_line_a_killed_run_was_writing_is_left_out(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _log(path, range(1, 4))
  with open(path, 'a') as f:
    f.write('{"step": 4, "kind": "tr')              # the kill came mid-line
  assert [r['step'] for r in read_metrics(str(path))] == [1, 2, 3]
  MetricsLog(str(path)).truncate_after(2)         # the resume drops it, and steps > 2
  assert [r['step'] for r in read_metrics(str(path))] == [1, 2]
  with open(path, 'a') as f:
    f.write(json.dumps({'step': 3}))               # whole, its newline not yet written
  assert [r['step'] for r in read_metrics(str(path))] == [1, 2, 3]


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _log(path, range(1, 3))
  lines = path.read_text().splitlines(keepends=True)
  path.write_text(lines[0] + '{"step": 2, "kin\n' + lines[1])
  with pytest.raises(ValueError, match=f'^{path}, line 2: not a JSON record .*damaged'):
    read_metrics(str(path))
  path.write_text(lines[0] + 'garbage\n')         # a whole last line that is not JSON
  with pytest.raises(ValueError, match=f'^{path}, line 2: not a JSON record'):
    read_metrics(str(path))


def test_a_resume_drops_the_final_evaluation_it_will_redo(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  log = _log(path, range(1, 3))
  log.write({'step': 2, 'kind': 'eval', 'split': 'validation', 'sequences': 8})
  log.write({'step': 2, 'kind': 'eval', 'split': 'validation', 'sequences': 64,
             'final': True})
  log.write({'step': 2, 'kind': 'eval', 'split': 'test', 'sequences': 64, 'final': True})
  log.truncate_after(2)
  assert [(r['kind'], r.get('sequences')) for r in read_metrics(str(path))] == [
      ('train', None), ('train', None), ('eval', 8)]
