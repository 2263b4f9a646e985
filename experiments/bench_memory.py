"""Memory figures of the benchmarks, and the refusal of a row that would not fit the device.

Every `--size gpu` row carries three figures:
  estimate_bytes  an analytic estimate made before compiling: the row's arguments
                  (parameters, optimizer state, inputs, KV cache) counted exactly, plus
                  the activations its section names (see each section's `_estimate`).
  memory          XLA's memory analysis of the compiled function: argument, output,
                  temporary and aliased bytes, and `peak_bytes` = argument + output + temp
                  - alias, what one call holds (XLA's own peak_memory_in_bytes is kept as
                  `reported_peak_bytes`: on the CPU it leaves out the temporaries).
  device          the device's bytes_limit, bytes_in_use and peak_bytes_in_use, from
                  jax.Device.memory_stats(), where the backend reports them (GPU, TPU).
                  The peak is the process's so far (JAX cannot reset it): it is read after
                  each table. The CPU reports none (memory_stats() is None).
A row is refused (`DoesNotFit`), naming the row and the bytes, when its estimate exceeds
the memory still free on the device (bytes_limit - bytes_in_use), before it compiles; or
when XLA's planned peak does, before it runs. The run goes on with the other rows. The CPU
reports no limit: nothing is refused there unless a limit is given (`--memory-limit`).
"""

from __future__ import annotations

import jax
import numpy as np


class DoesNotFit(ValueError):
  """A row that would not fit in the device's memory."""


def tree_bytes(tree) -> int:
  """Bytes of every array (or jax.ShapeDtypeStruct) leaf of `tree`."""
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree) if hasattr(leaf, 'shape'))


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's memory analysis of a compiled function (None where the backend gives none)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {name: int(getattr(stats, f'{name}_size_in_bytes'))
         for name in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  out['reported_peak'] = getattr(stats, 'peak_memory_in_bytes', None)
  return {f'{name}_bytes': None if value is None else int(value)
          for name, value in out.items()}


def device_memory(device=None) -> dict[str, int | str | None]:
  """The device's kind and, where its backend reports them, its bytes_limit, bytes_in_use
  and peak_bytes_in_use (the process's peak so far)."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() or {}
  return {'device_kind': device.device_kind, 'platform': device.platform,
          **{name: stats.get(name) for name in ('bytes_limit', 'bytes_in_use',
                                                 'peak_bytes_in_use')}}


def free_bytes(limit: int | None = None) -> int | None:
  """The bytes a new row may use: `limit` when given (--memory-limit, which stands for the
  whole device), else bytes_limit - bytes_in_use where the backend reports them, else None
  (the CPU: nothing to compare to)."""
  if limit is not None:
    return int(limit)
  stats = device_memory()
  if stats['bytes_limit'] is None:
    return None
  return int(stats['bytes_limit']) - int(stats['bytes_in_use'] or 0)


def gib(n: int | None) -> str:
  return '-' if n is None else f'{n / 2**30:.2f} GiB'


def check_fits(row: str, needed: int, free: int | None, what: str) -> None:
  """A DoesNotFit naming `row` unless `needed` bytes fit in `free` (None: not checked)."""
  if free is not None and needed > free:
    raise DoesNotFit(f'{row}: needs about {gib(needed)} ({needed:,} bytes, {what}); '
                     f'{gib(free)} ({free:,} bytes) are free on the device')


def out_of_memory(error: BaseException) -> bool:
  """Whether an exception is XLA running out of device memory."""
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text
