"""experiments.benchmark's gpu size without a GPU: the dry run CI runs (one compiled row per
section, nothing timed, no `datasets`), the device script's rehearsal, the refusal of rows
that would not fit, the errors of the command line, and the pieces the gpu sections rest
on (the plain train step against the loop's, a prefilled state tiled to a larger batch).
Nothing here times anything."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from experiments import bench_decode, bench_pretrained, bench_rows, bench_train, benchmark
from experiments import flops_recheck
from gating.layers import decode
from gating.training import config
from tests.xla_env import FAST_COMPILE_FLAG, without_xla_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SECTIONS = ['attention', 'forward', 'train', 'decode']


def without_datasets(tmp_path):
  """An environment whose Python cannot import datasets or orbax, as on a bare GPU image.
  Without the suite's fast-compile flag: the gpu sizes' programs compile faster with XLA's
  default emitters (the dry run took 26 s with them, 35 s with the flag)."""
  poison = tmp_path / 'poison'
  (poison / 'orbax').mkdir(parents=True)
  (poison / 'datasets.py').write_text("raise ImportError('datasets is not installed')\n")
  (poison / 'orbax' / '__init__.py').write_text("raise ImportError('orbax is not installed')\n")
  return dict(os.environ, PYTHONPATH=os.pathsep.join([str(poison), ROOT]),
              XLA_FLAGS=without_xla_flag(FAST_COMPILE_FLAG))


@pytest.mark.slow
def test_the_gpu_dry_run_compiles_one_row_per_section_without_datasets(tmp_path):
  run = subprocess.run([sys.executable, '-m', 'experiments.benchmark', '--size', 'gpu',
                        '--dry-run', '--out', str(tmp_path / 'out')], cwd=ROOT,
                       env=without_datasets(tmp_path), capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.load(open(tmp_path / 'out' / 'benchmark.json'))
  assert result['size'] == 'gpu' and result['dry_run'] is True
  assert list(result['sections']) == GPU_SECTIONS
  for name, rows in result['sections'].items():
    compiled = [r for r in rows if r['compiled']]
    assert len(compiled) == 1, name                    # exactly one row compiled
    assert compiled[0]['memory']['peak_bytes'] > 0 and compiled[0]['xla_flops'] > 0
    assert len({r['candidate'] for r in rows}) >= 4   # dense and the gated candidates
    for r in rows:
      assert r['median_s'] is None and r['ratio_vs_dense'] is None   # nothing timed
      assert r['estimate_bytes'] > 0 and r['refused'] is None
      assert r['device'] == jax.devices()[0].device_kind
      assert r['memory_checked'] == 'not checked: the backend reports no memory limit'
  shapes = {(r['batch'], r['length'], r['heads'], r['mode'])
            for r in result['sections']['attention']}
  assert shapes == {(b, l, h, m) for b, l in ((16, 2048), (4, 8192)) for h in (8, 16)
                    for m in ('forward', 'forward+backward')}
  assert {r['batch'] for r in result['sections']['decode']} == {1, 16, 64}
  assert 'compiled, not timed' in run.stdout


@pytest.mark.slow
def test_the_device_script_rehearses_on_the_cpu_and_merges_one_json(tmp_path):
  script = os.path.join(ROOT, 'experiments', 'device_check.sh')
  env = dict(without_datasets(tmp_path), PYTHON=sys.executable)
  run = subprocess.run([script, str(tmp_path / 'check'), '--dry-run', '--memory-limit', '1'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f'jax {jax.__version__}' in run.stdout and 'backend cpu' in run.stdout
  merged = json.load(open(tmp_path / 'check' / 'device_check.json'))
  assert list(merged['sections']) == GPU_SECTIONS and merged['dry_run'] is True
  for name, status in merged['status'].items():   # a 1-byte device: every row refused
    assert status['exit_code'] == 0 and not status['timed_out'], name
    assert status['rows'] == status['refused_rows'] > 0 and status['timed_rows'] == 0
  row = merged['sections']['decode'][-1]
  assert row['refused'].startswith('decode [batch=64, ') and 'k2_grouped: needs about' in \
      row['refused'] and 'estimated before compiling); 0.00 GiB (1 bytes) are free' in \
      row['refused']
  assert not row['compiled']
  # Without a GPU and without --dry-run it refuses at once. Without PYTHON, on a PATH
  # with python3 and no python (as on a GPU image), it runs python3.
  bin_ = tmp_path / 'bin'
  bin_.mkdir()
  (bin_ / 'python3').write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  (bin_ / 'python3').chmod(0o755)
  env = {k: v for k, v in env.items() if k != 'PYTHON'}
  env['PATH'] = os.pathsep.join([str(bin_), *[d for d in os.environ['PATH'].split(os.pathsep)
                                             if not os.path.exists(os.path.join(d, 'python'))]])
  run = subprocess.run([script, str(tmp_path / 'nogpu')], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 1 and 'error: no GPU or TPU: jax sees only cpu' in run.stderr
  bare = tmp_path / 'bare'           # neither: only what the script needs to get that far
  bare.mkdir()
  for tool in ('bash', 'dirname'):
    (bare / tool).symlink_to(shutil.which(tool))
  env['PATH'] = str(bare)
  run = subprocess.run([script, str(tmp_path / 'nopython')], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 1
  assert run.stderr.strip() == 'error: neither python nor python3 is on PATH; set PYTHON'


@pytest.mark.parametrize('argv,message', [
    (['--size', 'tpu'], "error: unknown size 'tpu'; choose one of: cpu, gpu"),
    (['--size', 'gpu', '--sections', 'attention,study'],
     "error: unknown sections ['study'] for --size gpu; choose from: attention, forward, "
     'train, decode'),
    (['--sections', 'forward'],
     "error: unknown sections ['forward'] for --size cpu; choose from: attention, decode, "
     'train, study, width, projection'),
    (['--dry-run'], 'error: --dry-run and --memory-limit are for --size gpu'),
    (['--size', 'gpu', '--quick'], 'error: --quick is for --size cpu'),
    (['--size', 'gpu', '--memory-limit', 'lots'],
     "error: --memory-limit must be a number of bytes, got 'lots'"),
    (['--size', 'gpu', '--memory-limit', 'inf'],
     "error: --memory-limit must be a number of bytes, got 'inf'"),
])
def test_bad_arguments_print_one_error_line(argv, message, tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(argv + ['--out', str(tmp_path)])
  text = str(exit_info.value.code)
  assert text.startswith(message) and '\n' not in text
  assert not os.listdir(tmp_path)            # refused before anything ran


def test_an_out_that_cannot_be_a_folder_is_one_error_line(tmp_path):
  file = tmp_path / 'benchmark.json'
  file.write_text('{}')
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(['--sections', 'attention', '--out', str(file)])
  assert str(exit_info.value.code) == f'error: --out {file}: exists and is not a folder'
  # The scripts that write one file refuse a folder there, before they build anything.
  for main in (lambda argv: bench_pretrained.parse_args(argv),
               lambda argv: flops_recheck.main(['tiny', *argv])):
    with pytest.raises(SystemExit) as exit_info:
      main(['--out', str(tmp_path)])
    assert (str(exit_info.value.code)
            == f'error: --out {tmp_path}: is a folder; give the path of a file')
  assert file.read_text() == '{}'


def tiny_candidate(calls, estimate=1, fail_on_run=None):
  """A candidate of x @ x over a [128, 128] float32 input (64 KiB of argument)."""
  def build():
    calls.append('build')

    def make_call(compiled):
      calls.append('make_call')
      x = jnp.ones((128, 128))
      if fail_on_run is not None:
        def call():
          raise fail_on_run
        return call
      return lambda: compiled(x)
    return jax.jit(lambda x: x @ x), (jax.ShapeDtypeStruct((128, 128), jnp.float32),), \
        make_call
  return bench_rows.Candidate(estimate, build)


def test_rows_that_would_not_fit_are_refused_before_compiling_or_running():
  calls = []
  settings = bench_rows.Settings(memory_limit=10**9, trials=1, min_seconds=0.0)
  rows = bench_rows.run_table('toy', dict(size=7), {
      'dense': tiny_candidate(calls, estimate=10**12)}, settings)
  assert calls == [] and not rows[0]['compiled']        # the estimate: never compiled
  assert rows[0]['refused'] == ('toy [size=7] dense: needs about 931.32 GiB '
                                '(1,000,000,000,000 bytes, estimated before compiling); '
                                '0.93 GiB (1,000,000,000 bytes) are free on the device')
  rows = bench_rows.run_table('toy', dict(size=7), {'dense': tiny_candidate(calls)},
                              settings._replace(memory_limit=1000))
  assert calls == ['build'] and rows[0]['compiled']      # compiled, never run
  assert "(131,072 bytes, XLA's planned peak of the compiled function)" in rows[0]['refused']
  assert rows[0]['memory']['argument_bytes'] == rows[0]['memory']['output_bytes'] == 65536
  calls.clear()
  rows = bench_rows.run_table('toy', dict(size=7), {
      'dense': tiny_candidate(calls),
      'big': tiny_candidate(calls, fail_on_run=RuntimeError('RESOURCE_EXHAUSTED: Out of '
                                                            'memory allocating 9 bytes'))},
      settings._replace(memory_limit=None))
  dense, big = rows
  assert dense['ratio_vs_dense'] == 1.0 and dense['trials'] == 1 and dense['refused'] is None
  assert dense['memory_checked'] == 'not checked: the backend reports no memory limit'
  assert big['refused'] == ('toy [size=7] big: ran out of device memory: RESOURCE_EXHAUSTED: '
                            'Out of memory allocating 9 bytes') and big['median_s'] is None
  with pytest.raises(RuntimeError, match='a bug'):      # other errors are not hidden
    bench_rows.run_table('toy', {}, {'dense': tiny_candidate([], fail_on_run=RuntimeError(
        'a bug'))}, settings._replace(memory_limit=None))


def test_a_dry_run_compiles_only_the_named_row_and_runs_nothing():
  calls = []
  rows = bench_rows.run_table('toy', {}, {'dense': tiny_candidate(calls),
                                          'gated': tiny_candidate(calls)},
                              bench_rows.Settings(dry_run=True), dry_compile='gated')
  assert calls == ['build'] and [r['compiled'] for r in rows] == [False, True]
  assert all(r['median_s'] is None for r in rows)


@pytest.mark.slow
def test_the_plain_train_step_is_the_loops_train_step():
  from gating import data  # pylint: disable=import-outside-toplevel (needs datasets)
  from gating.training import loop  # pylint: disable=import-outside-toplevel
  model_cfg = config.ModelConfig(num_layers=2, features=32, num_heads=4, prefix_len=4,
                                 gate='topk', active_heads=2, path='gathered', noise='gumbel',
                                 mlp_groups=4, active_groups=2, dtype='float32')
  cfg = config.TrainConfig(model=model_cfg, data=config.DataConfig(kind='text', seq_len=16),
                           steps=100, batch_size=4, optim=config.OptimConfig(warmup_steps=0))
  info = data.DataInfo(vocab_size=data.BYTE_VOCAB, seq_len=16, prompt_len=0,
                       pad_id=data.BYTE_PAD_ID, label_names=('random',), fingerprint={})
  graphdef, state = loop.create(cfg, info)
  learner, _ = nnx.merge(graphdef, state)
  model = nnx.clone(learner.model)
  tx = bench_train.optimizer(cfg.optim, cfg.steps)
  plain_def, plain_state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  plain_state = jax.tree.map(lambda a: jnp.array(a, copy=True), plain_state)  # loop donates
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16), dtype=np.int32))
  ones = jnp.ones((4, 16), bool)
  batch = {'tokens': tokens, 'valid': ones, 'target_mask': ones}
  step = jax.jit(lambda s, b, i: bench_train.plain_train_step(s, b, i, graphdef=plain_def,
                                                              seed=cfg.seed))
  loop_step = loop.jit_train_step(graphdef, cfg, None)
  for i in range(2):
    state, metrics = loop_step(state, {**jax.tree.map(lambda a: a[None], batch),
                                       'label': jnp.zeros((1, 4), jnp.int32)}, jnp.int32(i))
    plain_state, loss = step(plain_state, batch, jnp.int32(i))
    np.testing.assert_allclose(loss, metrics['task_loss'], rtol=1e-6)
  want = nnx.state(nnx.merge(graphdef, state)[0].model, nnx.Param)
  got = nnx.state(nnx.merge(plain_def, plain_state)[0], nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got, want)


def test_a_prefilled_state_tiled_to_a_larger_batch_equals_prefilling_that_batch():
  model = gating.GatedLM(
      40, num_layers=2, features=32, num_heads=4, max_length=16, prefix_len=4, gate='topk',
      active_heads=2, path='gathered', mlp_groups=4, active_groups=2, rngs=nnx.Rngs(0))
  prompts_NxL = jax.random.randint(jax.random.key(1), (2, 8), 0, 40)
  prefill = nnx.jit(decode.prefill, static_argnames=('cache_length', 'projection'))
  for projection in ('grouped', 'weights'):
    _, state_N = prefill(model, prompts_NxL, cache_length=12, projection=projection)
    _, want = prefill(model, prompts_NxL[jnp.array([0, 1, 0, 1, 0])], cache_length=12,
                      projection=projection)
    got = bench_decode.tile_state(model, state_N, 5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)
    assert got.projections == want.projections == (projection,) * 2


@pytest.mark.slow
def test_every_gpu_section_runs_and_times_at_tiny_sizes(monkeypatch):
  """The path a device run takes after compiling (concrete arguments, the calls, timing,
  the ratios and tables), at tiny sizes, one trial: what the dry run does not reach."""
  from experiments import bench_attention, bench_width  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(bench_attention.GPU, 'shapes', ((2, 16),))
  monkeypatch.setitem(bench_attention.GPU, 'features', 32)
  monkeypatch.setitem(bench_attention.GPU, 'heads', (4,))
  for key, value in dict(layers=1, features=64, mlp=128, length=16, batch=2, prefix=4,
                         vocab=32).items():
    monkeypatch.setitem(bench_train.GPU, key, value)
  for key, value in dict(features=32, heads=4, layers=1, vocab=32, prefix=4, prompt=8,
                         steps=2, prompts=2, batches=(1, 3)).items():
    monkeypatch.setitem(bench_decode.GPU, key, value)
  settings = bench_rows.Settings(trials=1, min_seconds=0.0)
  for module, count in ((bench_attention, 10), (bench_width, 4), (bench_train, 4),
                        (bench_decode, 8)):
    rows = module.run_gpu(settings)
    assert len(rows) == count, module.__name__
    for r in rows:
      assert r['median_s'] > 0 and r['refused'] is None and r['memory']['peak_bytes'] > 0
      assert r['ratio_vs_dense'] == 1.0 or r['candidate'] != 'dense'
    assert 'of dense' in module.format_gpu_table(rows)
  assert {r['auto'] for r in rows} == {'grouped', 'activations'}  # decode, B = 1, 3 (CPU)
  assert rows[-1]['tokens_per_s'] == 3 * 2 / rows[-1]['median_s']
