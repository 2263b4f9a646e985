"""Shared test settings: no silent rank promotion, float32 matmuls at full precision."""

import os

import jax
import pytest

jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_default_matmul_precision', 'highest')

SHARED_DATA = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data')


@pytest.fixture
def tinyshakespeare_path():
  """../shared/data/tinyshakespeare.txt, or a clean skip where it is absent."""
  path = os.path.abspath(os.path.join(SHARED_DATA, 'tinyshakespeare.txt'))
  if not os.path.exists(path):
    pytest.skip(f'{path} is absent')
  return path
