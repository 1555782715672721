"""The pre-training objectives, chosen by `config.objective`.

One module per objective (`splitmask`, `beit`, and the pixel baselines `mae`,
`simmim`), the parts they share in `targets` (the model's input, target visual words,
token accuracy) and `pixels` (pixel targets and losses). An objective module
provides `MODEL_INPUTS` (the keys of its masks that the model reads),
`DEFAULT_MASK_RATIO` (its paper's ratio, used when `config.masking.ratio` is None),
`USES_TOKENIZER` (whether its targets are visual words of the run's codebook),
`build_model`, `build_loss_fn` and `make_mask_fn` (and `EVALUATED_STATE_KEY` when
its run is judged by other variables than the trained ones); adding one is a new
module and one entry in `OBJECTIVES`. The functions below dispatch on `config.objective`.

An objective that needs more than a loss of the codebook (`dino`: an EMA teacher and
a centre carried from step to step, schedules over the run, several views of each
image) provides `build_step_parts` in place of `build_loss_fn` (see
`build_step_parts`), and `make_views_fn` when its batches hold views instead of one
image (`make_views_fn`); its `make_mask_fn` may return None (no masks).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from splitmask_jax import train_step
from splitmask_jax.data import input_pipeline
from splitmask_jax.models import vit
from splitmask_jax.objectives import beit
from splitmask_jax.objectives import dino
from splitmask_jax.objectives import mae
from splitmask_jax.objectives import simmim
from splitmask_jax.objectives import splitmask
from splitmask_jax.objectives.targets import images_to_float
from splitmask_jax.runtime import sharding

OBJECTIVES: dict[str, ModuleType] = {
  "splitmask": splitmask,
  "beit": beit,
  "mae": mae,
  "simmim": simmim,
  "dino": dino,
}

# `loss_fn(params, batch, codebook, rng, *, train) -> (loss, metrics)`.
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

__all__ = [
  "OBJECTIVES",
  "LossFn",
  "build_loss_fn",
  "build_model",
  "build_step_parts",
  "example_inputs",
  "get",
  "images_to_float",
  "make_mask_fn",
  "make_views_fn",
  "mask_ratio",
  "step_loss",
]


def get(name: str) -> ModuleType:
  """The module of objective `name`; raises ValueError naming the allowed ones."""
  if name not in OBJECTIVES:
    raise ValueError(
      f"config.objective={name!r} is invalid: allowed values are {tuple(OBJECTIVES)}."
    )
  return OBJECTIVES[name]


def mask_ratio(config) -> float | None:
  """`config.masking.ratio`, or when it is None the objective's own default
  (None for an objective that masks nothing)."""
  if config.masking.ratio is not None:
    return config.masking.ratio
  return get(config.objective).DEFAULT_MASK_RATIO


def evaluated_state_key(config) -> str | None:
  """The key of `TrainState.objective_state` holding the variables a pre-training run
  is evaluated with (k-NN, probes, fine-tuning, export): DINO's 'teacher'; None for
  the trained parameters themselves (every other objective, any downstream run).

  Args:
    config: the run's config, a ConfigDict or its saved config.json as a dict.
  """
  if config.get("task", "pretrain") != "pretrain":
    return None
  return getattr(get(config.get("objective", "splitmask")), "EVALUATED_STATE_KEY", None)


def evaluated_params(config, params, objective_state):
  """The variables a run is evaluated with (see `evaluated_state_key`), from its
  TrainState's `params` and `objective_state`."""
  key = evaluated_state_key(config)
  return params if key is None else objective_state[key]


def build_model(config, grid: tuple[int, int], platform: str | None = None):
  """The pre-training model of `config.objective` (not yet initialised).

  Args:
    platform: where it will run ('cpu', 'gpu', 'tpu'; default: JAX's default
      backend), which decides the attention kernel of `config.model.attention`.
  """
  arch, patch = vit.parse_variant(config.model.variant)
  common = dict(
    arch,
    patch_size=patch,
    grid=grid,
    vocab_size=config.tokenizer.vocab_size,
    drop_path_rate=config.model.drop_path,
    dtype=jnp.dtype(config.model.dtype),
    **vit.block_options(config.model, platform or sharding.default_platform()),
  )
  return get(config.objective).build_model(config, **common)


def build_loss_fn(config, model, grid: tuple[int, int]) -> LossFn:
  """`loss_fn(params, batch, codebook, rng, train=...) -> (loss, metrics)`."""
  module = get(config.objective)
  if not hasattr(module, "build_loss_fn"):
    raise ValueError(
      f"config.objective={config.objective!r} carries a state from step to step: its loss "
      "comes from objectives.build_step_parts, in the train step's form."
    )
  return module.build_loss_fn(config, model, grid)


def build_step_parts(
  config, model, grid: tuple[int, int], *, total_steps: int, steps_per_epoch: float
) -> train_step.StepParts:
  """The objective's part of the train step for a run of `total_steps` updates of
  `steps_per_epoch` per epoch: its loss in the step's form and, for an objective
  with a state (DINO), that state's initialisation and update and its change to
  the optimizer. The others' are `step_loss(build_loss_fn(...))` alone."""
  module = get(config.objective)
  if hasattr(module, "build_step_parts"):
    return module.build_step_parts(
      config, model, grid, total_steps=total_steps, steps_per_epoch=steps_per_epoch
    )
  return train_step.StepParts(loss=step_loss(build_loss_fn(config, model, grid)))


def make_mask_fn(
  config, grid: tuple[int, int]
) -> Callable[[np.random.Generator], dict[str, np.ndarray]] | None:
  """`fn(rng) -> masks of one image`, drawn on the host by the input pipeline; None
  for an objective that masks nothing."""
  return get(config.objective).make_mask_fn(config, grid)


def make_views_fn(config) -> input_pipeline.ViewsFn | None:
  """`fn(image, rng) -> views of one image` (DINO's multi-crop), drawn on the host in
  place of the single crop; None for an objective that reads one image."""
  module = get(config.objective)
  return module.make_views_fn(config) if hasattr(module, "make_views_fn") else None


def step_loss(loss_fn: LossFn):
  """The train step's form of a loss: `(params, state, batch, rng, *, train)`,
  reading the codebook from the train state."""

  def loss(params, state, batch, rng, *, train: bool):
    return loss_fn(params, batch, state.codebook, rng, train=train)

  return loss


def example_inputs(config, example_masks: dict) -> tuple:
  """Positional model inputs with a batch of one, for initialisation.

  Args:
    example_masks: one example's output of the mask function ({} without one).
  """
  size, channels = config.model.image_size, config.model.num_channels
  images = jnp.zeros((1, size, size, channels), jnp.float32)
  keys = get(config.objective).MODEL_INPUTS
  return (images,) + tuple(jnp.asarray(example_masks[k])[None] for k in keys)
