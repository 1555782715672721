"""DINO (Caron et al. 2021): self-distillation with no labels, the paper's joint-embedding
baseline (Table 1: it falls off when the pre-training data shrinks).

A student network (the encoder and DINO's head, `pretrain.DINOModel`) sees 2 global
and L local crops of each image; a teacher of the same architecture, whose weights
are an exponential moving average of the student's, sees the 2 global crops. The
loss is the cross-entropy between the teacher's centred, sharpened softmax of each
global crop and the student's log-softmax of every other crop. The teacher and the
centre of its outputs are the objective's state (`TrainState.objective_state`),
updated in the train step after the optimizer:

  teacher <- m * teacher + (1 - m) * student, m from `momentum_teacher` to 1 (cosine)
  centre  <- c * centre + (1 - c) * mean of the teacher's outputs over the batch

The batch mean is the whole batch's under gradient accumulation (the loss returns
it under train_step.STATS_KEY, and micro-batch means average to it) and over every
device under sharding. The student's last layer is held still during the first
`freeze_last_layer_epochs`. The teacher temperature's warmup and this freeze are
in epochs, or in shares of the run when their `*_fraction` keys are set
(optim.schedule_steps), as the learning rate's warmup. No tokenizer and no mask:
the run's codebook is a placeholder nothing reads.

The views are drawn on the host (input_pipeline.multi_crop): each a random resized
crop and flip, then BYOL's photometric augmentations with DINO's probabilities per
view. Where this differs from DINO's code: no [CLS] token (the head reads the mean
of the encoder's tokens, see DINOModel); the teacher temperature warms up linearly
per step, not per epoch; gradients are clipped by their global norm
(`optim.grad_clip`), not per parameter tensor; the colour jitter has no hue shift
(data/photometric.py); the local crops' position embeddings are resampled by
`jax.image.resize`'s antialiased bicubic, not torch's `interpolate`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from splitmask_jax import optim
from splitmask_jax import train_step
from splitmask_jax.data import input_pipeline
from splitmask_jax.data import photometric
from splitmask_jax.models import pretrain
from splitmask_jax.objectives import targets

# The model reads the crops only: no masks.
MODEL_INPUTS = ()
# DINO masks nothing.
DEFAULT_MASK_RATIO = None
# No visual words: the run builds no codebook.
USES_TOKENIZER = False
# The objective state's key of the variables a run is judged and used by: DINO
# evaluates, fine-tunes and releases its EMA teacher, which is better than the
# student throughout training (DINO, section 5.1 and Fig. 6).
EVALUATED_STATE_KEY = "teacher"

# The batch keys of the views: uint8 [B, 2, S, S, C] and [B, L, s, s, C].
GLOBAL, LOCAL = "global", "local"
NUM_GLOBAL_CROPS = 2

# DINO's photometric augmentation of each view: BYOL's colour jitter (p 0.8) and
# greyscale (p 0.2) on every view, then a Gaussian blur and solarisation whose
# probabilities differ between the views (DataAugmentationDINO).
_JITTER = dict(color_jitter=0.4, color_jitter_prob=0.8, grayscale_prob=0.2)
VIEW_AUGMENTS = {
  "global_1": dict(_JITTER, blur_prob=1.0, solarize_prob=0.0),
  "global_2": dict(_JITTER, blur_prob=0.1, solarize_prob=0.2),
  "local": dict(_JITTER, blur_prob=0.5, solarize_prob=0.0),
}
# The global crop size DINO's blur sigmas (0.1 to 2 pixels, the same on its 96 px
# local crops) are given for.
_REFERENCE_SIZE = 224


def _augment(view: str, reference_size: float) -> input_pipeline.ImageAugmentFn:
  """The photometric augmentation of one kind of view (VIEW_AUGMENTS), its blur sigmas
  given for a `reference_size` px crop."""
  return functools.partial(
    photometric.small_data_augment, blur_reference_size=reference_size, **VIEW_AUGMENTS[view]
  )


def make_views_fn(config) -> input_pipeline.ViewsFn:
  """DINO's multi-crop of one image: 'global' uint8 [2, S, S, C] with S =
  config.model.image_size, and with num_local_crops L > 0 'local' uint8 [L, s, s, C]
  with s = config.dino.local_crop_size.

  The blur sigmas are DINO's pixels of a 224 px global crop, scaled with the global
  crop size; a local crop is blurred by as many pixels as a global one, as in DINO
  (where both take sigmas of 0.1 to 2 px at 224 and 96 px).
  """
  d, size = config.dino, config.model.image_size
  global_crops = (_augment("global_1", _REFERENCE_SIZE), _augment("global_2", _REFERENCE_SIZE))
  groups = [input_pipeline.CropGroup(GLOBAL, size, tuple(d.global_crop_scale), global_crops)]
  if d.num_local_crops:
    local = _augment("local", _REFERENCE_SIZE * d.local_crop_size / size)
    groups.append(
      input_pipeline.CropGroup(
        LOCAL, d.local_crop_size, tuple(d.local_crop_scale), (local,) * d.num_local_crops
      )
    )
  return functools.partial(input_pipeline.multi_crop, groups=tuple(groups))


def make_mask_fn(config, grid: tuple[int, int]) -> None:
  """None: DINO draws no masks."""
  del config, grid


def build_model(config, **common) -> pretrain.DINOModel:
  """The DINO network (student and teacher); `common` holds the keys every
  objective's model takes (its `vocab_size` is the unused codebook's)."""
  common.pop("vocab_size")
  d = config.dino
  return pretrain.DINOModel(
    out_dim=d.out_dim,
    hidden_dim=d.hidden_dim,
    bottleneck_dim=d.bottleneck_dim,
    norm_last_layer=d.norm_last_layer,
    **common,
  )


def teacher_temperature(config, *, total_steps: int, steps_per_epoch: float) -> optax.Schedule:
  """Teacher temperature of an update: linear from `warmup_teacher_temp` at the
  first to `teacher_temp` after `warmup_teacher_temp_epochs` (or
  `warmup_teacher_temp_fraction` of the `total_steps`), then constant."""
  d = config.dino
  warmup = optim.schedule_steps(
    d.warmup_teacher_temp_epochs,
    d.warmup_teacher_temp_fraction,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
  )
  if warmup <= 0:
    return optax.constant_schedule(d.teacher_temp)
  return optax.linear_schedule(d.warmup_teacher_temp, d.teacher_temp, warmup)


def teacher_momentum(config, total_steps: int) -> optax.Schedule:
  """EMA momentum of the teacher after an update (0-based): a cosine from
  `momentum_teacher` at the first to 1 at the end of the run (DINO's
  1 - (1 - m) * (1 + cos(pi * step / total_steps)) / 2)."""
  gap = optax.cosine_decay_schedule(1.0 - config.dino.momentum_teacher, max(total_steps, 1))
  return lambda step: 1.0 - gap(step)


def cross_entropy(
  student: jax.Array,
  teacher: jax.Array,
  centre: jax.Array,
  *,
  student_temp: float,
  teacher_temp: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
  """DINO's loss between the crops of each image.

  Args:
    student: float32 [B, V, K], the student's head outputs of V crops per image,
      the teacher's crops first and in its order.
    teacher: float32 [B, G, K], the teacher's of G <= V crops (the global ones).
    centre: float32 [K].
  Returns:
    (the mean over images and over the G * (V - 1) pairs of a teacher crop and a
    different student crop of -sum_k q_k log p_k, with q = softmax((teacher -
    centre) / teacher_temp), constant, and p = softmax(student / student_temp);
    q float32 [B, G, K]).
  """
  log_p = jax.nn.log_softmax(student / student_temp, axis=-1)
  q = jax.lax.stop_gradient(jax.nn.softmax((teacher - centre) / teacher_temp, axis=-1))
  per_pair = -jnp.einsum("bgk,bvk->bgv", q, log_p, precision=jax.lax.Precision.HIGHEST)
  g, v = q.shape[1], log_p.shape[1]
  # A global crop is not compared with itself.
  other = (jnp.arange(g)[:, None] != jnp.arange(v)[None, :]).astype(per_pair.dtype)
  return jnp.sum(jnp.mean(per_pair, axis=0) * other) / jnp.sum(other), q


def _heads(model, variables, crops, rng, train: bool) -> jax.Array:
  """The head outputs of crops uint8 [B, n, h, w, C]: float32 [B, n, K]."""
  b, n = crops.shape[:2]
  flat = targets.images_to_float(crops).reshape(b * n, *crops.shape[2:])
  return model.apply(variables, flat, train=train, rngs={"dropout": rng}).reshape(b, n, -1)


def loss(params, state, batch, rng, *, model, student_temp: float, teacher_temp, train: bool):
  """DINO's loss of a batch, in the train step's form.

  Args:
    state: the TrainState; its `objective_state` holds 'teacher' (variables like
      `params`) and 'centre' float32 [K], its `step` the updates done.
    batch: 'global' uint8 [B, 2, S, S, C]; optionally 'local' uint8 [B, L, s, s, C].
    teacher_temp: `step -> temperature` (`teacher_temperature`).
  Returns:
    (loss, metrics): 'loss'; 'teacher_entropy', the mean entropy of the teacher's
    sharpened distributions (0: each image on one output, log K: uniform, both
    collapses); and under train_step.STATS_KEY 'teacher_mean', float32 [K], the
    mean of the teacher's outputs over the batch's global crops.
  """
  teacher_vars, centre = state.objective_state["teacher"], state.objective_state["centre"]
  global_rng, local_rng = jax.random.split(rng)
  student = [_heads(model, params, batch[GLOBAL], global_rng, train)]
  if LOCAL in batch:
    student.append(_heads(model, params, batch[LOCAL], local_rng, train))
  # The teacher runs without stochastic depth, as DINO's (built without it).
  teacher = _heads(model, jax.lax.stop_gradient(teacher_vars), batch[GLOBAL], rng, False)
  value, q = cross_entropy(
    jnp.concatenate(student, axis=1),
    teacher,
    centre,
    student_temp=student_temp,
    teacher_temp=teacher_temp(state.step),
  )
  entropy = -jnp.mean(jnp.sum(q * jnp.log(jnp.maximum(q, 1e-30)), axis=-1))
  stats = {"teacher_mean": jnp.mean(teacher, axis=(0, 1))}
  return value, {"loss": value, "teacher_entropy": entropy, train_step.STATS_KEY: stats}


def init_state(params, *, out_dim: int) -> dict[str, Any]:
  """The teacher starts as a copy of the student, the centre at zero."""
  return {
    "teacher": jax.tree.map(jnp.copy, params),
    "centre": jnp.zeros((out_dim,), jnp.float32),
  }


def update_state(objective_state, params, stats, step, *, momentum, centre_momentum: float):
  """The EMA teacher (momentum `momentum(step)`) towards the updated student, and
  the centre towards the batch's mean teacher output (`stats['teacher_mean']`)."""
  m = momentum(step)
  teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, objective_state["teacher"], params)
  centre = (
    centre_momentum * objective_state["centre"] + (1.0 - centre_momentum) * stats["teacher_mean"]
  )
  return {"teacher": teacher, "centre": centre}


def last_layer_mask(params):
  """True at the head's weight-normalised last layer (kernel and scale)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "last_layer" in {getattr(k, "key", None) for k in path}, params
  )


def build_step_parts(
  config, model, grid: tuple[int, int], *, total_steps: int, steps_per_epoch: float
) -> train_step.StepParts:
  """DINO's loss, its teacher and centre, and its frozen last layer, for a run of
  `total_steps` updates of `steps_per_epoch` per epoch."""
  del grid
  d = config.dino
  freeze_steps = optim.schedule_steps(
    d.freeze_last_layer_epochs,
    d.freeze_last_layer_fraction,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
  )
  return train_step.StepParts(
    loss=functools.partial(
      loss,
      model=model,
      student_temp=d.student_temp,
      teacher_temp=teacher_temperature(
        config, total_steps=total_steps, steps_per_epoch=steps_per_epoch
      ),
    ),
    init_objective_state=functools.partial(init_state, out_dim=d.out_dim),
    update_objective_state=functools.partial(
      update_state,
      momentum=teacher_momentum(config, total_steps),
      centre_momentum=d.centre_momentum,
    ),
    wrap_optimizer=lambda optimizer: optim.hold_still(optimizer, last_layer_mask, freeze_steps),
  )
