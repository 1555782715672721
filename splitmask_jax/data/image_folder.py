"""A folder of the user's own images as a TFDS dataset, prepared once as ArrayRecord.

`--config.data.dataset` names a folder rather than a TFDS dataset when its value starts
with '/', './', '../' or '~' (`is_image_folder`); TFDS names never do. The folder is
prepared once into `data_dir/image_folder/<config>/1.0.0/`, where <config> is a slug of
the folder's name and a hash of its absolute path (two folders never share one), and
is then read like any TFDS dataset (`tfds.data_source` + grain).

Layout:
  a) split folders: the folder holds `train/` and one of `validation/`, `val/`, `test/`
     (the first found, in that order): those are the 'train' and 'validation' splits;
     anything else at the top is ignored.
  b) otherwise the whole folder is one pool; a seeded, deterministic share
     (VALIDATION_SHARE, at least one image; class-balanced when labelled) is held out
     as 'validation', the rest is 'train'.
  Within a split root (or the pool): image files directly in it -> unlabelled; only
  sub-folders -> labelled, the class being the first-level sub-folder's name (its images
  found recursively), classes sorted by name and, with split folders, the union over
  the splits. Images and class sub-folders side by side at one level are refused.
  Sub-folders holding no image file, and hidden files and folders (a leading '.'),
  are ignored; symbolic links to files and to class folders are followed, deeper
  links to folders are not.

Images are files with a recognised extension (IMAGE_EXTENSIONS, any case); other files
are skipped as 'not_an_image' (with a pool, they are reported under 'train'). Each
image is decoded in a pool of worker processes: EXIF orientation applied, every mode
converted to RGB (alpha composited over white, 16-bit greyscale scaled to 8 bits),
skipped as 'too_small' when its shorter side is below MIN_SIZE, downscaled to a
shorter side of MAX_SIZE when above, skipped as 'undecodable' when it fails to decode
(truncated, corrupt, decompression bomb). Records hold JPEG bytes: a file that is
already an RGB JPEG needing no change keeps its own bytes, any other is re-encoded.

What happened to every file is counted in a report (`preparation_report`), stored in
the dataset's metadata and as `preparation_report.json` beside its records.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import json
import multiprocessing
import os
import re
from collections.abc import Iterator
from collections.abc import Sequence
from concurrent import futures
from typing import Any
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import ExifTags
from PIL import Image
from PIL import ImageOps

from splitmask_jax.data import subsets

NAME = "image_folder"
_VERSION = "1.0.0"
IMAGE_EXTENSIONS = frozenset(
  (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
)
# Split folder names: the training one, then the validation ones by preference.
TRAIN_FOLDER = "train"
VALIDATION_FOLDERS = ("validation", "val", "test")
# Share of a pool held out as 'validation', and the seed of that draw.
VALIDATION_SHARE = 0.02
SPLIT_SEED = 0
# Shorter sides below MIN_SIZE are skipped, above MAX_SIZE downscaled to it (pixels).
MIN_SIZE = 16
MAX_SIZE = 512
SKIP_REASONS = ("not_an_image", "too_small", "undecodable")
REPORT_FILE = "preparation_report.json"
_FOLDER_PREFIXES = ("/", "./", "../", "~")
_LISTED_SKIPS = 100  # skipped files kept in the report
_LOGGED_SKIPS = 20  # of which logged
_JPEG_QUALITY = 95  # TFDS's own encode_jpeg default
# Images per task sent to a worker, and tasks in flight per worker: enough to keep
# the workers busy, few enough that decoded images never pile up in memory.
_CHUNK = 16
_TASKS_PER_WORKER = 4


class NoImagesError(FileNotFoundError):
  """The folder does not exist, is not a folder, or holds no image file."""


def is_image_folder(dataset: str) -> bool:
  """Whether a `data.dataset` value names a folder of images rather than a TFDS dataset.

  It does when it starts with '/', './', '../' or '~': TFDS names
  ('name/config:version') never do.
  """
  return dataset.startswith(_FOLDER_PREFIXES)


def _absolute(folder: str) -> str:
  return os.path.abspath(os.path.expanduser(folder))


def config_name(folder: str) -> str:
  """The builder config of `folder`: a slug of its name and a hash of its absolute path.

  E.g. '/data/My Photos' -> 'my_photos_3f2a9c1e'.
  """
  path = _absolute(folder)
  slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower()).strip("_")[:40]
  return f"{slug or 'images'}_{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def _is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible(names: Sequence[str]) -> list[str]:
  return sorted(n for n in names if not n.startswith("."))


def _files_below(folder: str) -> list[str]:
  """Every visible file below `folder`, recursively, as sorted absolute paths."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = _visible(dirs)
    found.extend(os.path.join(root, f) for f in _visible(files))
  return sorted(found)


