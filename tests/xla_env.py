"""XLA_FLAGS for the tests: the suite's fast-compile flag (see conftest.py), and a flag
added to or taken from those already set, for a subprocess that needs other flags."""

import importlib.metadata
import os

from packaging import version as versions   # pytest's own dependency

# XLA's CPU backend emits fusions with its older elemental emitters: tiny programs compile
# faster (compiling was more than half of the suite's time).
FAST_COMPILE_FLAG = '--xla_cpu_use_fusion_emitters=false'
# The first jaxlib whose XLA no longer knows the flag (it has only the fusion emitters),
# and XLA aborts the process on a flag it does not know: jaxlib 0.11.0 has it, 0.11.1 and
# 0.11.2 do not (read off `XLA_FLAGS=--help`).
FAST_COMPILE_FLAG_GONE = (0, 11, 1)


def fast_compile_flag_known(jaxlib_version: str | None = None) -> bool:
  """Whether the installed jaxlib (or `jaxlib_version`, e.g. '0.10.2') takes the flag."""
  version = versions.Version(jaxlib_version or importlib.metadata.version('jaxlib'))
  return version.release[:3] < FAST_COMPILE_FLAG_GONE


def with_xla_flag(flag: str) -> str:
  """os.environ's XLA_FLAGS plus `flag` (e.g. several host devices for a subprocess)."""
  return f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def without_xla_flag(flag: str) -> str:
  """os.environ's XLA_FLAGS less `flag`."""
  return ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if f != flag)
