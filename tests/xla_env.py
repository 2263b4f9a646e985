"""XLA_FLAGS for the tests: the suite's fast-compile flag (see conftest.py), and a flag
added to or taken from those already set, for a subprocess that needs other flags."""

import os

# XLA's CPU backend emits fusions with its older elemental emitters: tiny programs compile
# faster (compiling was more than half of the suite's time).
FAST_COMPILE_FLAG = '--xla_cpu_use_fusion_emitters=false'


def with_xla_flag(flag: str) -> str:
  """os.environ's XLA_FLAGS plus `flag` (e.g. several host devices for a subprocess)."""
  return f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def without_xla_flag(flag: str) -> str:
  """os.environ's XLA_FLAGS less `flag`."""
  return ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if f != flag)
