"""What a new user tripped on: corrupt checkpoints are named as such (with the intact
earlier steps and --restore-step), damage that decompresses without error is caught by
checksums, data errors leave no folder, a finished run is left as it is, and provenance
keeps every session."""

import dataclasses
import gc
import json
import os
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import eval as eval_script
from experiments import train as train_script
from gating.data import corpus
from gating.study import evaluation
from gating.training import checkpoint
from gating.training import loop as train
from gating.training.metrics_file import read_metrics
from tests.training.test_train import TINY

SMALL = dataclasses.replace(TINY, steps=6, checkpoint_every=2, eval_every=6, eval_batches=1,
                            data=dataclasses.replace(TINY.data, num_train=256,
                                                     num_validation=32, num_test=32))
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures',
                       'run_format1')


@pytest.fixture(scope='module')
def finished(trained_run):
  """A finished 6-step run with checkpoints at steps 2, 4 and 6 (shared: copied per test)."""
  return trained_run(SMALL)


def copy(run, tmp_path):
  shutil.copytree(run, tmp_path / 'run')
  return tmp_path / 'run'


def flip_bytes(step_dir, count=64, offset=100):
  """Flips bytes inside every array data file of a checkpoint: the damage that
  decompresses without any error from orbax or TensorStore."""
  data_dir = os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data_dir):
    path = os.path.join(data_dir, name)
    raw = bytearray(open(path, 'rb').read())
    for i in range(offset, min(len(raw), offset + count)):
      raw[i] ^= 0xFF
    open(path, 'wb').write(bytes(raw))


CORRUPT = (r'the checkpoint at step 6 \(.*checkpoints/6\) looks corrupt: .*\. Intact earlier '
           r'checkpoints: steps \[2, 4\]; use one with --restore-step N .*nothing was deleted')


def test_flipped_bytes_are_caught_by_the_checksums_not_written_as_nan(finished, tmp_path):
  run = copy(finished, tmp_path)
  flip_bytes(run / 'checkpoints' / '6')
  with pytest.raises(checkpoint.CheckpointError, match=CORRUPT + '.*') as error:
    evaluation.load_run(str(run))
  assert 'checksums recorded when it was saved' in str(error.value)
  assert '\n' not in str(error.value)
  with pytest.raises(SystemExit, match='^error: the checkpoint at step 6'):
    eval_script.main(['--workdir', str(run), '--k', '2'])
  assert not os.path.exists(run / 'eval.json')
  eval_script.main(['--workdir', str(run), '--k', '2', '--restore-step', '4'])
  report = json.load(open(run / 'eval.json'))
  assert report['step'] == 4 and all(np.isfinite(r['loss']) for r in report['results'])


@pytest.mark.parametrize('damage', ['garbage_arrays', 'truncated_meta'])
def test_unreadable_files_are_named_corrupt_and_train_resumes_from_an_intact_step(
    finished, tmp_path, damage):
  run = copy(finished, tmp_path)
  step6 = run / 'checkpoints' / '6'
  if damage == 'garbage_arrays':
    for root, _, files in os.walk(step6 / 'state'):
      for name in files:
        open(os.path.join(root, name), 'wb').write(b'not a checkpoint')
  else:
    path = step6 / 'meta' / 'metadata'
    os.truncate(path, os.path.getsize(path) // 2)
  resumed = dataclasses.replace(SMALL, steps=8)     # 2 more steps: the schedule is refit
  with pytest.raises(checkpoint.CheckpointError, match=CORRUPT):
    train.train(resumed, str(run), progress=False, extend_schedule=True)
  assert sorted(os.listdir(run / 'checkpoints')) == ['2', '4', '6']   # nothing moved
  with pytest.raises(checkpoint.CheckpointError, match=r'--restore-step 5: no checkpoint.*\[2, 4, 6\]'):
    train.train(resumed, str(run), progress=False, restore_step=5, extend_schedule=True)
  summary = train.train(resumed, str(run), progress=False, restore_step=4,
                        extend_schedule=True)
  assert summary['steps'] == 8 and np.isfinite(summary['test']['loss'])
  assert os.listdir(run / 'checkpoints_quarantine') == ['6']        # moved aside, not deleted
  steps = [r['step'] for r in read_metrics(str(run / 'metrics.jsonl'))
           if r['kind'] == 'train']
  assert steps == list(range(1, 9))


@pytest.mark.parametrize('what,error', [
    ('arrays', PermissionError(13, 'Permission denied', 'checkpoints/6/state')),
    # TensorStore words every failed read 'Error reading', a denied one too
    ('arrays', ValueError('PERMISSION_DENIED: Error reading local file '
                          '"checkpoints/6/state/d/0a1b": Permission denied')),
    ('arrays', ValueError('sharding of the target does not match the saved array')),
    ('metadata', PermissionError(13, 'Permission denied', 'checkpoints/6/meta'))])
def test_a_read_that_fails_for_another_reason_is_not_called_corrupt(finished, tmp_path,
                                                                      monkeypatch, what, error):
  """Only damaged bytes are corruption: a permission or a sharding bug is named as itself,
  without the advice to restore an earlier step."""
  run = copy(finished, tmp_path)
  real = checkpoint.ocp.CheckpointManager.restore

  def failing(self, step, args=None, **kw):
    if (what == 'arrays') == ('state' in args.keys()):
      raise error
    return real(self, step, args=args, **kw)
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'restore', failing)
  with pytest.raises(checkpoint.CheckpointError) as caught:
    evaluation.load_run(str(run))
  said = str(caught.value)
  assert f'reading the {what} of the checkpoint at step 6' in said
  assert 'not because its bytes are damaged' in said and str(error) in said
  assert 'corrupt' not in said and '--restore-step' not in said
  assert not isinstance(caught.value, checkpoint.CorruptCheckpoint)


