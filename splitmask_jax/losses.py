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


# Who an InfoNCE anchor is contrasted with (config.loss.negatives).
# 'other_branch': the other branch's embeddings of the other images, B - 1 per anchor
#   (the paper's Eq. 2: its negatives are "the other images in the batch").
# 'both_branches': SimCLR's NT-Xent, both branches' embeddings of the other images,
#   2B - 2 per anchor.
NEGATIVES = ("other_branch", "both_branches")


def symmetric_info_nce(
  za: jax.Array,
  zb: jax.Array,
  temperature: float,
  *,
  negatives: str = "other_branch",
  scale_by_temperature: bool = False,
) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE between the two views of each image (SplitMask's match loss).

  Eq. 2 of the paper scores pairs with dot products and tau = 0.2 "following MoCo v3",
  which L2-normalises its features, so both inputs are normalised here (cosine
  similarity). Under jit with the batch sharded over devices, B is the global
  batch, so every image's negatives are all other images of the global batch; a
  step that accumulates gradients (config.accum_steps) calls it per micro-batch,
  whose images are the negatives.

  negatives='other_branch' (the paper's): logits za @ zb.T / tau, the mean of the
  a->b (rows) and b->a (columns) cross-entropies with the diagonal as the target;
  each anchor has B - 1 negatives. negatives='both_branches' (SimCLR's NT-Xent):
  z = [za; zb] [2B, D], logits z @ z.T / tau without the self-similarities, the
  mean over the 2B rows of the cross-entropy whose target is the anchor's other
  view; each anchor has 2B - 2 negatives. Both are symmetric in (za, zb).

  Args:
    za, zb: float [B, D], any float dtype (computed in float32); row i of each is
      the same image.
    temperature: tau > 0.
    negatives: one of NEGATIVES.
    scale_by_temperature: multiply the loss by 2 tau, as MoCo v3 does, so that its
      gradient with respect to the cosine similarities does not grow as 1 / tau.
      MoCo v3 sums its two directions where this averages them: its loss is twice
      this one.
  Returns:
    loss: float32 scalar.
    metrics: {'accuracy': float32 scalar, the fraction of anchors (2B of them:
      each image in each branch) whose highest logit is its other view}.
  """
  if za.ndim != 2 or za.shape != zb.shape:
    raise ValueError(f"za and zb must both be [B, D], got {za.shape} and {zb.shape}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if negatives not in NEGATIVES:
    raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
  za = _l2_normalize(za.astype(jnp.float32))
  zb = _l2_normalize(zb.astype(jnp.float32))
  if negatives == "other_branch":
    logits = za @ zb.T / temperature
    loss_ab, acc_ab = _cross_entropy_to(logits, jnp.arange(za.shape[0]))
    loss_ba, acc_ba = _cross_entropy_to(logits.T, jnp.arange(za.shape[0]))
    loss, accuracy = 0.5 * (loss_ab + loss_ba), 0.5 * (acc_ab + acc_ba)
  else:
    b = za.shape[0]
    z = jnp.concatenate([za, zb], axis=0)
    logits = z @ z.T / temperature
    # An embedding is not its own negative: -inf drops it from every softmax sum.
    logits = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits)
    loss, accuracy = _cross_entropy_to(logits, (jnp.arange(2 * b) + b) % (2 * b))
  if scale_by_temperature:
    loss = loss * (2.0 * temperature)
  return loss, {"accuracy": accuracy}


def _cross_entropy_to(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of float32 logits [R, C] against int labels [R], and the
  share of rows whose argmax is the label."""
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return jnp.mean(ce), accuracy
