"""Orbax checkpoints of the train state in `{workdir}/checkpoints`.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a
crash or Ctrl-C during a save leaves the previous checkpoints restorable; unfinished
temporary folders are removed on the next start.
"""
from __future__ import annotations

import os

from absl import logging
import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int, subdir: str = 'checkpoints'
                 ) -> ocp.CheckpointManager:
  """A manager of {workdir}/{subdir} that keeps the last `keep` checkpoints, saving in
  the background."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, subdir)), options=options)


def save(manager: ocp.CheckpointManager, state) -> None:
  """Saves `state` (any pytree with an integer `step`) under its step number."""
  manager.save(int(state.step), args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, state, step: int):
  """Checkpoint `step` restored into the structure, dtypes and shardings of `state`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(manager: ocp.CheckpointManager, state):
  """The latest checkpoint restored like `state`, or `state` itself when there is none."""
  step = manager.latest_step()
  if step is None:
    return state
  logging.info('Restoring checkpoint at step %d from %s', step, manager.directory)
  return restore(manager, state, step)
