"""MAE (He et al. 2021): the encoder sees a random quarter of the patches, a light
decoder predicts the pixels of the rest, mean squared error on the masked patches,
each target patch normalised by its own mean and variance (`config.mae.norm_pix_loss`).

No tokenizer: the targets are the image's pixels in the model's input space
([-1, 1]), so the run's codebook is never read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from splitmask_jax import masking
from splitmask_jax.models import pretrain
from splitmask_jax.objectives import pixels
from splitmask_jax.objectives import targets

# The masks of `make_mask_fn` the model reads, in its argument order.
MODEL_INPUTS = ("visible", "masked")

# MAE's 75% of the patches hidden from the encoder.
DEFAULT_MASK_RATIO = 0.75
# Targets are pixels: no codebook is built.
USES_TOKENIZER = False


def loss(params, batch, codebook, rng, *, model, patch_size: int, norm_pix_loss: bool, train: bool):
  """MAE: mean squared error on the pixels of the masked patches.

  Args:
    batch: image uint8 [B, H, W, C]; visible int32 [B, n]; masked int32 [B, m].
    codebook: unused (the train state's placeholder).
  Returns:
    (loss, metrics): the loss is the mean over masked patches and their
    patch_size**2 * C values; with norm_pix_loss the targets are normalised
    patches (`pixels.normalize_patches`).
  """
  del codebook
  images = targets.images_to_float(batch["image"])
  out = model.apply(
    params, images, *(batch[k] for k in MODEL_INPUTS), train=train, rngs={"dropout": rng}
  )
  target = pixels.patch_pixels(images, patch_size, batch["masked"])
  if norm_pix_loss:
    target = pixels.normalize_patches(target)
  value = pixels.mean_squared_error(out["pixels"], target)
  return value, {"loss": value}


def build_model(config, **common) -> pretrain.MAEModel:
  """The MAE model; `common` holds the keys every objective's model takes (its
  `vocab_size` is the unused codebook's)."""
  common.pop("vocab_size")
  m = config.mae
  return pretrain.MAEModel(
    num_channels=config.model.num_channels,
    decoder_width=m.decoder_width,
    decoder_depth=m.decoder_depth,
    decoder_num_heads=m.decoder_num_heads,
    **common,
  )


def build_loss_fn(config, model, grid: tuple[int, int]):
  """`loss_fn(params, batch, codebook, rng, train=...) -> (loss, metrics)`."""
  del grid
  return functools.partial(
    loss, model=model, patch_size=model.patch_size, norm_pix_loss=config.mae.norm_pix_loss
  )


def make_mask_fn(
  config, grid: tuple[int, int]
) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
  """Which patches of one image the encoder sees: `config.masking.kind` ('uniform' in
  MAE; 'block', BEiT's blocks, is MAE's block-wise ablation) hides round(ratio * N).

  Returns:
    fn(rng) -> {'visible': int32 [N - m], 'masked': int32 [m]}, sorted indices.
  """
  m = config.masking
  ratio = DEFAULT_MASK_RATIO if m.ratio is None else m.ratio
  hide = masking.make_mask_fn(
    "beit", grid, ratio, kind=m.kind, min_block=m.min_block, max_block=m.max_block
  )

  def mask_fn(rng: np.random.Generator) -> dict[str, np.ndarray]:
    mask = hide(rng)["mask"]
    return {
      "visible": np.flatnonzero(~mask).astype(np.int32),
      "masked": np.flatnonzero(mask).astype(np.int32),
    }

  return mask_fn
