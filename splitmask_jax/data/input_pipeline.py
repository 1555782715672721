"""Host input pipelines (grain): augmented pre-training batches and evaluation batches.

Records come from a random-access source (`tfds.data_source`, or any sequence of dicts
holding 'image': uint8 [H, W, C] with C = 1 or 3, and 'label' for evaluation). Images
leave the host as uint8 [b, H, W, C]; conversion to float happens on the device.

Randomness: every example's augmentation and mask come from a generator that grain
derives from (pipeline seed, position of the example in the global stream). Batches
therefore depend only on the seed and the global batch size, neither on the number
of prefetch workers nor on where the pipeline was resumed.

An objective that trains on several views of each image instead of one crop (DINO's
multi-crop: `multi_crop`) passes a `views_fn`; its views replace 'image' in the
batches, drawn with the same discipline, and drawn again identically for evaluation
from a generator of the example's index.

Unreadable records (an image that fails to decode) do not stop a run: pre-training
takes the next readable record of the source in its place, so batches stay full and
deterministic, and counts them; evaluation marks them invalid.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import grain
import numpy as np
from absl import logging
from PIL import Image

MaskFn = Callable[[np.random.Generator], dict[str, np.ndarray]]
# One uint8 [H, W, C] image and a generator in, the augmented image out.
ImageAugmentFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# One record's uint8 [H, W, C] image and a generator in, its views out: {key: uint8
# array of a fixed shape} (`multi_crop`).
ViewsFn = Callable[[np.ndarray, np.random.Generator], dict[str, np.ndarray]]

# Bicubic as in BEiT's pre-training crop.
_RESAMPLE = Image.Resampling.BICUBIC
_CROP_ATTEMPTS = 10
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)
# Batch key of the number of unreadable records skipped to fill each example.
SKIPPED_KEY = "skipped_images"
# More unreadable records in a row than this means a broken dataset, not a few
# broken files: that fails rather than reading on.
_MAX_UNREADABLE_IN_A_ROW = 100


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
      f"image must be uint8 [H, W, C] with C in (1, 3), got {image.dtype} {image.shape}."
    )
  return image


def _resize(
  image: np.ndarray, image_size: int, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
  """Crops `box` (left, upper, right, lower) of `image` and resizes it (uint8)."""
  height, width, channels = image.shape
  if box in (None, (0, 0, width, height)) and (height, width) == (image_size,) * 2:
    return image
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((image_size, image_size), _RESAMPLE, box=box))
  return out[..., None] if channels == 1 else out


def sample_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float],
  ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
) -> tuple[int, int, int, int]:
  """Samples a random resized crop with torchvision's rule.

  Up to 10 tries draw an area fraction ~ U(scale) and an aspect ratio (w / h)
  log-uniform in `ratio`, keeping the first box that fits, at a uniform position;
  otherwise the largest centred box whose aspect ratio is clipped to `ratio`.

  Args:
    height, width: image size in pixels.
    rng: generator of the draws.
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio width / height.

  Returns:
    (top, left, h, w) in pixels, 0 < h <= height, 0 < w <= width.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_CROP_ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def augment(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  image_size: int,
  crop_scale: tuple[float, float],
  crop_ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
) -> np.ndarray:
  """Random resized crop to image_size x image_size, then a random horizontal flip.

  Args:
    image: uint8 [H, W, C], C in (1, 3).
    rng: generator of the crop and flip draws.
    image_size: output side in pixels.
    crop_scale: (min, max) area fraction of the crop.
    crop_ratio: (min, max) aspect ratio width / height of the crop.

  Returns:
    uint8 [image_size, image_size, C].
  """
  image = _check_image(image)
  top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng, crop_scale, crop_ratio)
  out = _resize(image, image_size, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


class CropGroup(NamedTuple):
  """Views of an image stacked under one batch key (see `multi_crop`).

  Attributes:
    key: the batch key, e.g. 'global'.
    size: side of each view in pixels.
    scale: (min, max) area fraction of each random resized crop.
    augment_fns: one per view, applied after its crop and flip (None: nothing);
      their number is the number of views.
  """

  key: str
  size: int
  scale: tuple[float, float]
  augment_fns: tuple[ImageAugmentFn | None, ...]


def multi_crop(
  image: np.ndarray, rng: np.random.Generator, *, groups: Sequence[CropGroup]
) -> dict[str, np.ndarray]:
  """Several augmented views of one image (DINO's multi-crop), as a `ViewsFn`.

  Each view is a random resized crop and flip (`augment`) followed by its own
  augmentation; the views draw from `rng` one after the other, group by group,
  so they depend on the image and the generator's state alone.

  Args:
    image: uint8 [H, W, C], C in (1, 3).
    groups: what to draw (CropGroup).

  Returns:
    {group.key: uint8 [len(group.augment_fns), group.size, group.size, C]}.
  """
  views = {}
  for group in groups:
    crops = []
    for augment_fn in group.augment_fns:
      crop = augment(image, rng, image_size=group.size, crop_scale=group.scale)
      crops.append(crop if augment_fn is None else augment_fn(crop, rng))
    views[group.key] = np.stack(crops)
  return views


def _read(source: Sequence[Any], index: int) -> Any | None:
  """`source[index]`, or None when the record cannot be read or decoded."""
  try:
    return source[index]
  # Decoders fail in many ways (PIL raises UnidentifiedImageError or OSError;
  # OpenCV returns None, on which TFDS then calls a method), so any error while
  # reading one record makes that record unreadable; _SkipUnreadable fails on
  # a source whose records fail in a long row.
  except Exception as e:  # pylint: disable=broad-except
    logging.log_every_n(logging.WARNING, "Skipping unreadable record %d: %r", 100, index, e)
    return None


class _SkipUnreadable:
  """Random-access view of a source whose record i is (record, skipped).

  `record` is the first readable record among source[i], source[i + 1], ...
  (cyclically) and `skipped` the number of unreadable ones passed over, so the
  result depends on i alone.
  """

  def __init__(self, source: Sequence[Any]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[Any, int]:
    size = len(self._source)
    for skipped in range(min(size, _MAX_UNREADABLE_IN_A_ROW)):
      record = _read(self._source, (index + skipped) % size)
      if record is not None:
        return record, skipped
    raise ValueError(
      f"Records {index % size} to {(index + skipped) % size} of the "
      f"source are all unreadable (see the warnings above): the data "
      f"is broken, not a few files of it."
    )


def _record_image(record: Mapping[str, Any]) -> np.ndarray:
  if "image" not in record:
    raise ValueError(f"records must hold an 'image'; this one holds {sorted(record)}.")
  return _check_image(record["image"])


def _masks(mask_fn: MaskFn, rng: np.random.Generator) -> dict[str, np.ndarray]:
  masks = mask_fn(rng)
  if not isinstance(masks, Mapping) or {"image", "label", "valid", SKIPPED_KEY} & set(masks):
    raise ValueError(
      "mask_fn must return a dict of arrays whose keys are not "
      f"'image', 'label', 'valid' or {SKIPPED_KEY!r}, got {masks!r}."
    )
  return dict(masks)


def _pretrain_example(
  item: tuple[Mapping[str, Any], int],
  rng: np.random.Generator,
  *,
  image_size: int,
  crop_scale: tuple[float, float],
  crop_ratio: tuple[float, float],
  mask_fn: MaskFn | None,
  augment_fn: ImageAugmentFn | None,
  views_fn: ViewsFn | None,
  count_skipped: bool,
) -> dict[str, np.ndarray]:
  record, skipped = item
  # The mask generator is split off first, so masks do not depend on how many
  # draws the augmentation makes.
  mask_rng = np.random.default_rng(rng.integers(2**63, size=2))
  if views_fn is not None:
    example = _views(views_fn, _record_image(record), rng)
  else:
    image = augment(
      _record_image(record),
      rng,
      image_size=image_size,
      crop_scale=crop_scale,
      crop_ratio=crop_ratio,
    )
    if augment_fn is not None:
      image = augment_fn(image, rng)
    example = {"image": image}
  if mask_fn is not None:
    example.update(_masks(mask_fn, mask_rng))
  if count_skipped:
    example[SKIPPED_KEY] = np.int32(skipped)
  return example


def _views(views_fn: ViewsFn, image: np.ndarray, rng: np.random.Generator) -> dict:
  views = views_fn(image, rng)
  if not isinstance(views, Mapping) or {"label", "valid", SKIPPED_KEY} & set(views):
    raise ValueError(
      f"views_fn must return a dict of arrays whose keys are not 'label', 'valid' or "
      f"{SKIPPED_KEY!r}, got {views!r}."
    )
  return dict(views)


def _check_common(
  source: Sequence[Any],
  batch_size: int,
  image_size: int,
  process_index: int,
  process_count: int,
  seed: int,
) -> None:
  if len(source) == 0:
    raise ValueError("source must hold at least one record, got an empty source.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if image_size < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index must be in [0, process_count) with "
      f"process_count >= 1, got process_index={process_index}, "
      f"process_count={process_count}."
    )
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")


def pretrain_dataset(
  source: Sequence[Mapping[str, Any]],
  *,
  batch_size: int,
  image_size: int,
  crop_scale: tuple[float, float] = (0.08, 1.0),
  crop_ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
  augment_fn: ImageAugmentFn | None = None,
  mask_fn: MaskFn | None,
  views_fn: ViewsFn | None = None,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  prefetch_buffer: int = 2,
  count_skipped: bool = False,
) -> grain.IterDataset:
  """Infinite stream of augmented, masked pre-training batches for one process.

  The global stream is the source reshuffled every epoch, epoch after epoch;
  process p takes its elements p, p + P, p + 2P, ... (P = process_count), so the
  P per-process batches of one step together cover consecutive elements of the
  global stream: within an epoch the processes see disjoint examples, and the
  global batches do not depend on P (up to their order). Each element is randomly
  resized-cropped and flipped, then passed through `augment_fn`, and `mask_fn`
  draws its mask from a generator of its own.

  Args:
    source: random-access records holding 'image': uint8 [H, W, C], C in (1, 3).
    batch_size: examples per batch of this process.
    image_size: side of the output images in pixels.
    crop_scale: (min, max) area fraction of the random resized crop.
    crop_ratio: (min, max) aspect ratio width / height of the crop.
    augment_fn: `(image, rng) -> image` after the crop and flip (the small-data
      photometric augmentation, photometric.py), or None. It does not change
      the masks, which come from a generator split off before the crop.
    mask_fn: maps a generator to a dict of mask arrays of fixed shapes (one
      example), or None for images only.
    views_fn: `(image, rng) -> {key: view array}` (`multi_crop`), drawn from the
      example's generator in place of the crop, flip and `augment_fn`: its
      views replace 'image'. None: one image per example.
    seed: pipeline seed in [0, 2**32); shuffling, augmentation and masks follow
      from it.
    process_index, process_count: this process and the number of processes.
    num_workers: prefetching worker processes; 0 computes in this process. Worker
      processes read grain's absl flags: parse them first (absl.app.run does).
    prefetch_buffer: batches prepared ahead (and threads preparing them) in this
      process or in each worker.
    count_skipped: whether batches carry SKIPPED_KEY. An unreadable record is
      always replaced by the next readable one of the source (see _SkipUnreadable).

  Returns:
    grain IterDataset of dicts: 'image' uint8 [batch_size, image_size, image_size,
    C] (or the views of `views_fn`, each with a leading batch axis), each mask
    array with a leading batch axis, and when count_skipped SKIPPED_KEY int32
    [batch_size], the unreadable records passed over to fill each example
    (other record fields, such as 'label', are dropped). Its
    iterator's `get_state()` / `set_state()` save and restore the position in
    the stream.
  """
  _check_common(source, batch_size, image_size, process_index, process_count, seed)
  _check_stream_args(crop_scale, crop_ratio, num_workers, prefetch_buffer)
  example_fn = functools.partial(
    _pretrain_example,
    image_size=image_size,
    crop_scale=tuple(crop_scale),
    crop_ratio=tuple(crop_ratio),
    mask_fn=mask_fn,
    augment_fn=augment_fn,
    views_fn=views_fn,
    count_skipped=count_skipped,
  )
  return _batched_stream(
    _shuffled_records(source, seed, repeats=1),
    example_fn,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    num_workers=num_workers,
    prefetch_buffer=prefetch_buffer,
  )


def _check_stream_args(crop_scale, crop_ratio, num_workers, prefetch_buffer) -> None:
  if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
    raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}.")
  if not 0 < crop_ratio[0] <= crop_ratio[1]:
    raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {crop_ratio}.")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
  if prefetch_buffer < 1:
    raise ValueError(f"prefetch_buffer must be >= 1, got {prefetch_buffer}.")


class _RepeatedRecords(grain.MapDataset):
  """Each epoch of `parent` (an endlessly reshuffled source of `size` records) with
  its first size / repeats records each taken `repeats` times in a row.

  An epoch keeps its length, so schedules in epochs mean the same number of
  updates with or without repetition (DeiT's repeated-augmentation sampler).
  """

  def __init__(self, parent: grain.MapDataset, size: int, repeats: int):
    super().__init__(parent)
    self._size, self._repeats = size, repeats

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, self._size)
    return self._parent[epoch * self._size + position // self._repeats]


def _shuffled_records(source: Sequence[Any], seed: int, repeats: int) -> grain.MapDataset:
  """The endless global stream of (record, skipped) pairs, reshuffled every epoch."""
  ds = grain.MapDataset.source(_SkipUnreadable(source)).seed(seed).shuffle().repeat()
  return ds if repeats == 1 else _RepeatedRecords(ds, len(source), repeats)


def _batched_stream(
  records: grain.MapDataset,
  example_fn,
  *,
  batch_size: int,
  process_index: int,
  process_count: int,
  num_workers: int,
  prefetch_buffer: int,
) -> grain.IterDataset:
  """Augments the global stream, takes this process's share, batches, prefetches."""
  # Random draws before sharding: an element's generator follows from its
  # position in the global stream, not from the process that reads it.
  ds = records.random_map(example_fn)
  ds = ds[process_index::process_count]
  # Batching before the worker split keeps every batch identical for any number
  # of workers: worker w computes whole batches w, w + W, ...
  ds = ds.batch(batch_size, drop_remainder=True)
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=prefetch_buffer, prefetch_buffer_size=prefetch_buffer)
  )
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch_buffer)
    )
  return it_ds