class _Listing(NamedTuple):
  """The files of one split root (or of the pool), paths relative to the folder.

  images: image files, sorted by class then path.
  classes: class of each image (a sub-folder name), or None when unlabelled.
  others: files without an image extension.
  """

  images: list[str]
  classes: list[str] | None
  others: list[str]


def _list_root(root: str, folder: str) -> _Listing:
  """Lists a split root (or the pool), an existing folder, by the rules of the module
  docstring."""
  with os.scandir(root) as scan:
    entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
  files = [e.name for e in entries if e.is_file()]
  image_files = [n for n in files if _is_image_name(n)]
  class_files = {}
  for entry in entries:
    if entry.is_dir():
      below = _files_below(entry.path)
      if any(_is_image_name(f) for f in below):
        class_files[entry.name] = below
  if image_files and class_files:
    raise ValueError(
      f"{root} holds both images ({', '.join(image_files[:3])}, ...) and class "
      f"sub-folders ({', '.join(list(class_files)[:3])}, ...): put every image in a class "
      "sub-folder (labelled), or no sub-folders at all (unlabelled)."
    )

  def relative(path):
    return os.path.relpath(path, folder)

  others = [relative(os.path.join(root, n)) for n in files if not _is_image_name(n)]
  if not class_files:
    if not image_files:
      raise NoImagesError(
        f"{root} holds no image file (recognised extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
      )
    return _Listing([relative(os.path.join(root, n)) for n in image_files], None, others)
  images, classes = [], []
  for name, below in class_files.items():
    for path in below:
      if _is_image_name(path):
        images.append(relative(path))
        classes.append(name)
      else:
        others.append(relative(path))
  return _Listing(images, classes, others)


def _list_folder(folder: str) -> tuple[dict[str, _Listing], str | None]:
  """The listing of each split root, {split or 'pool': listing}, and the validation
  folder's name (None for a pool)."""
  if not os.path.isdir(folder):
    raise NoImagesError(
      f"{folder} does not exist" if not os.path.exists(folder) else f"{folder} is not a folder"
    )
  present = [name for name in VALIDATION_FOLDERS if os.path.isdir(os.path.join(folder, name))]
  if not os.path.isdir(os.path.join(folder, TRAIN_FOLDER)) or not present:
    return {"pool": _list_root(folder, folder)}, None
  roots = {"train": TRAIN_FOLDER, "validation": present[0]}
  return {
    split: _list_root(os.path.join(folder, name), folder) for split, name in roots.items()
  }, present[0]


class _Source(NamedTuple):
  """What preparation reads: per split the (relative path, class index or -1) of each
  image and the non-image files, the class names (None: unlabelled), and the layout."""

  images: dict[str, list[tuple[str, int]]]
  others: dict[str, list[str]]
  classes: list[str] | None
  layout: str


def _held_out(classes: list[str] | None, labels: np.ndarray) -> np.ndarray:
  """Sorted indices of the pool's images held out as 'validation'."""
  if classes is not None:
    return subsets.class_balanced_indices(labels, VALIDATION_SHARE, SPLIT_SEED)
  count = max(1, round(VALIDATION_SHARE * len(labels)))
  return np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(labels))[:count])


