"""What every training loop here shares: the workdir's config, the step loop with
its logging, evaluation, checkpointing, preemption and divergence handling.

`train.py` (pre-training) and `finetune.py` build their state, data and jitted
step and hand them to `run`; this module knows nothing of what a step computes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils

from splitmask_jax import config_base
from splitmask_jax.data import datasets
from splitmask_jax.data import input_pipeline
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import console
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import preemption
from splitmask_jax.runtime import profiling
from splitmask_jax.runtime import sharding
from splitmask_jax.runtime import workdir as workdir_lib

CONFIG_FILE = "config.json"


def _check_workdir_config(config, workdir: str, allow_config_change: bool) -> bool:
  """Refuses a workdir that holds a run of another config, unless allowed.

  A run written before a key of `config_base.ADDED_KEYS` existed resumes with
  the key's old value, set on `config`, unless `config` asks for another value
  than the default.

  Returns whether the saved config differs on keys that a resumption may not
  change (only possible when allowed).
  """
  path = workdir_lib.path(workdir, CONFIG_FILE)
  if not path.exists():
    return False
  saved = json.loads(path.read_text())
  legacy = config_base.legacy_values(saved, config)
  if legacy:
    config.update_from_flattened_dict(legacy)
    logging.info(
      "Resuming %s, a run written before these config keys existed, with the values it ran "
      "with: %s.",
      workdir,
      ", ".join(f"{k}={v!r}" for k, v in legacy.items()),
    )
  conflicts = config_base.resume_conflicts(saved, config)
  if conflicts and not allow_config_change:
    changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in conflicts.items())
    raise ValueError(
      f"{workdir} holds a run of another config ({changes}). Use another workdir, or "
      "resume this run with the new values by passing --allow_config_change "
      f"(allow_config_change=True in Python). Keys that may change "
      f"on resume: {', '.join(config_base.RESUMABLE_KEYS)}."
    )
  return bool(conflicts)


def save_config(config, workdir: str, replaced_at_step: int | None = None) -> None:
  """Writes config.json; `replaced_at_step`: keep the one it replaces under that step."""
  if jax.process_index() != 0:
    return
  directory = workdir_lib.path(workdir)
  path = directory / CONFIG_FILE
  if replaced_at_step is not None:
    path.rename(directory / f"config.until_step_{replaced_at_step}.json")
  workdir_lib.write_atomically(path, config.to_json_best_effort(indent=2, sort_keys=True))


def open_workdir(
  config,
  workdir: str,
  *,
  allow_config_change: bool,
  check_checkpoint: Callable[[checkpointing.Checkpointer, int], None] | None = None,
) -> tuple[checkpointing.Checkpointer, int]:
  """Checks `config` against the workdir's run, then records it there.

  Args:
    allow_config_change: resume a run whose config differs on keys outside
      `config_base.RESUMABLE_KEYS` (the old config.json is kept as
      `config.until_step_<step>.json`).
    check_checkpoint: `(checkpointer, step)`, raises if the latest checkpoint
      cannot be restored into this config's state; called before anything is
      written.

  Returns:
    (the workdir's Checkpointer, the step to start from: 0 or the latest saved).
  """
  workdir_lib.path(workdir).mkdir(parents=True, exist_ok=True)
  config_changed = _check_workdir_config(config, workdir, allow_config_change)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    _check_block_layout(config, checkpointer, start_step)
  if start_step and check_checkpoint is not None:
    check_checkpoint(checkpointer, start_step)
  if jax.process_count() > 1:  # every process has read config.json before it changes
    multihost_utils.sync_global_devices("config checked")
  save_config(config, workdir, start_step if config_changed else None)
  return checkpointer, start_step


def _check_block_layout(config, checkpointer: checkpointing.Checkpointer, step: int) -> None:
  """Refuses to resume scanned encoder blocks as unrolled ones or the other way round.

  The two layouts compute the same function but hold the parameters (and the
  optimizer's moments) in other shapes; fine-tuning and export convert them, a
  resumed optimizer state is not converted.
  """
  saved = checkpointer.saved_names(step, ("params", "params", "encoder"))
  if saved is None:
    return
  scanned = sharding.SCANNED in saved
  if scanned != bool(config.model.scan):
    raise ValueError(
      f"The checkpoint of step {step} in {checkpointer.directory} holds the encoder's blocks "
      f"{'scanned' if scanned else 'unrolled'}, but config.model.scan={config.model.scan}: "
      f"resume with --config.model.scan={scanned} (both compute the same function; "
      "fine-tuning and export read either)."
    )


def prepare_data(data) -> datasets.DatasetInfo:
  """Prepares `config.data`'s dataset (process 0; the others wait) and describes it."""
  datasets.prepare_dataset(
    data.dataset, data.data_dir, data.manual_dir, process_index=jax.process_index()
  )
  if jax.process_count() > 1:  # process 0 prepares; the others read once it is done
    multihost_utils.sync_global_devices("dataset prepared")
  return datasets.dataset_info(data.dataset, data.data_dir)


def num_steps(config, train_size: int) -> tuple[int, float]:
  """The run's length: (total steps, steps per epoch).

  `num_steps` is taken as it is. Otherwise the length in examples
  (`num_examples`, or `num_epochs` passes over the `train_size` examples trained
  on) becomes ceil(examples / batch_size) steps, capped at `max_epochs` epochs
  when that is set. So with `num_examples` the number of updates stays fixed when
  the data shrinks, and the epochs grow until the cap (the paper's protocol).
  """
  steps_per_epoch = train_size / config.batch_size
  if config.num_steps is not None:
    total, how = int(config.num_steps), "num_steps"
  else:
    if config.num_examples is not None:
      examples, how = config.num_examples, f"num_examples={config.num_examples:,}"
    else:
      examples, how = config.num_epochs * train_size, f"num_epochs={config.num_epochs:g}"
    total = max(1, math.ceil(examples / config.batch_size))
    if config.max_epochs is not None and total > config.max_epochs * steps_per_epoch:
      total = max(1, math.ceil(config.max_epochs * steps_per_epoch))
      how += f", capped at max_epochs={config.max_epochs:g}"
  logging.info(
    "Schedule: %d steps of %d examples = %.4g epochs of %d examples (%s)",
    total,
    config.batch_size,
    total / steps_per_epoch,
    train_size,
    how,
  )
  return total, steps_per_epoch


def _accumulate(window, step, metrics, opt_state, max_skips, skipped_images):
  """Adds one step to the log window's sums, on the device (no host sync).

  Args:
    window: the previous output, or None to start a window.
    step: int32 [], updates done, this step included.
    metrics: the step's float32 scalars (loss parts, grad_norm, lr, ...).
    opt_state: the optax.apply_if_finite state after the step, without its
      inner state (the moments need not travel).
    max_skips: the wrapper's max_consecutive_errors (0: nothing is skipped).
    skipped_images: int32 [B], unreadable records replaced in the global batch.

  Returns:
    'sums' of the metrics over the steps whose update was applied, their count
    'applied', 'skipped_updates', 'skipped_images', and 'bad_step' (-1: none)
    with 'bad', the metrics of the window's first applied step that had a
    non-finite metric.
  """
  if window is None:
    zeros = jax.tree.map(jnp.zeros_like, metrics)
    window = {
      "sums": zeros,
      "bad": zeros,
      "bad_step": jnp.int32(-1),
      "applied": jnp.int32(0),
      "skipped_updates": jnp.int32(0),
      "skipped_images": jnp.int32(0),
    }
  # The wrapper skipped this update: its gradient was not finite and not yet
  # more than max_skips times in a row.
  skipped = ~opt_state.last_finite & (opt_state.notfinite_count <= max_skips)
  finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in jax.tree.leaves(metrics)]))
  first_bad = ~finite & ~skipped & (window["bad_step"] < 0)
  return {
    "sums": jax.tree.map(lambda s, m: s + jnp.where(skipped, 0.0, m), window["sums"], metrics),
    "bad": jax.tree.map(lambda b, m: jnp.where(first_bad, m, b), window["bad"], metrics),
    "bad_step": jnp.where(first_bad, step, window["bad_step"]),
    "applied": window["applied"] + (~skipped).astype(jnp.int32),
    "skipped_updates": window["skipped_updates"] + skipped.astype(jnp.int32),
    "skipped_images": window["skipped_images"] + jnp.sum(skipped_images),
  }


