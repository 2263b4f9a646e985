"""metrics.jsonl, the source of truth for a run's curves: one JSON object per line
({'kind': 'train' | 'eval', 'step': s, ...}), appended as the run goes and cut back to
the restored step when it resumes (`MetricsLog.truncate_after`). The run's final
evaluation (the whole validation and test splits at its last step, written just before
summary.json) is marked 'final': True; a run resumed before summary.json was written
redoes it, so the resume drops the marked lines too, and each appears once.

A run killed while writing leaves its last line cut short: a resume drops it, and
`read_metrics` skips it (the run may also still be writing it). Any other line that does
not parse means the file was damaged; `read_metrics` raises a ValueError naming the file
and the line rather than skip it.

Needs only the standard library: the plots read it without the training stack.
"""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsLog:
  """metrics.jsonl: one JSON object per line; truncated to a step when a run resumes."""

  def __init__(self, path: str):
    self.path = path

  def truncate_after(self, step: int) -> None:
    """Keeps the complete lines with step <= `step` that are not the final evaluation's
    (atomically: tmp file + rename)."""
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill
        if record.get('step', 0) <= step and not record.get('final'):
          kept.append(json.dumps(record))
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(''.join(line + '\n' for line in kept))
    os.replace(tmp, self.path)

  def write(self, record: dict[str, Any]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of metrics.jsonl at `path`, a last line cut short by a kill (or still
  being written) left out; ValueError for a damaged line before it."""
  with open(path) as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  records = []
  for i, (n, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1 and not line.endswith('\n'):
        break          # the line a killed (or running) run was writing
      raise ValueError(f'{path}, line {n}: not a JSON record ({e}); the file is '
                       'damaged') from None
  return records
