"""Tests for splitmask_jax.data.photometric: each op against an independent reference."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from PIL import Image
from PIL import ImageFilter
from PIL import ImageOps

from splitmask_jax.data import photometric
from splitmask_jax.data import randaugment

_OFF = dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


def _image(channels=3, height=24, width=24, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _only(image, seed, **kwargs):
  """small_data_augment with every op off but those set in kwargs."""
  return photometric.small_data_augment(image, np.random.default_rng(seed), **{**_OFF, **kwargs})


def _edge_sigma(row):
  """Standard deviation of the blur kernel from a blurred step edge's profile."""
  spread = np.diff(row.astype(np.float64))
  spread /= spread.sum()
  position = np.arange(len(spread))
  mean = (spread * position).sum()
  return float(np.sqrt((spread * (position - mean) ** 2).sum()))


@pytest.mark.parametrize("threshold", [128, 64])
def test_solarize_inverts_values_at_or_above_the_threshold(threshold):
  image = _image()
  out = _only(image, 0, solarize_prob=1.0, solarize_threshold=threshold)
  np.testing.assert_array_equal(out, np.where(image >= threshold, 255 - image, image))


def test_grayscale_is_the_luma_repeated_over_the_channels():
  image = _image()
  out = _only(image, 0, grayscale_prob=1.0)
  luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  assert out.shape == image.shape
  for c in range(3):
    assert np.abs(out[..., c] - luma).max() <= 1.0
  # One channel is already grey.
  grey = _image(channels=1)
  np.testing.assert_array_equal(_only(grey, 0, grayscale_prob=1.0), grey)


def test_jitter_is_randaugment_color_jitter_after_the_four_decisions():
  image = _image()
  for seed in range(5):
    reference_rng = np.random.default_rng(seed)
    reference_rng.random(4)
    expected = randaugment.color_jitter(image, reference_rng, strength=0.3)
    out = _only(image, seed, color_jitter_prob=1.0, color_jitter=0.3)
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, image)


@pytest.mark.parametrize("channels", [1, 3])
def test_blur_removes_high_frequencies_and_keeps_the_mean(channels):
  image = _image(channels, 224, 224)

  def roughness(x):
    return np.mean(np.diff(x.astype(np.float64), axis=1) ** 2)

  for seed in range(5):
    out = _only(image, seed, blur_prob=1.0)
    assert roughness(out) < 0.9 * roughness(image)
    assert np.abs(out.mean(axis=(0, 1)) - image.mean(axis=(0, 1))).max() <= 1.0


@pytest.mark.parametrize("height, width, expected", [(224, 224, 7.0), (32, 32, 1.0), (32, 64, 1.0)])
def test_blur_sigma_scales_with_the_short_side(height, width, expected):
  # A vertical step edge: its blurred profile has the kernel's spread.
  edge = np.zeros((height, width, 1), np.uint8)
  edge[:, width // 2 :] = 250
  out = _only(edge, 0, blur_prob=1.0, blur_sigma=(7.0, 7.0))
  assert _edge_sigma(out[height // 2, :, 0]) == pytest.approx(expected, rel=0.05)
  # Along the edge nothing changes.
  assert (out == out[:1]).all()


def test_ops_apply_in_order_with_the_documented_draws():
  image = _image(height=40, width=40)
  for seed in range(3):
    rng = np.random.default_rng(seed)
    rng.random(4)
    expected = Image.fromarray(randaugment.color_jitter(image, rng))
    expected = ImageOps.grayscale(expected).convert("RGB")
    expected = expected.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0) * 40 / 224))
    expected = ImageOps.solarize(expected, 128)
    out = photometric.small_data_augment(
      image,
      np.random.default_rng(seed),
      color_jitter_prob=1.0,
      grayscale_prob=1.0,
      blur_prob=1.0,
      solarize_prob=1.0,
    )
    np.testing.assert_array_equal(out, np.asarray(expected))


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_off_is_the_identity(channels):
  image = _image(channels)
  for kwargs in (_OFF, {**_OFF, "color_jitter_prob": 1.0, "color_jitter": 0.0}):
    for seed in range(3):
      out = photometric.small_data_augment(image, np.random.default_rng(seed), **kwargs)
      np.testing.assert_array_equal(out, image)
      assert out is not image


