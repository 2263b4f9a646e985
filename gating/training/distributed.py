"""More than one process: jax.distributed, and each process's part of the global arrays.

In a multi-process run (one process per host, or several on one machine), every array of
the train step is a global array over the devices of all processes. Each process holds
only the shards on its own devices, so it must:
- load only its own rows of the global batch (`local_rows`: which rows its devices hold;
  giving every process the whole batch as process-local data would silently make a
  global batch of duplicated rows);
- put the (identical) initial or restored state onto the replicated sharding with
  arrays it builds itself (`replicate`: `jax.device_put` refuses a sharding over devices
  of other processes);
- gather batch-sharded outputs from every process before reading them on the host
  (`fetch`: `jax.device_get` cannot read the rows of other processes).
In one process each of these is the plain single-process operation.

`initialize` starts jax.distributed from a detected cluster (SLURM, Open MPI, a TPU pod:
JAX's own detection) or from an explicit coordinator, process count and id. JAX's CPU
collectives default to gloo, so several CPU processes on one machine can train together
(the tests do).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int | None = None) -> None:
  """jax.distributed.initialize, from the cluster's environment when no argument is given.

  coordinator, num_processes and process_id go together (JAX's cluster detection fills
  in none of them when one is given). heartbeat_timeout_s: how long the others wait for a
  process that stopped answering before they fail (JAX's default when None). Raises
  ValueError for an incomplete or bad set.
  """
  given = {'--coordinator': coordinator, '--num-processes': num_processes,
           '--process-id': process_id}
  missing = [name for name, value in given.items() if value is None]
  if 0 < len(missing) < 3:
    raise ValueError(f'{", ".join(n for n in given if n not in missing)} also needs '
                     f'{", ".join(missing)}')
  if not missing:
    if num_processes < 1:
      raise ValueError(f'--num-processes must be >= 1, got {num_processes}')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process-id must be in [0, {num_processes}), got {process_id}')
    if ':' not in coordinator:
      raise ValueError(f'--coordinator must be HOST:PORT, got {coordinator!r}')
  kwargs = {}
  if heartbeat_timeout_s is not None:
    if heartbeat_timeout_s < 1:
      raise ValueError(f'--heartbeat-timeout must be >= 1 s, got {heartbeat_timeout_s}')
    kwargs['heartbeat_timeout_seconds'] = heartbeat_timeout_s
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, **kwargs)


def local_rows(sharding: jax.sharding.Sharding, shape: Sequence[int],
               axis: int) -> tuple[int, int]:
  """[lo, hi): the rows along `axis` of a global array of `shape` that this process's
  devices hold. Raises ValueError when they are not one contiguous block."""
  spans = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    start, stop, _ = index[axis].indices(shape[axis])
    spans.add((start, stop))
  lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
  if sum(e - s for s, e in spans) != hi - lo:
    raise ValueError(f'the rows of this process are not contiguous: {sorted(spans)}')
  return lo, hi


def global_batch(sharding: jax.sharding.Sharding, rows: dict[str, np.ndarray],
                 axis: int = 0) -> dict[str, jax.Array]:
  """Global arrays from whole-batch host arrays, of which each process passes only the
  rows its devices hold (the others' rows are never sent to a device)."""
  out = {}
  for name, value in rows.items():
    lo, hi = local_rows(sharding, value.shape, axis)
    mine = value[(slice(None),) * axis + (slice(lo, hi),)]
    out[name] = jax.make_array_from_process_local_data(sharding, mine, value.shape)
  return out


def replicate(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """`tree` (the same values in every process) as arrays replicated on `sharding`."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = one(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, value, value.shape)

  return jax.tree.map(one, tree)


def fetch(tree: Any) -> Any:
  """The host values of global arrays (sharded or replicated) in every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
