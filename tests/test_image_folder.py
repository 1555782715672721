"""A folder of the user's own images, prepared as a TFDS dataset and read by a run.

Every folder is written here with PIL: images in every mode a folder may hold, plus
broken files, so preparation is checked on what users actually have.
"""

import io
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from splitmask_jax import main
from splitmask_jax.data import datasets
from splitmask_jax.data import image_folder
from splitmask_jax.runtime import metric_log

from helpers import ROOT
from helpers import load_config

RED, BLUE, WHITE, CYAN = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 255, 255)
# What the odd class folder turns into: the report's counts for 'train'.
TRAIN_REPORT = {
  "written": 14,
  "skipped": {"not_an_image": 1, "too_small": 1, "undecodable": 3},
  "converted": {"CMYK": 1, "F": 1, "I": 1, "I;16": 1, "L": 1, "P": 1, "RGBA": 1},
  "downscaled": 1,
}


def _halves(left, right, size=(40, 30)):
  """An RGB image whose left half is `left` and right half `right`."""
  image = np.zeros((size[1], size[0], 3), np.uint8)
  image[:, : size[0] // 2], image[:, size[0] // 2 :] = left, right
  return Image.fromarray(image)


def _encoded(image, image_format):
  buffer = io.BytesIO()
  image.save(buffer, format=image_format)
  return buffer.getvalue()


def _write_odd_files(folder):
  """One file of each kind a user's folder may hold; returns {name: expected}."""
  os.makedirs(folder / "nested", exist_ok=True)
  _halves(RED, BLUE).save(folder / "rgb.jpg", quality=95)
  Image.new("L", (30, 20), 100).save(folder / "grey.png")
  Image.new("CMYK", (30, 20), (255, 0, 0, 0)).save(folder / "cmyk.jpg", quality=95)
  rgba = np.zeros((30, 40, 4), np.uint8)
  rgba[:, :20] = (255, 0, 0, 0)  # transparent red: white once composited
  rgba[:, 20:] = (0, 0, 255, 255)
  Image.fromarray(rgba).save(folder / "rgba.png")
  _halves(RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(
    folder / "palette.gif"
  )
  grey16 = np.zeros((30, 40), np.uint16)
  grey16[:, :20], grey16[:, 20:] = 65535, 128 * 257  # 255 and 128 in 8 bits
  Image.fromarray(grey16).save(folder / "grey16.png")
  # 32-bit integers holding 16-bit values, and floats in [0, 1]: 255 and 128 too.
  Image.fromarray(grey16.astype(np.int32)).save(folder / "grey32.tif")
  Image.fromarray(np.where(grey16 == 65535, 1.0, 0.5).astype(np.float32)).save(folder / "float.tif")
  Image.new("RGB", (4, 4), RED).save(folder / "tiny.png")
  height_px = np.linspace(0, 255, 1800).astype(np.uint8)
  huge = np.broadcast_to(height_px[:, None, None], (1800, 2600, 3))
  Image.fromarray(np.ascontiguousarray(huge)).save(folder / "huge.jpg", quality=90)
  whole = _encoded(Image.new("RGB", (64, 64), BLUE), "JPEG")
  (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
  (folder / "random.jpg").write_bytes(np.random.default_rng(0).bytes(1000))
  # A valid 1x1 PNG whose header claims 20000x20000 pixels: a decompression bomb.
  png = bytearray(_encoded(Image.new("L", (1, 1)), "PNG"))
  png[16:24] = struct.pack(">II", 20000, 20000)  # IHDR's width, height
  png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # IHDR's CRC
  (folder / "bomb.png").write_bytes(bytes(png))
  (folder / "notes.txt").write_text("not an image")
  (folder / ".DS_Store").write_bytes(b"\0" * 10)  # hidden: ignored
  # Stored 40 wide, 24 high, red left; EXIF orientation 6: shown rotated 90 degrees
  # clockwise, 24 wide and 40 high, red on top.
  exif = Image.Exif()
  exif[0x0112] = 6
  _halves(RED, BLUE, (40, 24)).save(folder / "rotated.jpg", quality=95, exif=exif)
  _halves(BLUE, RED).save(folder / "nested" / "deep.png")


def _write_images(folder, count, size=(20, 16), seed=0):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")


@pytest.fixture(scope="module")
def split_folders(tmp_path_factory):
  """train/ and val/ with class sub-folders (birds only in val/); the odd files in
  train/cats/. Prepared once with 2 decoding processes."""
  root = tmp_path_factory.mktemp("split_folders")
  folder = root / "My Photos"
  _write_odd_files(folder / "train" / "cats")
  _write_images(folder / "train" / "dogs", 3)
  _write_images(folder / "val" / "birds", 2, seed=1)
  _write_images(folder / "val" / "cats", 1, seed=2)
  _write_images(folder / "val" / "dogs", 1, seed=3)
  data_dir = str(root / "tfds")
  report = image_folder.prepare_image_folder(str(folder), data_dir, num_workers=2)
  return str(folder), data_dir, report


def test_is_image_folder():
  for value in ("/data/photos", "./photos", "../photos", "~/photos", "~"):
    assert image_folder.is_image_folder(value)
  for value in ("imagenet2012", "fashion_mnist:3.0.1", "i_naturalist2019/2019", "photos/cats"):
    assert not image_folder.is_image_folder(value)


def test_report_counts_every_file(split_folders):
  folder, data_dir, report = split_folders
  assert report["splits"] == {
    "train": TRAIN_REPORT,
    "validation": {
      "written": 4,
      "skipped": dict.fromkeys(image_folder.SKIP_REASONS, 0),
      "converted": {},
      "downscaled": 0,
    },
  }
  assert report["classes"] == ["birds", "cats", "dogs"]
  assert report["num_source_files"] == 22
  assert report["layout"] == "split folders train/ and val/"
  skipped = {path: (reason, detail) for path, reason, detail in report["skipped_files"]}
  assert set(skipped) == {
    "train/cats/notes.txt",
    "train/cats/tiny.png",
    "train/cats/truncated.jpg",
    "train/cats/random.jpg",
    "train/cats/bomb.png",
  }
  assert skipped["train/cats/notes.txt"][0] == "not_an_image"
  assert skipped["train/cats/tiny.png"] == ("too_small", "4x4 px, under 16 px")
  assert skipped["train/cats/truncated.jpg"][0] == "undecodable"
  assert "truncated" in skipped["train/cats/truncated.jpg"][1].lower()
  assert skipped["train/cats/random.jpg"][0] == "undecodable"
  assert "UnidentifiedImageError" in skipped["train/cats/random.jpg"][1]
  assert skipped["train/cats/bomb.png"][0] == "undecodable"
  assert "DecompressionBombError" in skipped["train/cats/bomb.png"][1]

  # The report survives in the dataset's metadata and beside its records.
  builder = image_folder.folder_builder(folder, data_dir)
  assert image_folder.preparation_report(builder) == report
  with open(os.path.join(builder.data_path, image_folder.REPORT_FILE)) as f:
    assert json.load(f) == report
  info = datasets.dataset_info(folder, data_dir)
  assert info == datasets.DatasetInfo({"train": 14, "validation": 4}, 3, (None, None, 3))


def _records(folder, split, data_dir):
  source = datasets.load_source(folder, split, data_dir)
  return {r["file_name"].decode(): r for r in (source[i] for i in range(len(source)))}


def _mean(image, rows=slice(None), cols=slice(None)):
  return image[rows, cols].reshape(-1, 3).mean(0)


def test_records_are_rgb_oriented_and_labelled(split_folders):
  folder, data_dir, _ = split_folders
  train = _records(folder, "train", data_dir)
  validation = _records(folder, "validation", data_dir)
  assert len(train) == 14 and len(validation) == 4
  names = datasets.prepared_builder(folder, data_dir).info.features["label"].names
  for path, record in {**train, **validation}.items():
    image = record["image"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, path
    assert image_folder.MIN_SIZE <= min(image.shape[:2]) <= image_folder.MAX_SIZE, path
    assert names[record["label"]] == path.split("/")[1], path

  cats = {
    path.rsplit("/", 1)[1]: r["image"]
    for path, r in train.items()
    if path.startswith("train/cats/")
  }
  assert sorted(cats) == [
    "cmyk.jpg",
    "deep.png",
    "float.tif",
    "grey.png",
    "grey16.png",
    "grey32.tif",
    "huge.jpg",
    "palette.gif",
    "rgb.jpg",
    "rgba.png",
    "rotated.jpg",
  ]
  assert cats["huge.jpg"].shape == (512, 740, 3)  # 1800 x 2600 -> shorter side 512
  # Top to bottom, the huge image is a ramp from black to white.
  assert _mean(cats["huge.jpg"], slice(0, 5)).max() < 10
  assert _mean(cats["huge.jpg"], slice(-5, None)).min() > 245
  rotated = cats["rotated.jpg"]
  assert rotated.shape == (40, 24, 3)
  np.testing.assert_allclose(_mean(rotated, slice(2, 18)), RED, atol=12)
  np.testing.assert_allclose(_mean(rotated, slice(22, 38)), BLUE, atol=12)
  for name, left, right in (
    ("rgb.jpg", RED, BLUE),
    ("rgba.png", WHITE, BLUE),
    ("palette.gif", RED, BLUE),
    ("deep.png", BLUE, RED),
    ("grey16.png", (255,) * 3, (128,) * 3),
    ("grey32.tif", (255,) * 3, (128,) * 3),
    ("float.tif", (255,) * 3, (128,) * 3),
  ):
    np.testing.assert_allclose(_mean(cats[name], cols=slice(2, 18)), left, atol=6, err_msg=name)
    np.testing.assert_allclose(_mean(cats[name], cols=slice(22, 38)), right, atol=6, err_msg=name)
  np.testing.assert_allclose(_mean(cats["grey.png"]), (100,) * 3, atol=2)
  np.testing.assert_allclose(_mean(cats["cmyk.jpg"]), CYAN, atol=6)


def test_rgb_jpeg_keeps_its_own_bytes(split_folders):
  folder, data_dir, _ = split_folders
  source = datasets.prepared_builder(folder, data_dir).as_data_source(
    split="train", decoders={"image": tfds.decode.SkipDecoding()}
  )
  stored = {r["file_name"].decode(): r["image"] for r in (source[i] for i in range(len(source)))}
  with open(os.path.join(folder, "train", "cats", "rgb.jpg"), "rb") as f:
    assert stored["train/cats/rgb.jpg"] == f.read()
  for path, data in stored.items():
    assert Image.open(io.BytesIO(data)).format == "JPEG", path


def test_second_call_does_not_rebuild_and_stale_folder_warns(tmp_path, monkeypatch, caplog):
  folder = tmp_path / "pool"
  _write_images(folder, 12)
  data_dir = str(tmp_path / "tfds")
  report = image_folder.prepare_image_folder(str(folder), data_dir, num_workers=0)
  assert report["num_source_files"] == 12 and report["classes"] is None
  assert report["splits"]["validation"]["written"] == 1  # at least one image
  data_path = os.fspath(image_folder.folder_builder(str(folder), data_dir).data_path)

  def mtimes():
    return {f: os.stat(os.path.join(data_path, f)).st_mtime_ns for f in os.listdir(data_path)}

  before = mtimes()

  def fail(*args, **kwargs):
    raise AssertionError("the folder was prepared again")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with caplog.at_level(logging.WARNING):
    assert image_folder.prepare_image_folder(str(folder), data_dir) == report
  assert "Image folder" not in caplog.text
  _write_images(folder / "more", 3, seed=5)  # now a mixed layout: cannot be read
  (folder / "img_000.png").unlink()
  with caplog.at_level(logging.WARNING):
    image_folder.prepare_image_folder(str(folder), data_dir)
  assert "can no longer be read" in caplog.text
  for i in range(3):
    os.replace(folder / "more" / f"img_{i:03d}.png", folder / f"new_{i}.png")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    datasets.prepare_dataset(str(folder), data_dir)
  assert "holds 14 image files, but 12 when it was prepared (2 added)" in caplog.text
  assert f"delete {data_path}" in caplog.text
  assert mtimes() == before


def test_held_out_split_is_deterministic_and_class_balanced(tmp_path):
  folder = tmp_path / "pool"
  for name, count in (("a", 60), ("b", 40), ("c", 25)):
    _write_images(folder / name, count, seed=count)
  names = {}
  for num_workers in (0, 2):
    data_dir = str(tmp_path / f"tfds_{num_workers}")
    report = image_folder.prepare_image_folder(str(folder), data_dir, num_workers=num_workers)
    assert report["layout"] == "one pool, 2% held out for validation (seed 0)"
    records = {split: _records(str(folder), split, data_dir) for split in ("train", "validation")}
    names[num_workers] = {split: sorted(r) for split, r in records.items()}
    # 2% of 125 images is 2.5; every class keeps at least one: one of each.
    assert sorted(r["label"] for r in records["validation"].values()) == [0, 1, 2]
    assert sorted(names[num_workers]["train"] + names[num_workers]["validation"]) == sorted(
      f"{c}/{p.name}" for c in "abc" for p in (folder / c).iterdir()
    )
  assert names[0] == names[2]


def test_layouts_that_are_refused(tmp_path):
  mixed = tmp_path / "mixed"
  _write_images(mixed, 2)
  _write_images(mixed / "cats", 2)
  with pytest.raises(
    ValueError,
    match=r"holds both images \(img_000.png, img_001.png, "
    r"...\) and class sub-folders \(cats, ...\)",
  ):
    image_folder.prepare_image_folder(str(mixed), str(tmp_path / "tfds"))
  split = tmp_path / "split"
  _write_images(split / "train" / "cats", 2)
  _write_images(split / "validation", 2)
  with pytest.raises(ValueError, match="disagree on labels"):
    image_folder.prepare_image_folder(str(split), str(tmp_path / "tfds"))


def test_split_without_usable_image_fails_and_says_why(tmp_path):
  folder = tmp_path / "photos"
  _write_images(folder / "train", 3)
  (folder / "val").mkdir()
  (folder / "val" / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(
    image_folder.NoImagesError,
    match=r"none of the 1 image files of the validation split can be used; "
    r"the first: val/broken.jpg undecodable \(UnidentifiedImageError",
  ):
    image_folder.prepare_image_folder(str(folder), str(tmp_path / "tfds"), num_workers=0)
  # Nothing is left that would pass for a prepared folder.
  assert not image_folder.folder_builder(str(folder), str(tmp_path / "tfds")).is_prepared()


def test_missing_or_empty_folder_names_path_and_config_key(tmp_path, monkeypatch):
  data_dir = str(tmp_path / "tfds")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("no images here")
  (tmp_path / "file.jpg").write_bytes(b"")
  monkeypatch.setenv("HOME", str(tmp_path))
  for name, path, why in (
    ("~/missing", tmp_path / "missing", "does not exist"),
    (str(tmp_path / "file.jpg"), tmp_path / "file.jpg", "is not a folder"),
    (str(tmp_path / "empty"), tmp_path / "empty", "holds no image"),
  ):
    for call in (
      lambda: datasets.prepare_dataset(name, data_dir),
      lambda: datasets.load_source(name, "train", data_dir),
      lambda: datasets.dataset_info(name, data_dir),
    ):
      with pytest.raises(datasets.DatasetNotPreparedError) as info:
        call()
      assert f"{path} {why}" in str(info.value)
      assert "config.data.dataset" in str(info.value)
  assert not os.path.exists(data_dir)


def test_config_name_is_per_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  one, other = (
    image_folder.config_name("~/a/My Photos"),
    image_folder.config_name(str(tmp_path / "b" / "My Photos")),
  )
  assert one.startswith("my_photos_") and other.startswith("my_photos_") and one != other
  assert image_folder.config_name(str(tmp_path / "a" / "My Photos/")) == one


@pytest.mark.slow
def test_pretraining_and_finetuning_on_a_folder(split_folders, tmp_path):
  """configs/image_folder.py with the folder as its one data value: pre-training
  (broken files never reach it), then fine-tuning from its lowest held-out loss."""
  folder, data_dir, _ = split_folders
  config_file = ROOT / "configs" / "image_folder.py"
  config = load_config("test", config_file)
  config.data.dataset = folder
  config.data.data_dir = data_dir
  config.knn.num_train, config.knn.num_test, config.knn.batch_size = 14, 4, 8
  workdir = str(tmp_path / "run")
  final = main.run(config, workdir)
  assert np.isfinite(final["loss"])
  records = [r for r in metric_log.read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in records] == [2, 4]
  assert all(r["skipped_images"] == 0 for r in records)
  assert 0 <= final["knn_top1"] <= 1
  # The validation split is smaller than a batch: it is cycled, not dropped.
  assert np.isfinite(final["val_loss"]) and final["best_step"] == 4

  tune = load_config("finetune,test", config_file)
  tune.data.dataset = folder
  tune.data.data_dir = data_dir
  tune.init.workdir = workdir
  tune.init.checkpoint = "best"
  tuned = main.run(tune, str(tmp_path / "tuned"))
  assert 0 <= tuned["test_top1"] <= 1
