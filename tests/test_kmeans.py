"""Tests for splitmask_jax.kmeans (spherical k-means)."""

import jax
import numpy as np
import pytest

from splitmask_jax import kmeans


def _reference_kmeans(points, init, num_iters):
  """Float64 spherical k-means with no re-seeding.

  Returns the centroids, the per-iteration mean cosine, and the smallest
  top-1/top-2 cosine margin met in any assignment (the test's precondition: with
  no near-ties, float32 must make the same assignments).
  """
  x = np.asarray(points, np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  c = np.asarray(init, np.float64)
  c = c / np.linalg.norm(c, axis=1, keepdims=True)
  objectives, min_margin = [], np.inf
  for _ in range(num_iters):
    cos = x @ c.T
    labels = cos.argmax(1)
    top2 = np.sort(cos, axis=1)[:, -2:]
    min_margin = min(min_margin, (top2[:, 1] - top2[:, 0]).min())
    objectives.append(cos.max(1).mean())
    for k in range(len(c)):
      s = x[labels == k].sum(0)
      assert np.linalg.norm(s) > 1e-3, "reference hit an empty cluster"
      c[k] = s / np.linalg.norm(s)
  return c, np.array(objectives), min_margin


def _blobs(rng, num_clusters, per_cluster, dim, noise):
  """Points around random unit directions, with random positive scales."""
  means = rng.normal(size=(num_clusters, dim))
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  labels = np.repeat(np.arange(num_clusters), per_cluster)
  points = means[labels] + noise * rng.normal(size=(len(labels), dim))
  points *= rng.uniform(0.2, 3.0, size=(len(labels), 1))  # cosine ignores scale
  return points.astype(np.float32), labels, means


def test_matches_float64_reference_with_shared_init():
  rng = np.random.default_rng(1)
  points, _, _ = _blobs(rng, 6, 40, 8, noise=0.5)  # overlapping blobs
  init = kmeans.initial_centroids(jax.random.key(1), points, 6)
  want, want_obj, margin = _reference_kmeans(points, init, num_iters=6)
  assert margin > 1e-5
  got, stats = kmeans.fit_spherical_kmeans(
    jax.random.key(2), points, 6, num_iters=6, chunk_size=64, init=init
  )
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["mean_cosine"]), want_obj, atol=1e-5)
  np.testing.assert_array_equal(stats["num_reseeded"], 0)
  # The data are hard enough that the iterations actually move the centroids.
  assert want_obj[-1] - want_obj[0] > 0.05


def test_initial_centroids_are_distinct_normalised_points():
  rng = np.random.default_rng(0)
  points = rng.normal(size=(50, 5)).astype(np.float32)
  init = np.asarray(kmeans.initial_centroids(jax.random.key(0), points, 50))
  unit = points / np.linalg.norm(points, axis=1, keepdims=True)
  # All 50 rows drawn from 50 points: a permutation of the normalised points.
  order = np.linalg.norm(init[:, None] - unit[None], axis=-1).argmin(1)
  assert sorted(order.tolist()) == list(range(50))
  np.testing.assert_allclose(init, unit[order], atol=1e-6)


def test_mean_cosine_never_decreases():
  rng = np.random.default_rng(1)
  points = rng.normal(size=(500, 6)).astype(np.float32)
  points[:3] = 0.0  # zero points must not produce NaN or break monotonicity
  centroids, stats = kmeans.fit_spherical_kmeans(
    jax.random.key(0), points, 24, num_iters=12, chunk_size=128
  )
  objective = np.asarray(stats["mean_cosine"])
  assert np.isfinite(np.asarray(centroids)).all()
  assert np.all(np.diff(objective) >= -1e-6), objective
  assert objective[-1] > objective[0] + 0.01
  # The returned centroids score at least the last recorded objective.
  norms = np.linalg.norm(points, axis=1, keepdims=True)
  unit = points / np.maximum(norms, 1e-12)
  final = (unit @ np.asarray(centroids).T).max(1).mean()
  assert final >= objective[-1] - 1e-6


