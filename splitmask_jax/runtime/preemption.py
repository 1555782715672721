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
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

# Exit status of a run that saved its state and stopped because it was asked
# to (SIGTERM): run the same command again to resume. Distinct from Python's
# and absl's failures (1, 2) and from deaths by a signal (128 + n).
EXIT_CODE = 42


class Preempted(Exception):
  """The run saved a checkpoint at `step` and stopped at a preemption notice."""

  def __init__(self, step: int):
    super().__init__(
      f"Preempted: the state at step {step} is saved; run the same "
      f"command again to resume (exit status {EXIT_CODE})."
    )
    self.step = step


class PreemptionWatcher:
  """Tells the train loop whether to save and stop after a step.

  A context manager: on one process, entering it installs the SIGTERM handler
  and leaving it puts the previous handler back, so that a notebook or a test
  calling the loop twice is left as it was.
  """

  def __init__(self):
    self._multi_process = jax.process_count() > 1
    self._signalled = False
    self._installed = False
    self._previous_handler = None
    self._sync_point_available = True

  def __enter__(self) -> PreemptionWatcher:
    # With several processes JAX's own SIGTERM handler must stay in place: a
    # Python handler would replace it and break the agreement on the step.
    if not self._multi_process:
      if threading.current_thread() is threading.main_thread():
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True
      else:
        logging.warning(
          "Not on the main thread: SIGTERM is not handled; a preempted "
          "run loses the steps since its last checkpoint."
        )
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      # None: the previous handler was not set from Python; the default is the
      # closest Python can put back.
      previous = self._previous_handler
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
      self._installed = False

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    # Only the flag (no logging, no I/O): the loop saves after the current step.
    self._signalled = True

  @property
  def signalled(self) -> bool:
    """Whether this process received SIGTERM (its own handler only)."""
    return self._signalled

  def should_stop(self, step: int) -> bool:
    """Whether to save the state after update `step` and stop.

    Call it after every step, with consecutive steps, on every process: with
    several processes it is a collective agreement on the step.
    """
    if not self._multi_process:
      return self._signalled
    if not self._sync_point_available:
      return False
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # the preemption service is off
      logging.warning("Preemption notices are not handled: %s", e)
      self._sync_point_available = False
      return False
