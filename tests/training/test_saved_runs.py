"""Run folders written before the layout change (config format 1, no gate_options field)
still evaluate and resume; saved configs fill the fields they lack with defaults."""

import json
import os
import shutil

import numpy as np
import pytest

from experiments import eval as eval_script
from gating.study import evaluation
from gating.training import checkpoint, config
from gating.training import loop as train

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures',
                       'run_format1')


@pytest.fixture
def old_run(tmp_path):
  """A copy of a 6-step run folder written by the code before the layout change
  (commit b64eb0f: python -m experiments.train --steps 6 with a tiny model)."""
  workdir = tmp_path / 'run'
  shutil.copytree(FIXTURE, workdir)
  return workdir


def test_the_fixture_predates_the_format_and_the_new_fields():
  saved = json.load(open(os.path.join(FIXTURE, 'config.json')))
  assert 'format' not in saved and 'gate_options' not in saved['model']


def test_an_old_run_folder_evaluates(old_run):
  run = evaluation.load_run(str(old_run))
  assert run.step == 6 and run.config.model.gate_options == ()
  eval_script.main(['--workdir', str(old_run), '--k', '2'])
  report = json.load(open(old_run / 'eval.json'))
  assert report['results'] and all(np.isfinite(r['loss']) for r in report['results'])


def test_an_old_run_folder_resumes(old_run, capsys):
  cfg = config.from_dict(json.load(open(old_run / 'config.json')))
  cfg = config.override(cfg, ['steps=8'])
  # Its schedule was fit to 6 steps: more steps are refused unless asked for, and nothing
  # in the folder changes.
  before = {p.name: p.read_bytes() for p in old_run.iterdir() if p.is_file()}
  with pytest.raises(ValueError, match=r'trained with a schedule fit to 6 steps \(it is at '
                                       r'step 6\); continuing to 8 steps would stretch it: '
                                       r'.*step 7 runs at 2\.571e-03\. Pass --extend-schedule'):
    train.train(cfg, str(old_run), progress=False)
  assert {p.name: p.read_bytes() for p in old_run.iterdir() if p.is_file()} == before
  with pytest.raises(ValueError, match='would end it early'):
    train.train(config.override(cfg, ['steps=4']), str(old_run), progress=False)
  # Stopped partway, the extended run leaves no summary.json of the 6-step run to be taken
  # for its own (a sweep would count it trained): that one is moved aside, kept.
  assert train.train(cfg, str(old_run), progress=False, extend_schedule=True,
                     stop_after=7) is None
  assert not (old_run / 'summary.json').exists()
  assert (old_run / 'summary.earlier.json').read_bytes() == before['summary.json']
  summary = train.train(cfg, str(old_run), progress=False, extend_schedule=True)
  said = capsys.readouterr().out
  assert 'moved aside to summary.earlier.json' in said
  assert 'extending' in said and 'refit to 8 steps: the rate of step 6 was 3.000e-03' in said
  lr7 = [json.loads(line)['lr'] for line in open(old_run / 'metrics.jsonl')
         if json.loads(line).get('step') == 7 and json.loads(line)['kind'] == 'train']
  assert lr7 == [pytest.approx(train.learning_rate(cfg, 6))]
  provenance = json.load(open(old_run / 'provenance.json'))   # the session that extended it
  assert any('refit to 8 steps' in session.get('schedule_extended', '')
             for session in [provenance, *provenance.get('earlier', [])])
  assert summary['steps'] == 8 and np.isfinite(summary['test']['loss'])
  steps = [json.loads(line)['step'] for line in open(old_run / 'metrics.jsonl')
           if json.loads(line)['kind'] == 'train']
  assert steps == list(range(1, 9))
  assert json.load(open(old_run / 'config.json'))['format'] == config.FORMAT


def test_a_field_missing_from_a_saved_config_takes_its_default():
  values = config.TrainConfig().to_dict()
  del values['model']['router_init_logit'], values['format']
  assert config.from_dict(values) == config.TrainConfig()


def test_a_newer_format_is_refused():
  values = {**config.TrainConfig().to_dict(), 'format': config.FORMAT + 1}
  with pytest.raises(ValueError, match='config format .* newer headgate'):
    config.from_dict(values)


def test_the_compute_path_does_not_decide_compatibility(old_run):
  cfg = config.from_dict(json.load(open(old_run / 'config.json')))
  meta = {'config': cfg.to_dict(), 'data': {}}
  for other in (['model.path=gathered'], ['model.eval_path=masked']):
    changed = config.override(cfg, other)
    assert config.compatibility(changed) == config.compatibility(cfg)
  with pytest.raises(checkpoint.CheckpointError, match='model.num_heads: checkpoint 4 vs now 8'):
    train.check_compatible(meta, config.override(cfg, ['model.num_heads=8']),
                           train.load_data(cfg).info, 'here')
