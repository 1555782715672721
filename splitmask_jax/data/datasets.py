"""TFDS datasets on disk: preparing them (offline where possible) and opening them.

Training reads datasets through `tfds.data_source`, i.e. from ArrayRecord files with
random access and no TensorFlow. Preparing Fashion-MNIST or an image folder needs none
either: their images reach TFDS already encoded (PNG, JPEG) by PIL. Other TFDS builders
may hand TFDS image arrays, which TFDS encodes with TensorFlow; preparing those without
it installed stops with `DatasetNotPreparedError` naming the package to install.

A dataset is named as in `config.data.dataset`: a TFDS name, or a folder of the user's
own images (a path starting with '/', './', '../' or '~'; `image_folder.py`), which is
prepared into the same form and then read like any TFDS dataset. A TFDS dataset that
needs a manual download is prepared from `config.data.manual_dir` when that is set.

The embedded default dataset, Fashion-MNIST, is prepared under TFDS's own name, version,
features, keys and split layout (`fashion_mnist` 3.0.1, train / test), so a copy built
here from local IDX files and one built by TFDS online hold the same images and labels in
the same order and are interchangeable (the PNG bytes differ: PIL encodes them here,
TensorFlow there; both are lossless).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from tensorflow_datasets.image_classification import mnist

from splitmask_jax.data import image_folder
from splitmask_jax.data import in_memory

# Registers 'i_naturalist2019' with TFDS, so that tfds.builder finds it by name.
from splitmask_jax.data import inaturalist2019  # pylint: disable=unused-import
from splitmask_jax.data import subsets

FASHION_MNIST = "fashion_mnist"
# Labels read per call when reading a whole split's labels.
_LABEL_CHUNK = 8192
# Splits decoded by load_source, by (prepared dataset, split, its info's mtime).
_IN_MEMORY: dict[tuple, in_memory.InMemorySource] = {}
# Where Debian's package `dataset-fashion-mnist` installs the four IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# File names of the four IDX files per split, as published by Zalando and Debian.
FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_IMAGE_SIZE = 28
_FASHION_MNIST_NUM_CLASSES = 10
_IDX_UBYTE = 0x08


class DatasetNotPreparedError(FileNotFoundError):
  """The dataset is not on disk as ArrayRecord and could not be prepared here.

  The message says how to get the data.
  """


class DatasetInfo(NamedTuple):
  """What a caller needs to know about a prepared dataset.

  Attributes:
    num_examples: examples per split, e.g. {'train': 60000, 'test': 10000}.
    num_classes: number of classes of the 'label' feature, None without one.
    image_shape: (H, W, C) of the 'image' feature; H, W are None when images
      vary in size.
  """

  num_examples: dict[str, int]
  num_classes: int | None
  image_shape: tuple[int | None, ...]


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
  """Reads a gzip-compressed IDX file of unsigned bytes (the MNIST file format).

  Args:
    path: a `.gz` IDX file.
    ndim: expected number of dimensions (3 for images, 1 for labels).

  Returns:
    uint8 array of the shape stored in the header, e.g. [N, 28, 28] or [N].

  Raises:
    ValueError: the header's magic number is not that of an unsigned-byte IDX file
      of `ndim` dimensions, or the data length does not match the header.
  """
  with gzip.open(path, "rb") as f:
    data = f.read()
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise ValueError(
      f"IDX file {path} is truncated: {len(data)} bytes, shorter than its {header_len}-byte header."
    )
  magic = bytes(data[:4])
  expected = bytes([0, 0, _IDX_UBYTE, ndim])
  if magic != expected:
    raise ValueError(
      f"IDX file {path} has magic number 0x{magic.hex()}, expected "
      f"0x{expected.hex()} (unsigned bytes, {ndim} dimensions)."
    )
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  payload = len(data) - header_len
  if payload != int(np.prod(shape)):
    raise ValueError(
      f"IDX file {path} declares shape {shape} "
      f"({int(np.prod(shape))} bytes) but holds {payload} bytes."
    )
  return np.frombuffer(data, np.uint8, offset=header_len).reshape(shape)


def read_fashion_mnist_split(
  folder: str | os.PathLike[str], split: str
) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of Fashion-MNIST from its two IDX files in `folder`.

  Args:
    folder: folder holding the files named in FASHION_MNIST_FILES.
    split: 'train' or 'test'.

  Returns:
    images uint8 [N, 28, 28, 1] and labels int64 [N] in file order.

  Raises:
    ValueError: bad `split`, or files whose headers do not describe 28x28 images
      with as many labels as images, all labels in [0, 10).
  """
  if split not in FASHION_MNIST_FILES:
    raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}.")
  image_file, label_file = (os.path.join(folder, f) for f in FASHION_MNIST_FILES[split])
  images = read_idx(image_file, ndim=3)
  labels = read_idx(label_file, ndim=1)
  size = _FASHION_MNIST_IMAGE_SIZE
  if images.shape[1:] != (size, size):
    raise ValueError(
      f"IDX file {image_file} holds images of "
      f"{images.shape[1]}x{images.shape[2]}, expected {size}x{size}."
    )
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"IDX files {image_file} and {label_file} disagree on the "
      f"number of examples: {images.shape[0]} images, "
      f"{labels.shape[0]} labels."
    )
  if labels.size and labels.max() >= _FASHION_MNIST_NUM_CLASSES:
    raise ValueError(
      f"IDX file {label_file} holds label {labels.max()}, expected "
      f"labels in [0, {_FASHION_MNIST_NUM_CLASSES})."
    )
  return images[..., None], labels.astype(np.int64)