def _scan(folder: str) -> _Source:
  """Reads the folder's layout and assigns every file to a split."""
  listings, validation_folder = _list_folder(folder)
  labelled = {split: listing.classes is not None for split, listing in listings.items()}
  if len(set(labelled.values())) > 1:
    raise ValueError(
      f"{folder}: the split folders disagree on labels ("
      + ", ".join(
        f"{s}: {'class sub-folders' if l else 'images only'}" for s, l in labelled.items()
      )
      + "); give both class sub-folders, or neither."
    )
  classes = (
    sorted({c for listing in listings.values() for c in listing.classes})
    if all(labelled.values())
    else None
  )

  index = {} if classes is None else {c: i for i, c in enumerate(classes)}

  def indexed(listing):
    labels = [-1] * len(listing.images) if classes is None else [index[c] for c in listing.classes]
    return list(zip(listing.images, labels))

  if validation_folder is not None:
    return _Source(
      {split: indexed(listing) for split, listing in listings.items()},
      {split: listing.others for split, listing in listings.items()},
      classes,
      f"split folders {TRAIN_FOLDER}/ and {validation_folder}/",
    )
  pool = indexed(listings["pool"])
  if len(pool) < 2:
    raise ValueError(
      f"{folder} holds a single image file: at least 2 are needed, one "
      "of them held out for validation."
    )
  held_out = set(_held_out(classes, np.array([label for _, label in pool])).tolist())
  train = [item for i, item in enumerate(pool) if i not in held_out]
  if not train:
    raise ValueError(
      f"{folder}: holding out one image of each class for validation "
      f"leaves none for training; add images, or split them yourself into "
      f"{TRAIN_FOLDER}/ and {VALIDATION_FOLDERS[0]}/."
    )
  return _Source(
    {"train": train, "validation": [pool[i] for i in sorted(held_out)]},
    {"train": listings["pool"].others, "validation": []},
    classes,
    f"one pool, {VALIDATION_SHARE:.0%} held out for validation (seed {SPLIT_SEED})",
  )


class _Decoded(NamedTuple):
  """One image file after decoding: JPEG bytes, or why it was skipped.

  data: JPEG bytes of the RGB image, None when skipped.
  skipped: None, or one of SKIP_REASONS.
  detail: what was wrong (skipped files), '' otherwise.
  mode: the file's PIL mode ('RGB', 'L', 'CMYK', ...).
  downscaled: whether its shorter side was above MAX_SIZE.
  """

  data: bytes | None
  skipped: str | None
  detail: str
  mode: str
  downscaled: bool


