"""The Python examples of the README and of every guide page (docs/guide/*.md) run as
written: each file's ```python blocks in order, in one namespace per file."""

import glob
import os
import re

import pytest

from gating.layers import selection

ROOT = os.path.join(os.path.dirname(__file__), '..')
README = os.path.join(ROOT, 'README.md')
GUIDES = sorted(glob.glob(os.path.join(ROOT, 'docs', 'guide', '*.md')))


def python_blocks(path):
  return re.findall(r'```python\n(.*?)```', open(path).read(), flags=re.S)


def test_readme_has_python_blocks():
  assert python_blocks(README)


# The README's and the layers guide's examples took 5 s or more here: marked slow.
SLOW_PAGES = (README, os.path.join(ROOT, 'docs', 'guide', 'layers.md'))


@pytest.mark.parametrize('path', [
    pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p
    for p in [README] + GUIDES], ids=lambda p: os.path.relpath(p, ROOT))
def test_python_blocks_run(path):
  name = os.path.relpath(path, ROOT)
  rules = set(selection.RULES)
  namespace = {}
  try:
    for block in python_blocks(path):
      exec(compile(block, name, 'exec'), namespace)
  finally:
    for rule in set(selection.RULES) - rules:   # a page that registers a rule (extending.md)
      del selection.RULES[rule]