class _LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
  """TFDS's `fashion_mnist` builder reading its IDX files from a local folder."""

  name = FASHION_MNIST

  # TFDS locates a builder's download checksums through its code path, a lookup
  # that needs the `importlib_resources` package (TFDS issue #11212); this builder
  # downloads nothing, so it has no checksums and no code path to look them up in.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def __init__(self, *, source_dir: str, **kwargs: Any):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    # Both splits are parsed before anything is written, so a bad file fails fast.
    splits = {
      split: read_fashion_mnist_split(self._source_dir, split) for split in FASHION_MNIST_FILES
    }
    return {split: _examples(*arrays) for split, arrays in splits.items()}


def _examples(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
  # The file index is the key, as in TFDS's builder: TFDS orders records by key
  # hash, so equal keys give the same record order as TFDS's own preparation.
  # The images go to TFDS as PNG bytes encoded here: given arrays, TFDS would encode
  # them with TensorFlow.
  for index, (image, label) in enumerate(zip(images, labels)):
    yield index, {"image": _png(image), "label": label}


def _png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 1] -> PNG bytes of the greyscale image (lossless)."""
  encoded = io.BytesIO()
  Image.fromarray(image[..., 0]).save(encoded, format="PNG")
  return encoded.getvalue()


def _has_fashion_mnist_files(folder: str) -> bool:
  return all(
    os.path.isfile(os.path.join(folder, f)) for files in FASHION_MNIST_FILES.values() for f in files
  )


def _resolves(host: str) -> bool:
  # Offline, TFDS's download only fails after minutes of retries; a failed name
  # lookup tells the same at once.
  try:
    socket.getaddrinfo(host, None)
  except OSError:
    return False
  return True


def _check_array_record(builder: tfds.core.DatasetBuilder, name: str, data_dir: str) -> None:
  file_format = builder.info.file_format
  if file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DatasetNotPreparedError(
      f"TFDS dataset {name!r} is prepared in {data_dir} as "
      f"{getattr(file_format, 'value', file_format)}, but reading needs "
      f"ArrayRecord (random access). Convert it with\n"
      f"  tfds convert_format --dataset_version_dir={builder.data_path} "
      f"--out_file_format=array_record\n"
      f"or prepare it again into another data_dir."
    )


def _fashion_mnist_message(data_dir: str, manual_dir: str, reason: str) -> str:
  files = ", ".join(f for pair in FASHION_MNIST_FILES.values() for f in pair)
  return (
    f"Fashion-MNIST is not prepared in {data_dir} and could not be prepared "
    f"({reason}). Get the data in one of these ways:\n"
    f"  1. install Debian's package: sudo apt-get install dataset-fashion-mnist "
    f"(it puts the four IDX files in {DEBIAN_FASHION_MNIST_DIR});\n"
    f"  2. set --config.data.manual_dir to a folder holding {files} "
    f"(looked in {manual_dir});\n"
    f"  3. run once with internet access, so that TFDS downloads it."
  )


def _other_dataset_message(name: str, data_dir: str, builder: tfds.core.DatasetBuilder) -> str:
  where = "" if data_dir is None else f" --data_dir={data_dir}"
  instructions = _manual_instructions(builder)
  if not instructions:
    return (
      f"TFDS dataset {name!r} is not prepared in {data_dir or 'TFDS default data_dir'}. "
      f"Download and prepare it once (as ArrayRecord; many TFDS builders need TensorFlow "
      f"for this: pip install -e '.[tensorflow]') with\n"
      f"  python -m splitmask_jax.data --dataset={name}{where}"
    )
  return (
    f"TFDS dataset {name!r} is not prepared in {data_dir or 'TFDS default data_dir'}, "
    f"and it needs a manual download: place the files in a folder, then set "
    f"--config.data.manual_dir=FOLDER so that the run prepares it, or prepare it "
    f"once with\n"
    f"  python -m splitmask_jax.data --dataset={name}{where} --manual_dir=FOLDER\n"
    f"Instructions:\n{instructions.strip()}"
  )


def _manual_instructions(builder: tfds.core.DatasetBuilder) -> str | None:
  return getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)


def _prepare_from_manual_dir(
  builder: tfds.core.DatasetBuilder, name: str, data_dir: str, manual_dir: str
) -> None:
  folder = epath.Path(os.path.expanduser(manual_dir))
  if not folder.is_dir() or not any(folder.iterdir()):
    raise DatasetNotPreparedError(
      f"{_other_dataset_message(name, data_dir, builder)}\n"
      f"(--config.data.manual_dir={manual_dir} "
      f"{'is empty' if folder.is_dir() else 'is not a folder'}.)"
    )
  with _tensorflow_needed(name):
    builder.download_and_prepare(
      file_format=tfds.core.FileFormat.ARRAY_RECORD,
      download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(folder), try_download_gcs=False
      ),
    )


def _lacks_tensorflow(error: BaseException | None) -> bool:
  # TFDS re-raises the ImportError under its own prefixes, so the name may be
  # only in the message, or in an exception the error was raised from.
  while error is not None:
    if isinstance(error, ImportError) and (
      error.name == "tensorflow" or "No module named 'tensorflow'" in str(error)
    ):
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def _tensorflow_needed(name: str):
  """Turns TFDS's failure to import TensorFlow while preparing `name` into an
  error that says what to install."""
  try:
    yield
  except ImportError as e:
    if not _lacks_tensorflow(e):
      raise
    raise DatasetNotPreparedError(
      f"Preparing TFDS dataset {name!r} needs TensorFlow (its builder hands TFDS "
      f"image arrays, which TFDS encodes with TensorFlow), and TensorFlow is not "
      f"installed. Install it with the package's extra, then prepare again:\n"
      f"  pip install -e '.[tensorflow]'   (from the repository; or: pip install tensorflow)\n"
      f"Runs on the prepared data do not need it."
    ) from e


def _image_folder_error(name: str, error: Exception) -> DatasetNotPreparedError:
  return DatasetNotPreparedError(
    f"config.data.dataset={name!r} names a folder of images (a value starting with "
    f"'/', './', '../' or '~'), but {error}. Set --config.data.dataset to a folder "
    f"of images, or to a TFDS dataset name."
  )


def _image_folder_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    return image_folder.folder_builder(name, data_dir)
  except image_folder.NoImagesError as e:
    raise _image_folder_error(name, e) from e


def prepare_dataset(
  name: str,
  data_dir: str | None,
  manual_dir: str | None = None,
  *,
  process_index: int = 0,
  download: bool = True,
  download_others: bool = False,
) -> None:
  """Makes sure that dataset `name` is on disk in `data_dir` as ArrayRecord.

  Does nothing when it is already prepared. A folder of images is prepared from
  its files (`image_folder.prepare_image_folder`). 'fashion_mnist' is prepared
  from its four IDX files in `manual_dir` (default: where Debian's
  `dataset-fashion-mnist` puts them) and otherwise by TFDS's own download. Other
  TFDS datasets that need a manual download are prepared from `manual_dir` when it
  is given; any other is downloaded only with `download_others` (the command
  `python -m splitmask_jax.data`: a run does not start a download of many
  gigabytes on its own). Only the process with index 0 prepares anything; the
  others return at once.

  Args:
    name: TFDS name, optionally with config and version ('name/config:1.0.0'), or
      a folder of images ('/...', './...', '../...', '~...').
    data_dir: TFDS data directory; None: TFDS's default.
    manual_dir: folder holding the four Fashion-MNIST IDX files, or the manually
      downloaded files of another TFDS dataset.
    process_index: this process's index (jax.process_index()).
    download: whether TFDS may try to download 'fashion_mnist' when no local
      files are found.
    download_others: whether TFDS may download any other dataset that needs no
      manual download.

  Raises:
    DatasetNotPreparedError: the dataset is missing and could not be prepared,
      or the image folder is missing, not a folder or holds no image; the
      message says what to do.
    ValueError: corrupt Fashion-MNIST IDX files, or an image folder whose layout
      `image_folder` rules out.
  """
  if process_index != 0:
    return
  if image_folder.is_image_folder(name):
    try:
      image_folder.prepare_image_folder(name, data_dir)
    except image_folder.NoImagesError as e:
      raise _image_folder_error(name, e) from e
    return
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    _check_array_record(builder, name, data_dir)
    return
  if builder.name != FASHION_MNIST:
    manual = _manual_instructions(builder)
    if manual and manual_dir is not None:
      _prepare_from_manual_dir(builder, name, data_dir, manual_dir)
    elif download_others and not manual:
      with _tensorflow_needed(name):
        builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
    else:
      raise DatasetNotPreparedError(_other_dataset_message(name, data_dir, builder))
    return

  source_dir = DEBIAN_FASHION_MNIST_DIR if manual_dir is None else manual_dir
  if _has_fashion_mnist_files(source_dir):
    local = _LocalFashionMNIST(source_dir=source_dir, data_dir=data_dir)
    logging.info(
      "Preparing Fashion-MNIST in %s from the IDX files in %s", local.data_dir, source_dir
    )
    local.download_and_prepare(
      file_format=tfds.core.FileFormat.ARRAY_RECORD,
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return
  reason = f"the four IDX files are not all in {source_dir}"
  host = urllib.parse.urlparse(mnist.FashionMNIST.URL).hostname
  if download and not _resolves(host):
    reason += f", and the download server {host} cannot be resolved (offline?)"
  elif download:
    try:
      with _tensorflow_needed(name):
        builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
      return
    except DatasetNotPreparedError:
      raise
    # Offline, the download fails with network errors of many types (OSError,
    # DownloadError, HTTP errors): all of them mean "no data", reported below
    # with the original exception chained.
    except Exception as exc:  # pylint: disable=broad-except
      raise DatasetNotPreparedError(
        _fashion_mnist_message(
          data_dir, source_dir, f"{reason}, and TFDS's download failed: {exc!r}"
        )
      ) from exc
  raise DatasetNotPreparedError(_fashion_mnist_message(data_dir, source_dir, reason))


def prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a dataset (a TFDS name or an image folder) prepared as ArrayRecord.

  Raises:
    DatasetNotPreparedError: it is not, with a message saying how to get it.
  """
  if image_folder.is_image_folder(name):
    builder = _image_folder_builder(name, data_dir)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    if image_folder.is_image_folder(name):
      message = (
        f"The image folder {name} is not prepared in {data_dir}: "
        f"prepare_dataset (which every run calls first) prepares it."
      )
    elif builder.name == FASHION_MNIST:
      message = _fashion_mnist_message(
        data_dir, DEBIAN_FASHION_MNIST_DIR, "prepare_dataset was not run"
      )
    else:
      message = _other_dataset_message(name, data_dir, builder)
    raise DatasetNotPreparedError(message)
  _check_array_record(builder, name, data_dir)
  return builder


