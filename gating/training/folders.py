"""Output paths (a run's workdir, a sweep's or a benchmark's --out folder, an evaluation's
--out file): a path that cannot be written is refused before any work is done, with an
error that names it, rather than after the data is loaded, the model compiled or the
evaluation run, as a traceback from os.makedirs or open; and a JSON result is written
whole or not at all (`write_json`).

Needs only the standard library, so the benchmark's device run (no `datasets`) imports it.
"""

from __future__ import annotations

import json
import os
from typing import Any


def _folder_problem(path: str) -> str | None:
  """Why `path` cannot be (made) a folder this process writes into, or None."""
  if os.path.lexists(path) and not os.path.isdir(path):   # a file, or a broken link
    return 'exists and is not a folder'
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return f'{existing} is a file, so {path} cannot be a folder'
  if not os.access(existing, os.W_OK | os.X_OK):
    return f'{existing} is not writable'
  return None


def check_output_folder(path: str, name: str, error: type[Exception] = ValueError) -> None:
  """Raises `error` (its message starting with `name` and `path`) unless `path` is a
  folder or can be made one: it is not a file, and the nearest part of it that exists is
  a folder this process may write into."""
  problem = _folder_problem(path)
  if problem:
    raise error(f'{name} {path}: {problem}')


def check_output_file(path: str, name: str, error: type[Exception] = ValueError) -> None:
  """Raises `error` (its message starting with `name` and `path`) unless `path` can be
  written as a file: it is not a folder, and its folder is or can be made one (as
  `check_output_folder`; the writer makes it: os.makedirs)."""
  if os.path.isdir(path):
    raise error(f'{name} {path}: is a folder; give the path of a file')
  folder = os.path.dirname(path) or '.'
  problem = _folder_problem(folder)
  if problem:
    raise error(f'{name} {path}: {folder} is not a folder' if problem.startswith('exists')
                else f'{name} {path}: {problem}')


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON (indent 1) to `path` atomically, making its folder first: a
  temporary file renamed over it, so that a reader (a resumed run or sweep) never sees
  half a file, even after a kill."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)
