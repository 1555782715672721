"""Fine-tuning image augmentations on the host: RandAugment and colour jitter.

BEiT's fine-tuning recipe (which the paper follows) uses timm's transforms:
RandAugment `rand-m9-mstd0.5-inc1`, and colour jitter 0.4 where RandAugment is
off. Both are written here by hand on NumPy and PIL, because no maintained
RandAugment without a torch dependency exists on PyPI; they run per image in
the grain workers, with every random draw taken from the example's
`np.random.Generator`.

`rand_augment` follows timm's `RandAugment` on the "increasing" op set (`inc1`):
`num_ops` ops are chosen uniformly with replacement, each is applied with
probability `prob`, at a level drawn from N(magnitude, magnitude_std) and
clipped to [0, 10], which each op maps to its own argument (`OPS` lists them);
ops that act in two directions pick the sign at random. Where timm leaves a
choice to its caller, or cannot run, this module decides:
- geometric ops resample bicubically, BEiT's fine-tuning interpolation (timm's
  default picks bilinear or bicubic at random per op);
- the area they uncover is filled with the ImageNet mean (124, 116, 104), as
  timm's `create_transform` passes it, on RGB images, and with mid-grey 128 on
  greyscale ones, for which ImageNet defines no single grey;
- Posterize at level 10 keeps 0 bits, a black image: Pillow's `posterize`
  refuses 0 bits (so timm's op raises there with current Pillow).

`color_jitter` is torchvision's `ColorJitter(s, s, s)` without hue on PIL
images: brightness, contrast and saturation factors, each uniform in
[max(0, 1 - s), 1 + s], applied in a random order through PIL's ImageEnhance.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

_MAX_LEVEL = 10.0
_RESAMPLE = Image.Resampling.BICUBIC
_RGB_FILL = (124, 116, 104)
_GREY_FILL = 128

# (image, level in [0, 10], rng, fill) -> image.
_Op = Callable[[Image.Image, float, np.random.Generator, int | tuple[int, ...]], Image.Image]


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _fraction(level: float) -> float:
  return level / _MAX_LEVEL


def _auto_contrast(image, level, rng, fill):
  del level, rng, fill
  return ImageOps.autocontrast(image)


def _equalize(image, level, rng, fill):
  del level, rng, fill
  return ImageOps.equalize(image)


def _invert(image, level, rng, fill):
  del level, rng, fill
  return ImageOps.invert(image)


def _rotate(image, level, rng, fill):
  degrees = _signed(_fraction(level) * 30.0, rng)
  return image.rotate(degrees, resample=_RESAMPLE, fillcolor=fill)


def _posterize(image, level, rng, fill):
  del rng, fill
  bits = 4 - int(_fraction(level) * 4)
  if bits == 0:
    return Image.new(image.mode, image.size, 0)
  return ImageOps.posterize(image, bits)


def _solarize(image, level, rng, fill):
  del rng, fill
  return ImageOps.solarize(image, 256 - min(256, int(_fraction(level) * 256)))


def _solarize_add(image, level, rng, fill):
  del rng, fill
  add = min(128, int(_fraction(level) * 110))
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def _enhance(enhancer: type) -> _Op:
  def op(image, level, rng, fill):
    del fill
    # Both directions grow with the level; 0.1 keeps the factor positive.
    factor = max(0.1, 1.0 + _signed(_fraction(level) * 0.9, rng))
    return enhancer(image).enhance(factor)

  return op


def _affine(image, coefficients, fill):
  return image.transform(
    image.size, Image.Transform.AFFINE, coefficients, resample=_RESAMPLE, fillcolor=fill
  )


def _shear_x(image, level, rng, fill):
  return _affine(image, (1, _signed(_fraction(level) * 0.3, rng), 0, 0, 1, 0), fill)


def _shear_y(image, level, rng, fill):
  return _affine(image, (1, 0, 0, _signed(_fraction(level) * 0.3, rng), 1, 0), fill)


def _translate_x(image, level, rng, fill):
  pixels = _signed(_fraction(level) * 0.45, rng) * image.width
  return _affine(image, (1, 0, pixels, 0, 1, 0), fill)


def _translate_y(image, level, rng, fill):
  pixels = _signed(_fraction(level) * 0.45, rng) * image.height
  return _affine(image, (1, 0, 0, 0, 1, pixels), fill)


_OP_FNS: dict[str, _Op] = {
  "AutoContrast": _auto_contrast,
  "Equalize": _equalize,
  "Invert": _invert,
  "Rotate": _rotate,  # up to 30 degrees
  "Posterize": _posterize,  # 4 - 4 * level / 10 bits kept
  "Solarize": _solarize,  # inverts pixels >= 256 - 256 * level / 10
  "SolarizeAdd": _solarize_add,  # adds up to 110 to pixels below 128
  "Color": _enhance(ImageEnhance.Color),  # factors 1 +- 0.9 * level / 10
  "Contrast": _enhance(ImageEnhance.Contrast),
  "Brightness": _enhance(ImageEnhance.Brightness),
  "Sharpness": _enhance(ImageEnhance.Sharpness),
  "ShearX": _shear_x,  # up to 0.3
  "ShearY": _shear_y,
  "TranslateXRel": _translate_x,  # up to 0.45 of the side
  "TranslateYRel": _translate_y,
}
# timm's `_RAND_INCREASING_TRANSFORMS`, in its order.
OPS: tuple[str, ...] = tuple(_OP_FNS)

_JITTER_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def _check_image(image) -> np.ndarray:
  if (
    not isinstance(image, np.ndarray)
    or image.dtype != np.uint8
    or image.ndim != 3
    or image.shape[-1] not in (1, 3)
  ):
    desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ValueError(f"image must be a uint8 array [H, W, C] with C in (1, 3), got {desc}")
  return image


def _check_rng(rng):
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _check_real(name: str, value, low: float, high: float = math.inf) -> float:
  if (
    isinstance(value, bool)
    or not isinstance(value, numbers.Real)
    or not low <= value <= high
    or not math.isfinite(value)
  ):
    raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
  return float(value)


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
  out = np.array(image, dtype=np.uint8)  # a writable copy, C-contiguous
  return out[..., None] if channels == 1 else out


def rand_augment(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  num_ops: int = 2,
  magnitude: float = 9.0,
  magnitude_std: float = 0.5,
  prob: float = 0.5,
  ops: Sequence[str] = OPS,
) -> np.ndarray:
  """timm's RandAugment (increasing op set) on one image.

  Args:
    image: uint8 [H, W, C], C in (1, 3).
    rng: the source of every random draw.
    num_ops: ops drawn per image, uniformly with replacement from `ops`.
    magnitude: mean level in [0, 10].
    magnitude_std: std of the per-op level (clipped to [0, 10]); 0 fixes it.
    prob: probability that each drawn op is applied.
    ops: names to draw from, a subset of `OPS`.

  Returns:
    uint8 [H, W, C], C-contiguous, a new array.
  """
  image = _check_image(image)
  _check_rng(rng)
  if isinstance(num_ops, bool) or not isinstance(num_ops, numbers.Integral) or num_ops < 0:
    raise ValueError(f"num_ops must be a non-negative integer, got {num_ops!r}")
  magnitude = _check_real("magnitude", magnitude, 0.0, _MAX_LEVEL)
  magnitude_std = _check_real("magnitude_std", magnitude_std, 0.0)
  prob = _check_real("prob", prob, 0.0, 1.0)
  if isinstance(ops, str) or not ops or any(name not in _OP_FNS for name in ops):
    raise ValueError(f"ops must be a non-empty sequence of names from {OPS}, got {ops!r}")

  fill = _GREY_FILL if image.shape[-1] == 1 else _RGB_FILL
  out = _to_pil(image)
  for index in rng.integers(len(ops), size=num_ops):
    if rng.random() >= prob:
      continue
    level = magnitude
    if magnitude_std > 0:
      level = float(np.clip(rng.normal(magnitude, magnitude_std), 0.0, _MAX_LEVEL))
    out = _OP_FNS[ops[index]](out, level, rng, fill)
  return _to_array(out, image.shape[-1])


def _jitter_factors(rng: np.random.Generator, strength: float) -> list[tuple[type, float]]:
  """(ImageEnhance class, factor) pairs in the order they apply."""
  factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=len(_JITTER_ENHANCERS))
  return [
    (_JITTER_ENHANCERS[i], float(factors[i])) for i in rng.permutation(len(_JITTER_ENHANCERS))
  ]


def color_jitter(
  image: np.ndarray, rng: np.random.Generator, *, strength: float = 0.4
) -> np.ndarray:
  """Random brightness, contrast and saturation, in a random order.

  Args:
    image: uint8 [H, W, C], C in (1, 3); saturation leaves C = 1 unchanged.
    rng: the source of the factors and the order.
    strength: each factor is uniform in [max(0, 1 - strength), 1 + strength].

  Returns:
    uint8 [H, W, C], C-contiguous, a new array.
  """
  image = _check_image(image)
  _check_rng(rng)
  strength = _check_real("strength", strength, 0.0)
  out = _to_pil(image)
  for enhancer, factor in _jitter_factors(rng, strength):
    out = enhancer(out).enhance(factor)
  return _to_array(out, image.shape[-1])