def load_source(
  name: str, split: str, data_dir: str, in_memory_mib: float = 0
) -> Sequence[dict[str, Any]]:
  """Opens one split of a prepared TFDS dataset for random access.

  Args:
    name: TFDS name or image folder, as in `prepare_dataset`.
    split: TFDS split, slices allowed ('train', 'test', 'train[:1000]').
    data_dir: TFDS data directory.
    in_memory_mib: decode the whole split into memory once (in_memory.py) when its
      images have one shape and take at most this many MiB decoded; 0: never.
      The decoded split is kept for the process's later calls.

  Returns:
    The `tfds.data_source` of the split, or the split in memory: `len()` and
    `source[i]` -> dict of the decoded features, e.g. {'image': uint8 [H, W, C],
    'label': int64 scalar}.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared as ArrayRecord.
  """
  builder = prepared_builder(name, data_dir)
  source = builder.as_data_source(split=split)
  features = builder.info.features
  if in_memory_mib <= 0 or "image" not in features:
    return source
  size = in_memory.decoded_bytes(len(source), features["image"].shape)
  if size is None or size > in_memory_mib * 2**20:
    return source
  # Keyed by the prepared files' info as well: preparing the dataset again in the
  # same place (tests do) must not serve the old records.
  info_file = epath.Path(builder.data_dir) / "dataset_info.json"
  key = (str(builder.data_dir), split, info_file.stat().mtime if info_file.exists() else None)
  if key not in _IN_MEMORY:
    start = time.perf_counter()
    decoded = in_memory.decode_all(source, f"{name} {split}")
    if decoded is None:
      return source
    logging.info(
      "%s %s: %d records decoded into memory (%.0f MiB) in %.1fs",
      name,
      split,
      len(decoded),
      decoded.nbytes / 2**20,
      time.perf_counter() - start,
    )
    _IN_MEMORY[key] = decoded
  return _IN_MEMORY[key]