def _finetune_example(
  item: tuple[Mapping[str, Any], int],
  rng: np.random.Generator,
  *,
  image_size: int,
  crop_scale: tuple[float, float],
  crop_ratio: tuple[float, float],
  augment_fn: ImageAugmentFn | None,
) -> dict[str, np.ndarray]:
  record, skipped = item
  if "label" not in record:
    raise ValueError(f"fine-tuning records must hold a 'label'; they hold {sorted(record)}.")
  image = augment(
    _record_image(record), rng, image_size=image_size, crop_scale=crop_scale, crop_ratio=crop_ratio
  )
  if augment_fn is not None:
    image = augment_fn(image, rng)
  return {"image": image, "label": np.int32(record["label"]), SKIPPED_KEY: np.int32(skipped)}


def finetune_dataset(
  source: Sequence[Mapping[str, Any]],
  *,
  batch_size: int,
  image_size: int,
  crop_scale: tuple[float, float] = (0.08, 1.0),
  crop_ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
  augment_fn: ImageAugmentFn | None = None,
  repeats: int = 1,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  prefetch_buffer: int = 2,
) -> grain.IterDataset:
  """Infinite stream of augmented, labelled fine-tuning batches for one process.

  The same global stream, sharding, determinism and unreadable-record handling
  as `pretrain_dataset`; each image is random-resized-cropped and flipped, then
  passed through `augment_fn`. Mixup and cutmix act on whole batches on the device
  (mixing.py).

  Args:
    source: random-access records holding 'image' uint8 [H, W, C] and 'label'.
    augment_fn: `(image, rng) -> image` after the crop and flip (RandAugment or
      colour jitter), or None.
    repeats: each record appears this many times in a row in the global stream,
      differently augmented, so on different processes (repeated augmentation);
      an epoch keeps len(source) examples.
    Others: as `pretrain_dataset`.

  Returns:
    grain IterDataset of dicts: 'image' uint8 [batch_size, image_size,
    image_size, C], 'label' int32 [batch_size], SKIPPED_KEY int32 [batch_size].
  """
  _check_common(source, batch_size, image_size, process_index, process_count, seed)
  _check_stream_args(crop_scale, crop_ratio, num_workers, prefetch_buffer)
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  example_fn = functools.partial(
    _finetune_example,
    image_size=image_size,
    crop_scale=tuple(crop_scale),
    crop_ratio=tuple(crop_ratio),
    augment_fn=augment_fn,
  )
  return _batched_stream(
    _shuffled_records(source, seed, repeats),
    example_fn,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    num_workers=num_workers,
    prefetch_buffer=prefetch_buffer,
  )


