"""SimMIM (Xie et al. 2021), the objective of the data-scaling study (seed 002): one
encoder pass over every patch, masked ones replaced by a learned [MASK] embedding (as
BEiT's), one linear layer predicting each masked patch's pixels, L1 loss on the masked
pixels only.

The mask hides random squares of `config.simmim.mask_patch_size` pixels, coarser than
the ViT patch (SimMIM: 32 px squares on 16 px patches, 60% of them); `square_mask`
draws it, since BEiT's and MAE's generators work on the patch grid itself.

No tokenizer: the targets are the image's pixels in the model's input space
([-1, 1]), so the run's codebook is never read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from splitmask_jax.models import pretrain
from splitmask_jax.models import vit
from splitmask_jax.objectives import pixels
from splitmask_jax.objectives import targets

# The masks of `make_mask_fn` the model reads, in its argument order (BEiT's).
MODEL_INPUTS = ("mask", "masked")

# SimMIM's 60% of the squares.
DEFAULT_MASK_RATIO = 0.6
# Targets are pixels: no codebook is built.
USES_TOKENIZER = False


def loss(params, batch, codebook, rng, *, model, patch_size: int, train: bool):
  """SimMIM: mean absolute error on the pixels of the masked patches.

  Args:
    batch: image uint8 [B, H, W, C]; mask bool [B, N]; masked int32 [B, m].
    codebook: unused (the train state's placeholder).
  Returns:
    (loss, metrics): the loss is the mean over masked patches and their
    patch_size**2 * C values of |prediction - pixel|.
  """
  del codebook
  images = targets.images_to_float(batch["image"])
  out = model.apply(
    params, images, *(batch[k] for k in MODEL_INPUTS), train=train, rngs={"dropout": rng}
  )
  value = pixels.mean_absolute_error(
    out["pixels"], pixels.patch_pixels(images, patch_size, batch["masked"])
  )
  return value, {"loss": value}


def build_model(config, **common) -> pretrain.SimMIMModel:
  """The SimMIM model; `common` holds the keys every objective's model takes (its
  `vocab_size` is the unused codebook's)."""
  common.pop("vocab_size")
  return pretrain.SimMIMModel(num_channels=config.model.num_channels, **common)


def build_loss_fn(config, model, grid: tuple[int, int]):
  """`loss_fn(params, batch, codebook, rng, train=...) -> (loss, metrics)`."""
  del config, grid
  return functools.partial(loss, model=model, patch_size=model.patch_size)


def square_mask(
  rng: np.random.Generator, grid: tuple[int, int], square: int, num_squares: int
) -> np.ndarray:
  """SimMIM's mask: `num_squares` cells of the grid of `square` x `square` patches,
  drawn uniformly without replacement, each masking all of its patches.

  Args:
    rng: the only source of randomness.
    grid: (gh, gw) ViT patch grid, both multiples of `square`.
    square: side of a mask square in patches.
    num_squares: squares to mask, in [0, (gh / square) * (gw / square)].
  Returns:
    bool [gh * gw], row-major; num_squares * square**2 cells set.
  """
  rows, cols = grid[0] // square, grid[1] // square
  if rows * square != grid[0] or cols * square != grid[1]:
    raise ValueError(f"grid {grid} is not a whole grid of {square}x{square} squares")
  if not 0 <= num_squares <= rows * cols:
    raise ValueError(f"num_squares must be in [0, {rows * cols}], got {num_squares}")
  coarse = np.zeros(rows * cols, dtype=bool)
  coarse[rng.choice(rows * cols, size=num_squares, replace=False)] = True
  cells = coarse.reshape(rows, cols).repeat(square, axis=0).repeat(square, axis=1)
  return cells.reshape(-1)


def mask_squares(config) -> tuple[int, int]:
  """(square side in patches, squares masked) of a SimMIM config.

  SimMIM masks ceil(ratio * squares) of them (30 of 49 at 224 px).

  Raises:
    ValueError: naming the key, for a square that is not a multiple of the ViT
      patch or does not tile the image, a masking.kind other than 'uniform', or a
      ratio that masks no square or every one.
  """
  _, patch = vit.parse_variant(config.model.variant)
  size, side = config.model.image_size, config.simmim.mask_patch_size
  if side <= 0 or side % patch or size % side:
    raise ValueError(
      f"config.simmim.mask_patch_size={side!r} is invalid: it must be a positive multiple of "
      f"the ViT patch size {patch} (model.variant={config.model.variant!r}) that divides "
      f"model.image_size={size}."
    )
  if config.masking.kind != "uniform":
    raise ValueError(
      f"config.masking.kind={config.masking.kind!r} is invalid: SimMIM draws its squares "
      "uniformly; the allowed value is 'uniform' (the squares are the blocks)."
    )
  ratio = DEFAULT_MASK_RATIO if config.masking.ratio is None else config.masking.ratio
  total = (size // side) ** 2
  # Rounded first, so that e.g. 0.7 * 10 = 7.000000000000001 masks 7 squares, not 8.
  count = math.ceil(round(ratio * total, 9))
  if not 0 < count < total:
    raise ValueError(
      f"config.masking.ratio={ratio!r} is invalid: SimMIM masks ceil(ratio * {total}) of the "
      f"{total} squares of {side} px, which must leave at least one square seen and mask "
      "at least one."
    )
  return side // patch, count


def make_mask_fn(
  config, grid: tuple[int, int]
) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
  """SimMIM's mask of one image (`square_mask`, `mask_squares`).

  Returns:
    fn(rng) -> {'mask': bool [N], 'masked': int32 [m], its sorted indices}, with
    m = squares masked * square**2.
  """
  square, count = mask_squares(config)

  def mask_fn(rng: np.random.Generator) -> dict[str, np.ndarray]:
    mask = square_mask(rng, grid, square, count)
    return {"mask": mask, "masked": np.flatnonzero(mask).astype(np.int32)}

  return mask_fn
