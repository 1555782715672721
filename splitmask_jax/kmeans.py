"""Spherical k-means in JAX, the clustering behind the k-means tokenizer.

Points are compared by cosine similarity and assigned to the centroid with the
highest one, the same rule the tokenizer applies (paper eq. 1), so the fitted
centroids are exactly the vocabulary the tokenizer will use. A centroid is the
normalised mean (equivalently, normalised sum) of its members.

The assignment step runs over chunks of points, so the paper's scale (3M
patches, 8192 centroids) never builds an [M, K] similarity matrix: memory is
O(chunk_size * K). The whole fit is one jitted program (a scan over iterations,
each a scan over chunks).
"""

import functools
import numbers

import jax
import jax.numpy as jnp

# Norms at or below this are treated as zero: the vector has no direction.
_EPS = 1e-12

# A cluster whose member sum is shorter than this (in particular an empty
# cluster, whose sum is exactly zero) has no usable direction and is re-seeded.
_MIN_SUM_NORM = 1e-6


def unit_rows(x: jax.Array) -> jax.Array:
  """Scales the vectors along the last axis to unit L2 norm.

  Args:
    x: float array [..., d].

  Returns:
    float32 array [..., d]. Zero vectors stay zero (no NaN).
  """
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, _EPS)


def _similarities(points: jax.Array, centroids: jax.Array) -> jax.Array:
  # HIGHEST keeps true float32 products on accelerators (no TF32/bf16 passes),
  # so near-ties resolve as in float64, as far as float32 allows.
  return jnp.dot(points, centroids.T, precision=jax.lax.Precision.HIGHEST)