def dataset_info(name: str, data_dir: str) -> DatasetInfo:
  """Returns split sizes, number of classes and image shape of a prepared dataset.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared as ArrayRecord.
    ValueError: the dataset has no 'image' feature.
  """
  info = prepared_builder(name, data_dir).info
  features: Mapping[str, Any] = info.features
  if "image" not in features:
    raise ValueError(
      f"TFDS dataset {name!r} has no 'image' feature; its features are {sorted(features)}."
    )
  num_classes = features["label"].num_classes if "label" in features else None
  return DatasetInfo(
    num_examples={split: info.splits[split].num_examples for split in info.splits},
    num_classes=num_classes,
    image_shape=tuple(features["image"].shape),
  )


def load_labels(name: str, split: str, data_dir: str | None) -> np.ndarray:
  """The 'label' of every record of a prepared TFDS split, int64 [N].

  Images are read as encoded bytes and never decoded, so this takes about a
  second per 60k records.
  """
  source = prepared_builder(name, data_dir).as_data_source(
    split=split, decoders={"image": tfds.decode.SkipDecoding()}
  )
  labels = []
  for start in range(0, len(source), _LABEL_CHUNK):
    records = source.__getitems__(range(start, min(start + _LABEL_CHUNK, len(source))))
    labels.extend(int(r["label"]) for r in records)
  return np.asarray(labels, np.int64)


