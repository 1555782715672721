"""What the token-predicting objectives share: the model's input, the target visual
words of patches, and token accuracy.

The tokenizer is a fixed codebook, so tokenizing on the device is one matmul and an
argmax inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from splitmask_jax import tokenizers


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 in [-1, 1], the model's and tokenizer's input."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def token_accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Share of positions whose argmax word is the target: logits [..., V], targets int [...]."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))


def target_tokens(
  images: jax.Array,
  codebook: jax.Array,
  grid: tuple[int, int],
  token_patch: int,
  positions: jax.Array,
) -> jax.Array:
  """Visual words of the patches at `positions`.

  Args:
    images: float [B, H, W, C] in [-1, 1].
    codebook: float32 [V, d] unit rows.
    grid: the ViT patch grid; the tokenizer reads one `token_patch` patch per cell.
    positions: int32 [B, m], row-major over the grid.
  Returns:
    int32 [B, m].
  """
  patches = tokenizers.tokenizer_patches(images, grid, token_patch)
  tokens = tokenizers.tokenize(patches, codebook)
  return jnp.take_along_axis(tokens, positions, axis=1)
