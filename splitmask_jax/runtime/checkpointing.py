"""Orbax checkpoints of the train state and the input iterator's position.

One `CheckpointManager` in `<workdir>/checkpoints` holds two items per step:
`state` (parameters, optimizer state, step, codebook; every process writes its
shards) and `data` (the grain iterator state, one file per process), so a
restarted run continues with the same weights and the same next batch.

Saves are atomic: orbax writes a step into `<step>.orbax-checkpoint-tmp` and
renames it to `<step>` once every item is on disk, so a process killed while
saving leaves the previous steps intact and a temporary folder that the next
`Checkpointer` deletes. Older steps are deleted only after a newer one is
committed, keeping the `keep` latest.

A committed step can still be damaged later (a machine or filesystem crash
truncates files). `Checkpointer.latest_step` and `Checkpointer.restore_latest`
move a step that cannot be read to `<workdir>/damaged_checkpoints/<step>` (never
deleting it) and fall back to the previous one. A step counts as damaged only
when reading it without any train state to match fails too, so a config that does
not fit an intact checkpoint is reported as such and moves nothing.

`BestCheckpointer` keeps, in `<workdir>/best_checkpoint`, the state of the
lowest held-out loss seen at evaluations, for fine-tuning from it.

A train state is saved as the tree of its fields, leaving out those that are None
(`TrainState.objective_state` of the objectives that carry none): their checkpoints
hold what they held before the field existed, and those restore.
"""

from __future__ import annotations

import dataclasses
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from splitmask_jax.runtime import workdir as workdir_lib

# The folder of a workdir that holds the checkpoint of the lowest held-out loss.
BEST_DIR = "best_checkpoint"
# The folder of a workdir where steps that could not be read are set aside.
DAMAGED_DIR = "damaged_checkpoints"


def _saved_tree(state):
  """What a checkpoint holds of a train state (a dataclass): {field: value} for its
  fields that are not None; any other tree as it is."""
  if not dataclasses.is_dataclass(state):
    return state
  values = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  return {name: value for name, value in values.items() if value is not None}


def _as_state(restored, state_like):
  """The inverse of `_saved_tree`: the restored fields in `state_like`'s dataclass."""
  if not dataclasses.is_dataclass(state_like):
    return restored
  return state_like.replace(**restored)


