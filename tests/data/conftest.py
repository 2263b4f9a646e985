import pytest

from gating import data
from tests.data.helpers import SMALL


@pytest.fixture(scope='module')
def small():
  return data.synthetic(**SMALL, seed=1)
