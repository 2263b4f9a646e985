"""Where a result came from: code version, packages, Python, XLA flags, devices.

Every run folder and benchmark file records this, so a number can be traced back.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

import jax

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'datasets', 'numpy',
            'tqdm', 'matplotlib')


def git_commit(path: str | None = None) -> str | None:
  """HEAD of the repository holding `path` (default: this package), '+dirty' if changed."""
  path = path or os.path.dirname(os.path.abspath(__file__))
  try:
    run = lambda *args: subprocess.run(['git', '-C', path, *args], capture_output=True,
                                       text=True, check=True).stdout.strip()
    commit = run('rev-parse', 'HEAD')
    return commit + ('+dirty' if run('status', '--porcelain', '--untracked-files=no') else '')
  except (OSError, subprocess.CalledProcessError):
    return None


def package_versions() -> dict[str, str | None]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def provenance() -> dict[str, object]:
  devices = jax.devices()
  return {
      'git_commit': git_commit(),
      'python': sys.version.split()[0],
      'packages': package_versions(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'process_count': jax.process_count(),
      'platform': platform.platform(),
      'processor': platform.processor() or platform.machine(),
      'cpu_count': os.cpu_count(),
  }
