"""Tests of the cross-entropy and symmetric InfoNCE losses against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitmask_jax.losses import symmetric_info_nce
from splitmask_jax.losses import token_cross_entropy


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_cross_entropy(logits, targets, weights=None):
  logits = np.asarray(logits, np.float64)
  lp = _np_log_softmax(logits)
  ce = -np.take_along_axis(lp, np.asarray(targets)[..., None], axis=-1)[..., 0]
  if weights is None:
    return ce.mean()
  w = np.asarray(weights, np.float64)
  return (w * ce).sum() / w.sum()


def _np_info_nce(za, zb, tau):
  za = np.asarray(za, np.float64)
  zb = np.asarray(zb, np.float64)
  za = za / np.linalg.norm(za, axis=1, keepdims=True)
  zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
  logits = za @ zb.T / tau
  diag = np.arange(len(za))
  ce_ab = -_np_log_softmax(logits)[diag, diag].mean()
  ce_ba = -_np_log_softmax(logits.T)[diag, diag].mean()
  acc = 0.5 * ((logits.argmax(1) == diag).mean() + (logits.T.argmax(1) == diag).mean())
  return 0.5 * (ce_ab + ce_ba), acc


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 11), (4, 16, 64)])
def test_cross_entropy_matches_numpy(shape):
  rng = np.random.default_rng(sum(shape))
  logits = rng.normal(size=shape) * 4.0
  targets = rng.integers(0, shape[-1], shape[:-1])
  weights = rng.uniform(size=shape[:-1]) * (rng.uniform(size=shape[:-1]) > 0.3)
  got = token_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, _np_cross_entropy(logits, targets), rtol=1e-5)
  got_w = token_cross_entropy(
    jnp.asarray(logits, jnp.float32),
    jnp.asarray(targets),
    weights=jnp.asarray(weights, jnp.float32),
  )
  np.testing.assert_allclose(got_w, _np_cross_entropy(logits, targets, weights), rtol=1e-5)


def test_cross_entropy_stable_bool_weights_and_bf16():
  logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
  targets = np.array([1, 2])
  got = token_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  np.testing.assert_allclose(got, 0.5 * (1000.0 + np.log(3.0)), rtol=1e-6)

  mask = np.array([False, True])
  got = token_cross_entropy(
    jnp.asarray(logits, jnp.float32), jnp.asarray(targets), weights=jnp.asarray(mask)
  )
  np.testing.assert_allclose(got, np.log(3.0), rtol=1e-6)
  zero = token_cross_entropy(
    jnp.asarray(logits, jnp.float32), jnp.asarray(targets), weights=jnp.zeros(2)
  )
  assert float(zero) == 0.0

  rng = np.random.default_rng(0)
  bf16 = jnp.asarray(rng.normal(size=(6, 9)) * 3, jnp.bfloat16)
  t = rng.integers(0, 9, 6)
  got = token_cross_entropy(bf16, jnp.asarray(t))
  assert got.dtype == jnp.float32
  # The reference sees the same bf16-rounded logits, in float64.
  np.testing.assert_allclose(got, _np_cross_entropy(np.asarray(bf16, np.float64), t), rtol=1e-5)


def test_cross_entropy_bad_arguments():
  with pytest.raises(ValueError, match="targets"):
    token_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="targets"):
    token_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((3,), jnp.float32))
  with pytest.raises(ValueError, match="weights"):
    token_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((3,), jnp.int32), jnp.ones((2,)))


@pytest.mark.parametrize("batch,dim,tau", [(2, 3, 0.2), (8, 16, 0.2), (5, 7, 1.0)])
def test_info_nce_matches_numpy(batch, dim, tau):
  rng = np.random.default_rng(batch * dim)
  za = rng.normal(size=(batch, dim))
  zb = za + rng.normal(size=(batch, dim)) * 0.8
  loss, metrics = symmetric_info_nce(
    jnp.asarray(za, jnp.float32), jnp.asarray(zb, jnp.float32), tau
  )
  ref_loss, ref_acc = _np_info_nce(za, zb, tau)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], ref_acc, rtol=1e-6)


def test_info_nce_properties():
  rng = np.random.default_rng(1)
  za = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)
  zb = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)
  loss, _ = symmetric_info_nce(za, zb, 0.2)
  np.testing.assert_allclose(symmetric_info_nce(zb, za, 0.2)[0], loss, rtol=1e-6)
  scale = jnp.asarray([[3.0], [0.1], [1.0], [7.0], [0.5], [2.0]])
  np.testing.assert_allclose(symmetric_info_nce(za * scale, zb, 0.2)[0], loss, rtol=1e-5)

  constant = jnp.ones((6, 10))
  same, _ = symmetric_info_nce(constant, constant, 0.2)
  np.testing.assert_allclose(same, np.log(6.0), rtol=1e-6)

  # Perfectly matched, well separated pairs: accuracy 1 and loss near 0.
  eye = jnp.eye(6, 10)
  loss_eye, metrics = symmetric_info_nce(eye, 2.0 * eye, 0.05)
  assert float(metrics["accuracy"]) == 1.0 and float(loss_eye) < 1e-6

  grads = jax.grad(lambda a, b: symmetric_info_nce(a, b, 0.2)[0], argnums=(0, 1))(za, zb)
  assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in grads)
  zero_row = za.at[0].set(0.0)
  grads = jax.grad(lambda a: symmetric_info_nce(a, zb, 0.2)[0])(zero_row)
  assert np.isfinite(grads).all()


def test_info_nce_bf16_and_bad_arguments():
  rng = np.random.default_rng(2)
  za = jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16)
  zb = jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16)
  loss, metrics = symmetric_info_nce(za, zb, 0.2)
  assert loss.dtype == jnp.float32 and metrics["accuracy"].dtype == jnp.float32
  np.testing.assert_allclose(
    loss, _np_info_nce(np.asarray(za, np.float64), np.asarray(zb, np.float64), 0.2)[0], rtol=1e-5
  )
  with pytest.raises(ValueError, match="temperature"):
    symmetric_info_nce(za, zb, 0.0)
  with pytest.raises(ValueError, match="za and zb"):
    symmetric_info_nce(za, zb[:3], 0.2)


def _np_nt_xent(za, zb, tau):
  """SimCLR's NT-Xent in float64: 2B anchors, each against its other view and both
  branches' embeddings of the other images."""
  z = np.concatenate([za, zb]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  logits = z @ z.T / tau
  np.fill_diagonal(logits, -np.inf)
  n = len(za)
  positive = (np.arange(2 * n) + n) % (2 * n)
  ce = -_np_log_softmax(logits)[np.arange(2 * n), positive]
  return ce.mean(), (logits.argmax(1) == positive).mean()


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (fake) devices")
@pytest.mark.parametrize("negatives", ["other_branch", "both_branches"])
def test_info_nce_sharded_batch_uses_global_negatives(negatives):
  """With the batch sharded over devices the loss equals the single-device one
  (for NT-Xent, the two branches' shards are joined into one global set)."""
  n = jax.device_count()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(3)
  za = rng.normal(size=(2 * n, 5)).astype(np.float32)
  zb = (za + rng.normal(size=(2 * n, 5))).astype(np.float32)
  loss, metrics = jax.jit(lambda a, b: symmetric_info_nce(a, b, 0.2, negatives=negatives))(
    jax.device_put(za, sharding), jax.device_put(zb, sharding)
  )
  reference = _np_info_nce if negatives == "other_branch" else _np_nt_xent
  ref_loss, ref_acc = reference(za, zb, 0.2)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], ref_acc, rtol=1e-6)
