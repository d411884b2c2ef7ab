"""Orbax checkpoints of the train state in `{workdir}/checkpoints`.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a
crash or Ctrl-C during a save leaves the previous checkpoints restorable; unfinished
temporary folders are removed on the next start.
"""
from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax
import orbax.checkpoint as ocp


ITEM = 'default'  # The item folder CheckpointManager writes in a step folder.


def make_manager(workdir: str, keep: int, subdir: str = 'checkpoints'
                 ) -> ocp.CheckpointManager:
  """A manager of {workdir}/{subdir} that keeps the last `keep` checkpoints, saving in
  the background."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, subdir)), options=options)


def _stored(state):
  """What a checkpoint of `state` stores: a dataclass state (`train.TrainState`) as the
  dict of its fields that are not None, so that a state without an EMA (`ema` None) is
  stored, and restored, as before that field existed; any other pytree as it is."""
  if dataclasses.is_dataclass(state):
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if getattr(state, f.name) is not None}
  return state


def save(manager: ocp.CheckpointManager, state) -> None:
  """Saves `state` (any pytree with an integer `step`) under its step number."""
  manager.save(int(state.step), args=ocp.args.StandardSave(_stored(state)))


def restore(manager: ocp.CheckpointManager, state, step: int):
  """Checkpoint `step` restored into the structure, dtypes and shardings of `state`; its
  fields that are None stay None (and must not be in the checkpoint: `stored_fields`)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _stored(state))
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return state.replace(**restored) if dataclasses.is_dataclass(state) else restored


def restore_fields(manager: ocp.CheckpointManager, fields: dict, step: int) -> dict:
  """Only the top-level entries `fields` names (e.g. {'params': ...}) of checkpoint
  `step`, restored into their structures, dtypes and shardings; the others (the optimizer
  state) are not read. What evaluation needs: it builds no optimizer like the run's.

  Raises:
    ValueError: (Orbax) a named entry is missing or has another structure."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fields)
  args = ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)
  return manager.restore(step, args=args)


def metadata_tree(item) -> dict:
  """The tree of array metadata of a checkpoint item folder ({step folder}/default), read
  without restoring any array."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(item).tree
  finally:
    handler.close()


def stored_fields(manager: ocp.CheckpointManager, step: int) -> set[str]:
  """The top-level names checkpoint `step` holds, e.g. {'step', 'params', 'opt_state'}
  (and 'ema' for a run with an EMA of its parameters), read from its metadata."""
  return set(metadata_tree(manager.directory / str(step) / ITEM).keys())


def restore_latest(manager: ocp.CheckpointManager, state):
  """The latest checkpoint restored like `state`, or `state` itself when there is none."""
  step = manager.latest_step()
  if step is None:
    return state
  logging.info('Restoring checkpoint at step %d from %s', step, manager.directory)
  return restore(manager, state, step)