def _barriers_named(prefix: str) -> ocp.options.MultiprocessingOptions:
  """Multi-host barrier keys of one manager's own.

  Orbax names a save's barriers by its step alone; the regular and the best
  checkpoint of the same step, saved at once on several hosts, would otherwise
  meet at the same barrier and leave every process waiting.
  """
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs in a workdir."""

  def __init__(self, workdir: str, *, keep: int):
    self.directory = workdir_lib.path(workdir, "checkpoints")
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        multiprocessing_options=_barriers_named("checkpoints"),
      ),
    )

  def latest_step(self) -> int | None:
    """The newest step whose metadata reads (None: no step saved yet).

    Newer steps whose metadata does not read are set aside.

    Raises:
      FileNotFoundError: steps were saved, and none of them reads.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      try:
        self._manager.metadata(step).item_metadata["state"]
        error = None
      except Exception as e:  # noqa: BLE001 (any failure to read a step's metadata)
        error = e
      if _on_every_process(error is None):
        return step
      self._set_aside(step, error)
    if steps:
      raise self._nothing_readable()
    return None

  def saved_shape(self, step: int, name: str) -> tuple[int, ...]:
    """Shape of the train-state array `name` (e.g. 'codebook') saved at `step`.

    Read from the checkpoint's metadata: no array is loaded.
    """
    metadata = self._manager.metadata(step).item_metadata["state"]
    return tuple(metadata[name].shape)

  def saved_names(self, step: int, path: tuple[str, ...]) -> set[str] | None:
    """The names below `path` (e.g. ('params', 'params', 'encoder')) in the train
    state saved at `step`, from its metadata; None when the path is not there."""
    tree = self._manager.metadata(step).item_metadata["state"]
    for name in path:
      if not hasattr(tree, "keys") or name not in tree:
        return None
      tree = tree[name]
    return set(tree.keys()) if hasattr(tree, "keys") else None

  def save(self, step: int, state, data_iterator) -> None:
    """Starts an asynchronous save; the iterator position is captured now.

    Raises:
      workdir.DiskFull: the disk has no room for it (nothing is written).
    """
    _check_space(self._manager, self.directory, state, f"the checkpoint of step {step}")
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_saved_tree(state)),
        data=grain.checkpoint.CheckpointSave(data_iterator),
      ),
    )

  def restore(self, step: int, state_like, data_iterator):
    """Restores `step` into the structure and shardings of `state_like`.

    The data iterator is restored in place; returns the train state.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved_tree(state_like))
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
      ),
    )
    return _as_state(restored["state"], state_like)

  def restore_latest(self, state_like, data_iterator) -> tuple[object, int]:
    """Restores the newest step that reads, setting aside newer damaged ones.

    Returns:
      (the train state, its step).

    Raises:
      FileNotFoundError: no step is left that can be read (the damaged ones are
        named, and kept in DAMAGED_DIR).
      Exception: a step that reads on its own does not restore into
        `state_like` (another model or optimizer): orbax's error, nothing moved.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, state_like, data_iterator)
        error = None
      except Exception as e:  # noqa: BLE001 (classified below)
        error = e
      if _on_every_process(error is None):
        return state, step
      if _on_every_process(self._readable(step)):
        if error is None:
          raise RuntimeError(f"Another process could not restore step {step} of {self.directory}.")
        raise error
      self._set_aside(step, error)
    raise self._nothing_readable()

  def _nothing_readable(self) -> FileNotFoundError:
    damaged = self.directory.parent / DAMAGED_DIR
    return FileNotFoundError(
      f"No checkpoint in {self.directory} can be read; the damaged ones are in {damaged}: "
      f"{sorted(p.name for p in damaged.iterdir()) if damaged.exists() else []}. Start "
      "again in another workdir (or move this one's checkpoints/ and metrics away to start "
      "it afresh)."
    )

  def _readable(self, step: int) -> bool:
    """Whether every array and iterator file of `step` reads, with no train state to match."""
    try:
      _read_state(self.directory, step, names=None)
      for file in (self.directory / str(step) / "data").glob("*.json"):
        json.loads(file.read_text())
    except Exception:  # noqa: BLE001 (any failure means the files are damaged)
      return False
    return True

  def _set_aside(self, step: int, error: Exception | None) -> None:
    """Moves `step` to DAMAGED_DIR (process 0; every process then forgets it)."""
    target = self.directory.parent / DAMAGED_DIR / str(step)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      n = 1
      while target.exists():  # an earlier run set aside a step of the same number
        n += 1
        target = target.parent / f"{step}.{n}"
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()
    reason = "on another process" if error is None else f"{type(error).__name__}: {error}"
    logging.warning(
      "The checkpoint of step %d in %s cannot be read (%s). Moved it to %s; trying the one "
      "before it.",
      step,
      self.directory,
      reason.splitlines()[0][:300],
      target,
    )

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class BestCheckpointer:
  """Keeps the train state of the lowest value of one evaluation metric.

  One orbax `CheckpointManager` in `<workdir>/best_checkpoint` holding one step
  (the state only: a resumed run restarts from the latest regular checkpoint),
  with the metric stored beside it, so the best value so far survives a restart.
  """

  def __init__(self, workdir: str, metric: str):
    self.directory = workdir_lib.path(workdir, BEST_DIR)
    self.metric = metric
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_handlers={"state": ocp.StandardCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda metrics: metrics[metric],
        best_mode="min",
        keep_checkpoints_without_metrics=False,
        create=True,
        cleanup_tmp_directories=True,
        multiprocessing_options=_barriers_named("best"),
      ),
    )
    # Read once: orbax records a save's metrics only when the save is committed.
    step = self._manager.best_step()
    metrics = None if step is None else self._manager.metrics(step)
    self._best = None if metrics is None else (step, float(metrics[metric]))

  def best(self) -> tuple[int, float] | None:
    """(step, metric value) of the kept checkpoint, None before the first."""
    return self._best

  def offer(self, step: int, state, value: float) -> bool:
    """Saves `state` (asynchronously) when `value` is finite and below the best so far.

    Returns whether it did.
    """
    best = self.best()
    if not np.isfinite(value) or (best is not None and value >= best[1]):
      return False
    _check_space(self._manager, self.directory, state, f"the best checkpoint (step {step})")
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(_saved_tree(state))),
      metrics={self.metric: float(value)},
    )
    self._best = (step, float(value))
    return True

  def close(self) -> None:
    self._manager.close()


