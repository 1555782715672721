"""Pre-training, end to end: data, codebook, sharded state, the step loop, evaluation.

`train_and_evaluate(config, workdir)` is what `main.py` calls; it is importable
from a notebook. A workdir holding a checkpoint is resumed from its latest step,
with the same data order and random draws as an unbroken run, provided that the
config is the run's own (see `config_base.resume_conflicts`). A preemption notice
(SIGTERM) saves the current step and raises `preemption.Preempted`; a non-finite
loss or gradient stops the run at the next log step with FloatingPointError,
before any save, unless `skip_nonfinite_updates` skips such updates.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from splitmask_jax import checkpointing
from splitmask_jax import config_base
from splitmask_jax import datasets
from splitmask_jax import input_pipeline
from splitmask_jax import knn
from splitmask_jax import masking
from splitmask_jax import metric_log
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import preemption
from splitmask_jax import profiling
from splitmask_jax import sharding
from splitmask_jax import tokenizers
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.models import vit

CONFIG_FILE = "config.json"


def _check_workdir_config(config, workdir: str, allow_config_change: bool) -> bool:
  """Refuses a workdir that holds a run of another config, unless allowed.

  Returns whether the saved config differs on keys that a resumption may not
  change (only possible when allowed).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    conflicts = config_base.resume_conflicts(json.load(f), config)
  if conflicts and not allow_config_change:
    changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in conflicts.items())
    raise ValueError(
        f"{workdir} holds a run of another config ({changes}). Use another workdir, or "
        "resume this run with the new values by passing --allow_config_change "
        f"(train_and_evaluate(..., allow_config_change=True)). Keys that may change "
        f"on resume: {', '.join(config_base.RESUMABLE_KEYS)}.")
  return bool(conflicts)


def _save_config(config, workdir: str, replaced_at_step: int | None) -> None:
  """Writes config.json; `replaced_at_step`: keep the one it replaces under that step."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  if replaced_at_step is not None:
    os.replace(path, os.path.join(workdir, f"config.until_step_{replaced_at_step}.json"))
  metric_log.write_atomically(path, config.to_json_best_effort(indent=2, sort_keys=True))


def _codebook_shape(config) -> tuple[int, int]:
  """(V, d): visual words and the dimension of a tokenizer patch."""
  return config.tokenizer.vocab_size, tokenizers.codebook_dim(config.tokenizer.patch_size,
                                                               config.model.num_channels)


def _check_codebook(config, checkpointer: checkpointing.Checkpointer, step: int) -> None:
  """Fails before anything is built if the checkpoint's codebook cannot be restored."""
  tok = config.tokenizer
  saved = checkpointer.saved_shape(step, "codebook")
  _, dim = _codebook_shape(config)
  where = f"the checkpoint of step {step} in {checkpointer.directory}"
  if saved[0] != tok.vocab_size:
    raise ValueError(
        f"config.tokenizer.vocab_size={tok.vocab_size} is invalid: {where} holds a "
        f"codebook of {saved[0]} visual words, so the allowed value is {saved[0]} "
        "(or start a new run in another workdir).")
  if saved[1] != dim:
    raise ValueError(
        f"config.tokenizer.patch_size={tok.patch_size} with config.model.num_channels="
        f"{config.model.num_channels} gives {dim}-dimensional token patches, but {where} "
        f"holds a codebook of dimension {saved[1]}: use the run's patch size and "
        "channels (or start a new run in another workdir).")


def _num_steps(config, train_size: int) -> tuple[int, float]:
  """(total steps, steps per epoch) from num_steps or num_epochs."""
  steps_per_epoch = train_size / config.batch_size
  if config.num_steps is not None:
    return int(config.num_steps), steps_per_epoch
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch))), steps_per_epoch