@pytest.mark.parametrize('damage', ['metadata_file_gone', 'array_index_gone',
                                    'empty_newer_step'])
def test_files_missing_from_a_step_folder_are_damage_with_the_intact_steps(finished,
                                                                           tmp_path, damage):
  """A step folder missing a file it needs (or empty, as a kill or a partial copy leaves
  it) is damaged: named corrupt with the intact earlier steps, not 'not because its bytes
  are damaged' with no way forward."""
  run = copy(finished, tmp_path)
  step = 8 if damage == 'empty_newer_step' else 6
  if damage == 'metadata_file_gone':
    os.remove(run / 'checkpoints' / '6' / 'meta' / 'metadata')
  elif damage == 'array_index_gone':
    os.remove(run / 'checkpoints' / '6' / 'state' / '_METADATA')
  else:
    os.makedirs(run / 'checkpoints' / '8')
  intact = '2, 4, 6' if step == 8 else '2, 4'
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf'step {step} \(.*\) looks corrupt: .*Intact earlier checkpoints: '
                           rf'steps \[{intact}\]'):
    evaluation.load_run(str(run))


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_unreadable_arrays_give_one_error_line_without_the_reads_left_in_flight(
    finished, tmp_path):
  """The reads still in flight when a restore fails printed 'Event loop is closed' through
  sys.unraisablehook, about a hundred tracebacks around the CLI's one error line (pytest's
  own hook turns each into a warning, made an error here)."""
  run = copy(finished, tmp_path)
  data_dir = run / 'checkpoints' / '6' / 'state' / 'ocdbt.process_0' / 'd'
  for name in os.listdir(data_dir):
    (data_dir / name).write_bytes(b'not a checkpoint' * 64)
  with pytest.raises(SystemExit, match='^error: the checkpoint at step 6 .* looks corrupt'):
    eval_script.main(['--workdir', str(run), '--k', '2'])
  time.sleep(0.5)      # the reads left in flight end in TensorStore's threads
  gc.collect()


def test_a_step_folder_holding_another_steps_checkpoint_is_refused(finished, tmp_path):
  """checkpoints/6 replaced by a copy of step 4: it loaded as step 6 with step 4's
  values, and training went on from them."""
  run = copy(finished, tmp_path)
  shutil.rmtree(run / 'checkpoints' / '6')
  shutil.copytree(run / 'checkpoints' / '4', run / 'checkpoints' / '6')
  with pytest.raises(checkpoint.CheckpointError,
                     match='folder of step 6 .* holds the checkpoint saved at step 4'):
    evaluation.load_run(str(run))


def test_a_truncated_orbax_step_metadata_file_still_restores_verified(finished, tmp_path):
  """_CHECKPOINT_METADATA holds orbax's timestamps; orbax 0.12.8 reads around a truncated
  one, and the arrays then verify against their checksums, so the step restores."""
  run = copy(finished, tmp_path)
  os.truncate(run / 'checkpoints' / '6' / '_CHECKPOINT_METADATA', 10)
  assert evaluation.load_run(str(run)).step == 6


