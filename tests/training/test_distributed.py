"""Two CPU processes train one model (jax.distributed on localhost, gloo collectives).

Each process has 2 CPU devices, so the global batch is sharded over 4 devices in 2
processes. Checked: the global batch holds exactly batch_size distinct rows, each process
loading only its own; the loss curve equals a one-process run of the same global batch;
only process 0 writes metrics, plots and summary while orbax writes the whole checkpoint;
a two-process resume continues exactly; a batch that does not divide by the 4 devices is
refused before anything compiles.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from experiments import configs
from gating.training import checkpoint
from gating.training import loop as train
from gating.training.metrics_file import read_metrics
from gating.training.config import override
from tests.xla_env import with_xla_flag

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
OVERRIDES = ['steps=6', 'eval_every=3', 'checkpoint_every=3', 'batch_size=16',
             'eval_batches=1', 'model.num_layers=1', 'model.features=32', 'model.num_heads=4',
             'model.head_dim=none', 'model.gate=topk', 'model.active_heads=2',
             'optim.warmup_steps=1', 'data.num_tasks=4', 'data.input_len=6',
             'data.num_digits=6', 'data.num_recall_tasks=1', 'data.num_induction_tasks=1',
             'data.num_train=256', 'data.num_validation=32', 'data.num_test=32', 'k_schedule=']
TIMEOUT = 300

pytestmark = pytest.mark.slow


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(args, *, devices_per_process=2):
  """Runs `python args...` as process 0 and 1 of a 2-process job; (return codes, outputs)."""
  port = _free_port()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT,
         'XLA_FLAGS': with_xla_flag(
             f'--xla_force_host_platform_device_count={devices_per_process}')}
  procs = [subprocess.Popen(
      [sys.executable, *[a.format(port=port, id=i) for a in args]], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [p.returncode for p in procs], outs


def _train(workdir, overrides=OVERRIDES):
  sets = [a for o in overrides for a in ('--set', o)]
  return _launch(['-m', 'experiments.train', '--preset', 'synthetic', '--distributed',
                  '--coordinator', '127.0.0.1:{port}', '--num-processes', '2',
                  '--process-id', '{id}', '--workdir', str(workdir), '--no-progress', *sets])


def _losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(str(workdir / 'metrics.jsonl'))
          if r['kind'] == 'train'}


GLOBAL_BATCH = '''
import json, sys
import jax, numpy as np
from jax.experimental import multihost_utils
from experiments import configs
from gating import data
from gating.training import distributed, loop
from gating.training.config import override
distributed.initialize('127.0.0.1:{port}', 2, {id})
cfg = override(configs.get('synthetic'), sys.argv[1:])
splits = loop.load_data(cfg)
_, batch_sharding, _ = loop.mesh_and_shardings(cfg.batch_size, cfg.grad_accum)
batch = loop.train_batch(splits.train, 3, cfg, batch_sharding)
tokens = batch['tokens']
local = sum(s.data.shape[0] * s.data.shape[1] for s in tokens.addressable_shards)
gathered = multihost_utils.process_allgather(tokens, tiled=True)
full = data.batch_at(splits.train, 3, cfg.batch_size, cfg.seed)['tokens']
print(json.dumps({{'shape': list(tokens.shape), 'local_rows': local,
                   'equal': bool(np.array_equal(gathered.reshape(full.shape), full)),
                   'distinct': len({{tuple(r) for r in full}})}}))
'''


def test_each_process_loads_only_its_rows_of_the_global_batch():
  codes, outs = _launch(['-c', GLOBAL_BATCH, *OVERRIDES, 'grad_accum=2'])
  assert codes == [0, 0], outs
  for out in outs:
    seen = json.loads(out.strip().splitlines()[-1])
    # [A=2 micro-batches, 8 rows]: 4 of each micro-batch's rows on each process
    assert seen == {'shape': [2, 8, 14], 'local_rows': 2 * 4, 'equal': True, 'distinct': 16}


def test_two_processes_train_like_one_and_resume_exactly(tmp_path):
  codes, outs = _train(tmp_path / 'two')
  assert codes == [0, 0], outs
  assert 'validation:' in outs[0] and 'validation:' not in outs[1]  # only 0 reports
  two = tmp_path / 'two'
  records = read_metrics(str(two / 'metrics.jsonl'))
  assert [r['step'] for r in records if r['kind'] == 'train'] == list(range(1, 7))
  assert len([r for r in records if r['kind'] == 'eval']) == 4   # steps 3, 6; val, test
  assert len([f for f in os.listdir(two) if f.startswith('events.out.tfevents')]) == 1
  for name in ('summary.json', 'config.json', 'plots'):
    assert (two / name).exists()

  # the same global batch in one process (in this pytest process, one device)
  cfg = override(configs.get('synthetic'), OVERRIDES)
  train.train(cfg, str(tmp_path / 'one'), progress=False)
  one_losses, two_losses = _losses(tmp_path / 'one'), _losses(two)
  assert sorted(two_losses) == sorted(one_losses)
  np.testing.assert_allclose([two_losses[s] for s in sorted(two_losses)],
                             [one_losses[s] for s in sorted(one_losses)], rtol=1e-5)
  # orbax wrote the whole replicated state: it restores here, in one process, and holds
  # the one-process run's parameters. The key projection's bias is left out: its gradient
  # is zero in exact arithmetic (softmax ignores a shift of all scores), so Adam turns
  # rounding noise into steps of +-lr there.
  splits = train.load_data(cfg)
  params = []
  for run in ('one', 'two'):
    graphdef, state = train.create(cfg, splits.info)
    mngr = checkpoint.manager(str(tmp_path / run / 'checkpoints'))
    assert mngr.all_steps() == [3, 6]
    learner, _ = nnx.merge(graphdef, checkpoint.restore(mngr, 6, state))
    params.append({path: np.asarray(var[...]) for path, var
                   in nnx.to_flat_state(nnx.state(learner.model, nnx.Param))
                   if path[-2:] != ('key', 'bias')})
  assert len(params[1]) == len(params[0]) > 20
  for path, value in params[0].items():
    np.testing.assert_allclose(params[1][path], value, rtol=1e-4, atol=1e-6, err_msg=path)

  # killed after the checkpoint of step 3: two processes resume and continue exactly
  resumed = tmp_path / 'resumed'
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  (resumed / 'summary.json').unlink()
  codes, outs = _train(resumed)
  assert codes == [0, 0], outs
  assert f'resuming {resumed} from step 3' in outs[0]
  assert _losses(resumed) == two_losses


@pytest.mark.slow
def test_a_batch_the_devices_do_not_divide_is_refused_before_compiling(tmp_path):
  codes, outs = _train(tmp_path / 'odd', [*OVERRIDES, 'batch_size=18'])
  assert codes == [1, 1]
  for out in outs:
    assert out.strip().splitlines()[-1] == (
        'error: batch_size: the micro-batch of 18 rows (batch_size / grad_accum) is not '
        'divisible by the 4 devices')
  assert not (tmp_path / 'odd').exists()


def test_a_process_that_dies_leaves_the_last_checkpoint_and_the_run_resumes(tmp_path):
  """Process 1 is killed after a checkpoint; process 0 fails within the (low) heartbeat
  timeout instead of hanging; the checkpoints left are whole, and two processes resume."""
  workdir = tmp_path / 'run'
  overrides = [*OVERRIDES, 'steps=30', 'eval_every=30', 'checkpoint_every=3']
  sets = [a for o in overrides for a in ('--set', o)]
  port = _free_port()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT,
         'XLA_FLAGS': with_xla_flag('--xla_force_host_platform_device_count=2')}
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'experiments.train', '--preset', 'synthetic', '--distributed',
       '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i),
       '--heartbeat-timeout', '5', '--workdir', str(workdir), '--no-progress', *sets],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    deadline = time.time() + TIMEOUT
    while not (workdir / 'checkpoints' / '6').exists():
      assert time.time() < deadline and procs[0].poll() is None
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0
    assert time.time() - killed < 30   # the heartbeat timeout (5 s), not a hang
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  mngr = checkpoint.manager(str(workdir / 'checkpoints'))
  last = mngr.latest_step()
  assert last is not None and 6 <= last < 30
  mngr.close()
  assert not (workdir / 'summary.json').exists()

  codes, outs = _train(workdir, overrides)
  assert codes == [0, 0], outs
  assert f'resuming {workdir} from step {last}' in outs[0]
  assert sorted(_losses(workdir)) == list(range(1, 31))
