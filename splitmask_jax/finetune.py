"""Supervised fine-tuning of a pre-trained (or random-init) encoder, end to end.

`finetune_and_evaluate(config, workdir)` runs a `config.task == 'finetune'`
config (config_base.downstream_config): it loads the encoder of the
pre-training run in `config.init.workdir` (or keeps the random initialisation
when that is None: the baseline goes through the same code), trains the
classifier with Table 9's recipe (layer-wise learning-rate decay, RandAugment,
mixup / cutmix with label smoothing, stochastic depth, repeated augmentation)
and reports top-1 on the test split at intervals and at the end. The run
resumes from its own checkpoints like pre-training does (loop.py).

The encoder's variant (its size and patch size) and channels are the
pre-training run's; its image size may differ (BEiT and MAE fine-tune at 384 px
what they pre-trained at 224 px): the pre-trained position embeddings are then
resampled to the new patch grid once, when the run starts
(`adapt_to_image_size`), and the run's own checkpoints hold the new ones.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from splitmask_jax import config_base
from splitmask_jax import evaluation
from splitmask_jax import loop
from splitmask_jax import mixing
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.data import datasets
from splitmask_jax.data import input_pipeline
from splitmask_jax.data import randaugment
from splitmask_jax.models import classifier as classifier_lib
from splitmask_jax.models import vit
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import sharding
from splitmask_jax.runtime import workdir as workdir_lib

# Model keys a downstream run must share with the run it starts from. The image
# size may differ: the position embeddings are resampled (adapt_to_image_size).
_ENCODER_KEYS = ("variant", "num_channels")
# What the resampling's log line calls each downstream task.
_TASK_WORDS = {"finetune": "fine-tuning", "probe": "probing"}


@flax.struct.dataclass
class ClassifierState:
  """The fine-tuning train state (what a checkpoint holds besides the data position)."""

  step: jax.Array  # int32 []
  params: Any
  opt_state: Any


def build_classifier(
  config, num_classes: int, platform: str | None = None
) -> classifier_lib.Classifier:
  """The classifier of `config.model` (not yet initialised), to run on `platform`
  ('cpu', 'gpu', 'tpu'; default: JAX's default backend)."""
  arch, patch = vit.parse_variant(config.model.variant)
  return classifier_lib.Classifier(
    **arch,
    patch_size=patch,
    grid=config_base.grid_size(config),
    num_classes=num_classes,
    drop_path_rate=config.model.drop_path,
    head_init_scale=config.model.head_init_scale,
    use_fc_norm=config.model.fc_norm,
    dtype=jnp.dtype(config.model.dtype),
    **vit.block_options(config.model, platform or sharding.default_platform()),
  )


def check_init_run(config) -> dict | None:
  """Reads the variables of `config.init.workdir`, checking that its model matches.

  Runs before any data is read or anything compiled. The variant (encoder size
  and patch size) and channels must be the init run's; the image size may
  differ (`adapt_to_image_size` then resamples the position embeddings).

  Returns:
    The run's flax variables (numpy) as saved, or None for a random-init run.

  Raises:
    FileNotFoundError: no such run, or no checkpoint in it.
    ValueError: its encoder is not this config's (variant, channels).
  """
  init = config.init
  if init.workdir is None:
    return None
  path = workdir_lib.path(init.workdir, loop.CONFIG_FILE)
  if not path.exists():
    raise FileNotFoundError(
      f"config.init.workdir={init.workdir!r} holds no {loop.CONFIG_FILE}: pass the workdir "
      "of a pre-training run (or None to fine-tune from random init)."
    )
  saved_config = json.loads(path.read_text())
  saved_model = saved_config["model"]
  for key in _ENCODER_KEYS:
    if saved_model[key] != config.model[key]:
      # Only the image size may change: the encoder's weights fix the rest.
      hint = (
        " The encoder's size and patch size are the pre-training run's; "
        f"model.image_size may differ from its {saved_model['image_size']} px (a multiple "
        f"of the patch size {vit.parse_variant(saved_model['variant'])[1]}), and the "
        "position embeddings are then resampled."
        if key == "variant"
        else ""
      )
      raise ValueError(
        f"config.model.{key}={config.model[key]!r} does not match the run in "
        f"config.init.workdir={init.workdir!r}, which has model.{key}="
        f"{saved_model[key]!r}: set config.model.{key}={saved_model[key]!r}.{hint}"
      )
  best = init.checkpoint == "best"
  state_key = objectives.evaluated_state_key(saved_config)
  variables, step = checkpointing.load_params(
    init.workdir, init.step, best=best, state_key=state_key
  )
  logging.info(
    "Initialising the encoder from %s, step %d%s%s",
    init.workdir,
    step,
    " (its lowest held-out loss)" if best else "",
    f" (its {state_key})" if state_key else "",
  )
  return variables


def adapt_to_image_size(pretrained: dict | None, config) -> dict | None:
  """`pretrained` with its encoder's position embeddings on `config.model`'s patch grid.

  A downstream run at another image size than its init run, with the same patch
  size, has another patch grid: the pre-trained embeddings [1, gh*gw, D] are
  resampled to it (vit.resample_pos_embedding, bicubic), and one line says so.
  Called once, when a run starts from the init run (not when it resumes from
  its own checkpoints, which hold the resampled and since trained embeddings).

  Args:
    pretrained: a run's variables (check_init_run), or None (random init).
    config: the downstream config; its grid is config_base.grid_size(config).

  Returns:
    `pretrained` itself when the grids agree (or it is None); otherwise a copy
    whose params/encoder/pos_embedding is [1, new_gh*new_gw, D], the rest shared.

  Raises:
    ValueError: the encoder holds no pos_embedding, or not a square grid of them.
  """
  if pretrained is None:
    return None
  encoder = pretrained.get("params", {}).get("encoder", {})
  if "pos_embedding" not in encoder:
    raise ValueError(
      f"The encoder in config.init.workdir={config.init.workdir!r} holds no pos_embedding: "
      f"its parameters are {sorted(encoder)}."
    )
  pos = encoder["pos_embedding"]
  grid = config_base.grid_size(config)
  old_side = int(round(np.sqrt(np.shape(pos)[1])))
  if (old_side, old_side) == grid:
    return pretrained
  resampled = vit.resample_pos_embedding(pos, grid)
  _, patch = vit.parse_variant(config.model.variant)
  logging.info(
    "Position embeddings resampled from %dx%d to %dx%d patches (bicubic): pre-trained at "
    "%d px, %s at %d px",
    old_side,
    old_side,
    *grid,
    old_side * patch,
    _TASK_WORDS.get(config.task, config.task),
    config.model.image_size,
  )
  params = dict(pretrained["params"], encoder=dict(encoder, pos_embedding=resampled))
  return dict(pretrained, params=params)


def load_pretrained_encoder(variables: dict, pretrained: dict, *, source: str = "") -> dict:
  """`variables` with its encoder replaced by the pre-trained one, bit for bit.

  Args:
    variables: the classifier's variables `{'params': {'encoder': ..., 'head': ...}}`.
    pretrained: a pre-training (or fine-tuning) run's variables; its
      `params/encoder` is copied, its other parts (decoder, BEiT's [MASK]
      embedding) are left out. Blocks saved scanned load into unrolled ones and
      the other way round (vit.match_block_layout). Position embeddings of
      another grid must first be resampled (adapt_to_image_size).
    source: where `pretrained` came from, for error messages.

  Returns:
    A new variables tree: the pre-trained encoder as numpy float arrays in the
    classifier's dtypes, the head of `variables` unchanged.

  Raises:
    ValueError: an encoder parameter is missing, has another shape, or has no
      place in the model; the message lists them.
  """
  target = variables["params"]["encoder"]
  saved = pretrained.get("params", {}).get("encoder")
  if saved is None:
    raise ValueError(
      f"{source or 'the checkpoint'} holds no params/encoder: its top-level "
      f"parameters are {sorted(pretrained.get('params', {}))}."
    )
  if vit.is_scanned(saved) != vit.is_scanned(target):
    logging.info(
      "Converting the encoder of %s from %s to %s blocks (config.model.scan=%s).",
      source or "the checkpoint",
      *(("scanned", "unrolled") if vit.is_scanned(saved) else ("unrolled", "scanned")),
      vit.is_scanned(target),
    )
    saved = vit.match_block_layout(saved, target)
  flat_saved = flax.traverse_util.flatten_dict(saved, sep="/")
  problems = []

  def take(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    value = flat_saved.get(name)
    if value is None:
      problems.append(f"{name}: missing")
      return leaf
    if value.shape != leaf.shape:
      problems.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(leaf.shape)}")
      return leaf
    return np.asarray(value, dtype=leaf.dtype)

  encoder = jax.tree_util.tree_map_with_path(take, target)
  expected = set(flax.traverse_util.flatten_dict(target, sep="/"))
  # BEiT's [MASK] embedding is pre-training only; anything else unused is a mismatch.
  problems += [
    f"{name}: not in the model"
    for name in sorted(set(flat_saved) - expected)
    if name != "mask_token"
  ]
  if problems:
    raise ValueError(
      f"The encoder in {source or 'the checkpoint'} does not fit this model "
      f"({len(problems)} parameters): {'; '.join(problems[:8])}"
      f"{'; ...' if len(problems) > 8 else ''}. Use the pre-training run's model config."
    )
  params = dict(variables["params"], encoder=encoder)
  return dict(variables, params=params)


def _place(tree, shardings):
  """Host arrays (the same on every process) -> global arrays with `shardings`."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x)[index]),
    tree,
    shardings,
  )


def classifier_init_fn(model, config):
  """`rng -> variables`: the classifier's random initialisation at config.model's
  input shape (a batch of one zero image)."""
  size = config.model.image_size
  images = jnp.zeros((1, size, size, config.model.num_channels), jnp.float32)
  return lambda rng: model.init({"params": rng, "dropout": rng}, images, train=False)


def init_classifier_state(
  init_params,
  optimizer: optax.GradientTransformation,
  rng: jax.Array,
  mesh,
  pretrained: dict | None,
) -> ClassifierState:
  """The initial state, sharded like pre-training's (large arrays over 'fsdp').

  Args:
    init_params: `rng -> variables` (`classifier_init_fn`).
    pretrained: a run's variables whose encoder replaces the random one, or None.
  """
  param_shardings = sharding.fsdp_shardings(jax.eval_shape(init_params, rng), mesh)
  params = jax.jit(init_params, out_shardings=param_shardings)(rng)
  if pretrained is not None:
    params = _place(load_pretrained_encoder(jax.device_get(params), pretrained), param_shardings)

  def init(params):
    return ClassifierState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )

  shardings = sharding.fsdp_shardings(jax.eval_shape(init, params), mesh)
  return jax.jit(init, out_shardings=shardings)(params)


def classification_loss(
  params, state, batch, rng, *, model, num_classes: int, augment, train: bool
):
  """Soft-target cross-entropy after mixup / cutmix and label smoothing.

  Args:
    batch: image uint8 [B, H, W, C], label int32 [B].
    augment: the `config.augment` group (mixing and smoothing settings).
  """
  del state  # the classifier reads nothing but its parameters
  mix_rng, dropout_rng = jax.random.split(rng)
  images = objectives.images_to_float(batch["image"])
  images, targets, _ = mixing.mix_batch(
    images,
    batch["label"],
    mix_rng,
    num_classes=num_classes,
    mixup_alpha=augment.mixup,
    cutmix_alpha=augment.cutmix,
    switch_prob=augment.mix_switch_prob,
    label_smoothing=augment.label_smoothing,
  )
  logits = model.apply(params, images, train=train, rngs={"dropout": dropout_rng})
  loss = mixing.soft_cross_entropy(logits, targets)
  return loss, {"loss": loss}


def prepare_labelled_data(config) -> datasets.DatasetInfo:
  """Prepares config.data's dataset; raises unless it has labels."""
  info = loop.prepare_data(config.data)
  if info.num_classes is None:
    raise ValueError(
      f"config.data.dataset={config.data.dataset!r} has no 'label' feature: "
      f"the {config.task} task needs a labelled dataset."
    )
  return info


def _augment_fn(augment) -> input_pipeline.ImageAugmentFn | None:
  """RandAugment, else colour jitter, else nothing: the order of timm's transforms
  (which the paper's fine-tuning code uses), where the jitter is skipped under
  RandAugment."""
  if augment.randaugment_ops > 0:
    return functools.partial(
      randaugment.rand_augment,
      num_ops=augment.randaugment_ops,
      magnitude=augment.randaugment_magnitude,
      magnitude_std=augment.randaugment_magnitude_std,
    )
  if augment.color_jitter > 0:
    return functools.partial(randaugment.color_jitter, strength=augment.color_jitter)
  return None


def top1_evaluation(config, model, mesh):
  """`params -> top-1` on config.data.test_split (all of it, test crop ratio)."""
  data = config.data
  local_batch = sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  source = datasets.load_source(data.dataset, data.test_split, data.data_dir, data.in_memory_mib)
  predict = jax.jit(
    lambda params, images: jnp.argmax(
      model.apply(params, objectives.images_to_float(images), train=False), axis=-1
    )
  )

  def evaluate(params) -> float:
    batches = input_pipeline.eval_dataset(
      source,
      batch_size=local_batch,
      image_size=config.model.image_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      center_crop=data.test_crop_ratio,
    )
    predicted, labels = evaluation.extract_outputs(predict, params, batches, mesh)
    return float(np.mean(predicted == labels))

  return evaluate


def finetune_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Fine-tunes as `config` says, in `workdir`; returns the last logged values.

  Writes `config.json`, `metrics.jsonl` (`test_top1` every `eval_every` steps
  and at the end), TensorBoard events, checkpoints and `final_metrics.json`;
  resumes from the latest checkpoint found there.

  Raises:
    ValueError: an invalid config, one that does not match the workdir's run,
      or an init run whose encoder does not fit `config.model`; raised before
      any data is read or anything compiled.
    FileNotFoundError: config.init.workdir holds no run or no checkpoint.
    preemption.Preempted, FloatingPointError, workdir.WorkdirInUse,
      workdir.DiskFull: as in pre-training.
  """
  config_base.validate_config(config)
  if config.task != "finetune":
    raise ValueError(f"config.task={config.task!r}: finetune_and_evaluate needs 'finetune'.")
  mesh = sharding.make_mesh(config.mesh)
  local_batch = sharding.check_batch_size(config.batch_size, mesh, accum_steps=config.accum_steps)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  pretrained = check_init_run(config)
  with workdir_lib.RunLock(workdir):
    return _finetune(config, workdir, mesh, local_batch, pretrained, allow_config_change)


def _finetune(
  config, workdir: str, mesh, local_batch: int, pretrained, allow_config_change: bool
) -> dict:
  """finetune_and_evaluate's work once the config is checked and the workdir is held."""
  checkpointer, start_step = loop.open_workdir(
    config, workdir, allow_config_change=allow_config_change
  )

  data = config.data
  info = prepare_labelled_data(config)
  train_source = datasets.training_share(config.data)
  total_steps, steps_per_epoch = loop.num_steps(config, len(train_source))

  model = build_classifier(config, info.num_classes, sharding.platform_of(mesh))
  schedule = optim.learning_rate_schedule(
    config.optim, config.batch_size, total_steps, steps_per_epoch
  )
  max_skips = config.max_consecutive_skips if config.skip_nonfinite_updates else 0
  size = config.model.image_size
  init_params = classifier_init_fn(model, config)
  init_key = jax.random.PRNGKey(config.seed)
  abstract_params = jax.eval_shape(init_params, init_key)
  multipliers = optim.layer_decay_multipliers(
    abstract_params, model.depth, config.optim.layer_decay
  )
  optimizer = optax.apply_if_finite(
    optim.make_optimizer(config.optim, schedule, lr_multipliers=multipliers),
    max_consecutive_errors=max_skips,
  )
  # A resumed run restores its own (resampled, then trained) embeddings.
  state = init_classifier_state(
    init_params,
    optimizer,
    init_key,
    mesh,
    None if start_step else adapt_to_image_size(pretrained, config),
  )

  train_iter = iter(
    input_pipeline.finetune_dataset(
      train_source,
      batch_size=local_batch,
      image_size=size,
      crop_scale=tuple(data.crop_scale),
      augment_fn=_augment_fn(config.augment),
      repeats=config.augment.repeats,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_workers=data.num_workers,
      prefetch_buffer=data.prefetch,
    )
  )

  log = metric_log.MetricLog(workdir)
  if start_step:
    state, start_step = checkpointer.restore_latest(state, train_iter)
    logging.info("Resumed from step %d in %s", start_step, workdir)
  log.truncate_after(start_step if start_step else -1)
  if not start_step:
    log.write(
      0,
      {
        "num_params": sum(x.size for x in jax.tree.leaves(state.params)),
        "num_train_examples": len(train_source),
      },
    )

  loss_fn = functools.partial(
    classification_loss, model=model, num_classes=info.num_classes, augment=config.augment
  )
  train_step = train_step_lib.make_train_step(
    loss_fn, optimizer, schedule, config.seed, mesh, state, config.accum_steps
  )
  top1 = top1_evaluation(config, model, mesh)

  def evaluate(state):
    return {"test_top1": top1(state.params)}

  try:
    state, last = loop.run(
      config,
      workdir,
      state=state,
      train_iter=train_iter,
      train_step=train_step,
      max_skips=max_skips,
      mesh=mesh,
      start_step=start_step,
      total_steps=total_steps,
      steps_per_epoch=steps_per_epoch,
      checkpointer=checkpointer,
      log=log,
      evaluate=evaluate,
    )
    if start_step == total_steps:  # preempted after its last step: only the evaluation
      last = evaluate(state)
      log.write(total_steps, last)
  finally:
    checkpointer.close()
    log.close()
  logging.info("Test top-1 %.4f after %d steps", last.get("test_top1", float("nan")), total_steps)
  loop.write_final_metrics(workdir, total_steps, last)
  return last
