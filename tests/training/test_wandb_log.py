"""W&B logging (log.wandb): a real offline wandb run inside the run folder whose history,
read back from W&B's own run files, is the scalars of metrics.jsonl; off by default;
bad values and a missing wandb package are refused before anything is written.

No mocks of wandb: W&B runs offline (WANDB_MODE unset), with every directory it uses
inside tmp_path and its server address pointed at a closed local port.
"""

import dataclasses
import glob
import json
import os
import struct
import sys

import pytest

from gating.training import config, tensorboard, wandb_log
from gating.training import loop as train
from gating.training.metrics_file import read_metrics
from gating.training.config import LogConfig, TrainConfig
from tests.training.test_train import TINY

PROJECT = 'test-project'


def _offline_env(mp: pytest.MonkeyPatch, root) -> None:
  """Offline W&B (no WANDB_MODE, no key), every W&B directory under `root`, quiet."""
  for name in ('WANDB_MODE', 'WANDB_API_KEY', 'WANDB_PROJECT', 'WANDB_ENTITY', 'WANDB_RUN_ID',
               'WANDB_RESUME'):
    mp.delenv(name, raising=False)
  for name, sub in (('WANDB_DIR', 'wandb_dir'), ('WANDB_CACHE_DIR', 'wandb_cache'),
                    ('WANDB_CONFIG_DIR', 'wandb_config'), ('WANDB_DATA_DIR', 'wandb_data'),
                    ('WANDB_ARTIFACT_DIR', 'wandb_artifacts')):
    mp.setenv(name, str(root / sub))
  mp.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')   # nothing could be reached anyway
  mp.setenv('WANDB_SILENT', 'true')


@pytest.fixture(scope='module')
def resumed_run(tmp_path_factory):
  """A tiny run with log.wandb stopped after its checkpoint of step 5, then resumed to 10
  (two sittings, two offline W&B run folders of one run id)."""
  pytest.importorskip('wandb')
  root = tmp_path_factory.mktemp('wandb')
  workdir = root / 'run'
  cfg = dataclasses.replace(TINY, steps=10, checkpoint_every=5, eval_every=5,
                            log=LogConfig(wandb=PROJECT))
  with pytest.MonkeyPatch.context() as mp:
    _offline_env(mp, root)
    assert train.train(cfg, str(workdir), progress=False, stop_after=5) is None
    first_id = (workdir / wandb_log.ID_FILE).read_text().strip()
    summary = train.train(cfg, str(workdir), progress=False)
  return workdir, first_id, summary