def _scaled_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
  scale = shorter / min(size)
  return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
  """High-bit-depth greyscale (PIL modes I;16*, I, F) -> uint8, scaled, never clipped.

  16-bit data spans [0, 65535]. Otherwise the values' range decides: floats in
  [0, 1] span [0, 1]; values in [0, 255] are 8-bit, in [0, 65535] 16-bit; any other
  range is stretched to [0, 255].
  """
  kind, itemsize = values.dtype.kind, values.dtype.itemsize
  values = values.astype(np.float64)
  low, high = float(values.min()), float(values.max())
  if (kind, itemsize) == ("u", 2):
    full = 65535.0
  elif kind == "f" and low >= 0 and high <= 1:
    full = 1.0
  elif low >= 0 and high <= 255:
    full = 255.0
  elif low >= 0 and high <= 65535:
    full = 65535.0
  else:
    values, full = values - low, max(high - low, 1.0)
  return np.round(np.clip(values * (255 / full), 0, 255)).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB; transparency composited over white."""
  if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    image = Image.fromarray(_grey_to_uint8(np.asarray(image)))
  if image.has_transparency_data:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def _decode_image_file(path: str) -> _Decoded:
  """Decodes one image file into the JPEG bytes of an RGB image, or says why not.

  The EXIF orientation is applied, the mode converted to RGB (`_to_rgb`), an image
  whose shorter side exceeds MAX_SIZE downscaled (bicubic) to that shorter side;
  JPEGs are decoded at a reduced scale first (`Image.draft`), so huge ones are cheap.
  An RGB JPEG needing none of this keeps its own bytes.
  """
  mode = ""
  # PIL and its codecs fail in many ways on broken files (UnidentifiedImageError,
  # OSError for truncated data, DecompressionBombError, SyntaxError, ValueError,
  # struct.error...): each means this file is undecodable, not a failed preparation.
  try:
    with Image.open(path) as image:
      mode, size = image.mode, image.size
      if min(size) < MIN_SIZE:
        return _Decoded(
          None, "too_small", f"{size[0]}x{size[1]} px, under {MIN_SIZE} px", mode, False
        )
      downscaled = min(size) > MAX_SIZE
      if downscaled and image.format == "JPEG":
        image.draft(None, _scaled_size(size, MAX_SIZE))
      image.load()
      orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
      if orientation != 1:
        ImageOps.exif_transpose(image, in_place=True)
      if image.format == "JPEG" and mode == "RGB" and orientation == 1 and not downscaled:
        with open(path, "rb") as f:
          return _Decoded(f.read(), None, "", mode, False)
      rgb = _to_rgb(image)
    if downscaled and min(rgb.size) != MAX_SIZE:
      rgb = rgb.resize(_scaled_size(rgb.size, MAX_SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0)
    encoded = io.BytesIO()
    rgb.save(encoded, format="JPEG", quality=_JPEG_QUALITY)
  except Exception as e:  # pylint: disable=broad-except
    return _Decoded(None, "undecodable", f"{type(e).__name__}: {e}", mode, False)
  return _Decoded(encoded.getvalue(), None, "", mode, downscaled)


def _decode_files(paths: list[str]) -> list[_Decoded]:
  return [_decode_image_file(path) for path in paths]


def _decode_all(
  paths: list[str], executor: futures.Executor | None, in_flight: int
) -> Iterator[_Decoded]:
  """_decode_image_file of each path, in order, in `executor`'s processes (None: here),
  with at most `in_flight` chunks of paths submitted and not yet consumed."""
  chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
  if executor is None:
    for chunk in chunks:
      yield from _decode_files(chunk)
    return
  pending = collections.deque()
  for chunk in chunks:
    pending.append(executor.submit(_decode_files, chunk))
    if len(pending) >= in_flight:
      yield from pending.popleft().result()
  while pending:
    yield from pending.popleft().result()


def _features(classes: list[str] | None) -> tfds.features.FeaturesDict:
  features = {
    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
    "file_name": tfds.features.Text(),
  }
  if classes is not None:
    features["label"] = tfds.features.ClassLabel(names=classes)
  return tfds.features.FeaturesDict(features)


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The images of one folder, in the layout of the module docstring.

  Features: 'image' (uint8 [H, W, 3], JPEG-encoded), 'file_name' (the path relative
  to the folder), and 'label' when the folder is labelled. Splits: 'train',
  'validation'. The folder is scanned when the builder is made.
  """

  name = NAME
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Images of a folder, decoded to RGB and counted."}

  # TFDS looks up download checksums through a builder's code path, which needs the
  # `importlib_resources` package (as for datasets._LocalFashionMNIST); nothing is
  # downloaded here.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def __init__(self, *, folder: str, num_workers: int | None = None, **kwargs: Any):
    """Scans `folder`.

    Args:
      folder: the image folder ('~' expands).
      num_workers: decoding processes (default: one per CPU; 0: this process).
      **kwargs: DatasetBuilder's (data_dir, ...).
    """
    self._folder = _absolute(folder)
    self._num_workers = os.cpu_count() if num_workers is None else num_workers
    self._source = _scan(self._folder)
    # Per split, as its generator finishes: the report's counts and skipped files.
    self._counts: dict[str, dict[str, Any]] = {}
    self._skipped: dict[str, list[list[str]]] = {}
    self._executor: futures.Executor | None = None
    super().__init__(
      config=tfds.core.BuilderConfig(name=config_name(self._folder), description=self._folder),
      **kwargs,
    )

  def download_and_prepare(self, **kwargs: Any) -> None:
    """DatasetBuilder's, with the images decoded in `num_workers` processes.

    The processes are spawned, not forked, as grain's workers are: the preparing
    process may run JAX's threads, which a fork would copy in whatever state they
    are. So a script that prepares a folder needs the `if __name__ == "__main__":`
    guard. A worker that dies fails the preparation rather than hanging it.
    """
    if self._num_workers == 0:
      super().download_and_prepare(**kwargs)
      return
    with futures.ProcessPoolExecutor(
      self._num_workers, mp_context=multiprocessing.get_context("spawn")
    ) as executor:
      self._executor = executor
      try:
        super().download_and_prepare(**kwargs)
      finally:
        self._executor = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"The images of {self._folder}.",
      features=_features(self._source.classes),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    source = self._source
    self.info.metadata.update(
      classes=source.classes,
      layout=source.layout,
      num_source_files=sum(len(images) for images in source.images.values()),
    )
    # Validation first: it is small, and a split left empty fails the preparation.
    return {split: self._generate_examples(split) for split in reversed(source.images)}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    images, others = self._source.images[split], self._source.others[split]
    skipped_counts = dict.fromkeys(SKIP_REASONS, 0)
    skipped_counts["not_an_image"] = len(others)
    skipped = [
      [path, "not_an_image", f"extension {os.path.splitext(path)[1] or '(none)'}"]
      for path in others[:_LISTED_SKIPS]
    ]
    converted, written, downscaled = collections.Counter(), 0, 0
    decoded_images = _decode_all(
      [os.path.join(self._folder, path) for path, _ in images],
      self._executor,
      _TASKS_PER_WORKER * self._num_workers,
    )
    for (path, label), decoded in zip(images, decoded_images):
      if decoded.skipped is not None:
        skipped_counts[decoded.skipped] += 1
        if len(skipped) < _LISTED_SKIPS:
          skipped.append([path, decoded.skipped, decoded.detail])
        continue
      written += 1
      downscaled += decoded.downscaled
      if decoded.mode != "RGB":
        converted[decoded.mode] += 1
      example = {"image": decoded.data, "file_name": path}
      if self._source.classes is not None:
        example["label"] = label
      yield path, example
    if not written:
      raise NoImagesError(
        f"{self._folder}: none of the {len(images)} image files of the {split} split "
        f"can be used; the first: "
        + "; ".join(f"{path} {reason} ({detail})" for path, reason, detail in skipped[:3])
      )
    self._counts[split] = {
      "written": written,
      "skipped": skipped_counts,
      "converted": dict(sorted(converted.items())),
      "downscaled": downscaled,
    }
    self._skipped[split] = skipped
    done = [s for s in self._source.images if s in self._counts]  # in split order
    self.info.metadata["splits"] = {s: self._counts[s] for s in done}
    self.info.metadata["skipped_files"] = [entry for s in done for entry in self._skipped[s]][
      :_LISTED_SKIPS
    ]

  def _post_download_and_prepare_hook(self) -> None:
    report = preparation_report(self)
    (self.data_path / REPORT_FILE).write_text(json.dumps(report, indent=1))
    _log_report(self._folder, os.fspath(self.data_path), report)