def load_arrays(
  workdir: str, names: tuple[str, ...], step: int | None = None, *, best: bool = False
) -> tuple[dict, int]:
  """Reads parts of the train state saved in another run's workdir, as host arrays.

  For initialising a downstream model from a pre-training run, exporting one or
  drawing what it learned: the run's own model and optimizer need not be built,
  and only the named parts are read. Every process reads them whole.

  Args:
    workdir: a pre-training or fine-tuning workdir (holding `checkpoints/`).
    names: top-level fields of the saved state, e.g. ('params', 'codebook').
    step: the step to read; None for the latest.
    best: read the checkpoint that `BestCheckpointer` kept instead (`step` must
      be None).

  Returns:
    ({name: the saved tree or array, as numpy}, the step read).

  Raises:
    FileNotFoundError: the workdir holds no checkpoint, or not that step.
    KeyError: the checkpoint has no such field.
  """
  if best and step is not None:
    raise ValueError(f"best=True reads the best checkpoint's own step; got step={step}.")
  folder = BEST_DIR if best else "checkpoints"
  directory = workdir_lib.path(workdir, folder)
  if not directory.is_dir():
    what = (
      "a pre-training run that evaluated with keep_best_checkpoint=True"
      if best
      else "a finished (or checkpointed) run"
    )
    raise FileNotFoundError(f"{workdir} holds no {folder}/ folder: pass the workdir of {what}.")
  steps = ocp.utils.checkpoint_steps(directory)
  if not steps:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint.")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(
      f"{directory} holds no checkpoint of step {step}; it holds steps {sorted(steps)}."
    )
  return _read_state(directory, step, names), step


def _read_state(directory: epath.Path, step: int, names: tuple[str, ...] | None) -> dict:
  """The fields `names` (None: all) of the train state saved at `step`, as numpy.

  A plain tree reader: no train state to match, every leaf read as numpy.
  """
  manager = ocp.CheckpointManager(
    directory,
    item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    options=ocp.CheckpointManagerOptions(read_only=True),
  )
  try:
    tree = manager.item_metadata(step)["state"].tree
    names = tuple(tree) if names is None else names
    unknown = [name for name in names if name not in tree]
    if unknown:
      raise KeyError(
        f"The checkpoint of step {step} in {directory} has no {unknown}; it holds {sorted(tree)}."
      )
    item = {name: tree[name] for name in names}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    state = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
      ),
    )["state"]
  finally:
    manager.close()
  return {name: state[name] for name in names}


def _check_space(manager: ocp.CheckpointManager, directory: epath.Path, state, what: str) -> None:
  """Raises workdir.DiskFull on every process unless the disk holds one more step.

  The size of the newest saved step is the estimate (the state's bytes before
  the first): orbax deletes an old step only once the new one is complete.
  """
  manager.wait_until_finished()  # a save in flight still takes space
  steps = ocp.utils.checkpoint_steps(directory)
  if steps and not workdir_lib.is_remote(directory):
    needed = workdir_lib.tree_bytes(directory / str(max(steps)))
  else:
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  try:
    workdir_lib.check_space(directory.parent, needed, what)
    error = None
  except workdir_lib.DiskFull as e:
    error = e
  if not _on_every_process(error is None):
    raise error or workdir_lib.DiskFull(f"Another process has no space left for {what}.")


def _on_every_process(flag: bool) -> bool:
  """Whether `flag` holds on every process (a collective with several)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def load_params(
  workdir: str, step: int | None = None, *, best: bool = False, state_key: str | None = None
) -> tuple[dict, int]:
  """The flax variables `{'params': ...}` of a run's checkpoint (see `load_arrays`)
  and the step they were saved at: the trained parameters, or with `state_key` the
  variables under that key of the saved objective state (DINO's 'teacher')."""
  if state_key is None:
    arrays, step = load_arrays(workdir, ("params",), step, best=best)
    return arrays["params"], step
  arrays, step = load_arrays(workdir, ("objective_state",), step, best=best)
  return arrays["objective_state"][state_key], step
