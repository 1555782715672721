"""Orbax checkpoints of the train state and the input iterator's position.

One `CheckpointManager` in `<workdir>/checkpoints` holds two items per step:
`state` (parameters, optimizer state, step, codebook; every process writes its
shards) and `data` (the grain iterator state, one file per process), so a
restarted run continues with the same weights and the same next batch.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs in a workdir."""

  def __init__(self, workdir: str, *, keep: int):
    self._manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    """Starts an asynchronous save; the iterator position is captured now."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, state_like, data_iterator):
    """Restores `step` into the structure and shardings of `state_like`.

    The data iterator is restored in place; returns the train state.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