def _window_values(window, step: int, workdir: str, config) -> dict[str, float]:
  """The log record of a window fetched to the host: means over its applied steps.

  Raises:
    FloatingPointError: an applied step had a non-finite loss or gradient.
  """
  if window["bad_step"] >= 0:
    parts = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(window["bad"].items()))
    raise FloatingPointError(
      f"Non-finite loss or gradient at step {int(window['bad_step'])}: {parts}. The run "
      f"stopped at step {step}, before saving it: the checkpoints in {workdir} are "
      "from before the divergence. To skip such updates instead, set "
      "config.skip_nonfinite_updates=True."
    )
  applied = int(window["applied"])
  values = {k: float(v) / applied for k, v in window["sums"].items()} if applied else {}
  values["skipped_images"] = float(window["skipped_images"])
  if config.skip_nonfinite_updates:
    values["skipped_updates"] = float(window["skipped_updates"])
  return values


def run(
  config,
  workdir: str,
  *,
  state,
  train_iter: Iterator,
  train_step: Callable,
  max_skips: int,
  mesh,
  start_step: int,
  total_steps: int,
  steps_per_epoch: float,
  checkpointer: checkpointing.Checkpointer,
  log: metric_log.MetricLog,
  evaluate: Callable[[object], dict[str, float]],
):
  """Runs steps start_step + 1 ... total_steps, logging, evaluating and saving.

  Args:
    state: the (restored) train state; it has `step`, `opt_state` (an
      `optax.apply_if_finite` state) and whatever `train_step` reads.
    train_iter: the grain iterator of host batches (with SKIPPED_KEY); saved with
      the state.
    train_step: jitted `(state, global batch) -> (state, float32 metrics)`.
    max_skips: the optimizer's max_consecutive_errors (0: none skipped).
    evaluate: `state -> {name: value}`, run every `config.eval_every` steps and
      after the last one.

  Returns:
    (the final state, the values of the last log and evaluation).

  Raises:
    preemption.Preempted: after saving the current step.
    FloatingPointError: a non-finite loss or gradient, before any save of it.
  """
  accumulate = jax.jit(_accumulate, out_shardings=sharding.replicated(mesh))
  profiler = profiling.StepProfiler(config.profile, workdir, total_steps)
  step_rate = metric_log.StepRate(total_steps, log.writer, config.log_every)
  last = {}
  window, window_steps, window_start = None, 0, time.time()
  with preemption.PreemptionWatcher() as watcher:
    for step in range(start_step, total_steps):
      batch = next(train_iter)
      skipped_images = batch.pop(input_pipeline.SKIPPED_KEY)
      batch = sharding.global_batch(batch, mesh)
      state, metrics = train_step(state, batch)
      window = accumulate(
        window,
        state.step,
        metrics,
        state.opt_state._replace(inner_state=()),
        max_skips,
        sharding.global_batch(skipped_images, mesh),
      )
      window_steps += 1
      done = step + 1
      step_rate(done)
      profiler(done, state)
      at_end = done == total_steps
      stop = watcher.should_stop(done)
      save = done % config.checkpoint_every == 0 or at_end or stop
      logged = done % config.log_every == 0 or save
      if logged:
        # Raises on a divergence, before any save of this state.
        values = _window_values(jax.device_get(window), done, workdir, config)
        elapsed = time.time() - window_start
        values["images_per_sec"] = window_steps * config.batch_size / elapsed
        values["epoch"] = done / steps_per_epoch
        log.write(done, values)
        logging.info("%s", console.step_line(done, total_steps, values, step_rate.steps_per_sec))
        last = values
        window, window_steps = None, 0
      if (done % config.eval_every == 0 or at_end) and not stop:
        values = evaluate(state)
        log.write(done, values)
        logging.info("%s", console.values_line("eval", done, values))
        last.update(values)
      if save:
        checkpointer.save(done, state, train_iter)
        logging.info("checkpoint @ %d: writing to %s", done, checkpointer.directory)
      if stop:
        checkpointer.wait()
        stopped = preemption.Preempted(done, interrupted=watcher.interrupted)
        logging.warning(
          "%s: saved step %d in %s; exiting with status %d. Run the same command to resume.",
          stopped.what,
          done,
          checkpointer.directory,
          stopped.exit_code,
        )
        raise stopped
      if logged:  # evaluation and saving stay out of the next window's images/s
        window_start = time.time()
    checkpointer.wait()
    if watcher.signalled:  # after the last step: resume at the final evaluation
      raise preemption.Preempted(total_steps, interrupted=watcher.interrupted)
  return state, last


def write_final_metrics(workdir: str, step: int, values: dict) -> None:
  """`final_metrics.json`: the run's last logged values (process 0 writes it)."""
  if jax.process_index() == 0:
    workdir_lib.write_atomically(
      workdir_lib.path(workdir, "final_metrics.json"),
      json.dumps({"step": step, **values}, indent=2, sort_keys=True),
    )
