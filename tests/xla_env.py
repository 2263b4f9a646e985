"""XLA_FLAGS for the tests' subprocesses: a flag added to those the suite already set."""

import os


def with_xla_flag(flag: str) -> str:
  """os.environ's XLA_FLAGS (the suite's fast-compile flag, see conftest.py) plus `flag`,
  for a subprocess that needs one more (e.g. several host devices)."""
  return f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
