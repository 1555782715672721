"""Tests of splitmask_jax.data.datasets: offline Fashion-MNIST preparation and loading."""

import gzip
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

from splitmask_jax.data import datasets
from splitmask_jax.data import in_memory

NUM_TRAIN, NUM_TEST = 40, 20


def _write_idx(path, array, magic=None):
  """Writes an unsigned-byte IDX file as the format's specification describes."""
  array = np.asarray(array, np.uint8)
  header = bytes(magic if magic is not None else [0, 0, 8, array.ndim])
  header += np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def _fake_fashion_mnist(folder, seed=0):
  """Writes the four IDX files with random pixels; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  data = {}
  for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    image_file, label_file = datasets.FASHION_MNIST_FILES[split]
    _write_idx(os.path.join(folder, image_file), images)
    _write_idx(os.path.join(folder, label_file), labels)
    data[split] = images, labels
  return data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Fake IDX files, and a data_dir where they were prepared by prepare_dataset."""
  root = tmp_path_factory.mktemp("fmnist")
  manual_dir, data_dir = str(root / "idx"), str(root / "data")
  data = _fake_fashion_mnist(manual_dir)
  datasets.prepare_dataset("fashion_mnist", data_dir, manual_dir, download=False)
  return data, manual_dir, data_dir


def _records(source):
  return [(source[i]["image"], int(source[i]["label"])) for i in range(len(source))]


def test_prepared_records_are_the_files_records(prepared):
  data, _, data_dir = prepared
  for split, (images, labels) in data.items():
    source = datasets.load_source("fashion_mnist", split, data_dir)
    records = _records(source)
    assert len(records) == len(labels)
    for image, _ in records:
      assert image.shape == (28, 28, 1) and image.dtype == np.uint8
    # Each record is one file example with its own label, each example once.
    got = sorted((image.tobytes(), label) for image, label in records)
    want = sorted((image[..., None].tobytes(), int(label)) for image, label in zip(images, labels))
    assert got == want


class _TfdsFashionMNIST(mnist.FashionMNIST, skip_registration=True):
  """TFDS's own builder, minus its checksum lookup (which needs the package
  `importlib_resources`); the test downloads nothing."""

  name = "fashion_mnist"
  code_path = None


def test_same_records_in_same_order_as_tfds_own_builder(prepared, tmp_path, monkeypatch):
  """TFDS's own builder, fed the same files, writes the same records in order."""
  data, manual_dir, data_dir = prepared

  def local_files(self, urls):
    """Serves each URL by its file in manual_dir, extracted like TFDS does."""
    paths = {}
    for key, url in urls.items():
      name = url.rsplit("/", 1)[-1]
      with gzip.open(os.path.join(manual_dir, name)) as f:
        paths[key] = tmp_path / name.removesuffix(".gz")
        paths[key].write_bytes(f.read())
    return paths

  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", local_files)
  monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", NUM_TRAIN)
  monkeypatch.setattr(mnist, "_TEST_EXAMPLES", NUM_TEST)
  reference_dir = str(tmp_path / "reference")
  _TfdsFashionMNIST(data_dir=reference_dir).download_and_prepare(
    file_format="array_record", download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  for split in data:
    ours = _records(datasets.load_source("fashion_mnist", split, data_dir))
    theirs = _records(
      tfds.data_source("fashion_mnist", split=split, data_dir=reference_dir, download=False)
    )
    assert len(ours) == len(theirs)
    for (image, label), (ref_image, ref_label) in zip(ours, theirs):
      np.testing.assert_array_equal(image, ref_image)
      assert label == ref_label


def test_dataset_info(prepared):
  _, _, data_dir = prepared
  info = datasets.dataset_info("fashion_mnist", data_dir)
  assert info.num_examples == {"train": NUM_TRAIN, "test": NUM_TEST}
  assert info.num_classes == 10
  assert info.image_shape == (28, 28, 1)
  num_examples, num_classes, image_shape = info
  assert (num_examples, num_classes, image_shape) == tuple(info)


def test_second_call_does_not_rebuild(prepared, monkeypatch):
  _, manual_dir, data_dir = prepared
  version_dir = os.path.join(data_dir, "fashion_mnist", "3.0.1")
  before = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}

  def fail(*args, **kwargs):
    raise AssertionError("the dataset was prepared again")

  monkeypatch.setattr(datasets._LocalFashionMNIST, "download_and_prepare", fail)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  datasets.prepare_dataset("fashion_mnist", data_dir, manual_dir)
  datasets.prepare_dataset("fashion_mnist", data_dir, "/no/such/folder")
  after = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns for f in os.listdir(version_dir)}
  assert after == before


def _assert_explains_how_to_get_fashion_mnist(message):
  assert "apt-get install dataset-fashion-mnist" in message
  assert "--config.data.manual_dir" in message
  assert "internet" in message


