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

import time
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from splitmask_jax import config_base
from splitmask_jax import evaluation
from splitmask_jax import knn
from splitmask_jax import loop
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import tokenizers
from splitmask_jax import train_step as train_step_lib
from splitmask_jax import visualize
from splitmask_jax.data import datasets
from splitmask_jax.data import input_pipeline
from splitmask_jax.data import photometric
from splitmask_jax.data import subsets
from splitmask_jax.models import vit
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import console
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import sharding
from splitmask_jax.runtime import workdir as workdir_lib

CONFIG_FILE = loop.CONFIG_FILE


def codebook_shape(config) -> tuple[int, int]:
  """(V, d): visual words and the dimension of a tokenizer patch."""
  return config.tokenizer.vocab_size, tokenizers.codebook_dim(
    config.tokenizer.patch_size, config.model.num_channels
  )


def _check_codebook(config, checkpointer: checkpointing.Checkpointer, step: int) -> None:
  """Fails before anything is built if the checkpoint's codebook cannot be restored."""
  tok = config.tokenizer
  saved = checkpointer.saved_shape(step, "codebook")
  _, dim = codebook_shape(config)
  where = f"the checkpoint of step {step} in {checkpointer.directory}"
  if saved[0] != tok.vocab_size:
    raise ValueError(
      f"config.tokenizer.vocab_size={tok.vocab_size} is invalid: {where} holds a "
      f"codebook of {saved[0]} visual words, so the allowed value is {saved[0]} "
      "(or start a new run in another workdir)."
    )
  if saved[1] != dim:
    raise ValueError(
      f"config.tokenizer.patch_size={tok.patch_size} with config.model.num_channels="
      f"{config.model.num_channels} gives {dim}-dimensional token patches, but {where} "
      f"holds a codebook of dimension {saved[1]}: use the run's patch size and "
      "channels (or start a new run in another workdir)."
    )


