"""Run checkpoints with orbax: the trainable state plus JSON metadata, resumable exactly.

A checkpoint holds `state` (parameters, Lagrange multipliers, optimizer state and step:
the arrays of `nnx.Param` and `nnx.OptState` variables) and `meta` (step, config, data
fingerprint, and a checksum of every array). Orbax writes each step into a temporary
folder and renames it only when it is complete, so a run killed mid-save leaves no
partial checkpoint that could be taken for a whole one. Restoring goes onto an abstract
tree (from `nnx.eval_shape`).

Integrity: `save` records, per array, a 32-bit checksum of its bits computed on the global
array under jit (so it holds with several processes), and `load` recomputes it after
restoring. orbax-checkpoint has no checksum option of its own, and flipped bytes in an
array file can decompress without error into wrong (even NaN) values. A mismatch, a
file whose bytes do not parse or decompress (or end too early), a file missing from the
step folder (an empty or partly deleted one), or a non-finite value is corruption:
`CorruptCheckpoint` says the checkpoint at step N looks corrupt, gives the cause in one
line and lists the intact earlier steps, which `load(..., step=N)` (`--restore-step N`)
restores instead. Any other failure to read (a permission, a
sharding mismatch, a bug) is a `CheckpointError` that names it as it is, with no advice
to skip the step. Nothing is ever deleted; `quarantine` moves damaged later steps aside.
Checkpoints written before checksums were recorded restore with a one-line notice. A
step folder holding the checkpoint of another step (its metadata's step) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

CHECKPOINTED = (nnx.Param, nnx.OptState)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used (corrupt, or from a different model or data)."""


class CorruptCheckpoint(CheckpointError):
  """The checkpoint at `step` is damaged; `cause` says how, in one line."""

  def __init__(self, step: int, cause: str):
    super().__init__(f'checkpoint at step {step} looks corrupt: {cause}')
    self.step, self.cause = step, cause


QUARANTINE = 'checkpoints_quarantine'   # beside checkpoints/: damaged steps moved aside