def test_missing_folder_raises_clear_error(tmp_path):
  data_dir = str(tmp_path / "data")
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    datasets.prepare_dataset("fashion_mnist", data_dir, str(tmp_path / "missing"), download=False)
  assert isinstance(info.value, FileNotFoundError)
  _assert_explains_how_to_get_fashion_mnist(str(info.value))
  assert str(tmp_path / "missing") in str(info.value)
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    datasets.load_source("fashion_mnist", "train", data_dir)
  _assert_explains_how_to_get_fashion_mnist(str(info.value))


def test_offline_download_fails_fast_with_clear_error(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  def fail(*args, **kwargs):
    raise AssertionError("a download was attempted")

  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    datasets.prepare_dataset("fashion_mnist", str(tmp_path / "data"), str(tmp_path / "missing"))
  _assert_explains_how_to_get_fashion_mnist(str(info.value))
  assert "cannot be resolved" in str(info.value)


def test_failed_download_is_reported_with_its_cause(tmp_path, monkeypatch):
  cause = ConnectionError("connection refused")

  def refuse(*args, **kwargs):
    raise cause

  monkeypatch.setattr(datasets, "_resolves", lambda host: True)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    datasets.prepare_dataset("fashion_mnist", str(tmp_path / "data"), str(tmp_path / "missing"))
  assert info.value.__cause__ is cause
  assert "connection refused" in str(info.value)
  _assert_explains_how_to_get_fashion_mnist(str(info.value))


def test_other_dataset_not_prepared_says_how_to_build(tmp_path):
  data_dir = str(tmp_path / "data")
  for call in (
    lambda: datasets.prepare_dataset("mnist", data_dir),
    lambda: datasets.load_source("mnist", "train", data_dir),
    lambda: datasets.dataset_info("mnist", data_dir),
  ):
    with pytest.raises(datasets.DatasetNotPreparedError) as info:
      call()
    assert f"python -m splitmask_jax.data --dataset=mnist --data_dir={data_dir}" in str(info.value)
  assert not os.path.exists(os.path.join(data_dir, "mnist"))


def test_only_process_zero_prepares(tmp_path):
  manual_dir, data_dir = str(tmp_path / "idx"), str(tmp_path / "data")
  _fake_fashion_mnist(manual_dir)
  datasets.prepare_dataset("fashion_mnist", data_dir, manual_dir, process_index=1)
  assert not os.path.exists(data_dir)


def _corrupt(folder, kind):
  images_file = os.path.join(folder, datasets.FASHION_MNIST_FILES["train"][0])
  labels_file = os.path.join(folder, datasets.FASHION_MNIST_FILES["train"][1])
  images = np.zeros((NUM_TRAIN, 28, 28), np.uint8)
  if kind == "magic":
    _write_idx(images_file, images, magic=[0, 0, 8, 1])
  elif kind == "image_size":
    _write_idx(images_file, np.zeros((NUM_TRAIN, 28, 27), np.uint8))
  elif kind == "count":
    _write_idx(labels_file, np.zeros(NUM_TRAIN + 1, np.uint8))
  elif kind == "truncated":
    with gzip.open(images_file, "wb") as f:
      f.write(
        bytes([0, 0, 8, 3])
        + np.asarray([NUM_TRAIN, 28, 28], ">u4").tobytes()
        + images.tobytes()[:-5]
      )
  elif kind == "label":
    _write_idx(labels_file, np.full(NUM_TRAIN, 10, np.uint8))


@pytest.mark.parametrize(
  "kind, pattern",
  [
    ("magic", "magic number 0x00000801, expected 0x00000803"),
    ("image_size", "28x27, expected 28x28"),
    ("count", "40 images, 41 labels"),
    ("truncated", "holds 31355 bytes"),
    ("label", "label 10"),
  ],
)
def test_corrupt_idx_raises_clear_error(tmp_path, kind, pattern):
  folder = str(tmp_path)
  _fake_fashion_mnist(folder)
  _corrupt(folder, kind)
  with pytest.raises(ValueError, match=pattern):
    datasets.read_fashion_mnist_split(folder, "train")


def test_corrupt_idx_stops_preparation_and_leaves_nothing(tmp_path):
  manual_dir, data_dir = str(tmp_path / "idx"), str(tmp_path / "data")
  _fake_fashion_mnist(manual_dir)
  _corrupt(manual_dir, "magic")
  with pytest.raises(ValueError, match="magic number"):
    datasets.prepare_dataset("fashion_mnist", data_dir, manual_dir, download=False)
  with pytest.raises(datasets.DatasetNotPreparedError):
    datasets.load_source("fashion_mnist", "train", data_dir)


def test_read_split_rejects_unknown_split(tmp_path):
  with pytest.raises(ValueError, match="split must be one of"):
    datasets.read_fashion_mnist_split(str(tmp_path), "validation")


def test_tfrecord_preparation_is_rejected_with_conversion_hint(tmp_path):
  manual_dir, data_dir = str(tmp_path / "idx"), str(tmp_path / "data")
  _fake_fashion_mnist(manual_dir)
  datasets._LocalFashionMNIST(source_dir=manual_dir, data_dir=data_dir).download_and_prepare(
    file_format="tfrecord"
  )
  with pytest.raises(
    datasets.DatasetNotPreparedError, match="convert_format .*--out_file_format=array_record"
  ):
    datasets.prepare_dataset("fashion_mnist", data_dir, manual_dir)
  with pytest.raises(datasets.DatasetNotPreparedError, match="ArrayRecord"):
    datasets.load_source("fashion_mnist", "train", data_dir)


MANUAL_DATASET = "splitmask_manual_download_test"


class _ManualDownload(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset whose files the user downloads by hand: 8x8 grey images and
  labels in `data.npz`. Defining it registers it under MANUAL_DATASET."""

  name = MANUAL_DATASET
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put data.npz in the manual folder."
  code_path = None  # nothing downloaded, no checksums to look up (see datasets.py)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 1)),
          "label": tfds.features.ClassLabel(num_classes=2),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(dl_manager.manual_dir / "data.npz")}

  def _generate_examples(self, path):
    arrays = np.load(path)
    for i, (image, label) in enumerate(zip(arrays["images"], arrays["labels"])):
      yield i, {"image": image, "label": label}


def test_manual_dataset_is_prepared_from_manual_dir(tmp_path):
  data_dir, manual_dir = str(tmp_path / "data"), tmp_path / "manual"
  with pytest.raises(datasets.DatasetNotPreparedError) as info:
    datasets.prepare_dataset(MANUAL_DATASET, data_dir)
  assert (
    f"python -m splitmask_jax.data --dataset={MANUAL_DATASET} --data_dir={data_dir} "
    "--manual_dir=FOLDER"
  ) in str(info.value)
  assert "set --config.data.manual_dir=FOLDER" in str(info.value)
  assert "Put data.npz in the manual folder." in str(info.value)
  manual_dir.mkdir()
  with pytest.raises(
    datasets.DatasetNotPreparedError, match=f"--config.data.manual_dir={manual_dir} is empty"
  ):
    datasets.prepare_dataset(MANUAL_DATASET, data_dir, str(manual_dir))
  assert not os.path.exists(os.path.join(data_dir, MANUAL_DATASET))

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(6) % 2
  np.savez(manual_dir / "data.npz", images=images, labels=labels)
  # The command the message gives.
  datasets.main(
    [f"--dataset={MANUAL_DATASET}", f"--data_dir={data_dir}", f"--manual_dir={manual_dir}"]
  )
  source = datasets.load_source(MANUAL_DATASET, "train", data_dir)
  got = sorted((source[i]["image"].tobytes(), int(source[i]["label"])) for i in range(len(source)))
  assert got == sorted((image.tobytes(), int(label)) for image, label in zip(images, labels))
  assert datasets.dataset_info(MANUAL_DATASET, data_dir).num_examples == {"train": 6}


def test_small_split_is_decoded_into_memory_once_with_the_same_records(prepared):
  data, _, data_dir = prepared
  for split in ("train", "test", "train[:7]"):
    lazy = datasets.load_source("fashion_mnist", split, data_dir)
    held = datasets.load_source("fashion_mnist", split, data_dir, in_memory_mib=1)
    assert isinstance(held, in_memory.InMemorySource)
    assert datasets.load_source("fashion_mnist", split, data_dir, in_memory_mib=1) is held
    assert len(held) == len(lazy)
    for i in range(len(lazy)):
      for key, value in lazy[i].items():
        np.testing.assert_array_equal(held[i][key], value)
  # 40 images of 784 bytes: over a limit of 30 KiB, and never at 0.
  for limit in (30 / 1024, 0):
    source = datasets.load_source("fashion_mnist", "train", data_dir, in_memory_mib=limit)
    assert not isinstance(source, in_memory.InMemorySource)


def test_unreadable_record_keeps_the_split_on_disk(caplog):
  class Broken(list):
    def __getitem__(self, index):
      if index == 3:
        raise OSError("truncated PNG")
      return super().__getitem__(index)

  image = np.zeros((2, 2, 1), np.uint8)
  source = Broken({"image": image, "label": i} for i in range(5))
  assert in_memory.decode_all(source, "broken split") is None
  assert "broken split stays on disk" in caplog.text and "truncated PNG" in caplog.text
  held = in_memory.decode_all(source[:3], "good split")
  assert len(held) == 3 and held[2]["label"] == 2 and held.nbytes == 3 * 4 + 3 * 8
  with pytest.raises(IndexError):
    held[3]
