"""TFDS datasets on disk: preparing them (offline where possible) and opening them.

Training reads datasets through `tfds.data_source`, i.e. from ArrayRecord files with
random access and no TensorFlow at read time. Preparing a dataset (writing those files)
needs TensorFlow, because TFDS's `Image` feature PNG-encodes with it.

The embedded default dataset, Fashion-MNIST, is prepared under TFDS's own name, version,
features, keys and split layout (`fashion_mnist` 3.0.1, train / test), so a copy built
here from local IDX files and one built by TFDS online hold the same records in the same
order and are interchangeable.
"""

from __future__ import annotations

import gzip
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

FASHION_MNIST = "fashion_mnist"
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
    raise ValueError(f"IDX file {path} is truncated: {len(data)} bytes, shorter "
                     f"than its {header_len}-byte header.")
  magic = bytes(data[:4])
  expected = bytes([0, 0, _IDX_UBYTE, ndim])
  if magic != expected:
    raise ValueError(f"IDX file {path} has magic number 0x{magic.hex()}, expected "
                     f"0x{expected.hex()} (unsigned bytes, {ndim} dimensions).")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  payload = len(data) - header_len
  if payload != int(np.prod(shape)):
    raise ValueError(f"IDX file {path} declares shape {shape} "
                     f"({int(np.prod(shape))} bytes) but holds {payload} bytes.")
  return np.frombuffer(data, np.uint8, offset=header_len).reshape(shape)


def read_fashion_mnist_split(folder: str | os.PathLike[str],
                             split: str) -> tuple[np.ndarray, np.ndarray]:
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
    raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, "
                     f"got {split!r}.")
  image_file, label_file = (os.path.join(folder, f)
                            for f in FASHION_MNIST_FILES[split])
  images = read_idx(image_file, ndim=3)
  labels = read_idx(label_file, ndim=1)
  size = _FASHION_MNIST_IMAGE_SIZE
  if images.shape[1:] != (size, size):
    raise ValueError(f"IDX file {image_file} holds images of "
                     f"{images.shape[1]}x{images.shape[2]}, expected {size}x{size}.")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"IDX files {image_file} and {label_file} disagree on the "
                     f"number of examples: {images.shape[0]} images, "
                     f"{labels.shape[0]} labels.")
  if labels.size and labels.max() >= _FASHION_MNIST_NUM_CLASSES:
    raise ValueError(f"IDX file {label_file} holds label {labels.max()}, expected "
                     f"labels in [0, {_FASHION_MNIST_NUM_CLASSES}).")
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
    splits = {split: read_fashion_mnist_split(self._source_dir, split)
              for split in FASHION_MNIST_FILES}
    return {split: _examples(*arrays) for split, arrays in splits.items()}


def _examples(images: np.ndarray,
              labels: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
  # The file index is the key, as in TFDS's builder: TFDS orders records by key
  # hash, so equal keys give the same record order as TFDS's own preparation.
  for index, (image, label) in enumerate(zip(images, labels)):
    yield index, {"image": image, "label": label}


def _has_fashion_mnist_files(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, f))
             for files in FASHION_MNIST_FILES.values() for f in files)


def _resolves(host: str) -> bool:
  # Offline, TFDS's download only fails after minutes of retries; a failed name
  # lookup tells the same at once.
  try:
    socket.getaddrinfo(host, None)
  except OSError:
    return False
  return True


def _check_array_record(builder: tfds.core.DatasetBuilder, name: str,
                        data_dir: str) -> None:
  file_format = builder.info.file_format
  if file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} is prepared in {data_dir} as "
        f"{getattr(file_format, 'value', file_format)}, but reading needs "
        f"ArrayRecord (random access). Convert it with\n"
        f"  tfds convert_format --dataset_version_dir={builder.data_path} "
        f"--out_file_format=array_record\n"
        f"or prepare it again into another data_dir.")


def _fashion_mnist_message(data_dir: str, manual_dir: str, reason: str) -> str:
  files = ", ".join(f for pair in FASHION_MNIST_FILES.values() for f in pair)
  return (
      f"Fashion-MNIST is not prepared in {data_dir} and could not be prepared "
      f"({reason}). Get the data in one of these ways:\n"
      f"  1. install Debian's package: sudo apt-get install dataset-fashion-mnist "
      f"(it puts the four IDX files in {DEBIAN_FASHION_MNIST_DIR});\n"
      f"  2. set --config.data.manual_dir to a folder holding {files} "
      f"(looked in {manual_dir});\n"
      f"  3. run once with internet access, so that TFDS downloads it.")


