"""One set of GPUs per sweep run: the visible-devices variable of each worker slot.

`--gpus-per-run G` splits the machine's GPUs into groups of G (`device_groups`) and gives
worker slot i of a sweep the group i mod (number of groups) through CUDA_VISIBLE_DEVICES
(`slot_envs`), so that 8 runs on an 8-GPU box run one per GPU and share nothing. JAX in
each subprocess then sees only its own group, and the training mesh spans exactly it.

When there are more slots than groups (`--parallel` above the number of groups), several
runs share each GPU; JAX preallocates 75% of a GPU's memory per process by default, so
the second one would fail. Each run's preallocation is then capped at
MEM_BUDGET / (runs per GPU) of the GPU's memory through XLA_PYTHON_CLIENT_MEM_FRACTION
(JAX's documented knob, docs "GPU memory allocation").

The GPUs are counted by a short subprocess (`count_gpus`) rather than in the sweep
process, so that the sweep's own JAX never holds memory on them. A parent
CUDA_VISIBLE_DEVICES is respected: the groups are cut from the ids it lists.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Mapping, Sequence

VISIBLE = 'CUDA_VISIBLE_DEVICES'
MEM_FRACTION = 'XLA_PYTHON_CLIENT_MEM_FRACTION'
MEM_BUDGET = 0.9   # of each GPU's memory, split among the runs that share it


def count_gpus(env: Mapping[str, str] | None = None) -> int:
  """The number of GPUs JAX sees, asked in a subprocess (0 on a machine without one)."""
  env = dict(os.environ if env is None else env)
  env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  code = ('import jax\ntry:\n  print(len(jax.devices("gpu")))\n'
          'except RuntimeError:\n  print(0)')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                       text=True, check=True)
  return int(out.stdout.strip().splitlines()[-1])


def device_ids(count: int, env: Mapping[str, str]) -> list[str]:
  """The ids to hand out: those of a parent CUDA_VISIBLE_DEVICES, else 0..count-1."""
  listed = [d.strip() for d in env.get(VISIBLE, '').split(',') if d.strip()]
  return listed[:count] if listed else [str(i) for i in range(count)]


def device_groups(ids: Sequence[str], gpus_per_run: int) -> list[list[str]]:
  """The ids in consecutive groups of gpus_per_run (a remainder stays unused)."""
  if gpus_per_run < 1:
    raise ValueError(f'--gpus-per-run must be >= 1, got {gpus_per_run}')
  if gpus_per_run > len(ids):
    raise ValueError(f'--gpus-per-run {gpus_per_run} is more than the {len(ids)} GPUs '
                     'present')
  return [list(ids[i:i + gpus_per_run])
          for i in range(0, len(ids) - gpus_per_run + 1, gpus_per_run)]


def slot_envs(base: Mapping[str, str], groups: Sequence[Sequence[str]],
              parallel: int) -> list[dict[str, str]]:
  """One environment per worker slot: slot i sees groups[i % len(groups)]; where runs
  share a GPU, each run's memory preallocation is capped (see the module docstring)."""
  if parallel < 1:
    raise ValueError(f'--parallel must be >= 1, got {parallel}')
  sharing = math.ceil(parallel / len(groups))
  envs = []
  for slot in range(parallel):
    env = dict(base)
    env[VISIBLE] = ','.join(groups[slot % len(groups)])
    if sharing > 1:
      env[MEM_FRACTION] = f'{math.floor(MEM_BUDGET / sharing * 100) / 100:.2f}'
    envs.append(env)
  return envs
