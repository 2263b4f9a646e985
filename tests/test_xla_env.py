"""The suite's XLA flag is passed only to an XLA that knows it: XLA aborts the process on
an unknown flag (jaxlib 0.11.1 dropped this one), so a newer JAX must not crash the tests."""

import os
import subprocess
import sys

import pytest

from tests import xla_env


@pytest.mark.parametrize('version,known', [
    ('0.10.2', True), ('0.11.0', True), ('0.11.1', False), ('0.11.2', False),
    ('0.12.0', False), ('0.11.2.dev20261101', False), ('1.0.0', False)])
def test_the_flag_is_known_up_to_jaxlib_0_11_0(version, known):
  assert xla_env.fast_compile_flag_known(version) is known


def test_the_installed_xla_lists_the_flag_exactly_when_the_suite_passes_it():
  """XLA_FLAGS=--help makes XLA print every flag it knows (the process then exits)."""
  env = dict(os.environ, XLA_FLAGS='--help', JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.zeros(1) + 1'],
                       env=env, capture_output=True, text=True, timeout=120)
  listed = run.stdout + run.stderr
  assert '--xla_cpu_enable_fast_math' in listed, listed[-2000:]    # it did list the flags
  name = xla_env.FAST_COMPILE_FLAG.split('=')[0]
  assert (name in listed) is xla_env.fast_compile_flag_known()
  passed = xla_env.FAST_COMPILE_FLAG in os.environ.get('XLA_FLAGS', '')
  if os.environ.get('JAX_DISABLE_MOST_OPTIMIZATIONS') == '1':       # the suite's default
    assert passed is xla_env.fast_compile_flag_known()
