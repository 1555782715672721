"""XLA traces of a window of train steps, for TensorBoard's profile plugin or Perfetto."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from splitmask_jax.runtime import workdir as workdir_lib


class StepProfiler:
  """Writes an XLA trace of a window of train steps into the workdir.

  Steps `start_step + 1` ... `start_step + num_steps` (of `config.profile`) are
  traced, so that the first step's compilation stays out of the trace; a run
  resumed at or after `start_step` traces nothing. Every process writes its own
  trace to `<workdir>/profile/process_<i>`: open that folder in TensorBoard's
  profile plugin, or `perfetto_trace.json.gz` below it in ui.perfetto.dev. With
  a remote workdir the profiler writes to a local folder, copied there through
  epath when the window ends.
  """

  def __init__(self, profile_config, workdir: str, last_step: int):
    """`last_step`: the run's final step; a window reaching past it ends there."""
    self._start = profile_config.start_step
    self._stop = min(profile_config.start_step + profile_config.num_steps, last_step)
    self._destination = workdir_lib.path(workdir, "profile", f"process_{jax.process_index()}")
    self._remote = workdir_lib.is_remote(self._destination)
    self._logdir = tempfile.mkdtemp() if self._remote else os.fspath(self._destination)
    self._tracing = False

  def __call__(self, step: int, state) -> None:
    """Call after dispatching step `step` (updates done so far) with its output state.

    The state is awaited at both ends of the window: the trace holds exactly
    the window's device work despite asynchronous dispatch.
    """
    if step == self._start and self._start < self._stop:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self._logdir, create_perfetto_trace=True)
      self._tracing = True
    elif step == self._stop and self._tracing:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self._tracing = False
      if self._remote:
        _copy_tree(self._logdir, self._destination)
        shutil.rmtree(self._logdir, ignore_errors=True)


def _copy_tree(source: str, destination) -> None:
  """Copies a local folder's files below `destination` (an epath.Path)."""
  for root, _, files in os.walk(source):
    folder = destination / os.path.relpath(root, source)
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        (folder / name).write_bytes(f.read())