def _log_report(folder: str, data_path: str, report: dict[str, Any]) -> None:
  def describe(split, counts):
    skips = ", ".join(f"{n} {reason}" for reason, n in counts["skipped"].items() if n)
    modes = ", ".join(f"{n} {mode}" for mode, n in counts["converted"].items())
    return (
      f"{split}: {counts['written']} written, {skips or 'none'} skipped, "
      f"{modes or 'none'} converted to RGB, {counts['downscaled']} downscaled"
    )

  logging.info(
    "Prepared image folder %s (%s, %d image files, %s) into %s. %s.",
    folder,
    report["layout"],
    report["num_source_files"],
    f"{len(report['classes'])} classes" if report["classes"] else "unlabelled",
    data_path,
    "; ".join(describe(s, c) for s, c in report["splits"].items()),
  )
  shown = report["skipped_files"][:_LOGGED_SKIPS]
  if shown:
    logging.warning(
      "Skipped files (the first %d; all counts in %s):\n%s",
      len(shown),
      os.path.join(data_path, REPORT_FILE),
      "\n".join(f"  {path}: {reason} ({detail})" for path, reason, detail in shown),
    )


def _data_root(data_dir: str | None) -> str:
  if data_dir is None:
    return tfds.core.constants.get_default_data_dir()
  return os.path.expanduser(data_dir)