def test_a_checkpoint_without_checksums_restores_with_a_notice(tmp_path, capfd):
  shutil.copytree(FIXTURE, tmp_path / 'old')
  assert evaluation.load_run(str(tmp_path / 'old')).step == 6
  assert 'checkpoint at step 6 carries no checksums' in capfd.readouterr().err


def test_non_finite_values_in_a_checkpoint_are_corruption(tmp_path):
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  model.kernel[...] = model.kernel[...].at[0, 0].set(jnp.nan)
  mngr = checkpoint.manager(str(tmp_path / 'ckpt'))
  checkpoint.save(mngr, 1, nnx.state(model), {'step': 1})
  with pytest.raises(checkpoint.CheckpointError, match=r'step 1 \(.*\) looks corrupt: 1 array.*non-finite'):
    checkpoint.load(mngr, nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(1))))
  mngr.close()


def test_checksums_see_one_changed_bit_and_the_order_of_values():
  x = {'a': jnp.arange(6, dtype=jnp.float32), 'b': jnp.ones((2, 2), jnp.bfloat16)}
  base = checkpoint.checksums(x)
  assert base == checkpoint.checksums(jax_copy(x))
  flipped = {**x, 'a': x['a'].at[3].set(np.nextafter(np.float32(3), np.float32(4)))}
  assert checkpoint.checksums(flipped)['a'] != base['a']
  assert checkpoint.checksums({**x, 'a': x['a'][::-1]})['a'] != base['a']


def jax_copy(tree):
  return {k: jnp.array(v) for k, v in tree.items()}


def test_bad_data_is_one_error_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / 'run'
  # A hub source on a machine without the network (made so here, whatever this one has).
  monkeypatch.setattr(corpus, '_offline', lambda: 'no network in this test')
  for source in (tmp_path / 'missing.txt', tmp_path / 'empty.txt', 'hub:someone/corpus'):
    if source == tmp_path / 'empty.txt':
      source.write_text('')
    with pytest.raises(SystemExit) as exit_info:
      train_script.main(['--preset', 'text', '--workdir', str(workdir), '--no-progress',
                         '--set', f'data.sources={source}'])
    message = str(exit_info.value.code)
    name = source if isinstance(source, str) else source.name
    assert message.startswith('error: ') and '\n' not in message and name in message
    assert not workdir.exists()
  assert 'needs the Hugging Face hub, but this machine is offline (no network' in message


def test_a_workdir_that_cannot_be_a_folder_is_one_error_line_before_any_work(tmp_path,
                                                                            monkeypatch):
  def no_data(*args, **kwargs):
    raise AssertionError('the data was loaded before the workdir was checked')
  monkeypatch.setattr(train, 'load_data_and_assigner', no_data)
  file = tmp_path / 'notes.txt'
  file.write_text('mine')
  for workdir, why in ((file, 'exists and is not a folder'),
                       (file / 'run', f'{file} is a file, so {file}/run cannot be a folder')):
    with pytest.raises(SystemExit) as exit_info:
      train_script.main(['--workdir', str(workdir), '--no-progress', '--steps', '2'])
    assert str(exit_info.value.code) == f'error: workdir {workdir}: {why}'
  assert file.read_text() == 'mine' and os.listdir(tmp_path) == ['notes.txt']


def test_a_checkpoint_of_another_model_is_one_error_line(finished, tmp_path):
  run = copy(finished, tmp_path)
  with pytest.raises(SystemExit, match=r'^error: .* different model \(.*model.features: checkpoint 32 vs now 64'):
    train_script.main(['--workdir', str(run), '--no-progress', '--steps', '6'])


def test_training_a_finished_run_again_changes_nothing(finished, tmp_path, capsys):
  run = copy(finished, tmp_path)
  before = {name: open(run / name, 'rb').read()
            for name in ('metrics.jsonl', 'summary.json', 'provenance.json', 'config.json')}
  summary = train.train(SMALL, str(run), progress=False)
  assert summary['already_finished'] and 'is a finished run' in capsys.readouterr().out
  for name, content in before.items():
    assert open(run / name, 'rb').read() == content, name


