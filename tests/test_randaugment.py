"""Tests for splitmask_jax.data.randaugment: op arguments against PIL and NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from PIL import ImageOps

from splitmask_jax.data import randaugment

BICUBIC = Image.Resampling.BICUBIC


def _image(channels, height=40, width=20, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _pil(image):
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(pil, channels):
  out = np.asarray(pil)
  return out[..., None] if channels == 1 else out


def _one_op(image, name, seed=0, magnitude=9.0):
  """The op `name` alone, always applied, at a fixed level."""
  return randaugment.rand_augment(
    image,
    np.random.default_rng(seed),
    num_ops=1,
    magnitude=magnitude,
    magnitude_std=0.0,
    prob=1.0,
    ops=(name,),
  )


@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_keeps_shape_dtype_and_layout(channels):
  image = _image(channels)
  for name in randaugment.OPS:
    for magnitude in (0.0, 5.0, 10.0):
      out = _one_op(image, name, magnitude=magnitude)
      assert out.shape == image.shape and out.dtype == np.uint8, name
      assert out.flags.c_contiguous and out.flags.writeable, name
  # The default policy, on a non-contiguous view as the flip makes.
  view = image[:, ::-1]
  for seed in range(20):
    out = randaugment.rand_augment(view, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.uint8 and out.flags.c_contiguous
    out = randaugment.color_jitter(view, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.uint8 and out.flags.c_contiguous


@pytest.mark.parametrize("augment", [randaugment.rand_augment, randaugment.color_jitter])
def test_seeded_generator_is_deterministic(augment):
  image = _image(3)
  first = [augment(image, np.random.default_rng(seed)) for seed in range(8)]
  again = [augment(image, np.random.default_rng(seed)) for seed in range(8)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(first[0], other) for other in first[1:])


@pytest.mark.parametrize("channels", [1, 3])
def test_no_op_drawn_or_applied_is_identity(channels):
  image = _image(channels)
  for seed in range(5):
    for kwargs in ({"prob": 0.0}, {"num_ops": 0}):
      out = randaugment.rand_augment(image, np.random.default_rng(seed), magnitude=10.0, **kwargs)
      np.testing.assert_array_equal(out, image)
      assert out is not image


def test_prob_and_num_ops():
  image = _image(1)
  inverted = [
    not np.array_equal(
      randaugment.rand_augment(
        image, np.random.default_rng(seed), num_ops=1, prob=0.5, ops=("Invert",)
      ),
      image,
    )
    for seed in range(400)
  ]
  assert abs(np.mean(inverted) - 0.5) < 0.1
  # Ops chain: Invert twice is the identity, three times an inversion.
  for num_ops, expected in ((2, image), (3, 255 - image)):
    out = randaugment.rand_augment(
      image, np.random.default_rng(0), num_ops=num_ops, prob=1.0, ops=("Invert",)
    )
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_solarize_posterize_solarize_add_arguments(channels):
  image = _image(channels)
  pil = _pil(image)
  # Solarize (increasing): threshold 256 - int(0.9 * 256) = 26 at magnitude 9.
  np.testing.assert_array_equal(
    _one_op(image, "Solarize"), _array(ImageOps.solarize(pil, 26), channels)
  )
  # Posterize (increasing): 4 - int(0.9 * 4) = 1 bit at magnitude 9, 4 at 0, none at 10.
  np.testing.assert_array_equal(
    _one_op(image, "Posterize"), _array(ImageOps.posterize(pil, 1), channels)
  )
  np.testing.assert_array_equal(
    _one_op(image, "Posterize", magnitude=0.0), _array(ImageOps.posterize(pil, 4), channels)
  )
  np.testing.assert_array_equal(_one_op(image, "Posterize", magnitude=10.0), 0 * image)
  # SolarizeAdd: int(0.9 * 110) = 99 added below 128.
  expected = np.where(image < 128, np.minimum(image.astype(int) + 99, 255), image)
  np.testing.assert_array_equal(_one_op(image, "SolarizeAdd"), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_rotate_angle_and_fill(channels):
  image = _image(channels)
  fill = 128 if channels == 1 else (124, 116, 104)
  # 0.9 * 30 = 27 degrees, either way.
  candidates = {
    sign: _array(_pil(image).rotate(sign * 27.0, resample=BICUBIC, fillcolor=fill), channels)
    for sign in (1, -1)
  }
  signs = set()
  for seed in range(12):
    out = _one_op(image, "Rotate", seed=seed)
    signs |= {sign for sign, ref in candidates.items() if np.array_equal(out, ref)}
  assert signs == {1, -1}


def _shifted(image, axis, offset, fill):
  """out[p] = image[p + offset] along axis, `fill` where that falls outside."""
  out = np.full_like(image, fill)
  src = np.arange(image.shape[axis]) + offset
  keep = (src >= 0) & (src < image.shape[axis])
  np.moveaxis(out, axis, 0)[keep] = np.moveaxis(image, axis, 0)[src[keep]]
  return out


def test_translate_shifts_whole_pixels_and_fills_mean_grey():
  # 40 x 20 image: at magnitude 10 the shift is 0.45 * side = 18 rows or 9 columns.
  image = _image(1)[..., 0]
  for name, axis, pixels in (("TranslateXRel", 1, 9), ("TranslateYRel", 0, 18)):
    seen = set()
    for seed in range(12):
      out = _one_op(image[..., None], name, seed=seed, magnitude=10.0)[..., 0]
      seen |= {
        sign for sign in (1, -1) if np.array_equal(out, _shifted(image, axis, sign * pixels, 128))
      }
    assert seen == {1, -1}, name


def test_brightness_factor_against_float64_reference():
  image = _image(3)
  outs = {tuple(_one_op(image, "Brightness", seed=seed).ravel()) for seed in range(12)}
  # 1 +- 0.9 * 9 / 10; PIL blends in float and truncates.
  expected = {
    tuple(np.clip(np.floor(image.astype(np.float64) * factor), 0, 255).astype(np.uint8).ravel())
    for factor in (1.81, 0.19)
  }
  assert outs == expected


@pytest.mark.parametrize("channels", [1, 3])
def test_invert_and_autocontrast_match_pil(channels):
  image = _image(channels) // 2 + 40  # a narrow range, so autocontrast stretches it
  pil = _pil(image)
  np.testing.assert_array_equal(_one_op(image, "Invert"), 255 - image)
  np.testing.assert_array_equal(_one_op(image, "Invert"), _array(ImageOps.invert(pil), channels))
  np.testing.assert_array_equal(
    _one_op(image, "AutoContrast"), _array(ImageOps.autocontrast(pil), channels)
  )


def test_magnitude_std_draws_levels_around_the_mean():
  # Solarize's threshold reveals the level: a ramp image holds every value once.
  ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  thresholds = []
  for seed in range(200):
    out = randaugment.rand_augment(
      ramp,
      np.random.default_rng(seed),
      num_ops=1,
      magnitude=5.0,
      magnitude_std=1.0,
      prob=1.0,
      ops=("Solarize",),
    )
    changed = np.nonzero(out.ravel() != ramp.ravel())[0]
    thresholds.append(changed[0] if len(changed) else 256)
  levels = (256 - np.array(thresholds)) / 25.6
  assert abs(levels.mean() - 5.0) < 0.25 and 0.8 < levels.std() < 1.2


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_strength_zero_is_identity(channels):
  image = _image(channels)
  for seed in range(5):
    np.testing.assert_array_equal(
      randaugment.color_jitter(image, np.random.default_rng(seed), strength=0.0), image
    )


def test_color_jitter_matches_float64_reference_on_greyscale():
  image = _image(1).astype(np.float64)
  orders = set()
  for seed in range(10):
    expected = image
    applied = randaugment._jitter_factors(np.random.default_rng(seed), 0.4)
    orders.add(tuple(enhancer.__name__ for enhancer, _ in applied))
    for enhancer, factor in applied:
      assert 0.6 <= factor <= 1.4
      if enhancer.__name__ == "Brightness":
        expected = np.clip(np.floor(expected * factor), 0, 255)
      elif enhancer.__name__ == "Contrast":
        mean = np.floor(expected.mean() + 0.5)
        expected = np.clip(np.floor(mean + factor * (expected - mean)), 0, 255)
      # Saturation leaves greyscale unchanged.
    out = randaugment.color_jitter(image.astype(np.uint8), np.random.default_rng(seed))
    np.testing.assert_allclose(out, expected, atol=1)
  assert all(sorted(order) == ["Brightness", "Color", "Contrast"] for order in orders)
  assert len(orders) >= 3  # the order is random


def test_color_jitter_brightness_range_on_constant_image():
  # Contrast and saturation leave a constant grey image unchanged: only brightness acts.
  image = np.full((4, 4, 1), 150, np.uint8)  # 1.4 * 150 stays below 255
  values = np.array(
    [randaugment.color_jitter(image, np.random.default_rng(seed))[0, 0, 0] for seed in range(400)]
  )
  factors = values / 150.0
  assert factors.min() >= 0.6 - 1e-9 and factors.max() <= 1.4
  assert factors.min() < 0.62 and factors.max() > 1.37 and abs(factors.mean() - 1.0) < 0.03


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"num_ops": -1}, "num_ops"),
    ({"num_ops": 1.5}, "num_ops"),
    ({"magnitude": 10.5}, "magnitude"),
    ({"magnitude_std": -0.1}, "magnitude_std"),
    ({"magnitude_std": float("inf")}, "magnitude_std"),
    ({"prob": 1.1}, "prob"),
    ({"ops": ("Cutout",)}, "ops"),
    ({"ops": ()}, "ops"),
  ],
)
def test_rand_augment_rejects_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    randaugment.rand_augment(_image(1), np.random.default_rng(0), **kwargs)


@pytest.mark.parametrize("augment", [randaugment.rand_augment, randaugment.color_jitter])
def test_bad_image_or_rng_is_rejected(augment):
  for image in (
    np.zeros((8, 8), np.uint8),
    np.zeros((8, 8, 4), np.uint8),
    np.zeros((8, 8, 3), np.float32),
  ):
    with pytest.raises(ValueError, match="image"):
      augment(image, np.random.default_rng(0))
  with pytest.raises(ValueError, match="rng"):
    augment(_image(1), np.random.RandomState(0))
  if augment is randaugment.color_jitter:
    with pytest.raises(ValueError, match="strength"):
      augment(_image(1), np.random.default_rng(0), strength=-0.5)
