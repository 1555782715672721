"""The pre-training objectives, chosen by `config.objective`.

One module per objective (`splitmask`, `beit`), the part they share in `targets`
(the model's input, target visual words, token accuracy). An objective module
provides `MODEL_INPUTS` (the keys of its masks that the model reads), `build_model`,
`build_loss_fn` and `make_mask_fn`; adding one is a new module and one entry in
`OBJECTIVES`. The functions below dispatch on `config.objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from splitmask_jax.models import vit
from splitmask_jax.objectives import beit
from splitmask_jax.objectives import splitmask
from splitmask_jax.objectives.targets import images_to_float
from splitmask_jax.runtime import sharding

OBJECTIVES: dict[str, ModuleType] = {"splitmask": splitmask, "beit": beit}

# `loss_fn(params, batch, codebook, rng, *, train) -> (loss, metrics)`.
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

__all__ = [
  "OBJECTIVES",
  "LossFn",
  "build_loss_fn",
  "build_model",
  "example_inputs",
  "get",
  "images_to_float",
  "make_mask_fn",
  "step_loss",
]


def get(name: str) -> ModuleType:
  """The module of objective `name`; raises ValueError naming the allowed ones."""
  if name not in OBJECTIVES:
    raise ValueError(
      f"config.objective={name!r} is invalid: allowed values are {tuple(OBJECTIVES)}."
    )
  return OBJECTIVES[name]


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
  return get(config.objective).build_loss_fn(config, model, grid)


def make_mask_fn(
  config, grid: tuple[int, int]
) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
  """`fn(rng) -> masks of one image`, drawn on the host by the input pipeline."""
  return get(config.objective).make_mask_fn(config, grid)


def step_loss(loss_fn: LossFn):
  """The train step's form of a loss: `(params, state, batch, rng, *, train)`,
  reading the codebook from the train state."""

  def loss(params, state, batch, rng, *, train: bool):
    return loss_fn(params, batch, state.codebook, rng, train=train)

  return loss


def example_inputs(config, example_masks: dict) -> tuple:
  """Positional model inputs with a batch of one, for initialisation.

  Args:
    example_masks: one example's output of the mask function.
  """
  size, channels = config.model.image_size, config.model.num_channels
  images = jnp.zeros((1, size, size, channels), jnp.float32)
  keys = get(config.objective).MODEL_INPUTS
  return (images,) + tuple(jnp.asarray(example_masks[k])[None] for k in keys)
