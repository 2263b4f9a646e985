"""Weights & Biases logging of a run (optional, off by default): `--set log.wandb=PROJECT`.

metrics.jsonl stays the source of truth; W&B gets the same scalars as the TensorBoard
event files (`tensorboard.scalars`: `train/loss`, `train/active_heads/0`,
`validation/accuracy`, `test/permute_0/loss`, ...), each record logged with
`run.log(scalars, step=record['step'])`, plus the resolved config as the run's config.

Mode: `wandb.init(mode=os.environ['WANDB_MODE'])` when the environment variable
WANDB_MODE is set to a non-empty value (`online` sends the run to the server that
`wandb login` or WANDB_API_KEY configured, `disabled` turns W&B off; W&B checks the
value), else `mode='offline'`. So `wandb login` alone, or `wandb online`, does not make
a run online here: set WANDB_MODE=online. An offline run can be uploaded later with
`wandb sync RUN_FOLDER/wandb/offline-run-*`. (The mode is passed on explicitly because
W&B reads its environment only once per process.)

Files: W&B writes into the run folder (`dir=workdir`: RUN_FOLDER/wandb/). The W&B run id
is made once and kept in RUN_FOLDER/wandb_id.txt; a resumed run opens the same id with
`resume='allow'`, so it continues the same W&B run. Steps that an earlier sitting logged
past its last checkpoint are not purged, as they are in TensorBoard: offline, each sitting
has its own folder; online, W&B ignores a step below the last it has (with its warning
"Tried to log to step ..."), so it keeps the earlier sitting's values. On the same
machine they are the same numbers: the loop is deterministic. The run's name is the run
folder's name.

wandb is imported only when log.wandb is set; `require` fails early, before anything is
written, with the extra to install. Only process 0 logs (the loop decides).
"""

from __future__ import annotations

import importlib
import os
import secrets
import string
from typing import Any

from gating.training.tensorboard import scalars

EXTRA = 'pip install -e ".[wandb]"'
ID_FILE = 'wandb_id.txt'


def require() -> None:
  """A ValueError naming the extra when wandb is not installed (log.wandb needs it)."""
  try:
    importlib.import_module('wandb')
  except ImportError:
    raise ValueError('log.wandb: logging to W&B needs the wandb package, which is not '
                     f'installed: {EXTRA}') from None


def mode() -> str:
  """WANDB_MODE when it is set and non-empty, else 'offline'."""
  return os.environ.get('WANDB_MODE') or 'offline'


def run_id(workdir: str) -> str:
  """The run folder's W&B run id: read from wandb_id.txt, made and saved the first time."""
  path = os.path.join(workdir, ID_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = f.read().strip()
    if saved:
      return saved
  new = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  with open(path, 'w') as f:
    f.write(new + '\n')
  return new


class WandbLog:
  """Logs the scalars of metrics records to the W&B run of `workdir` (see the docstring)."""

  def __init__(self, project: str, workdir: str, *, config: dict[str, Any] | None = None):
    require()
    import wandb  # pylint: disable=import-outside-toplevel
    self._run = wandb.init(
        project=project, dir=workdir, id=run_id(workdir), resume='allow', mode=mode(),
        name=os.path.basename(os.path.normpath(os.path.abspath(workdir))), config=config,
        reinit='create_new')   # this run only: never returns or finishes another run

  @property
  def run(self):
    return self._run

  def write(self, record: dict[str, Any]) -> None:
    """A metrics.jsonl record: {'kind': 'train' | 'eval', 'step': s, ...}."""
    values = dict(scalars(record))
    if values:
      self._run.log(values, step=record['step'])

  def close(self) -> None:
    self._run.finish()
