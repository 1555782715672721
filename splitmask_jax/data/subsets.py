"""Class-balanced, deterministic subsets of a labelled split (e.g. 10% of the labels).

The paper's low-data settings (ImageNet shares, few labels for fine-tuning)
keep every class's share of the examples: each class contributes the same
fraction of its own examples, drawn with a seeded generator, so the subset
depends on (labels, fraction, seed) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def class_balanced_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Indices of a subset holding `fraction` of each class's examples.

  Each class gets floor(fraction * n_c) examples, and the remaining ones, up to
  round(fraction * N) in all, go to the classes with the largest remainders;
  every class keeps at least one example. Within a class the examples are a
  seeded random draw.

  Args:
    labels: int [N] class of each record.
    fraction: share in (0, 1].
    seed: the draw's seed.

  Returns:
    int64 [n] sorted record indices.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
  classes, counts = np.unique(labels, return_counts=True)
  exact = fraction * counts
  take = np.floor(exact).astype(np.int64)
  extra = int(round(fraction * len(labels))) - int(take.sum())
  if extra > 0:
    # Largest remainders first; ties by class order (a stable sort).
    take[np.argsort(-(exact - take), kind="stable")[:extra]] += 1
  take = np.clip(take, 1, counts)
  rng = np.random.default_rng(seed)
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
  return np.sort(np.concatenate(chosen))


class Subset(Sequence):
  """Random-access view of `source` restricted to `indices` (record i is source[indices[i]])."""

  def __init__(self, source: Sequence[Any], indices: np.ndarray):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Any:
    return self._source[int(self._indices[index])]
