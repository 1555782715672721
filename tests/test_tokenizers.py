"""Tests for splitmask_jax.tokenizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitmask_jax import tokenizers


def _reference_tokens(patches, codebook):
  """Float64 argmax of cosine similarity, and the top-1/top-2 margin."""
  x = np.asarray(patches, np.float64).reshape(-1, codebook.shape[1])
  e = np.asarray(codebook, np.float64)
  cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
    e / np.linalg.norm(e, axis=1, keepdims=True)
  ).T
  top2 = np.sort(cos, axis=1)[:, -2:]
  shape = np.shape(patches)[:-1]
  return (np.argmax(cos, axis=1).reshape(shape), (top2[:, 1] - top2[:, 0]).reshape(shape))


def _patches_reference(images, p):
  b, h, w, c = images.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c), images.dtype)
  for i in range(h // p):
    for j in range(w // p):
      block = images[:, i * p : (i + 1) * p, j * p : (j + 1) * p, :]
      out[:, i * (w // p) + j] = block.reshape(b, -1)  # (row, col, channel)
  return out


@pytest.mark.parametrize(
  "grid,token_patch,channels", [((2, 3), 4, 3), ((4, 4), 2, 1), ((3, 2), 8, 3)]
)
def test_tokenizer_patches_without_resize(grid, token_patch, channels):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, grid[0] * token_patch, grid[1] * token_patch, channels)).astype(
    np.float32
  )
  got = tokenizers.tokenizer_patches(images, grid, token_patch)
  assert got.dtype == jnp.float32
  assert got.shape == (2, grid[0] * grid[1], tokenizers.codebook_dim(token_patch, channels))
  np.testing.assert_array_equal(np.asarray(got), _patches_reference(images, token_patch))


@pytest.mark.parametrize(
  "size,grid,token_patch",
  [
    (28, (7, 7), 2),  # downsample 28 -> 14
    (28, (7, 7), 8),  # upsample 28 -> 56
    (32, (4, 2), 4),
  ],
)  # anisotropic 32x32 -> 16x8
def test_tokenizer_patches_resize_shape_and_constant(size, grid, token_patch):
  images = np.stack([np.full((size, size, 3), v, np.float32) for v in (-1.0, 0.25, 1.0)])
  got = np.asarray(tokenizers.tokenizer_patches(images, grid, token_patch))
  assert got.shape == (3, grid[0] * grid[1], token_patch**2 * 3)
  for i, v in enumerate((-1.0, 0.25, 1.0)):
    np.testing.assert_allclose(got[i], v, atol=1e-6)


def test_tokenizer_patches_resize_averages_down():
  # A 2x downsample of a fine checkerboard must smooth it towards its mean
  # (antialiasing), not alias it to one of the two colours.
  board = np.indices((16, 16)).sum(0) % 2 * 2.0 - 1.0
  images = board[None, :, :, None].astype(np.float32)
  got = np.asarray(tokenizers.tokenizer_patches(images, (4, 4), 2))
  assert np.abs(got).max() < 0.5


@pytest.mark.parametrize(
  "batch_shape,token_patch,channels,vocab",
  [((3, 16), 4, 3, 1024), ((64,), 8, 1, 512), ((2, 4, 9), 2, 1, 37), ((5, 49), 4, 1, 1024)],
)
def test_tokenize_matches_float64_reference(batch_shape, token_patch, channels, vocab):
  dim = tokenizers.codebook_dim(token_patch, channels)
  rng = np.random.default_rng(sum(batch_shape) + vocab)
  patches = rng.uniform(-1, 1, batch_shape + (dim,)).astype(np.float32)
  codebook = tokenizers.random_projection_codebook(jax.random.key(vocab), vocab, dim)
  got = np.asarray(tokenizers.tokenize(jnp.asarray(patches), codebook))
  want, margin = _reference_tokens(patches, np.asarray(codebook))
  assert got.dtype == np.int32 and got.shape == batch_shape
  clear = margin >= 1e-5
  assert clear.mean() > 0.95  # the comparison below is not vacuous
  np.testing.assert_array_equal(got[clear], want[clear])


def test_tokenize_on_image_patches_and_zero_patch():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (2, 28, 28, 1)) / 127.5 - 1.0
  images[0, :4, :4] = 0.0  # the first tokenizer patch of image 0 is all zero
  patches = np.array(tokenizers.tokenizer_patches(images, (7, 7), 4))
  codebook = tokenizers.random_projection_codebook(jax.random.key(3), 256, 16)
  got = np.asarray(tokenizers.tokenize(patches, codebook))
  assert got[0, 0] == 0  # deterministic, not an argmax over NaNs
  patches[0, 0] = 1.0  # any direction: keeps the reference free of 0/0
  want, margin = _reference_tokens(patches, np.asarray(codebook))
  clear = margin >= 1e-5
  clear[0, 0] = False
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(got[clear], want[clear])


def test_tokenize_jits_with_paper_vocabulary():
  codebook = tokenizers.random_projection_codebook(jax.random.key(0), 8192, 192)
  patches = jax.random.uniform(jax.random.key(1), (2, 14 * 14, 192), minval=-1, maxval=1)
  got = np.asarray(jax.jit(tokenizers.tokenize)(patches, codebook))
  want, margin = _reference_tokens(np.asarray(patches), np.asarray(codebook))
  clear = margin >= 1e-5
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(got[clear], want[clear])


def test_tokenize_rejects_dimension_mismatch():
  codebook = tokenizers.random_projection_codebook(jax.random.key(0), 8, 12)
  with pytest.raises(ValueError, match="patches"):
    tokenizers.tokenize(jnp.zeros((3, 10)), codebook)
  with pytest.raises(ValueError, match="codebook"):
    tokenizers.tokenize(jnp.zeros((3, 12)), codebook[0])


def _assert_unit_rows(codebook, vocab, dim):
  assert codebook.shape == (vocab, dim) and codebook.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(codebook), axis=1), 1.0, atol=1e-6)


def test_random_projection_codebook():
  key = jax.random.key(0)
  codebook = tokenizers.random_projection_codebook(key, 2000, 48)
  _assert_unit_rows(codebook, 2000, 48)
  np.testing.assert_array_equal(codebook, tokenizers.random_projection_codebook(key, 2000, 48))
  other = tokenizers.random_projection_codebook(jax.random.key(1), 2000, 48)
  assert not np.allclose(codebook, other)
  # Components symmetric around zero: both signs, mean near 0.
  values = np.asarray(codebook)
  assert abs(values.mean()) < 0.01 and values.min() < 0 < values.max()


def test_random_patches_codebook_draws_distinct_sample_members():
  rng = np.random.default_rng(0)
  sample = rng.uniform(-1, 1, (300, 12)).astype(np.float32)
  sample[7] = 0.0
  key = jax.random.key(4)
  codebook = np.asarray(tokenizers.random_patches_codebook(key, sample, 299))
  assert np.isfinite(codebook).all()
  unit_sample = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
  # Each row is a normalised sample member; together they are distinct members.
  dist = np.linalg.norm(codebook[:, None] - unit_sample[None], axis=-1)
  members = dist.argmin(1)
  np.testing.assert_allclose(dist.min(1), 0.0, atol=1e-6)
  assert len(set(members.tolist())) == 299
  norms = np.linalg.norm(codebook, axis=1)
  np.testing.assert_allclose(norms[members != 7], 1.0, atol=1e-6)
  np.testing.assert_array_equal(codebook, tokenizers.random_patches_codebook(key, sample, 299))
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizers.random_patches_codebook(key, sample, 301)


def test_build_codebook_dispatch():
  rng = np.random.default_rng(0)
  sample = rng.uniform(-1, 1, (200, 12)).astype(np.float32)
  key = jax.random.key(0)
  for kind in tokenizers.CODEBOOK_KINDS:
    codebook = tokenizers.build_codebook(
      kind, key, vocab_size=16, dim=12, patches=sample, kmeans_iters=3
    )
    _assert_unit_rows(codebook, 16, 12)
  np.testing.assert_array_equal(
    tokenizers.build_codebook("random_patches", key, vocab_size=16, dim=12, patches=sample),
    tokenizers.random_patches_codebook(key, sample, 16),
  )
  np.testing.assert_array_equal(
    tokenizers.build_codebook("kmeans", key, vocab_size=16, dim=12, patches=sample, kmeans_iters=3),
    tokenizers.kmeans_codebook(key, sample, 16, num_iters=3),
  )
  with pytest.raises(ValueError, match="kind"):
    tokenizers.build_codebook("dall_e", key, vocab_size=16, dim=12)
  for kind in ("random_patches", "kmeans"):
    with pytest.raises(ValueError, match="patches"):
      tokenizers.build_codebook(kind, key, vocab_size=16, dim=12)
  with pytest.raises(ValueError, match="patches"):
    tokenizers.build_codebook("kmeans", key, vocab_size=16, dim=8, patches=sample)


def test_argument_checks():
  with pytest.raises(ValueError, match="token_patch"):
    tokenizers.codebook_dim(0, 3)
  with pytest.raises(ValueError, match="images"):
    tokenizers.tokenizer_patches(jnp.zeros((8, 8, 3)), (2, 2), 4)
  with pytest.raises(ValueError, match="grid"):
    tokenizers.tokenizer_patches(jnp.zeros((1, 8, 8, 3)), (2, 2, 2), 4)
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizers.random_projection_codebook(jax.random.key(0), 0, 4)


# --- the training patches the codebooks are built from (train._sample_patches) ---------


@pytest.mark.parametrize(
  "num_patches,num_images,per_image,images,most",
  [
    (8192, 1_281_167, 196, 8192, 1),  # random patches on ImageNet: V images, one each
    (200_000, 60_000, 16, 60_000, 4),  # the demo's k-means: every image, 3 or 4 each
    (64, 40, 16, 40, 2),  # fewer images than words: 1 or 2 each
    (1000, 10, 16, 63, 16),  # more than every position of every image: crops again
  ],
)
def test_patches_per_image_spreads_the_sample_evenly(
  num_patches, num_images, per_image, images, most
):
  from splitmask_jax import train  # pylint: disable=import-outside-toplevel

  counts = train.patches_per_image(num_patches, num_images, per_image)
  assert len(counts) == images and counts.sum() == num_patches
  assert counts.max() == most and counts.max() - counts.min() <= 1 and counts.min() >= 1


def _coded_source(num_images):
  """32x32 RGB images, 8x8 regions of constant colour: red codes the image, green
  the region (row-major over the 4x4 grid), blue is 255. Red and green of a patch
  after any normalisation are read back relative to blue."""
  images = []
  for i in range(num_images):
    image = np.full((32, 32, 3), 255, np.uint8)
    image[..., 0] = 2 * i + 1
    for position in range(16):
      row, col = divmod(position, 4)
      image[8 * row : 8 * row + 8, 8 * col : 8 * col + 8, 1] = 16 * position + 8
    images.append({"image": image})
  return images


def _decode(rows):
  """(image index, region code) of each tokenizer patch row [M, 8 * 8 * 3]."""
  rgb = np.asarray(rows, np.float64).reshape(len(rows), 64, 3)
  assert np.ptp(rgb, axis=1).max() < 1e-5  # one colour per patch: whole regions
  red, green = rgb[:, 0, 0] / rgb[:, 0, 2], rgb[:, 0, 1] / rgb[:, 0, 2]  # blue is 1.0
  return np.rint(((red + 1) * 127.5 - 1) / 2).astype(int), np.rint((green + 1) * 127.5).astype(int)


def _coded_config(kind):
  from helpers import load_config  # pylint: disable=import-outside-toplevel

  config = load_config("test")
  config.model.num_channels = 3
  # The whole 32 px image (no resize; a flip keeps the regions whole), a 4x4 grid.
  config.data.crop_scale = (1.0, 1.0)
  config.tokenizer.kind = kind
  config.tokenizer.vocab_size = 64
  return config


@pytest.mark.parametrize("num_images", [100, 40])
def test_random_patches_codebook_rows_come_from_distinct_images(num_images):
  """V = 64 words from 64 different images, or, from 40 images, at most 2 from each,
  at distinct positions."""
  from splitmask_jax import train  # pylint: disable=import-outside-toplevel

  config = _coded_config("random_patches")
  codebook = train.build_codebook(config, _coded_source(num_images), (4, 4), jax.random.key(0))
  images, regions = _decode(codebook)
  assert set(images.tolist()) <= set(range(num_images))
  _, per_image = np.unique(images, return_counts=True)
  assert len(per_image) == min(64, num_images) and per_image.max() == -(-64 // num_images)
  assert len(set(zip(images.tolist(), regions.tolist()))) == 64  # distinct positions


@pytest.mark.parametrize("num_patches,num_images", [(150, 100), (60, 100)])
def test_kmeans_sample_spreads_over_the_images(num_patches, num_images):
  """k-means' sample: 1 or 2 patches from every one of 100 images (150), one from
  each of 60 (60), never all the patches of a few images."""
  from splitmask_jax import train  # pylint: disable=import-outside-toplevel

  config = _coded_config("kmeans")
  patches = train._sample_patches(config, _coded_source(num_images), (4, 4), num_patches, seed=1)
  assert patches.shape == (num_patches, 192)
  images, regions = _decode(patches)
  _, per_image = np.unique(images, return_counts=True)
  assert len(per_image) == min(num_patches, num_images)
  assert per_image.max() == -(-num_patches // num_images)
  assert len(set(zip(images.tolist(), regions.tolist()))) == num_patches
