"""Patch-level tokenizers without a learned network (paper section 3.3, eq. 1).

A codebook holds V unit vectors e_i in R^d; a patch x gets the token
argmax_i cos(x, e_i). Tokens are computed on a lower-resolution "tokenizer
view" of the image whose token grid equals the ViT patch grid: the view is
`grid * token_patch` pixels per side (112 px with 8x8 token patches for a
224 px image and 16 px ViT patches), so d = token_patch**2 * channels.

Three codebooks: random projection (uniform random vectors), random patches
(patches sampled from the training set) and k-means (spherical k-means
centroids of training patches).
"""

import numbers

import jax
import jax.numpy as jnp

from splitmask_jax import kmeans

CODEBOOK_KINDS = ("random_projection", "random_patches", "kmeans")


def codebook_dim(token_patch: int, channels: int) -> int:
  """Dimension d of a tokenizer patch: token_patch**2 * channels."""
  _check_positive_int("token_patch", token_patch)
  _check_positive_int("channels", channels)
  return token_patch * token_patch * channels


def tokenizer_patches(images: jax.Array, grid: tuple[int, int], token_patch: int) -> jax.Array:
  """Cuts the tokenizer view of a batch of images into flattened patches.

  The images are resized to (gh * token_patch, gw * token_patch) pixels
  (`jax.image.resize`, linear, antialiased; skipped when the size already
  matches), then cut into non-overlapping token_patch x token_patch patches,
  row-major over the grid, each flattened in (row, col, channel) order.

  Args:
    images: float array [B, H, W, C] (pixel values in [-1, 1]).
    grid: (gh, gw), the ViT patch grid.
    token_patch: side of a tokenizer patch in pixels of the tokenizer view.

  Returns:
    float32 array [B, gh * gw, token_patch**2 * C].
  """
  if getattr(images, "ndim", None) != 4:
    raise ValueError(
      f"images must be a 4-D array [B, H, W, C], got shape {getattr(images, 'shape', None)}."
    )
  if len(grid) != 2:
    raise ValueError(f"grid must be a pair (gh, gw), got {grid!r}.")
  gh, gw = grid
  _check_positive_int("grid[0]", gh)
  _check_positive_int("grid[1]", gw)
  _check_positive_int("token_patch", token_patch)
  b, h, w, c = images.shape
  p = token_patch
  images = jnp.asarray(images, jnp.float32)
  if (h, w) != (gh * p, gw * p):
    images = jax.image.resize(images, (b, gh * p, gw * p, c), method="linear", antialias=True)
  patches = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(b, gh * gw, p * p * c)


def tokenize(patches: jax.Array, codebook: jax.Array) -> jax.Array:
  """Token of each patch: the codebook row of highest cosine similarity.

  The codebook rows are unit vectors, and a patch's norm scales all its
  similarities by one positive factor, so the argmax of the float32 dot product
  (at HIGHEST precision) is the argmax of the cosine with no normalisation of
  the patches. A zero patch has no direction; it scores 0 against every row and
  gets token 0, deterministically.

  Memory: one float32 [N, V] similarity matrix for N patches in total.

  Args:
    patches: float array [..., d].
    codebook: float32 array [V, d], unit-norm rows.

  Returns:
    int32 array [...] of tokens in [0, V).
  """
  if getattr(codebook, "ndim", None) != 2:
    raise ValueError(
      f"codebook must be a 2-D array [V, d], got shape {getattr(codebook, 'shape', None)}."
    )
  if patches.shape[-1:] != codebook.shape[1:]:
    raise ValueError(
      f"patches must end in the codebook dimension d={codebook.shape[1]}, "
      f"got shape {patches.shape}."
    )
  flat = patches.reshape(-1, codebook.shape[1])
  return kmeans.nearest(flat, codebook).reshape(patches.shape[:-1])


