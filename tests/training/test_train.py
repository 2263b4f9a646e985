import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gating.training import checkpoint
from gating.training import config
from gating.training import loop as train
from gating.training.metrics_file import read_metrics
from gating.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from tests.xla_env import with_xla_flag

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))

TINY = TrainConfig(
    model=ModelConfig(num_layers=1, features=32, num_heads=4, gate='topk', active_heads=2,
                      noise='gumbel'),
    data=DataConfig(num_tasks=4, input_len=6, num_digits=6, num_recall_tasks=1,
                    num_induction_tasks=1, num_train=512, num_validation=64, num_test=64),
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=5),
    steps=40, batch_size=16, eval_batches=2)


def run(cfg, workdir):
  return train.train(cfg, str(workdir), progress=False)


def metrics(workdir, kind='train'):
  return [r for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if r.get('kind') == kind]


def final_params(cfg, workdir):
  splits = train.load_data(cfg)
  graphdef, state = train.create(cfg, splits.info)
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'))
  state = checkpoint.restore(mngr, mngr.latest_step(), state)
  return jax.tree.leaves(nnx_params(graphdef, state))


def nnx_params(graphdef, state):
  from flax import nnx
  learner, _ = nnx.merge(graphdef, state)
  return nnx.state(learner, nnx.Param)


@pytest.mark.slow
def test_a_short_run_learns_and_writes_its_files(trained_run):
  workdir = trained_run(TINY)
  summary = json.load(open(workdir / 'summary.json'))
  lines = metrics(workdir)
  assert [r['step'] for r in lines] == list(range(1, TINY.steps + 1))
  first, last = np.mean([r['task_loss'] for r in lines[:5]]), np.mean(
      [r['task_loss'] for r in lines[-5:]])
  assert last < first - 0.2
  for name in ('config.json', 'provenance.json', 'data_info.json', 'summary.json'):
    assert os.path.exists(workdir / name)
  assert config.from_dict(json.load(open(workdir / 'config.json'))) == TINY
  assert set(summary['validation']['per_label']) <= set(
      json.load(open(workdir / 'data_info.json'))['label_names'])
  assert lines[-1]['usage'] and len(lines[-1]['active_heads']) == 1
  assert checkpoint.manager(str(workdir / 'checkpoints')).latest_step() == TINY.steps
  # Training FLOPs: counted (checked against a count by hand in test_flops.py).
  (per_step,) = summary['train_flops_per_step'].values()
  assert per_step > 0 and summary['train_flops'] > per_step
  assert 'train_flops_with_init' not in summary


