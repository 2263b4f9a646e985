"""Shared test settings: no silent rank promotion, float32 matmuls at full precision, one
JAX compilation cache for the whole session, and trained tiny runs (and the tiny sweep)
shared by the tests that only read them.

The compilation cache (JAX's persistent cache, in a folder of this session's temporary
directory) is shared by the pytest-xdist workers and by every subprocess the tests start
(sweeps, resumed runs, several processes), through JAX_COMPILATION_CACHE_DIR: a function
compiled once with the same shapes is loaded, not compiled again. It changes no result:
a cached executable is the one XLA compiled.

XLA compiles with most of its optimizations off (JAX_DISABLE_MOST_OPTIMIZATIONS=1, also
inherited by the workers and subprocesses): the tests' models are tiny, so compiling is
most of their time, and unoptimized code computes the same functions (every assertion
holds either way; the suite ran a third faster on the decode, FLOPs and MLP tests). With
it, XLA's CPU backend emits its fusions with the older elemental emitters
(XLA_FLAGS=--xla_cpu_use_fusion_emitters=false, appended to any XLA_FLAGS already set and
inherited the same way; only where jaxlib has the flag, up to 0.11.0: XLA aborts on a flag
it does not know, and from 0.11.1 it has only the newer emitters), which compile tiny
programs faster: XLA compiling was more than half of the suite's time (84 of 144 s in the
decode tests), and the attention tests ran in 27 s instead of 45 s. Set
JAX_DISABLE_MOST_OPTIMIZATIONS=0 to run the suite on fully optimized code with XLA's
default emitters.
"""

import collections
import hashlib
import os
import pathlib
import shutil
import tempfile

import filelock

from tests.xla_env import FAST_COMPILE_FLAG, fast_compile_flag_known, with_xla_flag

os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')   # before jax reads it
FAST_COMPILE = os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'].lower() not in ('0', 'false')
if (FAST_COMPILE and fast_compile_flag_known()
    and FAST_COMPILE_FLAG not in os.environ.get('XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = with_xla_flag(FAST_COMPILE_FLAG)
import jax  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position

jax.config.update('jax_disable_most_optimizations', FAST_COMPILE)
jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_default_matmul_precision', 'highest')

SHARED_DATA = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data')
CACHE_ENV = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
             'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def pytest_configure(config):
  """On the controller (or a run without xdist): make the session's cache folder and put
  it in the environment, which the xdist workers and every subprocess inherit."""
  if not hasattr(config, 'workerinput') and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    config._headgate_cache_dir = tempfile.mkdtemp(prefix='headgate-jax-cache-')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = config._headgate_cache_dir
    os.environ.update(CACHE_ENV)
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_unconfigure(config):
  made = getattr(config, '_headgate_cache_dir', None)
  if made:
    shutil.rmtree(made, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """The files that hold tests marked slow run first, those with the most slow tests
  first (a stable sort: the order within a file, and among the other files, is kept), so
  that the long tests start at once and the workers end together on short ones: with
  pytest-xdist's --dist worksteal (CI's) a worker that runs out of tests takes half of
  the other's remaining queue, so the tail is one short test, not one long file."""
  slow_count = collections.Counter(item.path for item in items
                                   if item.get_closest_marker('slow'))
  items.sort(key=lambda item: -slow_count[item.path])


@pytest.fixture
def tinyshakespeare_path():
  """../shared/data/tinyshakespeare.txt, or a clean skip where it is absent."""
  path = os.path.abspath(os.path.join(SHARED_DATA, 'tinyshakespeare.txt'))
  if not os.path.exists(path):
    pytest.skip(f'{path} is absent')
  return path


def _shared_folder(tmp_path_factory, name: str) -> pathlib.Path:
  """A folder of this session's temp dir that every xdist worker sees."""
  root = tmp_path_factory.getbasetemp()
  shared = root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root
  shared = shared / name
  shared.mkdir(exist_ok=True)
  return shared


@pytest.fixture(scope='session')
def finished_sweep(tmp_path_factory):
  """finished_sweep(name) -> the folder of `python -m experiments.sweep name --parallel 2`,
  run once per session whichever xdist worker asks first, for tests that read it; a test
  that writes into it copies it first."""
  from experiments import sweep as sweep_script  # pylint: disable=import-outside-toplevel
  shared = _shared_folder(tmp_path_factory, 'finished_sweeps')

  def get(name: str) -> pathlib.Path:
    out = shared / name
    with filelock.FileLock(str(out) + '.lock'):
      if not (out / 'results.csv').exists():
        shutil.rmtree(out, ignore_errors=True)        # a worker that died mid-sweep
        sweep_script.main([name, '--out', str(out), '--parallel', '2'])
    return out
  return get


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
  """trained_run(cfg) -> the folder of a finished run of `cfg`, trained once per session
  whichever xdist worker asks first (a file lock in the session's shared temp dir), for
  tests that only read a run. A test that writes into a run copies it first
  (`shutil.copytree(trained_run(cfg), tmp_path / 'run')`)."""
  from gating.training import loop  # pylint: disable=import-outside-toplevel
  shared = _shared_folder(tmp_path_factory, 'trained_runs')

  def get(cfg) -> pathlib.Path:
    key = hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16]
    workdir = shared / key
    with filelock.FileLock(str(workdir) + '.lock'):
      if not (workdir / 'summary.json').exists():
        shutil.rmtree(workdir, ignore_errors=True)     # a worker that died mid-run
        loop.train(cfg, str(workdir), progress=False)
    return workdir
  return get