def training_share(data) -> Sequence[dict[str, Any]]:
  """The training split of `config.data`, or its seeded class-balanced share.

  Args:
    data: a config's `data` group: dataset, train_split, data_dir,
      train_fraction, subset_seed, in_memory_mib.

  Returns:
    The split's data source when train_fraction is 1, else a `Subset` of it. A
    dataset without labels is treated as one class (a uniform seeded draw).
  """
  source = load_source(data.dataset, data.train_split, data.data_dir, data.in_memory_mib)
  if data.train_fraction == 1:
    return source
  if dataset_info(data.dataset, data.data_dir).num_classes is None:
    labels = np.zeros(len(source), np.int64)
  else:
    labels = load_labels(data.dataset, data.train_split, data.data_dir)
  indices = subsets.class_balanced_indices(labels, data.train_fraction, data.subset_seed)
  logging.info(
    "Training on %d of %d examples of %s (a class-balanced %.3g share)",
    len(indices),
    len(source),
    data.train_split,
    data.train_fraction,
  )
  return subsets.Subset(source, indices)


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m splitmask_jax.data --dataset=NAME [--data_dir=D] [--manual_dir=M]`."""
  parser = argparse.ArgumentParser(
    description="Prepares a dataset once as ArrayRecord, downloading it when TFDS can."
  )
  parser.add_argument(
    "--dataset", required=True, help="a TFDS name ('domainnet/clipart') or a folder of images"
  )
  parser.add_argument("--data_dir", default=None, help="TFDS data directory")
  parser.add_argument("--manual_dir", default=None, help="folder of the manually downloaded files")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  prepare_dataset(args.dataset, args.data_dir, args.manual_dir, download_others=True)
  info = dataset_info(args.dataset, args.data_dir)
  print(
    f"{args.dataset}: prepared; examples per split {info.num_examples}, {info.num_classes} classes."
  )


if __name__ == "__main__":
  main()
