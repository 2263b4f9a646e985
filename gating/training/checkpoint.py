"""Run checkpoints with orbax: the trainable state plus JSON metadata, resumable exactly.

A checkpoint holds `state` (parameters, Lagrange multipliers, optimizer state and step:
the arrays of `nnx.Param` and `nnx.OptState` variables) and `meta` (step, config, data
fingerprint). Orbax writes each step into a temporary folder and renames it only when it
is complete, so a run killed mid-save leaves no partial checkpoint that could be taken for
a whole one. Restoring goes onto an abstract tree (from `nnx.eval_shape`); a corrupt or
incompatible checkpoint raises `CheckpointError` naming its folder and deletes nothing.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

CHECKPOINTED = (nnx.Param, nnx.OptState)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used (corrupt, or from a different model or data)."""


def manager(directory: str, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State, meta: dict[str, Any]):
  """Saves the checkpointed part of `state` at `step` (synchronously)."""
  pure = nnx.to_pure_dict(nnx.filter_state(state, CHECKPOINTED))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(pure),
                                          meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def latest_meta(mngr: ocp.CheckpointManager) -> dict[str, Any] | None:
  """The metadata of the newest complete checkpoint, or None when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  path = os.path.join(str(mngr.directory), str(step))
  try:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # orbax raises many types for unreadable files
    raise CheckpointError(f'checkpoint {path} is unreadable ({type(e).__name__}: {e}); '
                          'nothing was deleted') from e


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: nnx.State) -> nnx.State:
  """Restores the checkpointed arrays of step `step` into a copy of `abstract_state`.

  `abstract_state` is the full state (e.g. of nnx.eval_shape(...) or of a fresh model);
  arrays that checkpoints leave out (gate statistics, rng counters) keep its values.
  """
  path = os.path.join(str(mngr.directory), str(step))
  target = nnx.to_pure_dict(nnx.filter_state(abstract_state, CHECKPOINTED))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, 'sharding', None)),
                        target)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:
    raise CheckpointError(f'checkpoint {path} cannot be restored into this model '
                          f'({type(e).__name__}: {e}); nothing was deleted') from e
  _check_shapes(target, restored['state'], path)
  state = jax.tree.map(lambda x: x, abstract_state)  # a copy of the containers
  nnx.replace_by_pure_dict(state, restored['state'])
  return state


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
