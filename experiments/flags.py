"""Command-line values the scripts share: comma-separated integers (`--k 2,4`, `--layers
0,1`, `--seeds 0,1`), parsed with an error that names the flag."""

from __future__ import annotations


def int_list(text: str, flag: str) -> list[int]:
  """'2,4' -> [2, 4] (empty items skipped); a ValueError names `flag` and the text, also
  when it holds no integer at all (',' or '')."""
  try:
    values = [int(x) for x in text.split(',') if x]
  except ValueError:
    raise ValueError(f'{flag} {text!r}: expected comma-separated integers') from None
  if not values:
    raise ValueError(f'{flag} {text!r}: expected at least one integer')
  return values
