"""Tests of splitmask_jax.data.inaturalist2019: the TFDS builder prepared from fake manual files
in the competition's layout (tarballs of JPEGs, COCO-style json files), read back with
`tfds.data_source`."""

import io
import json
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from splitmask_jax.data import datasets
from splitmask_jax.data import inaturalist2019

NAME = inaturalist2019.NAME
# (supercategory folder, category id) of the fake images, cycled: 3 categories in 2
# supercategories, with ids far apart so that "label = category id" is tested.
CATEGORIES = (("Birds", 5), ("Plants", 1009), ("Birds", 17))
NUM_IMAGES, NUM_VALIDATION, NUM_TEST = 15, 5, 3
# The image modes of the train/val tarball: one greyscale JPEG, one CMYK JPEG.
MODES = {3: "L", 4: "CMYK"}


def _jpeg(height, width, mode, seed):
  rng = np.random.default_rng(seed)
  channels = len(Image.new(mode, (1, 1)).getbands())
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG")
  return buffer.getvalue()


def _write_tar(path, members):
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _write_json(path, paths, labels=None):
  images = [
    {"id": 100 + i, "file_name": p, "width": 0, "height": 0, "license": 1}
    for i, p in enumerate(paths)
  ]
  data = {"info": {"year": 2019}, "images": images, "licenses": []}
  if labels is not None:
    data["annotations"] = [
      {"id": i, "image_id": 100 + i, "category_id": labels[p]} for i, p in enumerate(paths)
    ]
    data["categories"] = [
      {
        "id": i,
        "name": f"species {i}",
        "kingdom": "Animalia",
        "phylum": "",
        "class": "",
        "order": "",
        "family": "",
        "genus": "",
      }
      for i in reversed(range(1010))
    ]
  with open(path, "w") as f:
    json.dump(data, f)


def _write_manual_files(folder, with_test=True, left_out=0):
  """Writes the competition's files; returns {split: {path: (label, folder, bytes, (h, w))}}.

  `left_out` validation images are listed in val2019.json but not put in the tarball.
  """
  folder.mkdir(parents=True, exist_ok=True)
  expected = {"train": {}, "validation": {}}
  members = {}
  for i in range(NUM_IMAGES):
    supercategory, label = CATEGORIES[i % len(CATEGORIES)]
    path = f"train_val2019/{supercategory}/{label}/{i:032x}.jpg"
    size = (6 + i, 9 + 2 * i)
    members[path] = _jpeg(*size, MODES.get(i, "RGB"), seed=i)
    split = "validation" if i >= NUM_IMAGES - NUM_VALIDATION else "train"
    expected[split][path] = (label, supercategory, members[path], size)
  # A file that no json lists is ignored.
  members["train_val2019/Plants/1009/stray.jpg"] = _jpeg(5, 5, "RGB", seed=99)
  archived = dict(
    list(members.items())[: NUM_IMAGES - NUM_VALIDATION]
    + list(members.items())[NUM_IMAGES - NUM_VALIDATION + left_out :]
  )
  _write_tar(folder / "train_val2019.tar.gz", archived)
  for split, name in inaturalist2019.ANNOTATION_FILES.items():
    _write_json(folder / name, list(expected[split]), {p: v[0] for p, v in expected[split].items()})
  if with_test:
    expected["test"] = {
      f"test2019/{i:032x}.jpg": (-1, None, _jpeg(7, 5, "RGB", 50 + i), (7, 5))
      for i in range(NUM_TEST)
    }
    _write_tar(folder / "test2019.tar.gz", {p: v[2] for p, v in expected["test"].items()})
    _write_json(folder / "test2019.json", list(expected["test"]))
  return expected


def _prepare(manual_dir, data_dir):
  builder = tfds.builder(NAME, data_dir=str(data_dir))
  builder.download_and_prepare(
    file_format="array_record",
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
  )
  return builder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("inat19")
  expected = _write_manual_files(root / "manual")
  _prepare(root / "manual", root / "data")
  return expected, str(root / "data")


def _id(path):
  return path.rsplit("/", 1)[1][: -len(".jpg")]