def manager(directory: str, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _checksum(x: jax.Array) -> jax.Array:
  """A 32-bit checksum of an array's bits: sum_i bits_i * m_i mod 2^32, with an odd
  multiplier m_i = (2654435761 * (i + 1)) | 1 per position (order matters), as uint32."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  bits = bits.reshape(-1)
  index = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
  return jnp.sum(bits * ((index * jnp.uint32(2654435761)) | jnp.uint32(1)), dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def checksums(pure: dict) -> dict[str, str]:
  """{'a/b/c': '0x1234abcd'} for every array of a pure state dict (global arrays)."""
  sums = jax.device_get(_checksums_jit(pure))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {_key(path): f'{int(v):#010x}' for path, v in flat}


def _key(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State, meta: dict[str, Any]):
  """Saves the checkpointed part of `state` at `step` (synchronously), with the checksum
  of every array in its metadata."""
  pure = nnx.to_pure_dict(nnx.filter_state(state, CHECKPOINTED))
  meta = {**meta, 'checksums': checksums(pure)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(pure),
                                          meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


# What damaged bytes look like in the exceptions of orbax, TensorStore and json: a file
# that does not parse or decompress, ends too early, fails a checksum, or is missing from
# the step folder (an empty or partly deleted one). Anything else (a permission, a
# sharding mismatch, a bug) is reported as itself, not as corruption; a permission is
# looked for first, since TensorStore words every failed read 'Error reading'.
_DAMAGE_TYPES = (json.JSONDecodeError, UnicodeDecodeError, EOFError, zlib.error,
                 FileNotFoundError)
_DAMAGE = re.compile(r'corrupt|DATA_LOSS|decompress|checksum|truncat|unexpected end|'
                     r'end of (the )?(file|stream|input)|not a valid|Expecting|'
                     r'Unterminated|JSONDecodeError|Error reading|NOT_FOUND|No such file|'
                     r'was not found in the checkpoint|Dict key mismatch', re.I)
_ACCESS = re.compile(r'PERMISSION_DENIED|Permission denied', re.I)


def _chain(error: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def _is_damage(error: BaseException) -> bool:
  """True when an exception (or one in its chain) says the bytes are damaged or missing,
  and none says that access was denied."""
  chain = _chain(error)
  if any(isinstance(e, PermissionError) or _ACCESS.search(str(e)) for e in chain):
    return False
  return any(isinstance(e, _DAMAGE_TYPES) or _DAMAGE.search(f'{type(e).__name__}: {e}')
             for e in chain)


def _cause(error: BaseException) -> str:
  """The one line that says what went wrong, from an exception and its chain (orbax and
  TensorStore bury it under spec dumps): the first line that names a denied access, else
  the first that names damage, else the innermost exception's first line; at most 300
  characters, taken around what it names."""
  texts = [f'{type(e).__name__}: {e}' for e in _chain(error)]
  for pattern in (_ACCESS, _DAMAGE):
    for text in texts:
      for line in text.splitlines():
        found = pattern.search(line)
        if found:
          line = line.strip()
          start = max(0, min(found.start() - 100, len(line) - 300))
          return ('...' if start else '') + line[start:start + 300]
  return texts[-1].splitlines()[0][:300] if texts else 'unknown error'


def _read_error(step: int, what: str, path: str, error: BaseException) -> CheckpointError:
  """CorruptCheckpoint when `error` says the bytes are damaged; otherwise a
  CheckpointError that names the error as it is (no advice to skip the step)."""
  if _is_damage(error):
    return CorruptCheckpoint(step, f'its {what} cannot be read ({_cause(error)})')
  return CheckpointError(f'reading the {what} of the checkpoint at step {step} ({path}) '
                         f'failed, and not because its bytes are damaged: {_cause(error)}')


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON metadata of `step`; CorruptCheckpoint when its bytes are damaged, another
  CheckpointError (naming the error) when reading it fails otherwise."""
  try:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # orbax raises many types for unreadable files
    raise _read_error(step, 'metadata', os.path.join(str(mngr.directory), str(step)),
                      e) from e


def latest_meta(mngr: ocp.CheckpointManager) -> dict[str, Any] | None:
  """The metadata of the newest complete checkpoint, or None when there is none."""
  step = mngr.latest_step()
  return None if step is None else read_meta(mngr, step)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: nnx.State,
            meta: dict[str, Any] | None = None) -> nnx.State:
  """Restores and verifies the checkpointed arrays of `step` into a copy of
  `abstract_state` (the full state, e.g. of nnx.eval_shape(...) or of a fresh model);
  arrays that checkpoints leave out (gate statistics, rng counters) keep its values.

  Raises CorruptCheckpoint when the arrays' bytes are damaged (they do not parse or
  decompress, a checksum recorded at save time does not match, or a value is not
  finite); CheckpointError, naming the error as it is, when reading fails for another
  reason (a permission, a sharding mismatch) or an array has another shape than the
  model's.
  """
  path = os.path.join(str(mngr.directory), str(step))
  meta = read_meta(mngr, step) if meta is None else meta
  target = nnx.to_pure_dict(nnx.filter_state(abstract_state, CHECKPOINTED))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, 'sharding', None)),
                        target)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:
    _quiet_reads_left_in_flight()
    raise _read_error(step, 'arrays', path, e) from e
  _check_shapes(target, restored['state'], path)
  _verify(step, restored['state'], meta)
  state = jax.tree.map(lambda x: x, abstract_state)  # a copy of the containers
  nnx.replace_by_pure_dict(state, restored['state'])
  return state