def read_history(run_file: str) -> dict[int, dict[str, float]]:
  """{step: {key: value}} of the history records of an offline run's .wandb file.

  The file is W&B's record log (the LevelDB log format): a 7-byte header ':W&B', magic
  0xBEE1, version; then 32 KiB blocks of chunks [u32 crc][u16 length][u8 type][data]
  (type 1 full, 2 first, 3 middle, 4 last; a block's last < 7 bytes are padding); a
  record's data is a wandb_internal_pb2.Record.
  """
  from wandb.proto import wandb_internal_pb2
  data = open(run_file, 'rb').read()
  assert data[:4] == b':W&B' and struct.unpack('<H', data[4:6])[0] == 0xBEE1
  block, pos, pending, out = 32768, 7, b'', {}
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind == 0:
      break
    pending = chunk if kind in (1, 2) else pending + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record.FromString(pending)
      if record.WhichOneof('record_type') == 'history':
        row = {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        out.setdefault(int(row['_step']), {}).update(
            {k: v for k, v in row.items() if not k.startswith('_')})
  return out


@pytest.mark.slow
def test_a_run_logs_its_metrics_to_an_offline_wandb_run_in_its_folder(resumed_run):
  workdir, run_id, summary = resumed_run
  assert summary['steps'] == 10
  assert (workdir / wandb_log.ID_FILE).read_text().strip() == run_id
  sittings = sorted(glob.glob(str(workdir / 'wandb' / f'offline-run-*-{run_id}')))
  assert len(sittings) == 2, os.listdir(workdir / 'wandb')   # the resume: the same run id
  history = {}
  for sitting in sittings:
    (run_file,) = glob.glob(os.path.join(sitting, f'run-{run_id}.wandb'))
    history.update(read_history(run_file))
  # What metrics.jsonl says, as W&B keeps it: one row per step, a later value of a key
  # (the full validation after the last step's partial one) replacing an earlier one.
  expected = {}
  for record in read_metrics(str(workdir / 'metrics.jsonl')):
    expected.setdefault(record['step'], {}).update(tensorboard.scalars(record))
  assert sorted(history) == sorted(expected) == list(range(1, 11))
  for step, row in expected.items():
    assert history[step] == pytest.approx(row, rel=1e-6), step
  assert {'train/loss', 'train/active_heads/0', 'validation/accuracy', 'test/loss'} <= set(
      history[10])


def test_wandb_is_off_by_default_and_not_a_compatibility_field():
  assert TrainConfig().log.wandb is None
  on = config.override(TINY, [f'log.wandb={PROJECT}'])
  assert on.log.wandb == PROJECT
  assert config.compatibility(on) == config.compatibility(TINY)
  old = TrainConfig().to_dict()
  del old['log']                                        # a config from before the section
  assert config.from_dict(old) == TrainConfig()
  assert config.from_dict(on.to_dict()) == on


@pytest.mark.parametrize('assignment,message', [
    ('log.wandb=', r"log.wandb: must be a W&B project name \(or none: off\), got ''"),
    ('log.wandb=a/b', "log.wandb: 'a/b' is not a W&B project name"),
    ('log.wandb=' + 'x' * 129, 'at most 128 characters'),
    ('log.project=x', "unknown config key 'log.project'"),
])
def test_a_bad_project_is_refused_naming_the_field(assignment, message):
  with pytest.raises(ValueError, match=message):
    config.override(TrainConfig(), [assignment])
  with pytest.raises(ValueError, match='log.wandb'):
    LogConfig(wandb=3)


def test_offline_unless_wandb_mode_is_set(monkeypatch):
  monkeypatch.delenv('WANDB_MODE', raising=False)
  assert wandb_log.mode() == 'offline'
  monkeypatch.setenv('WANDB_MODE', '')
  assert wandb_log.mode() == 'offline'
  for value in ('online', 'disabled'):
    monkeypatch.setenv('WANDB_MODE', value)
    assert wandb_log.mode() == value


def test_the_run_id_is_made_once_per_run_folder(tmp_path):
  first = wandb_log.run_id(str(tmp_path))
  assert first and wandb_log.run_id(str(tmp_path)) == first
  assert wandb_log.run_id(str(tmp_path / '..' / tmp_path.name)) == first
  other = tmp_path / 'other'
  other.mkdir()
  assert wandb_log.run_id(str(other)) != first


def test_without_wandb_installed_training_names_the_extra_and_writes_nothing(
    tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)       # `import wandb` raises ImportError
  cfg = dataclasses.replace(TINY, log=LogConfig(wandb=PROJECT))
  with pytest.raises(ValueError, match=r'log.wandb: .*not installed: pip install -e "\.\[wandb\]"'):
    train.train(cfg, str(tmp_path / 'run'), progress=False)
  assert not (tmp_path / 'run').exists()

  from experiments import train as script
  with pytest.raises(SystemExit) as exit_info:
    script.main(['--workdir', str(tmp_path / 'cli'), '--steps', '1', '--no-plots',
                 '--no-progress', '--set', f'log.wandb={PROJECT}'])
  message = str(exit_info.value.code)
  assert message.startswith('error: log.wandb: ') and '\n' not in message
  assert 'pip install -e ".[wandb]"' in message
  assert not (tmp_path / 'cli').exists()