@pytest.mark.slow
def test_text_run_learns_on_tinyshakespeare(tmp_path, tinyshakespeare_path):
  cfg = dataclasses.replace(
      TINY, data=DataConfig(kind='text', sources=(tinyshakespeare_path,), seq_len=64,
                            max_bytes_per_domain=200_000),
      model=dataclasses.replace(TINY.model, prefix_len=16), steps=30, batch_size=8)
  run(cfg, tmp_path)
  lines = metrics(tmp_path)
  assert np.mean([r['task_loss'] for r in lines[-5:]]) < lines[0]['task_loss'] - 1.0


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path):
  cfg = dataclasses.replace(TINY, steps=20, checkpoint_every=10)
  assert train.train(cfg, str(tmp_path / 'split'), progress=False, stop_after=10) is None
  with open(tmp_path / 'split' / 'metrics.jsonl', 'a') as f:   # a line from a killed future
    f.write(json.dumps({'step': 11, 'kind': 'train', 'loss': 0.0}) + '\n{"step": 12, "lo')
  run(cfg, tmp_path / 'split')
  run(cfg, tmp_path / 'whole')
  assert [r['step'] for r in metrics(tmp_path / 'split')] == list(range(1, 21))
  for a, b in zip(final_params(cfg, tmp_path / 'split'), final_params(cfg, tmp_path / 'whole')):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_restored_run_is_evaluated_at_its_annealed_temperature(tmp_path):
  """Checkpoints hold no gate temperature: a run killed after its last checkpoint, before
  summary.json, redoes its final evaluation at the temperature training left (top-p at
  1.0 opens other heads than at 0.14), and so does a later evaluation of the checkpoint."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gating.layers.state import GateTemperature  # pylint: disable=import-outside-toplevel
  from gating.study import evaluation  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(
      TINY, steps=3, checkpoint_every=3, eval_every=3, temperature_start=1.0,
      temperature_end=0.05, temperature_steps=3,
      model=dataclasses.replace(TINY.model, gate='top_p', active_heads=None, noise=None,
                                eval_path='masked'))
  first = run(cfg, tmp_path)
  os.remove(tmp_path / 'summary.json')       # killed between the checkpoint and the summary
  again = run(cfg, tmp_path)
  assert again['test'] == first['test'] and again['validation'] == first['validation']
  loaded = evaluation.load_run(str(tmp_path))
  learner, _ = nnx.merge(loaded.graphdef, loaded.state)
  temperatures = [float(v[...]) for _, v in nnx.iter_graph(learner)
                  if isinstance(v, GateTemperature)]
  assert temperatures == [pytest.approx(0.05 ** (2 / 3))]     # temperature_at(step 2 of 3)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(tmp_path):
  """A real subprocess killed with SIGKILL mid-run, resumed, equals an uninterrupted run
  (trained here, in the test's process: the same program, one process fewer)."""
  args = ['--steps', '60', '--no-plots', '--no-progress', '--set', 'checkpoint_every=7',
          '--set', 'model.num_layers=1', '--set', 'model.features=32',
          '--set', 'model.num_heads=4', '--set', 'data.num_tasks=4', '--set', 'data.input_len=6',
          '--set', 'data.num_train=512', '--set', 'data.num_validation=64',
          '--set', 'data.num_test=64', '--set', 'batch_size=16', '--set', 'eval_batches=2',
          '--set', 'k_schedule=']
  command = [sys.executable, '-m', 'experiments.train', *args]
  env = {**os.environ, 'PYTHONPATH': ROOT}
  killed = tmp_path / 'killed'
  proc = subprocess.Popen([*command, '--workdir', str(killed)], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    path = killed / 'metrics.jsonl'
    if path.exists() and sum(1 for _ in open(path)) >= 20:
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run([*command, '--workdir', str(killed)], cwd=ROOT, env=env, check=True,
                 capture_output=True)
  cfg = config.from_dict(json.load(open(killed / 'config.json')))
  run(cfg, tmp_path / 'whole')
  for a, b in zip(final_params(cfg, killed), final_params(cfg, tmp_path / 'whole')):
    np.testing.assert_array_equal(a, b)
  steps = [r['step'] for r in metrics(killed)]
  assert steps == list(range(1, 61))


def test_corrupt_checkpoint_gives_a_clear_error_and_deletes_nothing(tmp_path):
  cfg = dataclasses.replace(TINY, steps=4, checkpoint_every=2)
  run(cfg, tmp_path)
  state_dir = tmp_path / 'checkpoints' / '4' / 'state'
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'not a checkpoint')
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  with pytest.raises(checkpoint.CheckpointError, match='checkpoints/4.*nothing was deleted'):
    train.train(dataclasses.replace(cfg, steps=6), str(tmp_path), progress=False,
                extend_schedule=True)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before


def test_checkpoint_of_another_model_is_refused(tmp_path):
  run(dataclasses.replace(TINY, steps=2), tmp_path)
  other = dataclasses.replace(TINY, steps=4, model=dataclasses.replace(TINY.model, features=64))
  with pytest.raises(checkpoint.CheckpointError, match='model.features: checkpoint 32 vs now 64'):
    run(other, tmp_path)
  # The same model trained on with another batch size, seed or learning rate would be
  # another run than the checkpoint's: refused, naming each field, config.json untouched.
  saved = (tmp_path / 'config.json').read_text()
  changed = dataclasses.replace(TINY, steps=2, batch_size=32, seed=1, optim=dataclasses.replace(
      TINY.optim, learning_rate=0.3))
  with pytest.raises(ValueError, match=r'trained with other settings \(batch_size: checkpoint '
                                       r'16 vs now 32; optim.learning_rate: checkpoint 0.003 '
                                       r'vs now 0.3; seed: checkpoint 0 vs now 1\)'):
    run(changed, tmp_path)
  assert (tmp_path / 'config.json').read_text() == saved
  run(dataclasses.replace(TINY, steps=2, eval_every=1, eval_batches=1), tmp_path)  # allowed


@pytest.mark.slow
def test_nan_guard_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """The loss turns NaN at step 8 (injected): the run stops naming that step, the last
  checkpoint (step 5) was written before and is intact, equal to an uninterrupted run's
  step 5, and the run resumes from it."""
  cfg = dataclasses.replace(TINY, steps=20, checkpoint_every=5, eval_every=20)
  clean_step = train.train_step

  def blows_up_from(step_index):
    def step_fn(state, batch, step, **kw):
      state, metrics = clean_step(state, batch, step, **kw)
      return state, {**metrics, 'loss': jax.numpy.where(step >= step_index, jax.numpy.nan,
                                                        metrics['loss'])}
    return step_fn
  monkeypatch.setattr(train, 'train_step', blows_up_from(7))      # step 8, 0-based 7
  with pytest.raises(FloatingPointError, match=r'loss is nan .* at step 8; stopping\. The '
                                               r'last good checkpoint \(step 5\) is kept'):
    run(cfg, tmp_path / 'blown')
  assert checkpoint.manager(str(tmp_path / 'blown' / 'checkpoints')).all_steps() == [5]
  assert [r['step'] for r in metrics(tmp_path / 'blown')] == list(range(1, 8))  # finite only
  # The uninterrupted run compiles the same program (the NaN never comes), so its step 5
  # is bit for bit the one the blown run should have kept (Adam turns a rounding
  # difference of another program into visible ones).
  monkeypatch.setattr(train, 'train_step', blows_up_from(10 ** 6))
  train.train(cfg, str(tmp_path / 'clean'), progress=False, stop_after=5)
  monkeypatch.setattr(train, 'train_step', clean_step)
  for a, b in zip(final_params(cfg, tmp_path / 'blown'), final_params(cfg, tmp_path / 'clean')):
    np.testing.assert_array_equal(a, b)
  summary = run(cfg, tmp_path / 'blown')          # resumes from step 5, verified
  assert summary['steps'] == 20 and np.isfinite(summary['test']['loss'])


def _five_steps_on(devices: int, workdir) -> dict:
  """A 5-step TINY run on `devices` CPU devices, and whether a 6-row batch is refused there:
  in this process when it has that many devices, else in a subprocess that has them."""
  if jax.device_count() == devices:
    try:
      train.mesh_and_shardings(batch_size=6, grad_accum=1)
      refused = None
    except ValueError as e:
      refused = str(e)
    summary = run(dataclasses.replace(TINY, steps=5), workdir)
    return {'refused': refused, 'losses': [r['loss'] for r in metrics(workdir)],
            'train_flops': summary['train_flops']}
  script = (
      'import json, sys; sys.path.insert(0, %r)\n'
      'from tests.training.test_train import _five_steps_on\n'
      'print(json.dumps(_five_steps_on(%d, sys.argv[1])))\n') % (ROOT, devices)
  env = {**os.environ, 'PYTHONPATH': ROOT,
         'XLA_FLAGS': with_xla_flag(f'--xla_force_host_platform_device_count={devices}')}
  out = subprocess.run([sys.executable, '-c', script, str(workdir)], env=env, cwd=ROOT,
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_four_devices_match_one(tmp_path):
  results = {devices: _five_steps_on(devices, tmp_path / str(devices)) for devices in (1, 4)}
  for devices in (1, 4):
    provenance = json.load(open(tmp_path / str(devices) / 'provenance.json'))
    assert provenance['device_count'] == devices
  np.testing.assert_allclose(results[4]['losses'], results[1]['losses'], rtol=1e-5)
  # the step's FLOPs are the whole batch's, not one device's share
  assert results[4]['train_flops'] == results[1]['train_flops']
  assert results[1]['refused'] is None
  assert 'micro-batch of 6 rows' in results[4]['refused']
  assert 'not divisible by the 4 devices' in results[4]['refused']


@pytest.mark.parametrize('name,overrides,moves', [
    ('l0', dict(model=dict(gate='hard_concrete', active_heads=None, eval_path='masked'),
                loss=dict(l0_weight=2.0)), 'fewer_heads'),
    ('l1', dict(model=dict(gate='sigmoid', active_heads=None, eval_path='masked'),
                loss=dict(l1_weight=2.0)), 'fewer_heads'),
    ('lagrangian', dict(model=dict(gate='hard_concrete', active_heads=None, eval_path='masked'),
                        loss=dict(target_fraction=0.25, target_warmup_steps=10),
                        optim=dict(lagrange_learning_rate=0.5)), 'fewer_heads'),
    ('load_balance', dict(model=dict(gate='topk', active_heads=1, noise=None),
                          loss=dict(load_balance_weight=1.0)), 'more_even'),
    ('z_loss', dict(model=dict(gate='topk', active_heads=2),
                    loss=dict(z_loss_weight=1.0)), 'smaller_z'),
])
@pytest.mark.slow
def test_each_regularizer_moves_the_gate_the_right_way(trained_run, name, overrides, moves):
  def variant(**loss_override):
    cfg = TINY
    sections = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in overrides.items()
                if k != 'loss'}
    cfg = dataclasses.replace(cfg, steps=60, checkpoint_every=60, **sections,   # reads metrics
                              loss=dataclasses.replace(cfg.loss, **loss_override))
    return cfg

  # (runs are shared: l0 and the Lagrangian compare with the same run without a term)
  a = metrics(trained_run(variant(**overrides['loss'])))[-10:]
  b = metrics(trained_run(variant()))[-10:]
  if moves == 'fewer_heads':
    assert np.mean([r['active_heads'] for r in a]) < np.mean([r['active_heads'] for r in b]) - 0.3
  elif moves == 'more_even':
    assert np.mean([r['usage_entropy'] for r in a]) > np.mean([r['usage_entropy'] for r in b])
  else:
    assert np.mean([r['reg/z_loss'] for r in a]) < np.mean([r['reg/z_loss'] for r in b])


@pytest.mark.slow
def test_grad_accumulation_takes_the_whole_batchs_step_whatever_the_token_counts():
  """One step on 16 rows, whole or as 2 micro-batches of 18 and 48 scored tokens (the
  synthetic tasks' targets differ in length; the rows are sorted by it): the same task
  loss, accuracy and gradient, since each micro-batch's tokens weigh in by their share of
  the step's, not by 1/2 each (a 0.29 relative gradient difference before)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gating import data  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, noise=None))
  splits = train.load_data(cfg)
  graphdef, state = train.create(cfg, splits.info)
  rows = train.model_inputs(data.batch_at(splits.train, 0, 16, 0))
  order = np.argsort(rows['target_mask'].sum(1), kind='stable')
  rows = {k: v[order] for k, v in rows.items()}
  learner, _ = nnx.merge(graphdef, state)
  weights = train.loss_weights(learner.model, rows)
  np.testing.assert_array_equal(weights, train.task_outputs(
      learner.model, rows, deterministic=True, active_heads=2)[2])
  assert (weights[:8].sum(), weights[8:].sum()) == (18, 48)
  out = {}
  for accum in (1, 2):
    batch = {k: jnp.asarray(v.reshape((accum, 16 // accum) + v.shape[1:]))
             for k, v in rows.items()}
    step = train.jit_train_step(graphdef, dataclasses.replace(cfg, grad_accum=accum), 2)
    _, out[accum] = step(jax.tree.map(jnp.copy, state), batch, jnp.int32(0))
  for name in ('task_loss', 'accuracy', 'grad_norm'):
    np.testing.assert_allclose(out[2][name], out[1][name], rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_schedules_grad_accumulation_and_bfloat16(trained_run):
  cfg = dataclasses.replace(
      TINY, steps=12, grad_accum=2, temperature_start=1.0, temperature_end=0.1,
      temperature_steps=10, k_schedule=((4, 4), (3, 8)),
      model=dataclasses.replace(TINY.model, dtype='bfloat16'))
  lines = metrics(trained_run(cfg))
  assert [r['K'] for r in lines] == [4] * 4 + [3] * 4 + [2] * 4
  np.testing.assert_allclose([r['temperature'] for r in lines[:11]],
                             [1.0 * 0.1 ** (s / 10) for s in range(11)], rtol=1e-5)
  # the budget shows in the usage: K heads per sequence
  assert [round(r['active_heads'][0]) for r in lines] == [4] * 4 + [3] * 4 + [2] * 4
  assert all(np.isfinite(r['loss']) for r in lines)


@pytest.mark.slow
def test_a_run_with_gated_mlp_groups_learns_and_logs_group_usage(tmp_path):
  cfg = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, mlp_groups=4,
                                                            active_groups=2))
  run(cfg, tmp_path)
  lines = metrics(tmp_path)
  first, last = np.mean([r['task_loss'] for r in lines[:5]]), np.mean(
      [r['task_loss'] for r in lines[-5:]])
  assert last < first - 0.2
  assert np.asarray(lines[-1]['group_usage']).shape == (1, 4)
  np.testing.assert_allclose(lines[-1]['active_groups'], [2.0])
  # Evaluation reports the groups beside the heads, at the run's Kf or another one.
  evals = metrics(tmp_path, 'eval')
  assert np.asarray(evals[-1]['group_usage']).sum(axis=1).tolist() == [2.0]
  from experiments import eval as eval_cli
  from experiments import plots
  from gating.study import evaluation, results
  run_ = evaluation.load_run(str(tmp_path))
  report = evaluation.evaluate_run(run_, paths=['gathered'], ks=[2], max_batches=1, groups=3)
  (one,) = report['results']
  assert one['Kf'] == 3 and one['active_groups_per_layer'] == [3.0]
  assert one['active_group_fraction'] == 0.75
  with pytest.raises(ValueError, match=r'groups Kf=5: must be in \[1, mlp_groups=4\]'):
    evaluation.evaluate_run(run_, paths=['gathered'], ks=[2], groups=5)
  shared = run_._replace(config=dataclasses.replace(run_.config, model=dataclasses.replace(
      run_.config.model, shared_groups=1)))
  with pytest.raises(ValueError, match='groups Kf=1: must exceed the 1 shared groups'):
    evaluation.evaluate_run(shared, paths=['gathered'], ks=[2], groups=1)
  eval_cli.main(['--workdir', str(tmp_path), '--paths', 'gathered', '--k', '2'])
  row = results.point_row(str(tmp_path), 'p')
  assert row['status'] == 'done'
  assert row['Kf'] == 2 and row['active_group_fraction'] == 0.5
  assert '| Kf | active groups |' in results.markdown([row])
  assert 'usage_heatmap.png' in ' '.join(plots.plot_run(str(tmp_path)))


def test_warm_start_copies_everything_but_fresh_routers_and_refuses_another_model(tmp_path):
  dense = dataclasses.replace(TINY, steps=4, eval_every=4, checkpoint_every=4,
                              model=dataclasses.replace(TINY.model, gate='dense',
                                                        active_heads=None, noise=None))
  run(dense, tmp_path / 'dense')
  gated = dataclasses.replace(dense, model=TINY.model, init_from=str(tmp_path / 'dense'))
  graphdef, state = train.create(gated, train.load_data(gated).info)
  state, copied = train.warm_start(state, graphdef, str(tmp_path / 'dense'))
  assert copied > 0
  # A model of another shape (other MLP width) or other parameter names (MLP groups)
  # would start partly untrained: refused before any folder is made.
  for other in (dict(mlp_features=64), dict(mlp_groups=4, active_groups=2)):
    cfg = dataclasses.replace(gated, model=dataclasses.replace(TINY.model, **other))
    with pytest.raises(ValueError, match=r'is another model: \d+ parameters outside the '
                                         r'routers do not match'):
      run(cfg, tmp_path / 'other')
    assert not (tmp_path / 'other').exists()


def test_exact_match_counts_only_the_sequences_with_a_scored_token():
  """A sequence with no scored token (a padded window of one valid token) has nothing to
  match: exact_match is over the others (here 1 of 2 exact), not 2 of 3 with it vacuously
  exact; loss and accuracy are token means, which it does not move."""
  info = train.data.DataInfo(vocab_size=4, seq_len=4, prompt_len=1, pad_id=3,
                             label_names=('a',), fingerprint={})
  sums = {'loss_sum': np.array([2.0, 3.0, 0.0]), 'hits': np.array([3.0, 1.0, 0.0]),
          'count': np.array([3.0, 3.0, 0.0]), 'exact': np.array([1.0, 0.0, 1.0]),
          'open_BxNxH': np.ones((3, 1, 2)), 'label': np.array([0, 0, 0])}
  block = train.summarize_eval(sums, info)
  assert block['exact_match'] == 0.5 and block['per_label']['a']['exact_match'] == 0.5
  assert block['loss'] == 5.0 / 6.0 and block['accuracy'] == 4.0 / 6.0
  assert block['sequences'] == 3
  none_scored = {**sums, 'count': np.zeros(3)}
  assert train.summarize_eval(none_scored, info)['exact_match'] == 0.0