def test_each_op_applies_at_its_probability():
  image = _image(height=16, width=16)
  num_draws = 2000
  applied = {
    "color_jitter_prob": lambda out: not np.array_equal(out, image),
    "grayscale_prob": lambda out: (out == out[..., :1]).all(),
    "blur_prob": lambda out: not np.array_equal(out, image),
    "solarize_prob": lambda out: not np.array_equal(out, image),
  }
  defaults = dict(color_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, solarize_prob=0.2)
  for key, prob in defaults.items():
    # Blur sigmas of 0.5 to 2 pixels of this image: each blur changes it.
    hits = [
      applied[key](_only(image, seed, **{key: prob}, blur_sigma=(0.5, 2.0), blur_reference_size=16))
      for seed in range(num_draws)
    ]
    assert abs(np.mean(hits) - prob) < 4 * np.sqrt(prob * (1 - prob) / num_draws), key


@pytest.mark.parametrize("channels", [1, 3])
def test_same_generator_state_same_result(channels):
  image = _image(channels, 32, 32)
  first = [photometric.small_data_augment(image, np.random.default_rng(s)) for s in range(10)]
  again = [photometric.small_data_augment(image, np.random.default_rng(s)) for s in range(10)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
    assert a.shape == image.shape and a.dtype == np.uint8 and a.flags.c_contiguous
  assert len({a.tobytes() for a in first}) > 5
  # A flipped view, as the pipeline's flip makes, gives the same as its copy.
  view = image[:, ::-1]
  np.testing.assert_array_equal(
    photometric.small_data_augment(view, np.random.default_rng(0)),
    photometric.small_data_augment(view.copy(), np.random.default_rng(0)),
  )


def _config(**overrides):
  return ml_collections.ConfigDict(
    {
      "color_jitter": 0.4,
      "color_jitter_prob": 0.8,
      "grayscale_prob": 0.2,
      "blur_prob": 0.5,
      "solarize_prob": 0.2,
      "mixup": 0.8,
      **overrides,
    }
  )


def test_make_augment_fn():
  fn = photometric.make_augment_fn(_config(color_jitter=0.2, solarize_prob=1.0))
  image = _image()
  np.testing.assert_array_equal(
    fn(image, np.random.default_rng(3)),
    photometric.small_data_augment(
      image, np.random.default_rng(3), color_jitter=0.2, solarize_prob=1.0
    ),
  )
  assert photometric.make_augment_fn(_config(**_OFF)) is None
  assert (
    photometric.make_augment_fn(_config(**{**_OFF, "color_jitter_prob": 1.0}, color_jitter=0.0))
    is None
  )
  assert photometric.make_augment_fn(_config(**{**_OFF, "blur_prob": 0.1})) is not None


@pytest.mark.parametrize(
  "overrides, pattern",
  [
    ({"grayscale_prob": 1.5}, r"config\.augment\.grayscale_prob .*\[0\.0, 1\.0\]"),
    ({"blur_prob": -0.1}, r"config\.augment\.blur_prob"),
    ({"color_jitter": -1.0}, r"config\.augment\.color_jitter .*\[0\.0, inf\]"),
  ],
)
def test_make_augment_fn_rejects_bad_values(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    photometric.make_augment_fn(_config(**overrides))


def test_rejects_bad_arguments():
  config = _config()
  del config["solarize_prob"]
  with pytest.raises(ValueError, match="lacks.*solarize_prob"):
    photometric.make_augment_fn(config)
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="blur_sigma"):
    photometric.small_data_augment(_image(), rng, blur_sigma=(2.0, 1.0))
  with pytest.raises(ValueError, match="solarize_threshold"):
    photometric.small_data_augment(_image(), rng, solarize_threshold=300)
  with pytest.raises(ValueError, match="uint8"):
    photometric.small_data_augment(_image().astype(np.float32), rng)
  with pytest.raises(ValueError, match="Generator"):
    photometric.small_data_augment(_image(), 0)