def _eval_example(
  index: int,
  *,
  source: Sequence[Mapping[str, Any]],
  num_examples: int,
  process_index: int,
  process_count: int,
  image_size: int,
  channels: int,
  with_labels: bool,
  mask_fn: MaskFn | None,
  views_fn: ViewsFn | None,
  seed: int,
  center_crop: float | None,
) -> dict[str, np.ndarray]:
  global_index = process_index + index * process_count
  record = _read(source, global_index) if global_index < num_examples else None
  valid = record is not None
  if views_fn is not None:
    # Seeded by the example's index alone, apart from the masks' generator: the
    # same views on every pass. A padding example's views (of a black image) only
    # give the arrays their shapes.
    image = _record_image(record) if valid else np.zeros((image_size,) * 2 + (channels,), np.uint8)
    example = _views(views_fn, image, np.random.default_rng((seed, global_index, 1)))
  elif valid:
    image = _record_image(record)
    box = None
    if center_crop is not None:
      # Resizing the short side to image_size / center_crop and cropping the
      # central image_size square, in one resampling of the matching source box.
      height, width = image.shape[:2]
      side = max(1, round(min(height, width) * center_crop))
      top, left = (height - side) // 2, (width - side) // 2
      box = (left, top, left + side, top + side)
    example = {"image": _resize(image, image_size, box=box)}
  else:
    example = {"image": np.zeros((image_size, image_size, channels), np.uint8)}
  example["valid"] = np.bool_(valid)
  if with_labels:
    example["label"] = np.int32(record["label"] if valid else 0)
  if mask_fn is not None:
    # Seeded by the example's index alone: the same masks on every pass, for any
    # batch size or number of processes.
    example.update(_masks(mask_fn, np.random.default_rng((seed, global_index))))
  return example


