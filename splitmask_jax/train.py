"""Pre-training, end to end: data, codebook, sharded state, the step loop, evaluation.

`train_and_evaluate(config, workdir)` is what `main.py` calls; it is importable
from a notebook. A workdir holding a checkpoint is resumed from its latest step.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions

from splitmask_jax import checkpointing
from splitmask_jax import config_base
from splitmask_jax import datasets
from splitmask_jax import input_pipeline
from splitmask_jax import knn
from splitmask_jax import masking
from splitmask_jax import metric_log
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import sharding
from splitmask_jax import tokenizers
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.models import vit

CONFIG_FILE = "config.json"


def _save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


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
  dim = tokenizers.codebook_dim(tok.patch_size, config.model.num_channels)
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
  """Pooled features and labels of every valid example of an eval dataset."""
  feats, labels = [], []
  for batch in data:
    images = sharding.global_batch({"image": batch["image"]}, mesh)["image"]
    out = jax.device_get(features_fn(params, images))
    valid = np.asarray(batch["valid"])
    # Single process: the global batch is this process's batch.
    feats.append(np.asarray(out)[: len(valid)][valid])
    labels.append(np.asarray(batch["label"])[valid])
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


def _check_finite(step: int, values: dict) -> None:
  bad = {k: v for k, v in values.items() if not math.isfinite(v)}
  if bad:
    parts = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
    raise FloatingPointError(
        f"Non-finite training metrics at step {step}: {sorted(bad)}. All values: {parts}. "
        "The last checkpoint before this step is kept in the workdir.")


def train_and_evaluate(config, workdir: str) -> dict:
  """Pre-trains as `config` says, in `workdir`; returns the last logged values.

  Writes `config.json`, `metrics.jsonl`, TensorBoard events and checkpoints to
  `workdir`; resumes from the latest checkpoint found there.
  """
  config_base.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  _save_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  local_batch = sharding.check_batch_size(config.batch_size, mesh)
  if config.knn.enabled:
    sharding.check_batch_size(config.knn.batch_size, mesh, "knn.batch_size")
  grid = config_base.grid_size(config)
  mask_fn = masking.make_mask_fn(
      config.objective, grid, config.masking.ratio, kind=config.masking.kind,
      min_block=config.masking.min_block, max_block=config.masking.max_block)

  data = config.data
  datasets.prepare_dataset(data.dataset, data.data_dir, data.manual_dir,
                           process_index=jax.process_index())
  info = datasets.dataset_info(data.dataset, data.data_dir)
  train_source = datasets.load_source(data.dataset, data.train_split, data.data_dir)
  total_steps, steps_per_epoch = _num_steps(config, len(train_source))

  model = objectives.build_model(config, grid)
  loss_fn = objectives.build_loss_fn(config, model, grid)
  schedule = optim.learning_rate_schedule(config.optim, config.batch_size, total_steps,
                                          steps_per_epoch)
  optimizer = optim.make_optimizer(config.optim, schedule)
  init_key, codebook_key = jax.random.split(jax.random.PRNGKey(config.seed))
  example_inputs = objectives.example_inputs(config, mask_fn(np.random.default_rng(0)))

  train_iter = iter(input_pipeline.pretrain_dataset(
      train_source, batch_size=local_batch, image_size=config.model.image_size,
      crop_scale=tuple(data.crop_scale), mask_fn=mask_fn, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=data.num_workers, prefetch_buffer=data.prefetch))

  checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  log = metric_log.MetricLog(workdir)
  if start_step:
    # The checkpoint holds the codebook: no need to rebuild it.
    codebook = jnp.zeros((config.tokenizer.vocab_size, tokenizers.codebook_dim(
        config.tokenizer.patch_size, config.model.num_channels)), jnp.float32)
  else:
    t0 = time.time()
    codebook = build_codebook(config, train_source, grid, codebook_key)
    logging.info("Built the %s codebook in %.1fs", config.tokenizer.kind, time.time() - t0)
  state = train_step_lib.init_train_state(model, optimizer, codebook, example_inputs,
                                          init_key, mesh)
  if start_step:
    state = checkpointer.restore(start_step, state, train_iter)
    log.truncate_after(start_step)
    logging.info("Resumed from step %d in %s", start_step, workdir)
  else:
    log.write(0, {"num_params": sum(x.size for x in jax.tree.leaves(state.params))})

  train_step = train_step_lib.make_train_step(loss_fn, optimizer, schedule, config.seed,
                                              mesh, state)
  eval_step = train_step_lib.make_eval_step(loss_fn, mesh, state)
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

  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=log.writer,
                                             every_steps=config.log_every)
  last = {}
  window, window_steps, window_start = None, 0, time.time()
  for step in range(start_step, total_steps):
    batch = sharding.global_batch(next(train_iter), mesh)
    state, metrics = train_step(state, batch)
    # Summed on the device: no host synchronisation until the next log step.
    window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
    window_steps += 1
    done = step + 1
    progress(done)
    at_end = done == total_steps
    save = done % config.checkpoint_every == 0 or at_end
    if done % config.log_every == 0 or save:
      values = {k: float(v) / window_steps for k, v in jax.device_get(window).items()}
      _check_finite(done, values)  # before any save of this state
      elapsed = time.time() - window_start
      values["images_per_sec"] = window_steps * config.batch_size / elapsed
      values["epoch"] = done / steps_per_epoch
      log.write(done, values)
      last = values
      window, window_steps, window_start = None, 0, time.time()
    if done % config.eval_every == 0 or at_end:
      val = validate()
      log.write(done, val)
      last.update(val)
    if save:
      checkpointer.save(done, state, train_iter)
  checkpointer.wait()

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
  checkpointer.close()
  log.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": total_steps, **last}, f, indent=2, sort_keys=True)
  return last