def random_projection_codebook(key: jax.Array, vocab_size: int, dim: int) -> jax.Array:
  """V vectors with i.i.d. U[-1, 1] components, normalised.

  [-1, 1] rather than [0, 1] because patches are centred in [-1, 1]; a
  positive-only codebook would cover one orthant of the patch space.

  Args:
    key: PRNG key.
    vocab_size: V.
    dim: d.

  Returns:
    float32 array [V, d] with unit-norm rows.
  """
  _check_positive_int("vocab_size", vocab_size)
  _check_positive_int("dim", dim)
  vectors = jax.random.uniform(key, (vocab_size, dim), jnp.float32, minval=-1.0, maxval=1.0)
  return kmeans.unit_rows(vectors)


def random_patches_codebook(key: jax.Array, patches: jax.Array, vocab_size: int) -> jax.Array:
  """V patches drawn uniformly without replacement from a sample, normalised.

  Args:
    key: PRNG key.
    patches: float array [M, d] of training patches, M >= vocab_size.
    vocab_size: V.

  Returns:
    float32 array [V, d], unit-norm rows (a zero patch gives a zero row).
  """
  _check_sample(patches, vocab_size)
  idx = jax.random.choice(key, patches.shape[0], (vocab_size,), replace=False)
  return kmeans.unit_rows(jnp.asarray(patches)[idx])


def kmeans_codebook(
  key: jax.Array, patches: jax.Array, vocab_size: int, *, num_iters: int, chunk_size: int = 4096
) -> jax.Array:
  """Spherical k-means centroids of a sample of patches.

  Args:
    key: PRNG key.
    patches: float array [M, d] of training patches, M >= vocab_size.
    vocab_size: V, the number of clusters.
    num_iters: k-means iterations.
    chunk_size: patches per assignment chunk (bounds memory to
      O(chunk_size * V)).

  Returns:
    float32 array [V, d], unit-norm rows.
  """
  _check_sample(patches, vocab_size)
  centroids, _ = kmeans.fit_spherical_kmeans(
    key, patches, vocab_size, num_iters=num_iters, chunk_size=chunk_size
  )
  return centroids


def build_codebook(
  kind: str,
  key: jax.Array,
  *,
  vocab_size: int,
  dim: int,
  patches: jax.Array | None = None,
  kmeans_iters: int = 20,
) -> jax.Array:
  """Builds a codebook of the given kind.

  Args:
    kind: one of 'random_projection', 'random_patches', 'kmeans'.
    key: PRNG key.
    vocab_size: V.
    dim: d, the tokenizer patch dimension (see `codebook_dim`).
    patches: float array [M, d] of training patches; required by
      'random_patches' and 'kmeans', ignored by 'random_projection'.
    kmeans_iters: k-means iterations (kind 'kmeans' only).

  Returns:
    float32 array [V, d] with unit-norm rows.
  """
  if kind not in CODEBOOK_KINDS:
    raise ValueError(f"kind must be one of {CODEBOOK_KINDS}, got {kind!r}.")
  if kind == "random_projection":
    return random_projection_codebook(key, vocab_size, dim)
  if patches is None:
    raise ValueError(f"patches are required for kind={kind!r}, got None.")
  if getattr(patches, "ndim", None) != 2 or patches.shape[1] != dim:
    raise ValueError(
      f"patches must have shape [M, dim={dim}], got {getattr(patches, 'shape', None)}."
    )
  if kind == "random_patches":
    return random_patches_codebook(key, patches, vocab_size)
  return kmeans_codebook(key, patches, vocab_size, num_iters=kmeans_iters)


def _check_positive_int(name, value):
  if not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_sample(patches, vocab_size):
  _check_positive_int("vocab_size", vocab_size)
  if getattr(patches, "ndim", None) != 2:
    raise ValueError(
      f"patches must be a 2-D array [M, d], got shape {getattr(patches, 'shape', None)}."
    )
  if patches.shape[0] < vocab_size:
    raise ValueError(
      f"patches must hold at least vocab_size={vocab_size} rows, got M={patches.shape[0]}."
    )