def test_records_hold_the_json_labels_and_the_images_written(prepared):
  expected, data_dir = prepared
  info = tfds.builder(NAME, data_dir=data_dir).info
  assert {s: info.splits[s].num_examples for s in info.splits} == {
    "train": NUM_IMAGES - NUM_VALIDATION,
    "validation": NUM_VALIDATION,
    "test": NUM_TEST,
  }
  assert info.features["label"].num_classes == 1010
  assert info.features["label"].names[1009] == "species 1009"
  for split, images in expected.items():
    source = tfds.data_source(NAME, split=split, data_dir=data_dir)
    by_id = {_id(path): value for path, value in images.items()}
    records = [source[i] for i in range(len(source))]
    assert sorted(r["id"].decode() for r in records) == sorted(by_id)
    for record in records:
      label, supercategory, data, size = by_id[record["id"].decode()]
      assert record["label"] == label
      assert record["supercategory"].decode() == (supercategory or "")
      image = record["image"]
      assert image.dtype == np.uint8 and image.shape == (*size, 3)
      np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_jpegs_keep_their_bytes_and_cmyk_is_stored_as_rgb(prepared):
  expected, data_dir = prepared
  source = tfds.builder(NAME, data_dir=data_dir).as_data_source(
    "train", decoders={"image": tfds.decode.SkipDecoding()}
  )
  stored = {source[i]["id"].decode(): source[i]["image"] for i in range(len(source))}
  for i, (path, (_, _, data, _)) in enumerate(expected["train"].items()):
    if MODES.get(i) == "CMYK":
      assert Image.open(io.BytesIO(stored[_id(path)])).mode == "RGB"
    else:  # RGB and greyscale JPEGs
      assert stored[_id(path)] == data


def test_the_training_code_reads_it_through_datasets(prepared):
  _, data_dir = prepared
  datasets.prepare_dataset(NAME, data_dir)  # already prepared: nothing to do
  assert datasets.dataset_info(NAME, data_dir) == datasets.DatasetInfo(
    num_examples={
      "train": NUM_IMAGES - NUM_VALIDATION,
      "validation": NUM_VALIDATION,
      "test": NUM_TEST,
    },
    num_classes=1010,
    image_shape=(None, None, 3),
  )
  assert len(datasets.load_source(NAME, "validation[:2]", data_dir)) == 2


def test_without_the_test_files_there_is_no_test_split(tmp_path):
  _write_manual_files(tmp_path / "manual", with_test=False)
  builder = _prepare(tmp_path / "manual", tmp_path / "data")
  assert set(builder.info.splits) == {"train", "validation"}


def test_categories_json_names_the_classes(tmp_path):
  _write_manual_files(tmp_path / "manual", with_test=False)
  species = [{"id": i, "name": f"Genus species{i}"} for i in range(1010)]
  with open(tmp_path / "manual" / "categories.json", "w") as f:
    json.dump(species[::-1], f)
  names = _prepare(tmp_path / "manual", tmp_path / "data").info.features["label"].names
  assert names == [c["name"] for c in species]


def test_a_missing_json_file_raises_with_the_instructions(tmp_path):
  _write_manual_files(tmp_path / "manual")
  (tmp_path / "manual" / "val2019.json").unlink()
  with pytest.raises(FileNotFoundError, match="val2019.json missing") as error:
    _prepare(tmp_path / "manual", tmp_path / "data")
  assert inaturalist2019.MANUAL_DOWNLOAD_INSTRUCTIONS in str(error.value)


def test_images_missing_from_the_tarball_raise_with_their_count(tmp_path):
  _write_manual_files(tmp_path / "manual", left_out=2)
  with pytest.raises(
    ValueError,
    match=(
      f"train_val2019.tar.gz is incomplete: 2 of the {NUM_VALIDATION} images that "
      f"val2019.json lists were not read from it"
    ),
  ):
    _prepare(tmp_path / "manual", tmp_path / "data")


def test_a_truncated_tarball_raises_with_the_count_of_images_not_read(tmp_path):
  _write_manual_files(tmp_path / "manual", with_test=False)
  archive = tmp_path / "manual" / "train_val2019.tar.gz"
  archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 3])
  with pytest.raises(
    ValueError,
    match=(
      r"train_val2019.tar.gz is truncated or corrupt \(.*\): [1-9]\d* of the "
      f"{NUM_IMAGES - NUM_VALIDATION} images that train2019.json lists were not read"
    ),
  ):
    _prepare(tmp_path / "manual", tmp_path / "data")


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK"])
def test_rgb_decodable_turns_other_modes_into_rgb(mode):
  image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 12)).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
  reference = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
  decoded = Image.open(io.BytesIO(inaturalist2019.rgb_decodable(buffer.getvalue())))
  assert decoded.mode == "RGB" and decoded.size == (12, 4)
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(reference))


def test_category_ids_must_be_those_of_the_competition():
  categories = [{"id": i, "name": str(i)} for i in range(1, 1011)]
  with pytest.raises(ValueError, match="ids 0 to 1009"):
    inaturalist2019.category_names({"categories": categories}, "train2019.json")
