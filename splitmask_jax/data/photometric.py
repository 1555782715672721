"""The stronger pre-training augmentation of the paper's smallest datasets.

The paper pre-trains Stanford Cars and DomainNet (clipart, painting, sketch) with
random greyscale, solarization, Gaussian blur and colour jittering on top of the
random resized crop and flip, without giving their parameters. The defaults here
are BYOL's and DINO's single-view values: jitter with probability 0.8, greyscale
0.2, blur 0.5 with sigma ~ U(0.1, 2.0), solarize 0.2 at threshold 128. The jitter
is the package's one colour jitter, `randaugment.color_jitter`: brightness,
contrast and saturation all at 0.4 (timm's semantics), where BYOL and DINO use
saturation 0.2 and add a hue shift of 0.1.

Blur sigmas are given for a 224 px image, as BYOL and DINO set them, and scale
with the image: a 32 px image is blurred by 32 / 224 of them, so the blur takes
the same share of the image at any resolution instead of erasing a small one.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import ImageFilter
from PIL import ImageOps

from splitmask_jax.data import input_pipeline
from splitmask_jax.data import randaugment

# Config keys of `make_augment_fn`, also keyword arguments of `small_data_augment`.
_PROB_KEYS = ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob")
CONFIG_KEYS = ("color_jitter",) + _PROB_KEYS


def _check_probs(prefix: str, color_jitter, probs) -> None:
  """Raises ValueError naming `prefix + key` for an invalid strength or probability."""
  # pylint: disable=protected-access
  randaugment._check_real(f"{prefix}color_jitter", color_jitter, 0.0)
  for key, prob in zip(_PROB_KEYS, probs):
    randaugment._check_real(f"{prefix}{key}", prob, 0.0, 1.0)


def small_data_augment(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  color_jitter: float = 0.4,
  color_jitter_prob: float = 0.8,
  grayscale_prob: float = 0.2,
  blur_prob: float = 0.5,
  blur_sigma: tuple[float, float] = (0.1, 2.0),
  blur_reference_size: int = 224,
  solarize_prob: float = 0.2,
  solarize_threshold: float = 128,
) -> np.ndarray:
  """Colour jitter, greyscale, Gaussian blur and solarization, each with a probability.

  The ops apply in that order. Draws, in this order, all from `rng`: four uniforms
  deciding which ops apply (one per op, in the order above, drawn whatever the
  probabilities), then the jitter's own draws (`randaugment.color_jitter`) when it
  applies, then the blur's sigma when it applies. The result therefore depends on
  the image and the generator's state alone.

  Args:
    image: uint8 [H, W, C], C in (1, 3).
    rng: the source of every random draw.
    color_jitter: brightness, contrast and saturation factors are uniform in
      [max(0, 1 - s), 1 + s]; 0 turns the jitter off.
    color_jitter_prob: probability of the jitter.
    grayscale_prob: probability of replacing the image by its ITU-R 601-2 luma
      (PIL's), repeated over the C channels; a no-op when C = 1.
    blur_prob: probability of a Gaussian blur (PIL's, isotropic).
    blur_sigma: (min, max) of the uniform blur sigma, in pixels of a
      `blur_reference_size` image: the sigma applied is scaled by
      min(H, W) / blur_reference_size.
    blur_reference_size: the image side `blur_sigma` is given for.
    solarize_prob: probability of inverting (255 - x) every value x >= solarize_threshold.
    solarize_threshold: in [0, 256].

  Returns:
    uint8 [H, W, C], C-contiguous, a new array. All probabilities 0 (or only the
    jitter on at strength 0) return a copy of the image.
  """
  # pylint: disable=protected-access
  image = randaugment._check_image(image)
  randaugment._check_rng(rng)
  probs = (color_jitter_prob, grayscale_prob, blur_prob, solarize_prob)
  _check_probs("", color_jitter, probs)
  if (
    isinstance(blur_sigma, str)
    or len(blur_sigma) != 2
    or not all(isinstance(s, numbers.Real) and math.isfinite(s) for s in blur_sigma)
    or not 0 < blur_sigma[0] <= blur_sigma[1]
  ):
    raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {blur_sigma!r}")
  randaugment._check_real("blur_reference_size", blur_reference_size, 1.0)
  randaugment._check_real("solarize_threshold", solarize_threshold, 0.0, 256.0)

  jitter, grey, blur, solarize = rng.random(len(probs)) < np.asarray(probs)
  if jitter and color_jitter > 0:
    image = randaugment.color_jitter(image, rng, strength=color_jitter)
  out = randaugment._to_pil(image)
  if grey and out.mode == "RGB":
    out = ImageOps.grayscale(out).convert("RGB")
  if blur:
    scale = min(image.shape[:2]) / blur_reference_size
    sigma = rng.uniform(blur_sigma[0], blur_sigma[1]) * scale
    out = out.filter(ImageFilter.GaussianBlur(sigma))
  if solarize:
    out = ImageOps.solarize(out, solarize_threshold)
  return randaugment._to_array(out, image.shape[-1])


def make_augment_fn(config_augment: Mapping[str, Any]) -> input_pipeline.ImageAugmentFn | None:
  """`small_data_augment` with the options of a config group, or None if it does nothing.

  Args:
    config_augment: holds `CONFIG_KEYS`: color_jitter (strength, >= 0) and
      color_jitter_prob, grayscale_prob, blur_prob, solarize_prob (in [0, 1]); a
      `ml_collections.ConfigDict` such as `config.augment`. The blur sigmas and the
      solarization threshold keep their defaults.

  Returns:
    `(image, rng) -> image` for `input_pipeline.pretrain_dataset(augment_fn=...)`,
    or None when every op is off (every probability 0, the jitter also at strength 0).

  Raises:
    ValueError: a missing or invalid key, named `config.augment.<key>`.
  """
  missing = [key for key in CONFIG_KEYS if key not in config_augment]
  if missing:
    raise ValueError(
      f"config.augment lacks {missing}; the small-data augmentation needs {list(CONFIG_KEYS)}."
    )
  options = {key: config_augment[key] for key in CONFIG_KEYS}
  probs = [options[key] for key in _PROB_KEYS]
  _check_probs("config.augment.", options["color_jitter"], probs)
  jitter_on = options["color_jitter"] > 0 and options["color_jitter_prob"] > 0
  if not jitter_on and not any(probs[1:]):
    return None
  return functools.partial(small_data_augment, **options)
