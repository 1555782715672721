"""Preemption notices: when to save at the current step and stop.

Cloud TPU and GPU schedulers announce an eviction with SIGTERM and kill the job
some seconds later. A run that stops at a step boundary, saves and exits with
`EXIT_CODE` loses no work: started again with the same workdir, it resumes from
that step.

- One process: a SIGTERM handler sets a flag, read by the loop at every step (a
  host-side bool, no device synchronisation).
- Several processes: JAX's preemption sync manager (started by
  `jax.distributed.initialize`) catches SIGTERM on any process, agrees with the
  others on the first step that all of them have yet to reach, and
  `multihost_utils.reached_preemption_sync_point` returns True on every process
  at that step, so that all of them take part in the same save.

Ctrl-C (SIGINT) on a one-process run is handled the same way: the first saves
the current step and stops with `INTERRUPT_EXIT_CODE`; a second one raises
KeyboardInterrupt at once, losing the steps since the last checkpoint. With
several processes Ctrl-C keeps Python's default (launch/local.sh's processes are
stopped with their terminal).
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

# Exit status of a run that saved its state and stopped because it was asked
# to (SIGTERM): run the same command again to resume. Distinct from Python's
# and absl's failures (1, 2) and from deaths by a signal (128 + n).
EXIT_CODE = 42
# Exit status of a run stopped by Ctrl-C after saving its state: the shell's
# status for a SIGINT (128 + 2), so scripts that stop on Ctrl-C still do.
INTERRUPT_EXIT_CODE = 130


class Preempted(Exception):
  """The run saved a checkpoint at `step` and stopped at a preemption notice
  (or at Ctrl-C: `interrupted`); `exit_code` is the process's exit status."""

  def __init__(self, step: int, *, interrupted: bool = False):
    self.step = step
    self.interrupted = interrupted
    self.exit_code = INTERRUPT_EXIT_CODE if interrupted else EXIT_CODE
    self.what = "Interrupted (Ctrl-C)" if interrupted else "Preempted"
    super().__init__(
      f"{self.what}: the state at step {step} is saved; run the same "
      f"command again to resume (exit status {self.exit_code})."
    )


class PreemptionWatcher:
  """Tells the train loop whether to save and stop after a step.

  A context manager: on one process, entering it installs the SIGTERM and
  SIGINT handlers and leaving it puts the previous ones back, so that a notebook
  or a test calling the loop twice is left as it was.
  """

  def __init__(self):
    self._multi_process = jax.process_count() > 1
    self._signalled = False
    self._interrupted = False
    self._previous_handlers = {}
    self._sync_point_available = True

  def __enter__(self) -> PreemptionWatcher:
    # With several processes JAX's own SIGTERM handler must stay in place: a
    # Python handler would replace it and break the agreement on the step.
    if not self._multi_process:
      if threading.current_thread() is threading.main_thread():
        for signum, handler in (
          (signal.SIGTERM, self._on_sigterm),
          (signal.SIGINT, self._on_sigint),
        ):
          self._previous_handlers[signum] = signal.signal(signum, handler)
      else:
        logging.warning(
          "Not on the main thread: SIGTERM and Ctrl-C are not handled; a preempted "
          "run loses the steps since its last checkpoint."
        )
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous_handlers.items():
      # None: the previous handler was not set from Python; the default is the
      # closest Python can put back.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous_handlers = {}

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    # Only the flag (no logging, no I/O): the loop saves after the current step.
    self._signalled = True

  def _on_sigint(self, signum, frame) -> None:
    del signum, frame
    self._interrupted = True
    # A second Ctrl-C stops at once, as Python's default does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stderr.write(
      "\nCtrl-C: saving the current step, then stopping. Press Ctrl-C again to stop "
      "at once (losing the steps since the last checkpoint).\n"
    )

  @property
  def signalled(self) -> bool:
    """Whether this process received SIGTERM or Ctrl-C (its own handlers only)."""
    return self._signalled or self._interrupted

  @property
  def interrupted(self) -> bool:
    """Whether the stop was asked for by Ctrl-C rather than SIGTERM."""
    return self._interrupted and not self._signalled

  def should_stop(self, step: int) -> bool:
    """Whether to save the state after update `step` and stop.

    Call it after every step, with consecutive steps, on every process: with
    several processes it is a collective agreement on the step.
    """
    if not self._multi_process:
      return self.signalled
    if not self._sync_point_available:
      return False
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # the preemption service is off
      logging.warning("Preemption notices are not handled: %s", e)
      self._sync_point_available = False
      return False