def patches_per_image(num_patches: int, num_images: int, per_image: int) -> np.ndarray:
  """How many patches `_sample_patches` takes from each image it reads.

  As many images as the sample allows, as few patches from each: E =
  max(min(num_patches, num_images), ceil(num_patches / per_image)) images, the
  first num_patches mod E of them giving ceil(num_patches / E) patches and the
  others floor(num_patches / E). E exceeds num_images only when even every
  position of every image would be too few.

  Args:
    num_patches: patches to sample, >= 1.
    num_images: images in the training set, >= 1.
    per_image: positions (token patches) in one image's crop, >= 1.

  Returns:
    int64 [E], each in [1, per_image], summing to num_patches.
  """
  count = max(min(num_patches, num_images), -(-num_patches // per_image))
  base, extra = divmod(num_patches, count)
  return base + (np.arange(count) < extra)


def _sample_patches(config, source, grid, num_patches: int, seed: int) -> np.ndarray:
  """Tokenizer-view patches from as many training images as possible, float32
  [num_patches, d].

  The images are the same random resized crops the model trains on (the training
  set reshuffled, as pre-training reads it), so the codebook describes the patches
  it will tokenize. Each image read gives `patches_per_image` patches at distinct
  random positions of its crop: one patch from each of num_patches images when the
  set holds that many (random patches' V words; a k-means sample smaller than the
  set), otherwise ceil or floor(num_patches / len(source)) from every image (the
  demo's k-means: 200k patches from Fashion-MNIST's 60k images, 3 or 4 each). Only
  when even every position of every image is too few does it read some images a
  second time, in another crop.
  """
  per_image = grid[0] * grid[1]
  counts = patches_per_image(num_patches, len(source), per_image)
  num_images = len(counts)
  batch_size = min(256, num_images)
  data = input_pipeline.pretrain_dataset(
    source,
    batch_size=batch_size,
    image_size=config.model.image_size,
    crop_scale=tuple(config.data.crop_scale),
    mask_fn=None,
    seed=seed,
    num_workers=config.data.num_workers,
    prefetch_buffer=config.data.prefetch,
  )
  view = jax.jit(
    lambda im: tokenizers.tokenizer_patches(
      objectives.images_to_float(im), grid, config.tokenizer.patch_size
    )
  )
  rng = np.random.default_rng(seed)
  chunks, done = [], 0
  progress = console.Progress(f"Tokenizer patches from {num_images:,} images", num_patches)
  for batch in data:
    take = counts[done : done + batch_size]  # the last batch may hold more than needed
    patches = np.asarray(view(batch["image"]))[: len(take)]  # [b, per_image, d]
    # Distinct positions per image: the first `take` of a random order of its own.
    order = np.argsort(rng.random((len(take), per_image)), axis=1)[:, : take.max()]
    chosen = np.arange(take.max()) < take[:, None]
    chunks.append(np.take_along_axis(patches, order[..., None], axis=1)[chosen])
    progress.update(len(chunks[-1]))
    done += len(take)
    if done == num_images:
      break
  progress.close()
  return np.concatenate(chunks)


def build_codebook(config, source, grid, key) -> jax.Array:
  """The run's codebook, float32 [V, d], from `config.tokenizer`."""
  tok = config.tokenizer
  _, dim = codebook_shape(config)
  patches = None
  if tok.kind != "random_projection":
    num = tok.kmeans_num_patches if tok.kind == "kmeans" else tok.vocab_size
    patches = _sample_patches(config, source, grid, max(num, tok.vocab_size), seed=config.seed + 1)
    if tok.kind == "kmeans":
      logging.info(
        "Fitting the k-means codebook: %d words to %s patches, %d iterations",
        tok.vocab_size,
        f"{len(patches):,}",
        tok.kmeans_iters,
      )
  return tokenizers.build_codebook(
    tok.kind,
    key,
    vocab_size=tok.vocab_size,
    dim=dim,
    patches=patches,
    kmeans_iters=tok.kmeans_iters,
  )


def _pooled_features(model, params, images):
  tokens, _ = model.apply(params, objectives.images_to_float(images), method="encode")
  return vit.pooled_features(tokens)


def knn_evaluation(config, model, params_by_name: dict, mesh, num_classes: int) -> dict:
  """k-NN top-1 of each named parameter set's pooled encoder features."""
  local_batch = sharding.check_batch_size(config.knn.batch_size, mesh, "knn.batch_size")

  features_fn = jax.jit(lambda p, im: _pooled_features(model, p, im))

  def features(name, params, split, num):
    source = datasets.load_source(
      config.data.dataset, split, config.data.data_dir, config.data.in_memory_mib
    )
    count = len(source) if num is None else min(num, len(source))
    examples = input_pipeline.eval_dataset(
      source,
      batch_size=local_batch,
      image_size=config.model.image_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_examples=count,
    )
    return evaluation.extract_outputs(
      features_fn,
      params,
      examples,
      mesh,
      what=f"k-NN features ({name} encoder, {split})",
      total=count,
    )

  results = {}
  for name, params in params_by_name.items():
    train_x, train_y = features(name, params, config.knn.train_split, config.knn.num_train)
    test_x, test_y = features(name, params, config.knn.test_split, config.knn.num_test)
    results[name] = knn.knn_accuracy(
      train_x,
      train_y,
      test_x,
      test_y,
      k=config.knn.k,
      temperature=config.knn.temperature,
      num_classes=num_classes,
    )
  return results


class Training(NamedTuple):
  """What a pre-training run compiles, built from its config alone (no data, no
  devices): the function `train_and_evaluate` runs and `plan.py` compiles for
  other targets."""

  grid: tuple[int, int]
  model: Any
  # The objective's loss in the train step's form, and its state's init and update.
  step: train_step_lib.StepParts
  mask_fn: Callable[[np.random.Generator], dict[str, np.ndarray]] | None  # None: no masks
  # The views of an image that replace its single crop (DINO's multi-crop), or None.
  views_fn: input_pipeline.ViewsFn | None
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  max_skips: int  # the optimizer's max_consecutive_errors (0: every update applied)
  example_inputs: tuple


def build_training(
  config, total_steps: int, steps_per_epoch: float, platform: str | None = None
) -> Training:
  """The model, loss, masks and optimizer of `config` for a run of `total_steps`.

  Args:
    platform: 'cpu', 'gpu' or 'tpu', where the step will run (default: JAX's
      default backend); it picks the attention kernel.
  """
  grid = config_base.grid_size(config)
  mask_fn = objectives.make_mask_fn(config, grid)
  model = objectives.build_model(config, grid, platform)
  step = objectives.build_step_parts(
    config, model, grid, total_steps=total_steps, steps_per_epoch=steps_per_epoch
  )
  schedule = optim.learning_rate_schedule(
    config.optim, config.batch_size, total_steps, steps_per_epoch
  )
  optimizer = optim.make_optimizer(
    config.optim, schedule, weight_decay=optim.weight_decay_schedule(config.optim, total_steps)
  )
  if step.wrap_optimizer is not None:
    optimizer = step.wrap_optimizer(optimizer)
  # Always wrapped, so that the optimizer state has one structure and a run can
  # resume with skipping switched on or off; 0 errors tolerated applies every update.
  max_skips = config.max_consecutive_skips if config.skip_nonfinite_updates else 0
  optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=max_skips)
  example_masks = {} if mask_fn is None else mask_fn(np.random.default_rng(0))
  return Training(
    grid=grid,
    model=model,
    step=step,
    mask_fn=mask_fn,
    views_fn=objectives.make_views_fn(config),
    schedule=schedule,
    optimizer=optimizer,
    max_skips=max_skips,
    example_inputs=objectives.example_inputs(config, example_masks),
  )


def example_arrays(config, parts: Training) -> dict[str, np.ndarray]:
  """One example as the input pipeline yields it, for its shapes and dtypes: a zero
  image (or the objective's views of it) and its masks."""
  rng = np.random.default_rng(0)
  size, channels = config.model.image_size, config.model.num_channels
  image = np.zeros((size, size, channels), np.uint8)
  example = {"image": image} if parts.views_fn is None else parts.views_fn(image, rng)
  if parts.mask_fn is not None:
    example.update(parts.mask_fn(rng))
  return {k: np.asarray(v) for k, v in example.items()}


def make_train_step(config, parts: Training, mesh, state):
  """The jitted `(state, batch) -> (state, metrics)` of a run (see train_step.py);
  `state` (arrays or shapes) fixes the shardings."""
  return train_step_lib.make_train_step(
    parts.step.loss,
    parts.optimizer,
    parts.schedule,
    config.seed,
    mesh,
    state,
    config.accum_steps,
    update_objective_state=parts.step.update_objective_state,
  )


def make_eval_step(parts: Training, mesh, state):
  """The jitted `(state, batch) -> metrics` of a run's held-out loss."""
  return train_step_lib.make_eval_step(parts.step.loss, mesh, state)


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
    workdir.WorkdirInUse: another run holds the workdir (workdir.RunLock).
    workdir.DiskFull: no room for the next checkpoint (checked before it is
      written; the previous ones stay intact).
  """
  config_base.validate_config(config)
  if config.task != "pretrain":
    raise ValueError(
      f"config.task={config.task!r}: train_and_evaluate pre-trains; "
      "main.run dispatches on the task."
    )
  mesh = sharding.make_mesh(config.mesh)
  local_batch = sharding.check_batch_size(config.batch_size, mesh, accum_steps=config.accum_steps)
  if config.knn.enabled:
    sharding.check_batch_size(config.knn.batch_size, mesh, "knn.batch_size")
  with workdir_lib.RunLock(workdir):
    return _pretrain(config, workdir, mesh, local_batch, allow_config_change)


def _pretrain(config, workdir: str, mesh, local_batch: int, allow_config_change: bool) -> dict:
  """train_and_evaluate's work once the config is checked and the workdir is held."""
  checkpointer, start_step = loop.open_workdir(
    config,
    workdir,
    allow_config_change=allow_config_change,
    check_checkpoint=lambda ckpt, step: _check_codebook(config, ckpt, step),
  )

  data = config.data
  info = loop.prepare_data(data)
  train_source = datasets.training_share(data)
  total_steps, steps_per_epoch = loop.num_steps(config, len(train_source))
  parts = build_training(config, total_steps, steps_per_epoch, sharding.platform_of(mesh))
  grid, mask_fn, model = parts.grid, parts.mask_fn, parts.model
  init_key, codebook_key = jax.random.split(jax.random.PRNGKey(config.seed))

  train_iter = iter(
    input_pipeline.pretrain_dataset(
      train_source,
      batch_size=local_batch,
      image_size=config.model.image_size,
      crop_scale=tuple(data.crop_scale),
      augment_fn=photometric.make_augment_fn(config.augment),
      mask_fn=mask_fn,
      views_fn=parts.views_fn,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_workers=data.num_workers,
      prefetch_buffer=data.prefetch,
      count_skipped=True,
    )
  )

  log = metric_log.MetricLog(workdir)
  if start_step:
    # The checkpoint holds the codebook: no need to rebuild it.
    codebook = jnp.zeros(codebook_shape(config), jnp.float32)
  elif not objectives.get(config.objective).USES_TOKENIZER:
    # Its targets are no visual words (pixels, for MAE and SimMIM): zeros of the
    # usual shape keep one train-state structure (checkpoints, _check_codebook,
    # plan.py) without minutes of fitting a codebook nothing reads.
    codebook = jnp.zeros(codebook_shape(config), jnp.float32)
    logging.info("No codebook: the %s objective reads no visual words.", config.objective)
  else:
    t0 = time.time()
    codebook = build_codebook(config, train_source, grid, codebook_key)
    logging.info(
      "Built the %s codebook (%d words) in %s",
      config.tokenizer.kind,
      config.tokenizer.vocab_size,
      console.duration(time.time() - t0),
    )
  state = train_step_lib.init_train_state(
    model,
    parts.optimizer,
    codebook,
    parts.example_inputs,
    init_key,
    mesh,
    parts.step.init_objective_state,
  )
  if start_step:
    state, start_step = checkpointer.restore_latest(state, train_iter)
    logging.info("Resumed from step %d in %s", start_step, workdir)
  # Records past the checkpoint (all of them for a fresh start) are recomputed.
  log.truncate_after(start_step if start_step else -1)
  if not start_step:
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.write(0, {"num_params": num_params})
    logging.info(
      "Model: %s, %s parameters (encoder and decoder)", config.model.variant, f"{num_params:,}"
    )

  train_step = make_train_step(config, parts, mesh, state)
  eval_step = make_eval_step(parts, mesh, state)
  val_source = datasets.load_source(data.dataset, data.val_split, data.data_dir, data.in_memory_mib)

  # Whole batches of held-out images: a split smaller than eval_batches batches is
  # cycled (a repeated image gets other masks), since a padded batch is skipped.
  num_val_batches = min(config.eval_batches, -(-len(val_source) // config.batch_size))
  val_records = subsets.Subset(
    val_source, np.arange(num_val_batches * config.batch_size) % len(val_source)
  )

  def validate(state):
    val_data = input_pipeline.eval_dataset(
      val_records,
      batch_size=local_batch,
      image_size=config.model.image_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      mask_fn=mask_fn,
      views_fn=parts.views_fn,
      seed=config.seed,
      with_labels=False,
    )
    sums, count = {}, 0
    for batch in val_data:
      if not np.all(batch["valid"]):  # a padded batch would bias the mean
        continue
      batch = {k: v for k, v in batch.items() if k != "valid"}
      metrics = jax.device_get(eval_step(state, sharding.global_batch(batch, mesh)))
      sums = {k: sums.get(k, 0.0) + float(v) for k, v in metrics.items()}
      count += 1
    return {f"val_{k}": v / count for k, v in sums.items()} if count else {}

  summarize = visualize.make_summary_fn(config, model, val_source, mask_fn, mesh)

  best = (
    checkpointing.BestCheckpointer(workdir, "val_loss") if config.keep_best_checkpoint else None
  )

  def evaluate(state):
    # Every process computes the summary (one jitted call); process 0 writes it.
    if summarize is not None:
      log.writer.write_images(int(state.step), summarize(state))
    values = validate(state)
    if best is not None and "val_loss" in values:
      if best.offer(int(state.step), state, values["val_loss"]):
        logging.info("best checkpoint @ %d: writing to %s", int(state.step), best.directory)
      if best.best() is not None:
        values["best_val_loss"] = best.best()[1]
    return values

  try:
    state, last = loop.run(
      config,
      workdir,
      state=state,
      train_iter=train_iter,
      train_step=train_step,
      max_skips=parts.max_skips,
      mesh=mesh,
      start_step=start_step,
      total_steps=total_steps,
      steps_per_epoch=steps_per_epoch,
      checkpointer=checkpointer,
      log=log,
      evaluate=evaluate,
    )
    if config.knn.enabled and info.num_classes is None:
      logging.info("No k-NN evaluation: %s has no labels.", data.dataset)
    elif config.knn.enabled:
      t0 = time.time()
      random_params = jax.jit(
        lambda k: model.init({"params": k, "dropout": k}, *parts.example_inputs, train=False)
      )(init_key)
      accuracy = knn_evaluation(
        config,
        model,
        {
          "pretrained": objectives.evaluated_params(config, state.params, state.objective_state),
          "random": random_params,
        },
        mesh,
        info.num_classes,
      )
      values = {"knn_top1": accuracy["pretrained"], "knn_top1_random_init": accuracy["random"]}
      log.write(total_steps, values)
      last.update(values)
      logging.info(
        "k-NN top-1 %.1f%% (random init %.1f%%), in %s",
        100 * accuracy["pretrained"],
        100 * accuracy["random"],
        console.duration(time.time() - t0),
      )
  finally:
    # Waits for a save in flight: whatever stopped the run, the last
    # checkpoint it started is complete.
    checkpointer.close()
    if best is not None:
      best.close()
    log.close()
  if best is not None and best.best() is not None:
    last["best_step"], last["best_val_loss"] = best.best()
  loop.write_final_metrics(workdir, total_steps, last)
  return last
