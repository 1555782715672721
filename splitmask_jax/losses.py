"""Pre-training losses: visual-token cross-entropy (inpaint) and symmetric InfoNCE (match)."""

import jax
import jax.numpy as jnp


def token_cross_entropy(
  logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
  """Mean cross-entropy of visual-word predictions.

  Args:
    logits: float [..., V], any float dtype; the log-softmax is taken in float32.
    targets: int [...], visual words in [0, V).
    weights: optional float or bool [...]; gives the weighted mean
      sum(w * ce) / sum(w) (0 when every weight is 0).
  Returns:
    float32 scalar.
  """
  if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
    raise ValueError(
      f"targets must have shape logits.shape[:-1]={logits.shape[:-1]}, got {targets.shape}"
    )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be an integer array, got dtype {targets.dtype}")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if weights is None:
    return jnp.mean(ce)
  if weights.shape != targets.shape:
    raise ValueError(f"weights must have the shape of targets {targets.shape}, got {weights.shape}")
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def symmetric_info_nce(za: jax.Array, zb: jax.Array, temperature: float) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE between the two views of each image (SplitMask's match loss).

  Eq. 2 of the paper scores pairs with dot products and tau = 0.2 "following MoCo v3",
  which L2-normalises its features, so both inputs are normalised here (cosine
  similarity). The logits are za @ zb.T over the whole batch: under jit with the
  batch sharded over devices, this is the global batch, so every image's negatives
  are all other images of the global batch; a step that accumulates gradients
  (config.accum_steps) calls it per micro-batch, whose images are the negatives.

  Args:
    za, zb: float [B, D], any float dtype (computed in float32); row i of each is
      the same image.
    temperature: tau > 0.
  Returns:
    loss: float32 scalar, the mean of the a->b and b->a cross-entropies with the
      diagonal as the target.
    metrics: {'accuracy': float32 scalar, fraction of rows whose argmax is the
      diagonal, averaged over both directions}.
  """
  if za.ndim != 2 or za.shape != zb.shape:
    raise ValueError(f"za and zb must both be [B, D], got {za.shape} and {zb.shape}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  za = _l2_normalize(za.astype(jnp.float32))
  zb = _l2_normalize(zb.astype(jnp.float32))
  logits = za @ zb.T / temperature
  labels = jnp.arange(za.shape[0])

  def direction(lg):
    ce = -jnp.take_along_axis(jax.nn.log_softmax(lg, axis=-1), labels[:, None], axis=-1)
    accuracy = jnp.mean((jnp.argmax(lg, axis=-1) == labels).astype(jnp.float32))
    return jnp.mean(ce), accuracy

  loss_ab, acc_ab = direction(logits)
  loss_ba, acc_ba = direction(logits.T)
  return 0.5 * (loss_ab + loss_ba), {"accuracy": 0.5 * (acc_ab + acc_ba)}
