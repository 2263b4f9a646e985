"""Output folders (a run's workdir, a sweep's or a benchmark's --out): a path that cannot
become a folder is refused before any work is done, with an error that names it, rather
than after the data is loaded and the model compiled, as a traceback from os.makedirs.

Needs only the standard library, so the benchmark's device run (no `datasets`) imports it.
"""

from __future__ import annotations

import os


def check_output_folder(path: str, name: str, error: type[Exception] = ValueError) -> None:
  """Raises `error` (its message starting with `name` and `path`) unless `path` is a
  folder or can be made one: it is not a file, and the nearest part of it that exists is
  a folder this process may write into."""
  if os.path.lexists(path) and not os.path.isdir(path):   # a file, or a broken link
    raise error(f'{name} {path}: exists and is not a folder')
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise error(f'{name} {path}: {existing} is a file, so {path} cannot be a folder')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise error(f'{name} {path}: {existing} is not writable')
