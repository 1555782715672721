"""BEiT: one encoder pass over every patch, masked ones replaced by a learned [MASK]
embedding, and cross-entropy on the visual words of the masked patches."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from splitmask_jax import losses
from splitmask_jax import masking
from splitmask_jax.models import pretrain
from splitmask_jax.objectives import targets

# The masks of `masking.make_mask_fn('beit', ...)` the model reads, in its argument order.
MODEL_INPUTS = ("mask", "masked")

# BEiT's 75 of 196 patches (40% in its paper, rounded to its exact count).
DEFAULT_MASK_RATIO = 75 / 196
# Targets are visual words of the run's codebook.
USES_TOKENIZER = True


def loss(params, batch, codebook, rng, *, model, grid, token_patch, train: bool):
  """BEiT: cross-entropy on the masked patches' tokens.

  Args:
    batch: image uint8 [B, H, W, C]; mask bool [B, N]; masked int32 [B, m].
  """
  images = targets.images_to_float(batch["image"])
  out = model.apply(
    params, images, *(batch[k] for k in MODEL_INPUTS), train=train, rngs={"dropout": rng}
  )
  tokens = targets.target_tokens(images, codebook, grid, token_patch, batch["masked"])
  value = losses.token_cross_entropy(out["logits"], tokens)
  return value, {
    "loss": value,
    "inpaint_loss": value,
    "inpaint_acc": targets.token_accuracy(out["logits"], tokens),
  }


def build_model(config, **common) -> pretrain.BEiTModel:
  """The BEiT model; `common` holds the keys every objective's model takes."""
  del config  # BEiT has no keys of its own
  return pretrain.BEiTModel(**common)


def build_loss_fn(config, model, grid: tuple[int, int]):
  """`loss_fn(params, batch, codebook, rng, train=...) -> (loss, metrics)`."""
  return functools.partial(loss, model=model, grid=grid, token_patch=config.tokenizer.patch_size)


def make_mask_fn(
  config, grid: tuple[int, int]
) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
  """BEiT's block mask of one image: which patches become [MASK]."""
  m = config.masking
  ratio = DEFAULT_MASK_RATIO if m.ratio is None else m.ratio
  return masking.make_mask_fn(
    "beit", grid, ratio, kind=m.kind, min_block=m.min_block, max_block=m.max_block
  )
