"""Mixup / CutMix with label smoothing on a device batch, and the soft-target loss.

`mix_batch` is timm's `Mixup` in `mode='batch'` with `prob=1.0` and its default
`correct_lam=True`, as BEiT's fine-tuning recipe uses it: one mixing
coefficient lam per batch; each image is mixed with its partner in the
reversed batch (example i with B - 1 - i). It runs inside the jitted step: the
alphas and probabilities are static, the choice between mixup and cutmix and
every random number are traced. timm refuses odd batches; here the middle
example of an odd batch is its own partner, so it stays unmixed.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax


def _check_real(name: str, value, low: float, high: float, *, high_open: bool = False):
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  if not low <= value <= high or (high_open and value == high):
    upper = f"{high})" if high_open else f"{high}]"
    raise ValueError(f"{name} must be in [{low}, {upper}, got {value!r}")
  return float(value)


def _check_num_classes(num_classes) -> int:
  if (
    isinstance(num_classes, bool)
    or not isinstance(num_classes, numbers.Integral)
    or num_classes < 1
  ):
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  return int(num_classes)


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot targets with label smoothing (timm's convention).

  Args:
    labels: int [B], classes in [0, num_classes).
    num_classes: K.
    smoothing: in [0, 1); every class gets smoothing / K, the true class
      1 - smoothing on top.

  Returns:
    float32 [B, K], rows summing to 1.
  """
  num_classes = _check_num_classes(num_classes)
  smoothing = _check_real("smoothing", smoothing, 0.0, 1.0, high_open=True)
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def _mixup(images: jax.Array, lam: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  del key
  mixed = lam * images.astype(jnp.float32) + (1 - lam) * images[::-1].astype(jnp.float32)
  return mixed.astype(images.dtype), lam


def _cutmix(images: jax.Array, lam: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pastes a box of the partner's pixels; lam becomes the share of own pixels."""
  height, width = images.shape[1:3]
  ratio = jnp.sqrt(1 - lam)
  y_key, x_key = jax.random.split(key)

  def span(side, sample_key):
    cut = jnp.floor(side * ratio).astype(jnp.int32)
    centre = jax.random.randint(sample_key, (), 0, side)
    low = jnp.clip(centre - cut // 2, 0, side)
    high = jnp.clip(centre + (cut + 1) // 2, 0, side)
    inside = (jnp.arange(side) >= low) & (jnp.arange(side) < high)
    return inside, high - low

  rows, box_height = span(height, y_key)
  cols, box_width = span(width, x_key)
  box = (rows[:, None] & cols[None, :])[None, :, :, None]
  lam = 1 - (box_height * box_width).astype(jnp.float32) / (height * width)
  return jnp.where(box, images[::-1], images), lam


def mix_batch(
  images: jax.Array,
  labels: jax.Array,
  rng: jax.Array,
  *,
  num_classes: int,
  mixup_alpha: float = 0.8,
  cutmix_alpha: float = 1.0,
  switch_prob: float = 0.5,
  label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixup or cutmix of a batch with its reverse, and the matching soft targets.

  When both alphas are positive, cutmix is drawn with probability switch_prob
  and mixup otherwise; when one is, that one is always used; when neither is,
  the images are returned as they are and the targets only smoothed. lam ~
  Beta(alpha, alpha) of the method drawn. Mixup: x = lam * x + (1 - lam) *
  x[::-1]. Cutmix: a box of side ratio sqrt(1 - lam), centred at a uniform
  pixel and clipped to the image, comes from x[::-1], and lam is corrected to
  1 - box area / (H * W).

  Args:
    images: float [B, H, W, C].
    labels: int [B], classes in [0, num_classes).
    rng: PRNG key.
    num_classes: K.
    mixup_alpha: >= 0; 0 disables mixup.
    cutmix_alpha: >= 0; 0 disables cutmix.
    switch_prob: in [0, 1], the probability of cutmix when both are enabled.
    label_smoothing: in [0, 1), see `smooth_labels`.

  Returns:
    (images in the input dtype [B, H, W, C],
     targets float32 [B, K] = lam * smooth(y) + (1 - lam) * smooth(y[::-1]),
     lam float32 []).
  """
  num_classes = _check_num_classes(num_classes)
  mixup_alpha = _check_real("mixup_alpha", mixup_alpha, 0.0, float("inf"))
  cutmix_alpha = _check_real("cutmix_alpha", cutmix_alpha, 0.0, float("inf"))
  switch_prob = _check_real("switch_prob", switch_prob, 0.0, 1.0)
  if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f"images must be a float array [B, H, W, C], got {images.dtype} {images.shape}"
    )
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels must have shape [B]={images.shape[:1]}, got {labels.shape}")

  targets = smooth_labels(labels, num_classes, label_smoothing)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, targets, jnp.ones((), jnp.float32)

  switch_key, lam_key, box_key = jax.random.split(rng, 3)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(lam_key, alpha, alpha)
    images, lam = jax.lax.cond(use_cutmix, _cutmix, _mixup, images, lam, box_key)
  else:
    # One method only: no draw for the switch, and only that branch is traced.
    alpha, method = (mixup_alpha, _mixup) if mixup_alpha > 0 else (cutmix_alpha, _cutmix)
    images, lam = method(images, jax.random.beta(lam_key, alpha, alpha), box_key)
  lam = lam.astype(jnp.float32)
  return images, lam * targets + (1 - lam) * targets[::-1], lam


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum_k targets * log_softmax(logits), in float32.

  Args:
    logits: float [B, K], any float dtype.
    targets: float [B, K], rows of class probabilities.

  Returns:
    float32 [].
  """
  if logits.ndim != 2 or logits.shape != targets.shape:
    raise ValueError(
      f"logits and targets must both be [B, K], got {logits.shape} and {targets.shape}"
    )
  return jnp.mean(
    optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
  )
