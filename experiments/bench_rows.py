"""The runner of the `--size gpu` tables: estimate, compile, refuse, then time.

A table is the candidates of one configuration, one of them 'dense' (the denominator).
Each candidate, in order:
  1. its analytic estimate (experiments.bench_memory) is checked against the device's free
     memory: refused before compiling when it does not fit;
  2. it is compiled from abstract arguments (jax.ShapeDtypeStruct leaves: nothing is
     allocated) and refused before it runs when XLA's planned peak does not fit;
  3. its concrete arguments are built and it runs once, untimed (an out-of-memory error
     there refuses the row too, and the run goes on).
Then the table's candidates are timed interleaved (experiments.timing) and every row gets
its time ratio to dense of the same run, the device's name, and its memory figures.
With `dry_run`, a table compiles at most the one candidate its section names and times
nothing; the other rows get their estimates only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from experiments import bench_memory
from experiments.timing import summarize, time_interleaved


class Candidate(NamedTuple):
  """One row: its estimate, and how to build it (called only when it is compiled):
  build() -> (jitted function, abstract arguments, make_call), make_call(compiled) -> a
  zero-argument callable running the compiled function on concrete arguments."""
  estimate_bytes: int
  build: Callable[[], tuple]


class Settings(NamedTuple):
  dry_run: bool = False
  memory_limit: int | None = None   # bytes; None: the device's own (none on the CPU)
  trials: int = 5
  min_seconds: float = 0.1
  # progress(rows, final): a table's rows so far (final: the table is done), after each row
  progress: Callable[[list[dict], bool], None] | None = None


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return cost.get('flops') if isinstance(cost, dict) else None


def _prepare(row: str, cand: Candidate, settings: Settings, compile_it: bool):
  """(zero-argument call or None, info) of one candidate (steps 1-3 of the docstring)."""
  info = dict(estimate_bytes=cand.estimate_bytes, memory=None, xla_flops=None, compiled=False,
              refused=None)
  free = bench_memory.free_bytes(settings.memory_limit)
  info['memory_checked'] = (f'against {free:,} free bytes' if free is not None else
                            'not checked: the backend reports no memory limit')
  try:
    bench_memory.check_fits(row, cand.estimate_bytes, free, 'estimated before compiling')
    if not compile_it:
      return None, info
    fn, args, make_call = cand.build()
    compiled = fn.lower(*args).compile()
    info.update(compiled=True, memory=bench_memory.compiled_memory(compiled),
                xla_flops=_flops(compiled))
    if info['memory'] is not None:
      bench_memory.check_fits(row, info['memory']['peak_bytes'], free,
                              "XLA's planned peak of the compiled function")
    if settings.dry_run:
      return None, info
    call = make_call(compiled)
    jax.block_until_ready(call())
    return call, info
  except bench_memory.DoesNotFit as e:
    info['refused'] = str(e)
  except Exception as e:  # pylint: disable=broad-except
    if not bench_memory.out_of_memory(e):
      raise
    info['refused'] = f'{row}: ran out of device memory: {str(e).splitlines()[0]}'
  print(f'  refused: {info["refused"]}', flush=True)
  return None, info


def run_table(section: str, fields: dict, cands: dict[str, Candidate], settings: Settings,
              dry_compile: str | None = None) -> list[dict]:
  """Rows of one table; `fields` (its configuration) go into every row. dry_compile: the
  candidate compiled under settings.dry_run (None: none of this table's)."""
  label = ', '.join(f'{k}={v}' for k, v in fields.items())
  calls, infos = {}, {}
  for name, cand in cands.items():
    compile_it = not settings.dry_run or name == dry_compile
    call, infos[name] = _prepare(f'{section} [{label}] {name}', cand, settings, compile_it)
    if call is not None:
      calls[name] = call
    if settings.progress is not None:   # a run cut short keeps what it compiled
      settings.progress(_rows(section, fields, infos, {}, settings), False)
  times = (time_interleaved(calls, settings.trials, settings.min_seconds)
           if calls and not settings.dry_run else {})
  del calls
  rows = _rows(section, fields, infos, times, settings)
  if settings.progress is not None:
    settings.progress(rows, True)
  return rows


def _rows(section, fields, infos, times, settings):
  stats = {name: summarize(t) for name, t in times.items()}
  base = stats['dense']['median_s'] if 'dense' in stats else None
  device = bench_memory.device_memory()
  rows = []
  for name, info in infos.items():
    s = stats.get(name)
    rows.append(dict(
        section=section, **fields, candidate=name, device=device['device_kind'],
        platform=device['platform'], dry_run=settings.dry_run, **info,
        ratio_vs_dense=None if s is None or base is None else s['median_s'] / base,
        device_bytes_limit=device['bytes_limit'],
        device_peak_bytes=device['peak_bytes_in_use'],
        **(s or dict(median_s=None, q25_s=None, q75_s=None, trials=0))))
  return rows


def format_rows(title: str, rows: list[dict], keys: tuple[str, ...],
                extra: Callable[[dict], str] | None = None) -> str:
  """A table of `--size gpu` rows, grouped by the values of `keys`."""
  lines = [title, f'  device: {rows[0]["device"]} ({rows[0]["platform"]}); memory: '
                  'estimate before compiling / XLA planned peak; device peak so far']
  group = None
  for r in rows:
    if tuple(r[k] for k in keys) != group:
      group = tuple(r[k] for k in keys)
      lines.append('\n  ' + ', '.join(f'{k}={r[k]}' for k in keys))
    peak = None if r['memory'] is None else r['memory']['peak_bytes']
    if r['refused']:
      timing = 'refused'
    elif r['median_s'] is None:
      timing = 'compiled, not timed' if r['compiled'] else 'not compiled'
    else:
      ratio = '-' if r['ratio_vs_dense'] is None else f'{r["ratio_vs_dense"]:.3f}x'
      timing = (f'{r["median_s"] * 1e3:9.2f} ms [{r["q25_s"] * 1e3:.2f}, '
                f'{r["q75_s"] * 1e3:.2f}] {ratio:>7} of dense')
    lines.append(f'    {r["candidate"]:<18} {timing:<44} '
                 f'{bench_memory.gib(r["estimate_bytes"]):>11} / {bench_memory.gib(peak):>11}'
                 f'  dev {bench_memory.gib(r["device_peak_bytes"])}'
                 + ('' if extra is None or r['median_s'] is None else '  ' + extra(r)))
    if r['refused']:
      lines.append(f'      {r["refused"]}')
  return '\n'.join(lines)
