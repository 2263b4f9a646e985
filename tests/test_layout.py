"""The layout's import rules, read from the source (no imports run):

- `gating/layers/` imports nothing from `gating.data`, `gating.training` or `gating.study`;
- `gating/training/` imports `gating.layers` and `gating.data`, never `gating.study`;
- `gating/data/` imports none of the other subpackages;
- nothing in `gating/` imports `experiments`.
"""

import ast
import os

import pytest

import gating

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
PACKAGE = os.path.join(ROOT, 'gating')

FORBIDDEN = {
    'gating/layers/': ('gating.data', 'gating.training', 'gating.study'),
    'gating/training/': ('gating.study',),
    'gating/data/': ('gating.layers', 'gating.training', 'gating.study'),
    'gating/': ('experiments',),
}


def _resolve(name: str) -> str:
  """A module name with the names kept for moved modules (gating._MOVED) resolved."""
  parts = name.split('.')
  if len(parts) >= 2 and parts[0] == 'gating' and parts[1] in gating._MOVED:  # pylint: disable=protected-access
    return '.'.join([gating._MOVED[parts[1]], *parts[2:]])  # pylint: disable=protected-access
  return name


def imported_modules(path: str) -> set[str]:
  """Every module a file imports, at any depth (function bodies too), resolved."""
  tree = ast.parse(open(path).read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
      # `from gating import data` imports the module gating.data.
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return {_resolve(n) for n in names}


def library_files():
  for folder, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        yield os.path.relpath(path, ROOT).replace(os.sep, '/'), path


def violations(rel: str, modules: set[str]) -> list[str]:
  bad = []
  for prefix, forbidden in FORBIDDEN.items():
    if rel.startswith(prefix):
      bad += [m for m in sorted(modules)
              if any(m == f or m.startswith(f + '.') for f in forbidden)]
  return bad


@pytest.mark.parametrize('rel,path', list(library_files()), ids=lambda v: v)
def test_imports_follow_the_layout(rel, path):
  assert not violations(rel, imported_modules(path)), f'{rel} breaks the layout rules'


def test_the_rule_checker_catches_a_violation(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def f():\n  from gating import train\n  import experiments.plots\n')
  modules = imported_modules(str(bad))
  assert violations('gating/layers/x.py', modules) == ['gating.training.loop', 'experiments.plots']
  assert violations('gating/training/x.py', {'gating.study.sweep'}) == ['gating.study.sweep']
  assert violations('gating/convert.py', modules) == ['experiments.plots']


def test_the_layout_folders_exist():
  for folder in ('layers', 'data', 'training', 'study'):
    assert os.path.isfile(os.path.join(PACKAGE, folder, '__init__.py')), folder


def test_moved_module_names_still_resolve():
  """`from gating import train` (and every other pre-layout module name) still works."""
  import importlib  # pylint: disable=import-outside-toplevel
  for old, new in gating._MOVED.items():  # pylint: disable=protected-access
    assert getattr(gating, old) is importlib.import_module(new)