def _prepared_path(folder: str, data_dir: str | None) -> str | None:
  """Where `folder` is prepared in `data_dir`, None if it is not."""
  path = os.path.join(_data_root(data_dir), NAME, config_name(folder), _VERSION)
  return path if os.path.exists(os.path.join(path, "dataset_info.json")) else None


def folder_builder(
  folder: str, data_dir: str | None, *, num_workers: int | None = None
) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `folder`'s images in `data_dir`.

  A prepared folder is read from `data_dir` alone (`tfds.builder_from_directory`:
  the folder itself may be gone); otherwise an `ImageFolder` that scans the folder
  and can prepare it.

  Args:
    folder: the image folder ('~' expands).
    data_dir: TFDS data directory; None: TFDS's default.
    num_workers: decoding processes for preparation (default: one per CPU).

  Raises:
    NoImagesError: the folder is not prepared, and it is missing, not a folder, or
      holds no image file.
    ValueError: a layout the module docstring rules out.
  """
  path = _prepared_path(folder, data_dir)
  if path is not None:
    return tfds.builder_from_directory(path)
  return ImageFolder(folder=folder, data_dir=_data_root(data_dir), num_workers=num_workers)


def preparation_report(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The report of a prepared image folder (a copy of its `info.metadata`).

  Returns:
    {'splits': {split: {'written': n, 'skipped': {reason: n}, 'converted': {mode: n},
    'downscaled': n}}, 'skipped_files': [[relative path, reason, detail], ...] (the
    first 100), 'classes': [...] or None, 'num_source_files': n (image files read),
    'layout': how the folder was read}.

  Raises:
    ValueError: `builder` holds no such report.
  """
  metadata = builder.info.metadata
  if metadata is None or "splits" not in metadata:
    raise ValueError(f"{builder.data_path} holds no image folder preparation report.")
  return copy.deepcopy(dict(metadata))


def _warn_if_stale(folder: str, data_path: str, report: dict[str, Any]) -> None:
  try:
    listings, _ = _list_folder(folder)
    count = sum(len(listing.images) for listing in listings.values())
  except (NoImagesError, ValueError) as e:
    logging.warning(
      "Image folder %s can no longer be read (%s); using the data prepared from it in %s.",
      folder,
      e,
      data_path,
    )
    return
  prepared = report["num_source_files"]
  if count != prepared:
    change = f"{count - prepared} added" if count > prepared else f"{prepared - count} removed"
    logging.warning(
      "Image folder %s holds %d image files, but %d when it was prepared (%s): the "
      "prepared data is used as it is. To prepare it again, delete %s.",
      folder,
      count,
      prepared,
      change,
      data_path,
    )


def prepare_image_folder(
  folder: str, data_dir: str | None, *, num_workers: int | None = None
) -> dict[str, Any]:
  """Prepares `folder`'s images as an ArrayRecord TFDS dataset in `data_dir`, once.

  An already prepared folder is not prepared again: its report is returned, with
  a warning when the folder's count of image files has changed since.

  Args:
    folder: the image folder ('~' expands).
    data_dir: TFDS data directory; None: TFDS's default.
    num_workers: decoding processes (default: one per CPU; 0: this process).

  Returns:
    The preparation report (`preparation_report`).

  Raises:
    NoImagesError: the folder is missing, not a folder, or holds no image file.
    ValueError: a layout the module docstring rules out.
  """
  builder = folder_builder(folder, data_dir, num_workers=num_workers)
  if not isinstance(builder, ImageFolder):  # prepared
    report = preparation_report(builder)
    _warn_if_stale(_absolute(folder), os.fspath(builder.data_path), report)
    return report
  builder.download_and_prepare(
    file_format=tfds.core.FileFormat.ARRAY_RECORD,
    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )
  return preparation_report(builder)
