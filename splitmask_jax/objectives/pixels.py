"""What the pixel-predicting objectives (MAE, SimMIM) share: patch pixels as targets,
MAE's per-patch normalisation and its inverse, and the two regression losses.

Pixels are in the model's input space (`targets.images_to_float`, [-1, 1]) and a
patch is flattened as `vit.patchify` flattens it: (row, col, channel) order, so a
prediction of p * p * C values per patch is the patch itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from splitmask_jax.models import vit

# MAE's epsilon under the square root of a patch's variance: a flat patch (the black
# background of Fashion-MNIST) normalises to zeros instead of dividing by zero.
NORM_EPS = 1e-6


def patch_pixels(images: jax.Array, patch_size: int, positions: jax.Array) -> jax.Array:
  """The pixels of the patches at `positions`.

  Args:
    images: float [B, H, W, C] in [-1, 1].
    positions: int32 [B, m], row-major over the patch grid.
  Returns:
    float32 [B, m, patch_size**2 * C].
  """
  patches = vit.patchify(images.astype(jnp.float32), patch_size)
  return vit.gather_tokens(patches, positions)


def patch_statistics(patches: jax.Array, eps: float = NORM_EPS) -> tuple[jax.Array, jax.Array]:
  """Each patch's mean and the square root of its variance plus `eps`.

  The variance is the unbiased one (over d - 1), as MAE computes it (torch's
  default `var`).

  Args:
    patches: float [..., d], d >= 2.
  Returns:
    (mean, std): float32 [..., 1] each.
  """
  patches = patches.astype(jnp.float32)
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
  return mean, jnp.sqrt(var + eps)


def normalize_patches(patches: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """MAE's `norm_pix_loss` target: each patch minus its mean, over its std.

  Args:
    patches: float [..., d].
  Returns:
    float32 [..., d].
  """
  mean, std = patch_statistics(patches, eps)
  return (patches.astype(jnp.float32) - mean) / std


def denormalize_patches(predicted: jax.Array, patches: jax.Array, eps: float = NORM_EPS):
  """The inverse of `normalize_patches` for a prediction of normalised pixels: back to
  pixels with the statistics of the true `patches` (for pictures only; the model
  never sees them).

  Args:
    predicted, patches: float [..., d].
  Returns:
    float32 [..., d].
  """
  mean, std = patch_statistics(patches, eps)
  return predicted.astype(jnp.float32) * std + mean


def mean_squared_error(predicted: jax.Array, target: jax.Array) -> jax.Array:
  """MAE's loss: the mean over patches of each patch's mean squared error.

  Every example holds the same number of masked patches, so this is MAE's sum
  over masked patches divided by their count.

  Args:
    predicted, target: float [B, m, d].
  Returns:
    float32 scalar.
  """
  _check_shapes(predicted, target)
  diff = predicted.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


def mean_absolute_error(predicted: jax.Array, target: jax.Array) -> jax.Array:
  """SimMIM's loss: the mean absolute error over the masked pixels (and channels).

  Args:
    predicted, target: float [B, m, d].
  Returns:
    float32 scalar.
  """
  _check_shapes(predicted, target)
  return jnp.mean(jnp.abs(predicted.astype(jnp.float32) - target.astype(jnp.float32)))


def _check_shapes(predicted, target):
  if predicted.shape != target.shape or predicted.ndim != 3:
    raise ValueError(
      f"predicted and target must both be [B, m, d], got {predicted.shape} and {target.shape}"
    )
