"""Running a frozen model over an evaluation dataset on the device mesh."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable

import numpy as np
from jax.experimental import multihost_utils

from splitmask_jax.runtime import console
from splitmask_jax.runtime import sharding


def extract_outputs(
  fn: Callable,
  params,
  data: Iterable[dict],
  mesh,
  *,
  what: str | None = None,
  total: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """`fn(params, images)` and the label of every valid example of an eval dataset.

  Args:
    fn: jitted `(params, uint8 images [B, H, W, C]) -> [B, ...]`.
    data: this process's batches of `input_pipeline.eval_dataset` ('image',
      'label', 'valid').
    what: a name for the stage: its progress is logged under it (console.Progress),
      out of `total` examples when that is given.

  Returns:
    (outputs [n, ...], labels int32 [n]) over the valid examples of every
    process, the same on each process.
  """
  outputs, labels = [], []
  progress = console.Progress(what, total) if what else None
  for batch in data:
    # Labels and valid flags travel in the global batch beside the images, so
    # the gathered rows line up whatever the mesh's device order.
    batch = sharding.global_batch({k: batch[k] for k in ("image", "label", "valid")}, mesh)
    out, label, valid = multihost_utils.process_allgather(
      (fn(params, batch["image"]), batch["label"], batch["valid"]), tiled=True
    )
    outputs.append(out[valid])
    labels.append(label[valid])
    if progress:
      progress.update(len(outputs[-1]))
  if progress:
    progress.close()
  return np.concatenate(outputs), np.concatenate(labels)