def eval_dataset(
  source: Sequence[Mapping[str, Any]],
  *,
  batch_size: int,
  image_size: int,
  process_index: int = 0,
  process_count: int = 1,
  mask_fn: MaskFn | None = None,
  views_fn: ViewsFn | None = None,
  seed: int = 0,
  num_examples: int | None = None,
  with_labels: bool = True,
  center_crop: float | None = None,
) -> grain.IterDataset:
  """Finite, deterministic evaluation batches for one process, padded to batch_size.

  Process p reads examples p, p + P, ... of the first `num_examples` records, each
  resized to image_size x image_size, or its central square crop with
  `center_crop` (no augmentation). Every process yields the
  same number of batches, ceil(ceil(num_examples / P) / batch_size); padding
  examples and unreadable records (zero images, label 0) have valid=False.
  Iterating again gives the same batches.

  Args:
    source: random-access records holding 'image': uint8 [H, W, C] (C in (1, 3))
      and, when with_labels, 'label'.
    batch_size: examples per batch of this process.
    image_size: side of the output images in pixels.
    process_index, process_count: this process and the number of processes.
    mask_fn: maps a generator to a dict of mask arrays; its generator is seeded by
      (seed, example index). None for no masks.
    views_fn: as `pretrain_dataset`'s, from a generator seeded by (seed, example
      index, 1): the random views of training, the same on every pass. Its views
      replace 'image'; `center_crop` does not apply.
    seed: seed of the masks and views.
    num_examples: use only the first num_examples records (default: all).
    with_labels: whether batches carry 'label'.
    center_crop: None resizes the whole image; a ratio r in (0, 1] resizes the
      central square of side r * (short side), the test crop ratio of
      fine-tuning (0.875: resize to image_size / 0.875, crop image_size).

  Returns:
    grain IterDataset of dicts: 'image' uint8 [batch_size, image_size, image_size,
    C] (or the views of `views_fn`), 'valid' bool [batch_size], 'label' int32
    [batch_size] when with_labels, and each mask array with a leading batch axis.

  Raises:
    ValueError: bad arguments, or with_labels and records without 'label'.
  """
  _check_common(source, batch_size, image_size, process_index, process_count, seed)
  if center_crop is not None and not 0 < center_crop <= 1:
    raise ValueError(f"center_crop must be in (0, 1] or None, got {center_crop}.")
  if num_examples is None:
    num_examples = len(source)
  elif not 1 <= num_examples <= len(source):
    raise ValueError(
      f"num_examples must be in [1, {len(source)}] (the source's size) or None, got {num_examples}."
    )
  first, _ = _SkipUnreadable(source)[0]
  if with_labels and "label" not in first:
    raise ValueError(
      f"with_labels=True needs records holding 'label'; they hold "
      f"{sorted(first)}. Pass with_labels=False for unlabelled data."
    )
  channels = _record_image(first).shape[-1]
  per_process = -(-num_examples // process_count)
  num_batches = -(-per_process // batch_size)
  example_fn = functools.partial(
    _eval_example,
    source=source,
    num_examples=num_examples,
    process_index=process_index,
    process_count=process_count,
    image_size=image_size,
    channels=channels,
    with_labels=with_labels,
    mask_fn=mask_fn,
    views_fn=views_fn,
    seed=seed,
    center_crop=center_crop,
  )
  ds = grain.MapDataset.range(num_batches * batch_size).map(example_fn)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
