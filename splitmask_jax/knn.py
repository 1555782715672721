"""k-nearest-neighbour accuracy of frozen features: did pre-training learn anything?

The classifier of DINO and NPID: cosine similarity to a labelled memory bank,
the k nearest vote with weights exp(similarity / temperature). It needs no
training, so it is a cheap end-of-run check beside the same figure for the
randomly initialised encoder.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_predict(bank, bank_labels, queries, *, k, num_classes, temperature):
  sims = queries @ bank.T  # [q, n]
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  votes = jax.nn.one_hot(bank_labels[top_idx], num_classes) * weights[..., None]
  return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_accuracy(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  *,
  k: int,
  temperature: float,
  num_classes: int,
  chunk: int = 1024,
) -> float:
  """Top-1 accuracy of weighted k-NN on L2-normalised features.

  Args:
    train_features: [n, D] memory bank; train_labels: int [n].
    test_features: [q, D] queries; test_labels: int [q].
  """
  if k > len(train_features):
    raise ValueError(f"knn k={k} exceeds the {len(train_features)} training features")

  def normalise(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  bank = jnp.asarray(normalise(train_features))
  bank_labels = jnp.asarray(train_labels, jnp.int32)
  queries = normalise(test_features)
  predictions = [
    np.asarray(
      _knn_predict(
        bank,
        bank_labels,
        jnp.asarray(queries[i : i + chunk]),
        k=k,
        num_classes=num_classes,
        temperature=temperature,
      )
    )
    for i in range(0, len(queries), chunk)
  ]
  return float(np.mean(np.concatenate(predictions) == np.asarray(test_labels)))
