"""A small split decoded once into arrays: every later read is an index.

A `tfds.data_source` reads and decodes each record on every access: about 200 us for a
28 x 28 PNG of Fashion-MNIST, most of it ArrayRecord's per-record read, which is more
than the augmentation and the mask together and is paid again every epoch, by the
tokenizer's patch sample, by the held-out loss and by the k-NN features. A split whose
decoded images fit in a few hundred MiB is decoded here once, in chunks (TFDS's batched
read, under half the time per record), and served from memory after that.

Hand-written because grain's only cache (`IterDataset.cache`) replays one ordered
stream of elements; the pipeline needs random access to the source, reshuffled every
epoch (input_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

_CHUNK = 4096


class InMemorySource(Sequence):
  """Random-access records held as arrays: record i is {key: array[i]}.

  Args:
    arrays: {feature: array with a leading axis of the split's length}, e.g.
      'image': uint8 [N, H, W, C], 'label': int64 [N].
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"arrays must share their leading length, got {lengths}.")
    self._arrays = dict(arrays)
    (self._length,) = lengths

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -self._length <= index < self._length:
      raise IndexError(f"record {index} of a source of {self._length}")
    return {k: v[index] for k, v in self._arrays.items()}

  @property
  def nbytes(self) -> int:
    return sum(v.nbytes for v in self._arrays.values())


def decoded_bytes(num_records: int, image_shape: Sequence[int | None]) -> int | None:
  """The bytes of a split's decoded uint8 images, or None when their shape varies."""
  if any(d is None for d in image_shape):
    return None
  return num_records * int(np.prod(image_shape))


def decode_all(source: Sequence[Mapping[str, Any]], what: str) -> InMemorySource | None:
  """Every record of `source` as an InMemorySource, or None where that cannot hold it.

  Reads `source.__getitems__` in chunks where the source has it. Returns None (and
  logs why) when a record fails to read or decode, or the records' fields do not
  stack into arrays (shapes that vary): the caller keeps reading the source record
  by record, where the input pipeline passes over unreadable records one at a time.
  """
  getitems = getattr(source, "__getitems__", None)
  columns: dict[str, list] = {}
  try:
    for start in range(0, len(source), _CHUNK):
      indices = range(start, min(start + _CHUNK, len(source)))
      records = getitems(indices) if getitems else [source[i] for i in indices]
      for record in records:
        for key, value in record.items():
          columns.setdefault(key, []).append(value)
    return InMemorySource({k: np.stack(v) for k, v in columns.items()})
  # Decoders fail in many ways (input_pipeline._read): any of them means reading
  # record by record, which skips just the bad ones.
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("%s stays on disk (read record by record): %r", what, e)
    return None
