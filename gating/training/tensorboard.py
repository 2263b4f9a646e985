"""TensorBoard event files of a run: the scalars of metrics.jsonl, written with tensorboardX.

metrics.jsonl stays the source of truth; the event files are a view of it, so that
`tensorboard --logdir runs/` shows every run (and every point of a sweep) side by side.
Every number of a record becomes a scalar, its tag the record's kind and key:
`train/loss`, `train/active_heads/0` (one per layer), `validation/accuracy`,
`validation/permute_0/accuracy` (per task or domain), `test/loss`. Lists of lists (head
usage) are left to metrics.jsonl and the plots.

A resumed run opens its writer with `purge_step` = the checkpoint's step + 1: TensorBoard
then hides the events at and after that step that an earlier sitting wrote past the
checkpoint, as `MetricsLog.truncate_after` drops those lines of metrics.jsonl.
`read_scalars` reads the event files back (tensorboardX's protobuf classes parse the
records) with the same purge rule; the tests use it.
"""

from __future__ import annotations

import glob
import os
import struct
from typing import Any, Iterator

EVAL_KEYS = ('loss', 'accuracy', 'exact_match', 'bits_per_token')


class ScalarLog:
  """Writes the scalars of metrics records into TensorBoard event files in `logdir`."""

  def __init__(self, logdir: str, *, purge_step: int):
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=10)

  def write(self, record: dict[str, Any]) -> None:
    """A metrics.jsonl record: {'kind': 'train' | 'eval', 'step': s, ...}."""
    step = record['step']
    for tag, value in scalars(record):
      self._writer.add_scalar(tag, value, global_step=step, walltime=record.get('time'))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
  """(tag, value) of every scalar of a metrics record (see the module docstring)."""
  if record.get('kind') == 'eval':
    split = record['split']
    for key in EVAL_KEYS:
      if key in record:
        yield f'{split}/{key}', float(record[key])
    for label, block in (record.get('per_label') or {}).items():
      for key in EVAL_KEYS:
        if key in block:
          yield f'{split}/{label}/{key}', float(block[key])
    return
  kind = record.get('kind', 'train')
  for key, value in record.items():
    if key in ('step', 'kind', 'time'):
      continue
    if _is_number(value):
      yield f'{kind}/{key}', float(value)
    elif isinstance(value, list) and value and all(_is_number(v) for v in value):
      for i, v in enumerate(value):
        yield f'{kind}/{key}/{i}', float(v)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the event files in `logdir`, as TensorBoard shows them.

  Files are read in the order they were written (their names start with the time); a
  session start at step p (a writer opened with purge_step=p) drops the steps >= p read
  so far; a later value of a (tag, step) replaces an earlier one.
  """
  from tensorboardX.proto import event_pb2
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    for payload in _records(path):
      event = event_pb2.Event.FromString(payload)
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        for values in out.values():
          for step in [s for s in values if s >= event.step]:
            del values[step]
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def _records(path: str) -> Iterator[bytes]:
  """The payloads of a TFRecord file: [u64 length][u32 crc][payload][u32 crc] each; a
  record cut short by a killed writer ends the file."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack('<Q', header[:8])
      payload = f.read(length)
      if len(payload) < length or len(f.read(4)) < 4:
        return
      yield payload