def _sample_patches(config, source, grid, num_patches: int, seed: int) -> np.ndarray:
  """Tokenizer-view patches of random training images, float32 [num_patches, d].

  The images are the same random resized crops the model trains on, so the
  codebook describes the patches it will tokenize.
  """
  per_image = grid[0] * grid[1]
  num_images = min(len(source), -(-num_patches // per_image))
  batch_size = min(256, num_images)
  data = input_pipeline.pretrain_dataset(
      source, batch_size=batch_size, image_size=config.model.image_size,
      crop_scale=tuple(config.data.crop_scale), mask_fn=None, seed=seed)
  view = jax.jit(lambda im: tokenizers.tokenizer_patches(
      objectives.images_to_float(im), grid, config.tokenizer.patch_size))
  chunks, total = [], 0
  for batch in data:
    patches = np.asarray(view(batch["image"]))
    chunks.append(patches.reshape(-1, patches.shape[-1]))
    total += len(chunks[-1])
    if total >= num_patches:
      break
  patches = np.concatenate(chunks)
  if len(patches) > num_patches:
    patches = np.random.default_rng(seed).permutation(patches)[:num_patches]
  return patches


def build_codebook(config, source, grid, key) -> jax.Array:
  """The run's codebook, float32 [V, d], from `config.tokenizer`."""
  tok = config.tokenizer
  _, dim = _codebook_shape(config)
  patches = None
  if tok.kind != "random_projection":
    num = tok.kmeans_num_patches if tok.kind == "kmeans" else tok.vocab_size
    patches = _sample_patches(config, source, grid, max(num, tok.vocab_size),
                              seed=config.seed + 1)
  return tokenizers.build_codebook(tok.kind, key, vocab_size=tok.vocab_size, dim=dim,
                                   patches=patches, kmeans_iters=tok.kmeans_iters)


def _pooled_features(model, params, images):
  tokens, _ = model.apply(params, objectives.images_to_float(images), method="encode")
  return vit.pooled_features(tokens)


def _extract(features_fn, params, data, mesh):
  """Pooled features and labels of every valid example of an eval dataset.

  Every process returns the examples of all processes.
  """
  feats, labels = [], []
  for batch in data:
    # Labels and valid flags travel in the global batch beside the images, so
    # the gathered rows line up whatever the mesh's device order.
    batch = sharding.global_batch({k: batch[k] for k in ("image", "label", "valid")}, mesh)
    out, label, valid = multihost_utils.process_allgather(
        (features_fn(params, batch["image"]), batch["label"], batch["valid"]), tiled=True)
    feats.append(out[valid])
    labels.append(label[valid])
  return np.concatenate(feats), np.concatenate(labels)


def knn_evaluation(config, model, params_by_name: dict, mesh, num_classes: int) -> dict:
  """k-NN top-1 of each named parameter set's pooled encoder features."""
  local_batch = sharding.check_batch_size(config.knn.batch_size, mesh, "knn.batch_size")
  def data(split, num):
    source = datasets.load_source(config.data.dataset, split, config.data.data_dir)
    return input_pipeline.eval_dataset(
        source, batch_size=local_batch, image_size=config.model.image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_examples=None if num is None else min(num, len(source)))
  features_fn = jax.jit(lambda p, im: _pooled_features(model, p, im))
  results = {}
  for name, params in params_by_name.items():
    train_x, train_y = _extract(features_fn, params, data(config.knn.train_split,
                                                           config.knn.num_train), mesh)
    test_x, test_y = _extract(features_fn, params, data(config.knn.test_split,
                                                         config.knn.num_test), mesh)
    results[name] = knn.knn_accuracy(train_x, train_y, test_x, test_y, k=config.knn.k,
                                     temperature=config.knn.temperature,
                                     num_classes=num_classes)
  return results


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
    window = {"sums": zeros, "bad": zeros, "bad_step": jnp.int32(-1),
              "applied": jnp.int32(0), "skipped_updates": jnp.int32(0),
              "skipped_images": jnp.int32(0)}
  # The wrapper skipped this update: its gradient was not finite and not yet
  # more than max_skips times in a row.
  skipped = ~opt_state.last_finite & (opt_state.notfinite_count <= max_skips)
  finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in jax.tree.leaves(metrics)]))
  first_bad = ~finite & ~skipped & (window["bad_step"] < 0)
  return {
      "sums": jax.tree.map(lambda s, m: s + jnp.where(skipped, 0.0, m), window["sums"],
                           metrics),
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
        "config.skip_nonfinite_updates=True.")
  applied = int(window["applied"])
  values = {k: float(v) / applied for k, v in window["sums"].items()} if applied else {}
  values["skipped_images"] = float(window["skipped_images"])
  if config.skip_nonfinite_updates:
    values["skipped_updates"] = float(window["skipped_updates"])
  return values


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Pre-trains as `config` says, in `workdir`; returns the last logged values.

  Writes `config.json`, `metrics.jsonl`, TensorBoard events and checkpoints to
  `workdir`; resumes from the latest checkpoint found there.

  Args:
    allow_config_change: resume a workdir whose `config.json` differs from
      `config` on keys outside `config_base.RESUMABLE_KEYS` (the old file is kept
      as `config.until_step_<step>.json`); without it such a workdir is refused.

  Raises:
    ValueError: an invalid config, or one that does not match the workdir's run;
      raised before any data is read or anything compiled.
    preemption.Preempted: SIGTERM (or, with several processes, JAX's preemption
      sync point) stopped the run after saving its current step.
    FloatingPointError: a non-finite loss or gradient; the message names the
      step and the loss parts.
  """
  config_base.validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  local_batch = sharding.check_batch_size(config.batch_size, mesh)
  if config.knn.enabled:
    sharding.check_batch_size(config.knn.batch_size, mesh, "knn.batch_size")
  os.makedirs(workdir, exist_ok=True)
  config_changed = _check_workdir_config(config, workdir, allow_config_change)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    _check_codebook(config, checkpointer, start_step)
  if jax.process_count() > 1:  # every process has read config.json before it changes
    multihost_utils.sync_global_devices("config checked")
  _save_config(config, workdir, start_step if config_changed else None)

  grid = config_base.grid_size(config)
  mask_fn = masking.make_mask_fn(
      config.objective, grid, config.masking.ratio, kind=config.masking.kind,
      min_block=config.masking.min_block, max_block=config.masking.max_block)
  data = config.data
  datasets.prepare_dataset(data.dataset, data.data_dir, data.manual_dir,
                           process_index=jax.process_index())
  if jax.process_count() > 1:  # process 0 prepares; the others read once it is done
    multihost_utils.sync_global_devices("dataset prepared")
  info = datasets.dataset_info(data.dataset, data.data_dir)
  train_source = datasets.load_source(data.dataset, data.train_split, data.data_dir)
  total_steps, steps_per_epoch = _num_steps(config, len(train_source))

  model = objectives.build_model(config, grid)
  loss_fn = objectives.build_loss_fn(config, model, grid)
  schedule = optim.learning_rate_schedule(config.optim, config.batch_size, total_steps,
                                          steps_per_epoch)
  # Always wrapped, so that the optimizer state has one structure and a run can
  # resume with skipping switched on or off; 0 errors tolerated applies every update.
  max_skips = config.max_consecutive_skips if config.skip_nonfinite_updates else 0
  optimizer = optax.apply_if_finite(optim.make_optimizer(config.optim, schedule),
                                    max_consecutive_errors=max_skips)
  init_key, codebook_key = jax.random.split(jax.random.PRNGKey(config.seed))
  example_inputs = objectives.example_inputs(config, mask_fn(np.random.default_rng(0)))

  train_iter = iter(input_pipeline.pretrain_dataset(
      train_source, batch_size=local_batch, image_size=config.model.image_size,
      crop_scale=tuple(data.crop_scale), mask_fn=mask_fn, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=data.num_workers, prefetch_buffer=data.prefetch, count_skipped=True))

  log = metric_log.MetricLog(workdir)
  if start_step:
    # The checkpoint holds the codebook: no need to rebuild it.
    codebook = jnp.zeros(_codebook_shape(config), jnp.float32)
  else:
    t0 = time.time()
    codebook = build_codebook(config, train_source, grid, codebook_key)
    logging.info("Built the %s codebook in %.1fs", config.tokenizer.kind, time.time() - t0)
  state = train_step_lib.init_train_state(model, optimizer, codebook, example_inputs,
                                          init_key, mesh)
  # Records past the checkpoint (all of them for a fresh start) are recomputed.
  log.truncate_after(start_step if start_step else -1)
  if start_step:
    state = checkpointer.restore(start_step, state, train_iter)
    logging.info("Resumed from step %d in %s", start_step, workdir)
  else:
    log.write(0, {"num_params": sum(x.size for x in jax.tree.leaves(state.params))})

  train_step = train_step_lib.make_train_step(loss_fn, optimizer, schedule, config.seed,
                                              mesh, state)
  eval_step = train_step_lib.make_eval_step(loss_fn, mesh, state)
  accumulate = jax.jit(_accumulate, out_shardings=sharding.replicated(mesh))
  val_source = datasets.load_source(data.dataset, data.val_split, data.data_dir)

  def validate():
    val_data = input_pipeline.eval_dataset(
        val_source, batch_size=local_batch, image_size=config.model.image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        mask_fn=mask_fn, seed=config.seed,
        num_examples=min(config.eval_batches * config.batch_size, len(val_source)))
    sums, count = {}, 0
    for batch in val_data:
      if not np.all(batch["valid"]):  # a padded batch would bias the mean
        continue
      batch = {k: v for k, v in batch.items() if k not in ("label", "valid")}
      metrics = jax.device_get(eval_step(state, sharding.global_batch(batch, mesh)))
      sums = {k: sums.get(k, 0.0) + float(v) for k, v in metrics.items()}
      count += 1
    return {f"val_{k}": v / count for k, v in sums.items()} if count else {}

  profiler = profiling.StepProfiler(config.profile, workdir, total_steps)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=log.writer,
                                             every_steps=config.log_every)
  last = {}
  window, window_steps, window_start = None, 0, time.time()
  try:
    with preemption.PreemptionWatcher() as watcher:
      for step in range(start_step, total_steps):
        batch = next(train_iter)
        skipped_images = batch.pop(input_pipeline.SKIPPED_KEY)
        batch = sharding.global_batch(batch, mesh)
        state, metrics = train_step(state, batch)
        window = accumulate(window, state.step, metrics,
                            state.opt_state._replace(inner_state=()), max_skips,
                            sharding.global_batch(skipped_images, mesh))
        window_steps += 1
        done = step + 1
        progress(done)
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
          last = values
          window, window_steps = None, 0
        if (done % config.eval_every == 0 or at_end) and not stop:
          val = validate()
          log.write(done, val)
          last.update(val)
        if save:
          checkpointer.save(done, state, train_iter)
        if stop:
          checkpointer.wait()
          logging.warning("Preempted: saved step %d in %s; exiting with status %d. Run "
                          "the same command to resume.", done, checkpointer.directory,
                          preemption.EXIT_CODE)
          raise preemption.Preempted(done)
        if logged:  # validation and saving stay out of the next window's images/s
          window_start = time.time()
      checkpointer.wait()
      if watcher.signalled:  # after the last step: resume at the k-NN evaluation
        raise preemption.Preempted(total_steps)

    if config.knn.enabled:
      t0 = time.time()
      random_params = jax.jit(
          lambda k: model.init({"params": k, "dropout": k}, *example_inputs, train=False)
      )(init_key)
      accuracy = knn_evaluation(config, model, {"pretrained": state.params,
                                                "random": random_params},
                                mesh, info.num_classes)
      values = {"knn_top1": accuracy["pretrained"],
                "knn_top1_random_init": accuracy["random"]}
      log.write(total_steps, values)
      last.update(values)
      logging.info("k-NN top-1 %.4f (random init %.4f) in %.1fs", accuracy["pretrained"],
                   accuracy["random"], time.time() - t0)
  finally:
    # Waits for a save in flight: whatever stopped the run, the last
    # checkpoint it started is complete.
    checkpointer.close()
    log.close()
  if jax.process_index() == 0:
    metric_log.write_atomically(os.path.join(workdir, "final_metrics.json"), json.dumps(
        {"step": total_steps, **last}, indent=2, sort_keys=True))
  return last