def test_a_summary_cut_by_a_kill_is_moved_aside_and_the_final_evaluation_runs_again(
    finished, tmp_path, capsys):
  run = copy(finished, tmp_path)
  whole = json.load(open(run / 'summary.json'))
  cut = (run / 'summary.json').read_bytes()[:40]
  (run / 'summary.json').write_bytes(cut)
  summary = train.train(SMALL, str(run), progress=False)
  assert 'summary.json cannot be read; moved aside to summary.damaged.json' in (
      capsys.readouterr().out)
  assert (run / 'summary.damaged.json').read_bytes() == cut          # kept as it was
  assert not summary.get('already_finished')
  assert json.load(open(run / 'summary.json'))['test'] == whole['test'] == summary['test']
  assert train.train(SMALL, str(run), progress=False)['already_finished']
  finals = [(r['split'], r['step']) for r in read_metrics(str(run / 'metrics.jsonl'))
            if r.get('final')]           # the evaluation redone, its lines written once
  assert finals == [('validation', SMALL.steps), ('test', SMALL.steps)]


def test_provenance_keeps_the_sessions_that_trained_earlier_steps(finished, tmp_path):
  run = copy(finished, tmp_path)
  first = json.load(open(run / 'provenance.json'))
  assert first['from_step'] == 0 and first['earlier'] == []
  train.train(dataclasses.replace(SMALL, steps=8), str(run), progress=False,
              extend_schedule=True)
  second = json.load(open(run / 'provenance.json'))
  assert second['from_step'] == 6
  assert [e['from_step'] for e in second['earlier']] == [0]
  assert second['earlier'][0]['git_commit'] == first['git_commit']


def test_a_damaged_provenance_record_is_kept_aside_not_dropped(finished, tmp_path):
  run = copy(finished, tmp_path)
  damaged = b'{"git_commit": "abc", "from_step": 0, "earl'          # cut by a full disk
  (run / 'provenance.json').write_bytes(damaged)
  train.train(dataclasses.replace(SMALL, steps=8), str(run), progress=False,
              extend_schedule=True)
  assert (run / 'provenance.damaged.json').read_bytes() == damaged
  record = json.load(open(run / 'provenance.json'))
  assert record['damaged_earlier_record'] == 'provenance.damaged.json'
  assert record['from_step'] == 6 and record['earlier'] == []
  # A second damaged record does not overwrite the first.
  (run / 'provenance.json').write_bytes(b'[1, 2')
  train._write_provenance(str(run / 'provenance.json'), {'from_step': 8})
  assert (run / 'provenance.damaged.json').read_bytes() == damaged
  assert (run / 'provenance.damaged.1.json').read_bytes() == b'[1, 2'


@pytest.mark.slow
def test_a_text_run_evaluates_and_resumes_after_it_and_its_data_moved(tmp_path):
  corpus = tmp_path / 'here' / 'corpus.txt'
  corpus.parent.mkdir()
  corpus.write_text(''.join(f'line {i} of a small corpus for a moved run.\n' for i in range(400)))
  cfg = dataclasses.replace(
      SMALL, data=dataclasses.replace(SMALL.data, kind='text', sources=(str(corpus),),
                                      seq_len=32),
      model=dataclasses.replace(SMALL.model, prefix_len=4))
  train.train(cfg, str(tmp_path / 'here' / 'run'), progress=False)
  shutil.move(str(tmp_path / 'here'), str(tmp_path / 'there'))
  moved_corpus = tmp_path / 'there' / 'corpus.txt'
  run_dir = tmp_path / 'there' / 'run'
  with pytest.raises(SystemExit, match='error: .*no file at .*here/corpus.txt'):
    eval_script.main(['--workdir', str(run_dir), '--k', '2'])
  eval_script.main(['--workdir', str(run_dir), '--k', '2', '--set',
                    f'data.sources={moved_corpus}'])
  assert json.load(open(run_dir / 'eval.json'))['step'] == 6
  with pytest.raises(SystemExit, match='only data.. keys'):
    eval_script.main(['--workdir', str(run_dir), '--set', 'model.num_heads=2'])
  resumed = dataclasses.replace(cfg, steps=8, data=dataclasses.replace(
      cfg.data, sources=(str(moved_corpus),)))
  assert train.train(resumed, str(run_dir), progress=False,
                     extend_schedule=True)['steps'] == 8