def _other_dataset_message(name: str, data_dir: str,
                           builder: tfds.core.DatasetBuilder) -> str:
  message = (
      f"TFDS dataset {name!r} is not prepared in {data_dir}. Prepare it (this "
      f"needs TensorFlow) with\n"
      f"  tfds build {name} --file_format=array_record --data_dir={data_dir}\n"
      f"or, in Python,\n"
      f"  tfds.builder({name!r}, data_dir={data_dir!r})"
      f".download_and_prepare(file_format='array_record')")
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if instructions:
    message += (f"\nThis dataset needs a manual download: place the files in a "
                f"folder and add --manual_dir=FOLDER. Instructions:\n"
                f"{instructions.strip()}")
  return message


def prepare_dataset(name: str, data_dir: str, manual_dir: str | None = None, *,
                    process_index: int = 0, download: bool = True) -> None:
  """Makes sure that TFDS dataset `name` is on disk in `data_dir` as ArrayRecord.

  Does nothing when it is already prepared. 'fashion_mnist' is prepared from its
  four IDX files in `manual_dir` (default: where Debian's `dataset-fashion-mnist`
  puts them) and otherwise by TFDS's own download. Other datasets must have been
  prepared beforehand (`tfds build`). Only the process with index 0 prepares
  anything; the others return at once.

  Args:
    name: TFDS name, optionally with config and version ('name/config:1.0.0').
    data_dir: TFDS data directory.
    manual_dir: folder holding the four Fashion-MNIST IDX files.
    process_index: this process's index (jax.process_index()).
    download: whether TFDS may try to download 'fashion_mnist' when no local
      files are found.

  Raises:
    DatasetNotPreparedError: the dataset is missing and could not be prepared;
      the message says how to get it.
    ValueError: corrupt Fashion-MNIST IDX files.
  """
  if process_index != 0:
    return
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    _check_array_record(builder, name, data_dir)
    return
  if builder.name != FASHION_MNIST:
    raise DatasetNotPreparedError(_other_dataset_message(name, data_dir, builder))

  source_dir = DEBIAN_FASHION_MNIST_DIR if manual_dir is None else manual_dir
  if _has_fashion_mnist_files(source_dir):
    local = _LocalFashionMNIST(source_dir=source_dir, data_dir=data_dir)
    local.download_and_prepare(
        file_format=tfds.core.FileFormat.ARRAY_RECORD,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return
  reason = f"the four IDX files are not all in {source_dir}"
  host = urllib.parse.urlparse(mnist.FashionMNIST.URL).hostname
  if download and not _resolves(host):
    reason += f", and the download server {host} cannot be resolved (offline?)"
  elif download:
    try:
      builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
      return
    # Offline, the download fails with network errors of many types (OSError,
    # DownloadError, HTTP errors): all of them mean "no data", reported below
    # with the original exception chained.
    except Exception as exc:  # pylint: disable=broad-except
      raise DatasetNotPreparedError(_fashion_mnist_message(
          data_dir, source_dir, f"{reason}, and TFDS's download failed: {exc!r}"
      )) from exc
  raise DatasetNotPreparedError(_fashion_mnist_message(data_dir, source_dir, reason))


def prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a dataset prepared as ArrayRecord.

  Raises:
    DatasetNotPreparedError: it is not, with a message saying how to get it.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    if builder.name == FASHION_MNIST:
      message = _fashion_mnist_message(
          data_dir, DEBIAN_FASHION_MNIST_DIR, "prepare_dataset was not run")
    else:
      message = _other_dataset_message(name, data_dir, builder)
    raise DatasetNotPreparedError(message)
  _check_array_record(builder, name, data_dir)
  return builder


def load_source(name: str, split: str, data_dir: str) -> Sequence[dict[str, Any]]:
  """Opens one split of a prepared TFDS dataset for random access.

  Args:
    name: TFDS name as in `prepare_dataset`.
    split: TFDS split, slices allowed ('train', 'test', 'train[:1000]').
    data_dir: TFDS data directory.

  Returns:
    The `tfds.data_source` of the split: `len()` and `source[i]` -> dict of the
    decoded features, e.g. {'image': uint8 [H, W, C], 'label': int64 scalar}.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared as ArrayRecord.
  """
  return prepared_builder(name, data_dir).as_data_source(split=split)


def dataset_info(name: str, data_dir: str) -> DatasetInfo:
  """Returns split sizes, number of classes and image shape of a prepared dataset.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared as ArrayRecord.
    ValueError: the dataset has no 'image' feature.
  """
  info = prepared_builder(name, data_dir).info
  features: Mapping[str, Any] = info.features
  if "image" not in features:
    raise ValueError(f"TFDS dataset {name!r} has no 'image' feature; its features "
                     f"are {sorted(features)}.")
  num_classes = features["label"].num_classes if "label" in features else None
  return DatasetInfo(
      num_examples={split: info.splits[split].num_examples for split in info.splits},
      num_classes=num_classes,
      image_shape=tuple(features["image"].shape))