def test_reseeds_empty_clusters():
  # Duplicate init centroids: argmax ties go to the first, the second copy is
  # empty and must be re-seeded onto a data point rather than kept or NaN.
  rng = np.random.default_rng(2)
  points, _, _ = _blobs(rng, 3, 30, 4, noise=0.1)
  init = np.stack([points[0], points[0], points[40], points[80]])
  centroids, stats = kmeans.fit_spherical_kmeans(
    jax.random.key(0), points, 4, num_iters=5, chunk_size=64, init=init
  )
  assert stats["num_reseeded"][0] == 1
  np.testing.assert_allclose(np.linalg.norm(np.asarray(centroids), axis=1), 1.0, atol=1e-6)


def test_recovers_well_separated_clusters():
  rng = np.random.default_rng(3)
  points, labels, _ = _blobs(rng, 4, 50, 16, noise=0.05)
  # Start from one random member of each cluster, far from the cluster mean in
  # units of the noise; k-means must move to the normalised member means.
  init = points[[rng.integers(50) + 50 * k for k in range(4)]]
  centroids, _ = kmeans.fit_spherical_kmeans(
    jax.random.key(0), points, 4, num_iters=4, chunk_size=64, init=init
  )
  unit = points / np.linalg.norm(points, axis=1, keepdims=True)
  sums = np.stack([unit[labels == k].sum(0) for k in range(4)])
  want = sums / np.linalg.norm(sums, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(centroids), want, atol=1e-5)


def test_recovers_clusters_from_random_init():
  # More centroids than clusters, so every cluster receives an initial point;
  # every centroid must then settle inside one cluster, and every cluster must
  # hold a centroid.
  rng = np.random.default_rng(4)
  points, _, means = _blobs(rng, 3, 60, 16, noise=0.02)
  centroids, _ = kmeans.fit_spherical_kmeans(
    jax.random.key(5), points, 12, num_iters=8, chunk_size=64
  )
  cos = np.asarray(centroids) @ means.T
  assert (cos.max(1) > 0.98).all()
  assert (cos.max(0) > 0.98).all()


@pytest.mark.parametrize("chunk_size", [7, 50, 1000])
def test_chunked_assignment_equals_unchunked(chunk_size):
  rng = np.random.default_rng(5)
  points = rng.normal(size=(103, 5)).astype(np.float32)
  key = jax.random.key(0)
  one_chunk, one_stats = kmeans.fit_spherical_kmeans(key, points, 9, num_iters=5, chunk_size=103)
  chunked, stats = kmeans.fit_spherical_kmeans(key, points, 9, num_iters=5, chunk_size=chunk_size)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(one_chunk), atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(stats["mean_cosine"]), np.asarray(one_stats["mean_cosine"]), atol=1e-6
  )
  np.testing.assert_array_equal(stats["num_reseeded"], one_stats["num_reseeded"])


def test_nearest_is_argmax_cosine():
  rng = np.random.default_rng(6)
  points = rng.normal(size=(40, 6)).astype(np.float32) * 5
  centroids = kmeans.unit_rows(rng.normal(size=(7, 6)))
  unit = points.astype(np.float64)
  unit /= np.linalg.norm(unit, axis=1, keepdims=True)
  want = (unit @ np.asarray(centroids, np.float64).T).argmax(1)
  np.testing.assert_array_equal(kmeans.nearest(points, centroids), want)


def test_fit_compiles_once_for_all_iterations():
  rng = np.random.default_rng(7)
  points = rng.normal(size=(31, 3)).astype(np.float32)
  before = kmeans._fit._cache_size()
  for num_iters in (2, 2):
    kmeans.fit_spherical_kmeans(
      jax.random.key(num_iters), points, 3, num_iters=num_iters, chunk_size=8
    )
  assert kmeans._fit._cache_size() == before + 1


def test_argument_checks():
  points = np.zeros((10, 3), np.float32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_clusters"):
    kmeans.fit_spherical_kmeans(key, points, 11, num_iters=1)
  with pytest.raises(ValueError, match="num_iters"):
    kmeans.fit_spherical_kmeans(key, points, 2, num_iters=0)
  with pytest.raises(ValueError, match="chunk_size"):
    kmeans.fit_spherical_kmeans(key, points, 2, num_iters=1, chunk_size=0)
  with pytest.raises(ValueError, match="init"):
    kmeans.fit_spherical_kmeans(key, points, 2, num_iters=1, init=np.zeros((3, 3)))
  with pytest.raises(ValueError, match="points"):
    kmeans.fit_spherical_kmeans(key, points[0], 2, num_iters=1)
