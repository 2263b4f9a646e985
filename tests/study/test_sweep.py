import csv
import json
import os
import re
import shutil
import sys

import pytest

from experiments import sweep as sweep_script
from experiments.configs import sweeps
from gating.study import sweep


def _rows(out):
  with open(out / 'results.csv', newline='') as f:
    return {row['point']: row for row in csv.DictReader(f)}


def _train_steps(workdir):
  return [json.loads(line)['step'] for line in open(workdir / 'metrics.jsonl')
          if json.loads(line)['kind'] == 'train']


@pytest.mark.slow
def test_tiny_sweep_runs_resumes_and_writes_results(tmp_path, capsys, finished_sweep):
  out = tmp_path / 'tiny'
  shutil.copytree(finished_sweep('tiny'), out)    # the shared run of the tiny sweep
  rows = _rows(out)
  assert set(rows) == {'dense_s0', 'topk_k2_s0'}
  for row in rows.values():
    assert row['status'] == 'done'
    assert 0 <= float(row['test_accuracy']) <= 1 and float(row['flops_per_token']) > 0
    assert int(row['tokens_seen']) > 0
    assert 'accuracy/permute_0' in row and 'bits_per_token/induction_0' in row
  assert rows['dense_s0']['rule'] == 'dense' and rows['dense_s0']['K'] == '4'
  assert rows['topk_k2_s0']['K'] == '2'
  # the warm start is trained first, and its steps count toward the point's budget
  assert (out / 'warm_s0' / 'summary.json').exists()
  assert rows['dense_s0']['steps'] == '6' and rows['dense_s0']['warm_start_steps'] == '0'
  assert rows['topk_k2_s0']['steps'] == '8' and rows['topk_k2_s0']['warm_start_steps'] == '2'
  assert int(rows['topk_k2_s0']['tokens_seen']) == int(rows['dense_s0']['tokens_seen']) // 6 * 8
  assert float(rows['topk_k2_s0']['active_fraction']) == 0.5
  assert float(rows['topk_k2_s0']['flops_per_token']) < float(rows['dense_s0']['flops_per_token'])
  table = (out / 'results.md').read_text()
  assert '| dense | dense | none | 4 | 1 |' in table
  assert '| topk_k2 | dynamic top-k | none | 2 | 1 |' in table
  for name in ('pareto.png', 'pareto_flops.png', 'per_label.png'):
    assert (out / 'plots' / name).stat().st_size > 0
  record = json.load(open(out / 'sweep.json'))
  assert record['sweep'] == 'tiny' and sorted(record['runs']) == sorted(rows)
  assert sorted(record['warm_runs']) == ['warm_s0']

  # Started again: everything is finished, nothing runs.
  capsys.readouterr()
  summary = out / 'dense_s0' / 'summary.json'
  stamp = summary.stat().st_mtime_ns
  sweep_script.main(['tiny', '--out', str(out), '--parallel', '2'])
  assert capsys.readouterr().out.count('skipped') == 3
  assert summary.stat().st_mtime_ns == stamp

  # A point killed mid-run (after its checkpoint of step 4, with a half-written metrics
  # line) resumes from its checkpoint; the finished one is skipped.
  point = out / 'topk_k2_s0'
  for name in ('summary.json', 'eval.json'):
    (point / name).unlink()
  for step in os.listdir(point / 'checkpoints'):
    if int(step) > 4:
      shutil.rmtree(point / 'checkpoints' / step)
  assert sorted(os.listdir(point / 'checkpoints')) == ['2', '4']
  with open(point / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "kind": "tra')

  # --report writes the results of the points finished so far, and trains nothing.
  (out / 'results.md').unlink()
  capsys.readouterr()
  sweep_script.main(['tiny', '--out', str(out), '--report'])
  assert 'sweep tiny: 2 of 3 points finished' in capsys.readouterr().out
  assert sorted(os.listdir(point / 'checkpoints')) == ['2', '4']
  assert not (point / 'summary.json').exists()
  assert {name: row['status'] for name, row in _rows(out).items()} == {
      'dense_s0': 'done', 'topk_k2_s0': 'unfinished'}
  table = (out / 'results.md').read_text()
  assert '1 of 2 points finished' in table and '| dense | dense | none | 4 | 1 |' in table
  assert '| topk_k2 |' not in table

  sweep_script.main(['tiny', '--out', str(out)])
  printed = capsys.readouterr().out
  assert 'dense_s0' in printed and 'skipped' in printed and 'topk_k2_s0' in printed
  assert 'resuming' in (point / 'sweep.log').read_text()
  assert _train_steps(point) == list(range(1, 7))
  assert _rows(out)['topk_k2_s0']['status'] == 'done'
  assert json.load(open(point / 'wall_time.json'))['train_sittings'] == 2

  # The same folder under another definition is refused and left as it is.
  before = (out / 'sweep.json').read_text()
  with pytest.raises(SystemExit, match="different definition of sweep 'tiny'.*steps=8"):
    sweep_script.main(['tiny', '--out', str(out), '--steps', '8'])
  assert (out / 'sweep.json').read_text() == before


def test_another_definition_names_what_changed_in_split_and_warm_starts(tmp_path):
  """A record that differs only in its split or its warm starts is refused naming the
  change (the message listed nothing: '()')."""
  record = {'sweep': 'tiny', 'preset': 'synthetic_tiny', 'runs': {'a_s0': ['x=1']},
            'warm_runs': {'warm_s0': ['steps=4']}}
  (tmp_path / 'sweep.json').write_text(json.dumps(record))
  sweep.check_folder(str(tmp_path), record)
  for other, named in (({**record, 'split': 'validation'}, "split 'test' vs now 'validation'"),
                       ({**record, 'warm_runs': {'warm_s0': ['steps=8']}},
                        r"warm_s0: overrides without \['steps=4'\] and with \['steps=8'\]")):
    with pytest.raises(sweep.SweepError, match=named):
      sweep.check_folder(str(tmp_path), other)


def test_folder_of_another_sweep_is_refused(tmp_path):
  (tmp_path / 'sweep.json').write_text(json.dumps({'sweep': 'synthetic', 'runs': {}}))
  with pytest.raises(SystemExit, match="holds sweep 'synthetic', not 'tiny'"):
    sweep_script.main(['tiny', '--out', str(tmp_path)])
  other = tmp_path / 'a_run'
  other.mkdir()
  (other / 'metrics.jsonl').write_text('')
  with pytest.raises(SystemExit, match='holds no sweep.json: not a sweep folder'):
    sweep_script.main(['tiny', '--out', str(other)])
  assert os.listdir(other) == ['metrics.jsonl']
  file = other / 'metrics.jsonl'
  with pytest.raises(SystemExit, match=f'^error: --out {file}: exists and is not a folder$'):
    sweep_script.main(['tiny', '--out', str(file)])
  with pytest.raises(SystemExit, match=f'^error: --out {file}/sweep: {file} is a file'):
    sweep_script.main(['tiny', '--out', str(file / 'sweep')])
  assert os.listdir(other) == ['metrics.jsonl'] and file.read_text() == ''


def test_report_needs_the_sweeps_own_folder(tmp_path):
  with pytest.raises(SystemExit, match="holds no sweep.json: sweep 'tiny' has not been "
                                       'started there'):
    sweep_script.main(['tiny', '--out', str(tmp_path / 'none'), '--report'])
  assert not (tmp_path / 'none').exists()
  (tmp_path / 'sweep.json').write_text(json.dumps({'sweep': 'synthetic', 'runs': {}}))
  with pytest.raises(SystemExit, match="holds sweep 'synthetic', not 'tiny'"):
    sweep_script.main(['tiny', '--out', str(tmp_path), '--report'])
  assert os.listdir(tmp_path) == ['sweep.json']


def test_unknown_sweep_lists_the_known_ones():
  known = re.escape(str(sorted(sweeps.SWEEPS)))
  assert {'synthetic', 'text', 'tiny', 'recipes'} <= set(sweeps.SWEEPS)
  with pytest.raises(SystemExit, match=r"unknown sweep 'nope'; known sweeps: " + known):
    sweep_script.main(['nope'])
  with pytest.raises(SystemExit, match=r"^error: --seeds '0,one': expected comma-separated "):
    sweep_script.main(['tiny', '--seeds', '0,one'])
  with pytest.raises(SystemExit, match=r"^error: --seeds ',': expected at least one integer"):
    sweep_script.main(['tiny', '--seeds', ','])


def test_study_sweeps_resolve(capsys):
  """Every point of every sweep resolves to a valid config (a dry run)."""
  for name, definition in sweeps.SWEEPS.items():
    sweep_script.main([name, '--dry-run', '--out', 'unused'])
    printed = capsys.readouterr().out
    runs = (len(definition.points) + bool(definition.warm_start)) * len(definition.seeds)
    assert printed.count('experiments.train') == runs
  synthetic = sweeps.SWEEPS['synthetic']
  assert len(synthetic.points) == 10 and synthetic.seeds == (0, 1, 2)
  assert len(sweeps.SWEEPS['text'].points) == 7


def test_a_crashed_point_does_not_stop_the_others(tmp_path):
  """run_points with stand-in commands: one point fails, the other finishes."""
  def point(name, code):
    workdir = tmp_path / name
    write = (f'import json, os, sys; os.makedirs({str(workdir)!r}, exist_ok=True); '
             f'open(os.path.join({str(workdir)!r}, sys.argv[1]), "w").write(sys.argv[2]); '
             f'sys.exit({code})')
    return sweep.Point(name, str(workdir), [sys.executable, '-c', write, 'summary.json',
                                            SUMMARY],
                       [sys.executable, '-c', write.replace(f'exit({code})', 'exit(0)'),
                        'eval.json', EVAL])

  lines = []
  outcomes = sweep.run_points([point('crash', 3), point('fine', 0)], parallel=2,
                              report=lines.append)
  assert [(o.name, o.status) for o in outcomes] == [('crash', 'failed'), ('fine', 'done')]
  assert 'train exited with code 3' in outcomes[0].message
  assert not (tmp_path / 'crash' / 'eval.json').exists()
  assert (tmp_path / 'fine' / 'eval.json').exists() and len(lines) == 2


# What a finished point's files hold, as far as the sweep reads them: one step, and an
# evaluation of the whole one-sequence test split at the run's own K (results.py).
SUMMARY = json.dumps({'steps': 1, 'test': {'sequences': 1}})
EVAL = json.dumps({'step': 1, 'final_step': 1, 'split': 'test', 'split_sequences': 1,
                   'max_batches': None, 'own_K': 2,
                   'results': [{'path': 'gathered', 'K': 2, 'sequences': 1}]})


def _stand_in(tmp_path, name, code=0, *, after=None, sleep=0.0):
  """A Point whose train command sleeps, records when it started and ended, and fails with
  `code` (or finds its `after` point untrained); eval just writes eval.json."""
  workdir = tmp_path / name
  needs = '' if after is None else (
      f'not os.path.exists({str(tmp_path / after / "summary.json")!r}) and sys.exit(9); ')
  train = (f'import os, sys, time; {needs}os.makedirs({str(workdir)!r}, exist_ok=True); '
           f'start = time.time(); time.sleep({sleep}); '
           f'open({str(workdir / "times")!r}, "w").write(f"{{start}} {{time.time()}}"); '
           f'{code} or open({str(workdir / "summary.json")!r}, "w").write({SUMMARY!r}); '
           f'sys.exit({code})')
  evaluate = f'open({str(workdir / "eval.json")!r}, "w").write({EVAL!r})'
  return sweep.Point(name, str(workdir), [sys.executable, '-c', train],
                     [sys.executable, '-c', evaluate], after)


def _times(tmp_path, name):
  return [float(t) for t in (tmp_path / name / 'times').read_text().split()]


def test_points_start_after_their_warm_start_while_others_fill_the_slots(tmp_path):
  """Two slots: the point that starts from the warm start waits for it (its command fails
  if the warm start is untrained), and the point that needs none runs meanwhile."""
  points = [_stand_in(tmp_path, 'warm_s0', sleep=2.0),
            _stand_in(tmp_path, 'routed_s0', after='warm_s0'),
            _stand_in(tmp_path, 'dense_s0')]
  outcomes = sweep.run_points(points, parallel=2, report=lambda line: None)
  assert [(o.name, o.status) for o in outcomes] == [
      ('warm_s0', 'done'), ('routed_s0', 'done'), ('dense_s0', 'done')]
  _, warm_end = _times(tmp_path, 'warm_s0')
  assert _times(tmp_path, 'dense_s0')[0] < warm_end       # filled the free slot
  assert _times(tmp_path, 'routed_s0')[0] >= warm_end


def test_a_point_whose_warm_start_failed_is_not_run(tmp_path):
  points = [_stand_in(tmp_path, 'warm_s0', 3), _stand_in(tmp_path, 'routed_s0', after='warm_s0'),
            _stand_in(tmp_path, 'dense_s0')]
  outcomes = sweep.run_points(points, parallel=1, report=lambda line: None)
  assert [(o.name, o.status) for o in outcomes] == [
      ('warm_s0', 'failed'), ('routed_s0', 'failed'), ('dense_s0', 'done')]
  assert outcomes[1].message == 'not run: warm_s0, which it starts from, did not finish'
  assert not (tmp_path / 'routed_s0').exists()
  with pytest.raises(ValueError, match='point routed_s0 starts after warm_s1, which is not '
                                       'among the points to run'):
    sweep.run_points([_stand_in(tmp_path, 'routed_s0', after='warm_s1')])


def test_the_sweeps_points_start_after_their_own_seeds_warm_start():
  _, points = sweep_script.points(sweeps.SWEEPS['tiny'], 'out', steps=None, seeds=(0, 1))
  after = {p.name: p.after for p in points}
  assert after == {'warm_s0': None, 'warm_s1': None, 'dense_s0': None, 'dense_s1': None,
                   'topk_k2_s0': 'warm_s0', 'topk_k2_s1': 'warm_s1'}
  assert [p.name for p in points][:2] == ['warm_s0', 'warm_s1']


def test_points_runs_the_chosen_points_with_their_warm_starts_only(tmp_path, capsys):
  tiny = sweeps.SWEEPS['tiny']
  _, points = sweep_script.points(tiny, 'out', steps=None, seeds=(0, 1))
  chosen = sweep_script.only_points(tiny, points, 'topk_k2')
  assert [p.name for p in chosen] == ['warm_s0', 'warm_s1', 'topk_k2_s0', 'topk_k2_s1']
  assert [p.name for p in sweep_script.only_points(tiny, points, 'dense')] == [
      'dense_s0', 'dense_s1']
  sweep_script.main(['tiny', '--points', 'dense', '--dry-run', '--out', str(tmp_path / 'o')])
  assert capsys.readouterr().out.count('experiments.train') == len(tiny.seeds)
  with pytest.raises(SystemExit, match="--points: unknown point\\(s\\) nope; the sweep "
                                       "'tiny' has dense, topk_k2"):
    sweep_script.main(['tiny', '--points', 'dense,nope', '--out', str(tmp_path / 'o')])
  with pytest.raises(SystemExit, match='--points chooses what runs; --report reports every'):
    sweep_script.main(['tiny', '--points', 'dense', '--report', '--out', str(tmp_path / 'o')])
  assert not (tmp_path / 'o').exists()


def test_worker_env_single_threads_xla_when_runs_fill_the_cores():
  env = sweep.worker_env(2, base={'XLA_FLAGS': '--foo'}, cores=2)
  assert env['XLA_FLAGS'] == '--foo --xla_cpu_multi_thread_eigen=false'
  assert 'XLA_FLAGS' not in sweep.worker_env(1, base={}, cores=2)


def test_a_point_evaluated_on_part_of_the_split_is_evaluated_again(tmp_path):
  from tests.study.test_results import whole_report
  (tmp_path / 'summary.json').write_text(json.dumps({'steps': 6, 'test': {'sequences': 64}}))
  for report, whole in ((whole_report(scored=16, max_batches=1), False),
                        (whole_report(step=4), False), (whole_report(), True)):
    (tmp_path / 'eval.json').write_text(json.dumps(report))
    assert sweep.is_evaluated(str(tmp_path)) == whole
  # Scored on another split than the sweep's (an experiments.eval --split validation over
  # it): evaluated again, not skipped as finished (its report then failed every sitting).
  (tmp_path / 'summary.json').write_text(json.dumps(
      {'steps': 6, 'test': {'sequences': 64}, 'validation': {'sequences': 64}}))
  (tmp_path / 'eval.json').write_text(json.dumps({**whole_report(), 'split': 'validation'}))
  assert not sweep.is_evaluated(str(tmp_path)) and not sweep.is_finished(str(tmp_path))
  assert sweep.is_evaluated(str(tmp_path), 'validation')


def test_a_stage_whose_file_cannot_be_read_runs_again(tmp_path):
  from tests.study.test_results import whole_report
  summary = json.dumps({'steps': 6, 'test': {'sequences': 64}})
  (tmp_path / 'summary.json').write_text(summary)
  (tmp_path / 'eval.json').write_text(json.dumps(whole_report()))
  assert sweep.is_finished(str(tmp_path))
  (tmp_path / 'eval.json').write_text(json.dumps(whole_report())[:30])    # cut by a kill
  assert sweep.is_trained(str(tmp_path)) and not sweep.is_evaluated(str(tmp_path))
  (tmp_path / 'summary.json').write_text(summary[:10])
  assert not sweep.is_trained(str(tmp_path)) and not sweep.is_finished(str(tmp_path))


def test_a_report_that_fails_after_the_points_ran_is_one_error_line(tmp_path, monkeypatch):
  """The report written after a sitting reads every point's files: one it cannot read is
  one error line (it was a traceback)."""
  def unreadable(*_, **__):
    raise ValueError('dense_s0/eval.json scores the validation split')
  monkeypatch.setattr(sweep, 'run_points', lambda points, **_: [])
  monkeypatch.setattr(sweep_script, 'finish', unreadable)
  with pytest.raises(SystemExit, match='^error: dense_s0/eval.json scores the validation'):
    sweep_script.main(['tiny', '--out', str(tmp_path / 'o')])