def _quiet_reads_left_in_flight() -> None:
  """After a failed restore, orbax's reads left in flight end noisily, each through
  sys.unraisablehook: TensorStore delivers their results to orbax's event loop, closed by
  then ('RuntimeError: Event loop is closed'), and the coroutines and tasks left
  unfinished raise or log their own read errors, with TensorStore's spec dumps, when
  they are collected (a hundred to thousands of lines around a damaged checkpoint's one
  error line). Chains a hook that drops exactly those, and passes every other to the
  hook before it, and filters the tasks' lines out of the asyncio logger; installed
  once."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_abandoned_orbax_reads', False):
    return

  def hook(unraisable):
    error, where = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'
    code = getattr(where, 'cr_code', None)
    orbax_read = code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename
    if not (closed_loop or orbax_read):
      previous(unraisable)
  hook.drops_abandoned_orbax_reads = True
  sys.unraisablehook = hook
  # the tasks among them log 'Task exception was never retrieved' when collected
  logging.getLogger('asyncio').addFilter(_drop_abandoned_orbax_tasks)


def _drop_abandoned_orbax_tasks(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not (message.startswith('Task exception was never retrieved')
              and f'{os.sep}orbax{os.sep}' in message)


def _verify(step: int, pure: dict, meta: dict[str, Any]) -> None:
  recorded = meta.get('checksums')
  if recorded is None:
    print(f'notice: checkpoint at step {step} carries no checksums (written before they '
          'were recorded); its arrays are checked for finite values only', file=sys.stderr)
  else:
    mismatched = [k for k, v in checksums(pure).items() if recorded.get(k) != v]
    if mismatched:
      raise CorruptCheckpoint(step, f'{len(mismatched)} array(s) differ from the checksums '
                                    f'recorded when it was saved (e.g. {mismatched[0]})')
  finite = jax.device_get(jax.jit(lambda t: jax.tree.map(
      lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
      else jnp.bool_(True), t))(pure))
  bad = [_key(p) for p, ok in jax.tree_util.tree_flatten_with_path(finite)[0] if not ok]
  if bad:
    raise CorruptCheckpoint(step, f'{len(bad)} array(s) hold non-finite values (e.g. {bad[0]})')


def intact_steps(mngr: ocp.CheckpointManager, abstract_state: nnx.State,
                 below: int | None = None) -> list[int]:
  """The steps (below `below`) whose metadata and arrays restore and verify."""
  good = []
  for step in sorted(mngr.all_steps()):
    if below is not None and step >= below:
      continue
    try:
      restore(mngr, step, abstract_state)
      good.append(step)
    except CheckpointError:
      continue
  return good


def load(mngr: ocp.CheckpointManager, abstract_state: nnx.State, *, step: int | None = None,
         check: Callable[[dict], None] | None = None, where: str = '',
         flag: str = '--restore-step') -> tuple[int, nnx.State, dict[str, Any]] | None:
  """Restores the latest checkpoint (or `step`): (step, state, meta), or None when there
  is no checkpoint. `check(meta)` runs before the arrays are read (e.g. a compatibility
  check). A corrupt checkpoint raises one CheckpointError paragraph: what looks corrupt,
  the cause in one line, and the intact earlier steps to pass as `flag`."""
  steps = sorted(mngr.all_steps())
  if not steps:
    if step is not None:
      raise CheckpointError(f'{flag} {step}: {where or mngr.directory} holds no checkpoint')
    return None
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'{flag} {step}: no checkpoint at that step in '
                          f'{where or mngr.directory}; its steps are {steps}')
  try:
    meta = read_meta(mngr, step)
    if meta.get('step', step) != step:
      raise CheckpointError(f'the checkpoint folder of step {step} in '
                            f'{where or mngr.directory} holds the checkpoint saved at step '
                            f"{meta['step']} (a copied or renamed folder?): refusing to "
                            f'resume from it as step {step}')
    if check is not None:
      check(meta)
    return step, restore(mngr, step, abstract_state, meta), meta
  except CorruptCheckpoint as e:
    intact = intact_steps(mngr, abstract_state, below=e.step)
    hint = (f'Intact earlier checkpoints: steps {intact}; use one with {flag} N (training '
            f'then moves the later steps aside into {QUARANTINE}/ beside checkpoints/).'
            if intact else 'No intact earlier checkpoint was found.')
    path = os.path.join(str(mngr.directory), str(e.step))
    raise CheckpointError(f'the checkpoint at step {e.step} ({path}) looks corrupt: '
                          f'{e.cause}. {hint} (nothing was deleted)') from None


def quarantine(directory: str, steps) -> str | None:
  """Moves the step folders `steps` of checkpoints `directory` into QUARANTINE beside it
  (a rename, never a deletion); returns the quarantine folder, or None if nothing moved."""
  steps = sorted(steps)
  if not steps:
    return None
  target = os.path.join(os.path.dirname(os.path.abspath(directory)), QUARANTINE)
  os.makedirs(target, exist_ok=True)
  for step in steps:
    dest = os.path.join(target, str(step))
    suffix = 1
    while os.path.exists(dest):
      dest = os.path.join(target, f'{step}.{suffix}')
      suffix += 1
    os.rename(os.path.join(directory, str(step)), dest)
  return target


def _check_shapes(target, restored, path):
  want = jax.tree_util.tree_flatten_with_path(target)[0]
  got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  for key, spec in want:
    value = got.get(key)
    if value is None or value.shape != spec.shape or value.dtype != spec.dtype:
      name = jax.tree_util.keystr(key)
      found = None if value is None else (value.shape, value.dtype)
      raise CheckpointError(f'checkpoint {path}: {name} is {found}, this model expects '
                            f'{(spec.shape, spec.dtype)}; nothing was deleted')