def nearest(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """Index of the unit centroid of highest cosine similarity to each point.

  Dividing a point by its norm scales all its similarities by the same positive
  factor, so the argmax of the dot product with unit centroids is the argmax of
  the cosine; points need no normalisation. A zero point scores 0 against every
  centroid and gets index 0 (argmax returns the first maximum).

  Args:
    points: float array [N, d].
    centroids: float32 array [K, d] with unit-norm rows.

  Returns:
    int32 array [N].
  """
  sims = _similarities(jnp.asarray(points, jnp.float32), centroids)
  return jnp.argmax(sims, axis=-1).astype(jnp.int32)


def initial_centroids(key: jax.Array, points: jax.Array, num_clusters: int) -> jax.Array:
  """Initial centroids: `num_clusters` points at distinct indices, normalised.

  Args:
    key: PRNG key.
    points: float array [M, d], M >= num_clusters.
    num_clusters: K.

  Returns:
    float32 array [K, d] (unit rows, except for zero points, which stay zero).
  """
  _check_points(points, num_clusters)
  idx = jax.random.choice(key, points.shape[0], (int(num_clusters),), replace=False)
  return unit_rows(jnp.asarray(points)[idx])


def fit_spherical_kmeans(
  key: jax.Array,
  points: jax.Array,
  num_clusters: int,
  *,
  num_iters: int,
  chunk_size: int = 4096,
  init: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Fits spherical k-means (Lloyd iterations under cosine similarity).

  Each iteration assigns every point to its nearest centroid (argmax cosine,
  as `nearest`), then replaces each centroid by the normalised sum of its
  members. Empty clusters are re-seeded: a cluster whose member sum vanishes
  (norm < 1e-6; an empty cluster's sum is exactly zero) takes the direction of
  a point drawn uniformly at random (with replacement across clusters, from a
  key folded with the iteration number). Such a cluster contributes nothing to
  the objective, whatever its direction, so re-seeding never lowers it.

  Args:
    key: PRNG key; drives the initialisation (unless `init` is given) and the
      re-seeding.
    points: float array [M, d]; normalised internally.
    num_clusters: K, 1 <= K <= M.
    num_iters: number of assign/update iterations, >= 1.
    chunk_size: points per assignment chunk (>= 1); peak memory of the
      assignment is O(chunk_size * K). Need not divide M.
    init: optional float array [K, d] of initial centroids (normalised
      internally); defaults to `initial_centroids` with a key derived from
      `key`.

  Returns:
    centroids: float32 [K, d], unit rows (a zero point drawn by the
      initialisation or a re-seed gives a zero row).
    stats: dict with
      'mean_cosine': float32 [num_iters]; entry t is the mean, over points, of
        the cosine to the nearest centroid at the start of iteration t (entry 0
        measures the initialisation). Non-decreasing, up to float32 rounding;
        the returned centroids score at least the last entry.
      'num_reseeded': int32 [num_iters]; clusters re-seeded at iteration t.
  """
  _check_points(points, num_clusters)
  if not isinstance(num_iters, numbers.Integral) or num_iters < 1:
    raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}.")
  if not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}.")
  init_key, reseed_key = jax.random.split(key)
  if init is None:
    init = initial_centroids(init_key, points, num_clusters)
  elif init.shape != (num_clusters, points.shape[1]):
    raise ValueError(
      f"init must have shape {(num_clusters, points.shape[1])} "
      f"(num_clusters, dim), got {init.shape}."
    )
  chunk_size = min(int(chunk_size), points.shape[0])
  return _fit(
    reseed_key,
    jnp.asarray(points),
    jnp.asarray(init),
    num_iters=int(num_iters),
    chunk_size=chunk_size,
  )


def _check_points(points, num_clusters):
  if getattr(points, "ndim", None) != 2:
    raise ValueError(
      f"points must be a 2-D array [M, d], got shape {getattr(points, 'shape', None)}."
    )
  if not isinstance(num_clusters, numbers.Integral) or not 1 <= num_clusters <= points.shape[0]:
    raise ValueError(
      f"num_clusters must be an int in [1, M={points.shape[0]}], got {num_clusters!r}."
    )


@functools.partial(jax.jit, static_argnames=("num_iters", "chunk_size"))
def _fit(key, points, init, *, num_iters, chunk_size):
  points = unit_rows(points)
  num_points, dim = points.shape
  num_clusters = init.shape[0]
  num_chunks = -(-num_points // chunk_size)
  pad = num_chunks * chunk_size - num_points
  # Zero padding is neutral: a zero point adds nothing to any member sum and
  # scores 0, and the objective divides by the true number of points.
  chunks = jnp.pad(points, ((0, pad), (0, 0)))
  chunks = chunks.reshape(num_chunks, chunk_size, dim)

  def assign_and_sum(centroids):
    """Per-cluster member sums [K, d] and the summed best cosine."""

    def chunk_step(carry, x):
      sums, total = carry
      sims = _similarities(x, centroids)
      labels = jnp.argmax(sims, axis=-1)
      best = jnp.max(sims, axis=-1)
      # A one-hot matmul instead of a scatter-add: deterministic summation
      # order on every backend, and a dense op accelerators run fast.
      onehot = (labels[:, None] == jnp.arange(num_clusters)).astype(jnp.float32)
      sums = sums + jnp.dot(onehot.T, x, precision=jax.lax.Precision.HIGHEST)
      return (sums, total + jnp.sum(best)), None

    init_carry = (jnp.zeros((num_clusters, dim), jnp.float32), jnp.float32(0))
    (sums, total), _ = jax.lax.scan(chunk_step, init_carry, chunks)
    return sums, total

  def iteration(centroids, t):
    sums, total = assign_and_sum(centroids)
    norms = jnp.linalg.norm(sums, axis=-1, keepdims=True)
    dead = norms[:, 0] < _MIN_SUM_NORM
    seeds = jax.random.randint(jax.random.fold_in(key, t), (num_clusters,), 0, num_points)
    new = jnp.where(dead[:, None], points[seeds], sums / jnp.maximum(norms, _EPS))
    stats = {"mean_cosine": total / num_points, "num_reseeded": jnp.sum(dead).astype(jnp.int32)}
    return new, stats

  centroids, stats = jax.lax.scan(iteration, unit_rows(init), jnp.arange(num_iters))
  return centroids, stats
