"""Tests for splitmask_jax.mixing against NumPy references of timm's Mixup."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from splitmask_jax import mixing

K = 5


def _smooth_reference(labels, num_classes, smoothing):
  off = smoothing / num_classes
  out = np.full((len(labels), num_classes), off)
  out[np.arange(len(labels)), labels] = 1 - smoothing + off
  return out


def _constant_batch(height=12, width=20):
  """Image i holds the value i everywhere, so every pixel names its source."""
  values = np.arange(4, dtype=np.float32)
  return jnp.asarray(np.broadcast_to(values[:, None, None, None], (4, height, width, 1)))


LABELS = jnp.array([0, 3, 1, 4], jnp.int32)


def _keys(n):
  return jax.random.split(jax.random.key(0), n)


def test_smooth_labels_matches_reference():
  labels = np.array([0, 4, 2])
  out = mixing.smooth_labels(jnp.asarray(labels), K, 0.1)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _smooth_reference(labels, K, 0.1), rtol=1e-6)
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_box_share_is_one_minus_lam_and_label_weight():
  images = _constant_batch()
  mix = jax.jit(
    functools.partial(
      mixing.mix_batch, num_classes=K, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1
    )
  )
  smooth = _smooth_reference(np.asarray(LABELS), K, 0.1)
  for key in _keys(10):
    out, targets, lam = (np.asarray(a) for a in mix(images, LABELS, key))
    for i in range(4):
      own = out[i] == i
      partner = out[i] == 3 - i
      assert np.all(own | partner)
      np.testing.assert_allclose(partner.mean(), 1 - lam, atol=1e-6)
      # The partner's pixels form one axis-aligned box.
      rows, cols = np.nonzero(partner[..., 0])
      if len(rows):
        box = partner[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_lam_distribution_matches_timm_box_rule():
  """Corrected lam over many keys against a NumPy sample of timm's `rand_bbox` rule."""
  height, width, n = 12, 20, 3000
  images = _constant_batch(height, width)[:2]
  lams = jax.jit(
    jax.vmap(
      lambda key: mixing.mix_batch(
        images, LABELS[:2], key, num_classes=K, mixup_alpha=0.0, cutmix_alpha=1.0
      )[2]
    )
  )(_keys(n))
  rng = np.random.default_rng(0)
  size = 100_000
  ratio = np.sqrt(1 - rng.beta(1.0, 1.0, size))
  sides = []
  for side in (height, width):
    cut = (side * ratio).astype(int)
    centre = rng.integers(0, side, size)
    sides.append(np.clip(centre + (cut + 1) // 2, 0, side) - np.clip(centre - cut // 2, 0, side))
  # Compared as box areas in pixels, which both sides hold exactly.
  areas = np.round((1 - np.asarray(lams, np.float64)) * height * width)
  assert stats.ks_2samp(areas, sides[0] * sides[1]).pvalue > 1e-3


def test_mixup_blends_with_reversed_batch():
  images = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
  mix = jax.jit(
    functools.partial(
      mixing.mix_batch, num_classes=K, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1
    )
  )
  smooth = _smooth_reference(np.asarray(LABELS), K, 0.1)
  x = np.asarray(images, np.float64)
  for key in _keys(5):
    out, targets, lam = mix(images, LABELS, key)
    lam = float(lam)
    assert 0 < lam < 1
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)


def test_switch_prob_and_lam_distributions():
  n = 3000
  images = _constant_batch(8, 8)[:2]
  mix = jax.jit(
    jax.vmap(
      lambda key: mixing.mix_batch(
        images, LABELS[:2], key, num_classes=K, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.3
      )
    )
  )
  out, _, lams = mix(_keys(n))
  out, lams = np.asarray(out), np.asarray(lams)
  # Cutmix leaves only whole source values; mixup blends 0 and 1 into lam-valued pixels.
  is_cutmix = np.all((out[:, 0] == 0) | (out[:, 0] == 1), axis=(1, 2, 3))
  assert abs(is_cutmix.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
  mixup_lams = lams[~is_cutmix]
  np.testing.assert_allclose(out[~is_cutmix, 0, 0, 0, 0], 1 - mixup_lams, atol=1e-6)
  # Mixup's lam follows Beta(mixup_alpha), not cutmix's alpha.
  assert stats.kstest(mixup_lams, stats.beta(0.2, 0.2).cdf).pvalue > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_mixing_when_both_alphas_are_zero(dtype):
  images = jax.random.normal(jax.random.key(2), (4, 5, 5, 1), dtype)
  out, targets, lam = jax.jit(
    functools.partial(
      mixing.mix_batch, num_classes=K, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.2
    )
  )(images, LABELS, jax.random.key(3))
  assert out.dtype == dtype and float(lam) == 1.0
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(images, np.float32))
  np.testing.assert_allclose(targets, _smooth_reference(np.asarray(LABELS), K, 0.2), rtol=1e-6)


def test_jitted_output_types():
  images = jnp.zeros((4, 8, 8, 3), jnp.bfloat16)
  out, targets, lam = jax.jit(functools.partial(mixing.mix_batch, num_classes=K))(
    images, LABELS, jax.random.key(0)
  )
  assert out.shape == images.shape and out.dtype == jnp.bfloat16
  assert targets.shape == (4, K) and targets.dtype == jnp.float32
  assert lam.shape == () and lam.dtype == jnp.float32


def _soft_cross_entropy_reference(logits, targets):
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return np.mean(-(targets * log_probs).sum(-1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_soft_cross_entropy_matches_float64_reference(dtype):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, K)) * 4, dtype)
  targets = rng.dirichlet(np.ones(K), size=6)
  loss = jax.jit(mixing.soft_cross_entropy)(logits, jnp.asarray(targets, jnp.float32))
  assert loss.dtype == jnp.float32 and loss.shape == ()
  # Against the logits as given (bfloat16 values exactly), so a bfloat16 softmax would fail.
  expected = _soft_cross_entropy_reference(np.asarray(logits, np.float64), targets)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"mixup_alpha": -0.1}, "mixup_alpha"),
    ({"mixup_alpha": float("inf")}, "mixup_alpha"),
    ({"cutmix_alpha": -1.0}, "cutmix_alpha"),
    ({"switch_prob": 1.5}, "switch_prob"),
    ({"label_smoothing": 1.0}, "smoothing"),
    ({"num_classes": 0}, "num_classes"),
  ],
)
def test_bad_arguments_are_rejected(kwargs, name):
  kwargs = {"num_classes": K, **kwargs}
  with pytest.raises(ValueError, match=name):
    mixing.mix_batch(jnp.zeros((4, 4, 4, 1)), LABELS, jax.random.key(0), **kwargs)


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="images"):
    mixing.mix_batch(jnp.zeros((4, 4, 4), jnp.float32), LABELS, jax.random.key(0), num_classes=K)
  with pytest.raises(ValueError, match="labels"):
    mixing.mix_batch(jnp.zeros((3, 4, 4, 1)), LABELS, jax.random.key(0), num_classes=K)
  with pytest.raises(ValueError, match="logits"):
    mixing.soft_cross_entropy(jnp.zeros((4, K)), jnp.zeros((4, K + 1)))
