"""--gpus-per-run: each sweep subprocess sees its own GPUs (read from the child's env)."""

import json
import os
import sys

import pytest

from experiments import sweep as sweep_script
from tests.study.test_sweep import EVAL, SUMMARY
from gating.study import devices
from gating.study import sweep


def test_groups_and_slot_envs():
  ids = devices.device_ids(8, {})
  assert devices.device_groups(ids, 2) == [['0', '1'], ['2', '3'], ['4', '5'], ['6', '7']]
  assert devices.device_groups(ids, 3) == [['0', '1', '2'], ['3', '4', '5']]
  # a parent CUDA_VISIBLE_DEVICES is respected
  assert devices.device_ids(2, {'CUDA_VISIBLE_DEVICES': '5,7'}) == ['5', '7']
  envs = devices.slot_envs({'A': '1'}, devices.device_groups(ids, 2), 4)
  assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == ['0,1', '2,3', '4,5', '6,7']
  assert all(e['A'] == '1' and 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in e for e in envs)
  # 4 runs on 2 GPUs: two per GPU, each capped to its share of the memory
  shared = devices.slot_envs({}, devices.device_groups(ids[:2], 1), 4)
  assert [e['CUDA_VISIBLE_DEVICES'] for e in shared] == ['0', '1', '0', '1']
  assert {e['XLA_PYTHON_CLIENT_MEM_FRACTION'] for e in shared} == {'0.45'}
  with pytest.raises(ValueError, match='--gpus-per-run 3 is more than the 2 GPUs present'):
    devices.device_groups(['0', '1'], 3)


def test_each_child_sees_its_own_devices(tmp_path):
  """run_points with one environment per slot: the children write what they see."""
  def point(name):
    workdir = tmp_path / name
    # what a finished, whole point's files hold (test_sweep), and the devices seen
    whole = {**json.loads(SUMMARY), **json.loads(EVAL)}
    write = ('import json, os, sys; os.makedirs(sys.argv[2], exist_ok=True); '
             f'json.dump({{**{whole!r}, **{{k: os.environ.get(k) for k in '
             '("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION")}}, '
             'open(os.path.join(sys.argv[2], sys.argv[1]), "w"))')
    return sweep.Point(name, str(workdir),
                       [sys.executable, '-c', write, 'summary.json', str(workdir)],
                       [sys.executable, '-c', write, 'eval.json', str(workdir)])

  envs = devices.slot_envs(dict(os.environ), devices.device_groups(['0', '1', '2', '3'], 2), 2)
  outcomes = sweep.run_points([point('a'), point('b')], parallel=2, env=envs,
                              report=lambda line: None)
  assert [o.status for o in outcomes] == ['done', 'done']
  seen = [json.load(open(tmp_path / name / 'summary.json')) for name in ('a', 'b')]
  assert sorted(s['CUDA_VISIBLE_DEVICES'] for s in seen) == ['0,1', '2,3']
  assert all(s['XLA_PYTHON_CLIENT_MEM_FRACTION'] is None for s in seen)
  for name in ('a', 'b'):   # train and eval of one point ran in the same slot
    assert (json.load(open(tmp_path / name / 'eval.json')) ==
            json.load(open(tmp_path / name / 'summary.json')))


def test_sweep_cli_gives_one_slot_per_gpu_group(tmp_path, capsys):
  sweep_script.main(['tiny', '--dry-run', '--out', str(tmp_path / 'x'), '--gpus-per-run', '2',
                     '--num-gpus', '4'])
  printed = capsys.readouterr().out
  assert 'slot 0: CUDA_VISIBLE_DEVICES=0,1\nslot 1: CUDA_VISIBLE_DEVICES=2,3\n' in printed
  assert 'slot 2' not in printed


def test_sweep_cli_refuses_more_gpus_per_run_than_present(tmp_path):
  out = tmp_path / 'x'
  with pytest.raises(SystemExit, match='error: --gpus-per-run 4 is more than the 2 GPUs'):
    sweep_script.main(['tiny', '--out', str(out), '--gpus-per-run', '4', '--num-gpus', '2'])
  # counted by JAX in a subprocess: this test machine has no GPU
  with pytest.raises(SystemExit, match='error: --gpus-per-run 1 is more than the 0 GPUs'):
    sweep_script.main(['tiny', '--out', str(out), '--gpus-per-run', '1'])
  assert not out.exists()
