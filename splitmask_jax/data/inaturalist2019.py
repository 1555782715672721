"""TFDS builder of iNaturalist 2019 (the FGVC6 competition), from its downloaded files.

TFDS ships iNaturalist 2017 and 2018 but not 2019, the dataset of the paper's Tables 1-3.
Importing this module registers `i_naturalist2019`, which reads the competition's
official files from a folder of manual downloads: the images stream out of the tarball
once per split (nothing is extracted to disk) and keep their original JPEG bytes.

The paper's test set is the official validation set: its Table 3 lists 265,240 / 3,003
images, the split files 265,213 / 3,030 (three per species), the same 268,243 in all.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

NAME = "i_naturalist2019"
NUM_CLASSES = 1010
TRAIN_VAL_ARCHIVE = "train_val2019.tar.gz"
# The json file of each labelled split; both list images of TRAIN_VAL_ARCHIVE.
ANNOTATION_FILES = {"train": "train2019.json", "validation": "val2019.json"}
TEST_ARCHIVE = "test2019.tar.gz"
TEST_IMAGES_FILE = "test2019.json"
REQUIRED_FILES = (TRAIN_VAL_ARCHIVE, *ANNOTATION_FILES.values())
TEST_FILES = (TEST_ARCHIVE, TEST_IMAGES_FILE)
# Optional: the species names, published after the competition (the json files' names
# are obfuscated).
CATEGORIES_FILE = "categories.json"
# Top folder of every path in TRAIN_VAL_ARCHIVE: train_val2019/<supercategory>/<id>/x.jpg.
_TRAIN_VAL_ROOT = "train_val2019"
_UNLABELLED = -1

_AWS = "https://ml-inat-competition-datasets.s3.amazonaws.com/2019"
_HOMEPAGE = "https://github.com/visipedia/inat_comp/tree/master/2019"
_DESCRIPTION = """\
The iNaturalist 2019 competition (FGVC6) dataset: 1,010 species of 72 genera, each
genus with at least 10 species; JPEG images of up to 800 px. 'train' holds the 265,213
images of train2019.json, 'validation' the 3,030 of val2019.json (three per species),
the held-out set on which results are reported; 'test' the 35,350 unlabelled images of
test2019.json, when those files were given.
"""
_CITATION = """\
@inproceedings{van2018inaturalist,
  title={The {iNaturalist} Species Classification and Detection Dataset},
  author={Van Horn, Grant and Mac Aodha, Oisin and Song, Yang and Cui, Yin and
          Sun, Chen and Shepard, Alex and Adam, Hartwig and Perona, Pietro and
          Belongie, Serge},
  booktitle={Computer Vision and Pattern Recognition (CVPR)},
  year={2018}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put these files of the iNaturalist 2019 competition (FGVC6) side by side in one folder,
FOLDER (no sub-folders). Get them from the competition's page
  {_HOMEPAGE}
(each one is at {_AWS}/<file name>) or from Kaggle
  https://www.kaggle.com/c/inaturalist-2019-fgvc6/data
Required:
  {TRAIN_VAL_ARCHIVE}  the training and validation images (74 GB): leave it packed;
      its md5sum is c60a6e2962c9b8ccbd458d12c8582644
  {ANNOTATION_FILES["train"]}  the training annotations
  {ANNOTATION_FILES["validation"]}  the validation annotations
Optional, for a 'test' split of unlabelled images:
  {TEST_ARCHIVE}  (md5sum 6966703cc589a877689dc8993bb3e55e) and {TEST_IMAGES_FILE}
Optional, for the species names as class names (those of the json files are
obfuscated): {CATEGORIES_FILE}
The competition's page serves the json files packed (train2019.json.tar.gz, ...):
unpack them into FOLDER (tar xzf train2019.json.tar.gz -C FOLDER).
Then prepare the dataset (it takes about as much disk as the images, and as much again
while it is written) by adding --config.data.manual_dir=FOLDER to the training
command, or in Python:
  import tensorflow_datasets as tfds, splitmask_jax.data.inaturalist2019
  tfds.builder('{NAME}', data_dir=DATA_DIR).download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=FOLDER))
or with TFDS's command line, which needs `pip install apache-beam` (TFDS issue #5463):
  tfds build {NAME} --imports splitmask_jax.data.inaturalist2019 --manual_dir=FOLDER \\
      --file_format=array_record --data_dir=DATA_DIR
"""


class ImageEntry(NamedTuple):
  """One image that a json file lists.

  Attributes:
    label: category id in [0, NUM_CLASSES), -1 for a test image.
    supercategory: the top folder under train_val2019/ (e.g. 'Plants'), None for a
      test image.
  """

  label: int
  supercategory: str | None


class Annotations(NamedTuple):
  """What the json files say, checked before any image is read.

  Attributes:
    category_names: NUM_CLASSES names, the name of category id i at index i.
    images: per split, {path in the archive: ImageEntry}.
  """

  category_names: list[str]
  images: dict[str, dict[str, ImageEntry]]


def _read_json(path: epath.Path) -> dict[str, Any]:
  with path.open("r") as f:
    data = json.load(f)
  if not isinstance(data, dict) or "images" not in data:
    raise ValueError(f"{path} is not an iNaturalist 2019 annotation file: it has no 'images' list.")
  return data


def category_names(data: Mapping[str, Any], json_name: str) -> list[str]:
  """The category names of an annotation file, in category id order.

  Args:
    data: a parsed json file holding 'categories' [{'id': int, 'name': str, ...}].
    json_name: its file name, for messages.

  Returns:
    NUM_CLASSES names; index i is the name of category id i.

  Raises:
    ValueError: the category ids are not exactly 0 to NUM_CLASSES - 1.
  """
  categories = sorted(data.get("categories", []), key=lambda c: c["id"])
  ids = [c["id"] for c in categories]
  if ids != list(range(NUM_CLASSES)):
    raise ValueError(
      f"{json_name} lists {len(ids)} categories with ids "
      f"{ids[:3]}...{ids[-3:]}; iNaturalist 2019 has {NUM_CLASSES} with "
      f"ids 0 to {NUM_CLASSES - 1}."
    )
  return [str(c["name"]) for c in categories]


def labelled_images(data: Mapping[str, Any], json_name: str) -> dict[str, ImageEntry]:
  """The images of train2019.json or val2019.json with their category and supercategory.

  Args:
    data: the parsed json file: 'images' [{'id', 'file_name', ...}] and 'annotations'
      [{'image_id', 'category_id', ...}].
    json_name: its file name, for messages.

  Returns:
    {file_name (path inside train_val2019.tar.gz): ImageEntry}.

  Raises:
    ValueError: an image without annotation, a category id out of range, or a
      file_name not of the form train_val2019/<supercategory>/<category>/<file>.
  """
  labels = {a["image_id"]: a["category_id"] for a in data.get("annotations", [])}
  unlabelled = [i["file_name"] for i in data["images"] if i["id"] not in labels]
  if unlabelled:
    raise ValueError(
      f"{len(unlabelled)} images of {json_name} have no annotation, e.g. {unlabelled[0]}."
    )
  images = {}
  for image in data["images"]:
    path, label = image["file_name"], labels[image["id"]]
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != _TRAIN_VAL_ROOT:
      raise ValueError(
        f"{json_name} lists the image {path!r}; expected paths of the "
        f"form {_TRAIN_VAL_ROOT}/<supercategory>/<category>/<file>."
      )
    if not 0 <= label < NUM_CLASSES:
      raise ValueError(
        f"{json_name} gives the image {path!r} the category id {label}, outside [0, {NUM_CLASSES})."
      )
    images[path] = ImageEntry(label=label, supercategory=parts[1])
  return images


def read_annotations(folder: epath.PathLike, with_test: bool) -> Annotations:
  """Reads and checks the json files of `folder` (not the images).

  Args:
    folder: the folder of manual downloads.
    with_test: whether to read test2019.json as the 'test' split too.

  Returns:
    The category names (from categories.json when `folder` holds it, else from
    train2019.json), the supercategories and the images of every split.

  Raises:
    ValueError: a json file that does not have the competition's format.
  """
  folder = epath.Path(folder)
  parsed = {split: _read_json(folder / name) for split, name in ANNOTATION_FILES.items()}
  if (folder / CATEGORIES_FILE).is_file():
    with (folder / CATEGORIES_FILE).open("r") as f:
      categories = json.load(f)
    # The file holds the list that replaces the 'categories' of the json files.
    if not isinstance(categories, dict):
      categories = {"categories": categories}
    names = category_names(categories, CATEGORIES_FILE)
  else:
    names = category_names(parsed["train"], ANNOTATION_FILES["train"])
  images = {split: labelled_images(data, ANNOTATION_FILES[split]) for split, data in parsed.items()}
  if with_test:
    test = _read_json(folder / TEST_IMAGES_FILE)
    images["test"] = {image["file_name"]: ImageEntry(_UNLABELLED, None) for image in test["images"]}
  return Annotations(names, images)


def missing_files(folder: epath.PathLike) -> list[str]:
  """The files of REQUIRED_FILES that are not in `folder`."""
  return [name for name in REQUIRED_FILES if not (epath.Path(folder) / name).is_file()]


def _has_test_files(folder: epath.Path) -> bool:
  present = [name for name in TEST_FILES if (folder / name).is_file()]
  if len(present) == 1:
    logging.warning(
      "%s holds %s but not %s: preparing %s without its 'test' split.",
      folder,
      present[0],
      (set(TEST_FILES) - set(present)).pop(),
      NAME,
    )
  return len(present) == len(TEST_FILES)


def rgb_decodable(data: bytes) -> bytes:
  """Image bytes that decode to uint8 [H, W, 3] with PIL, OpenCV and TensorFlow alike.

  TFDS's Image feature stores the bytes it is given and decodes them only when read,
  where PIL (tfds.data_source without OpenCV) returns CMYK JPEGs as [H, W, 4] and
  palette, alpha or 16-bit images in their own layout; only greyscale [H, W] is
  expanded to 3 channels by every decoder. So RGB and greyscale JPEGs (all but a few
  files of the dataset) keep their original bytes, and any other image is converted
  to RGB and stored as lossless PNG.

  Args:
    data: the bytes of an image file.

  Returns:
    `data` itself or a PNG of its RGB conversion.

  Raises:
    OSError: PIL cannot read the image (PIL.UnidentifiedImageError, truncated file).
  """
  with Image.open(io.BytesIO(data)) as image:
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
      return data
    rgb = image.convert("RGB")
  buffer = io.BytesIO()
  rgb.save(buffer, format="PNG")
  return buffer.getvalue()


class INaturalist2019(tfds.core.GeneratorBasedBuilder):
  """iNaturalist 2019 (FGVC6): 1,010 species, images of up to 800 px, variable size.

  Features: 'image' uint8 [H, W, 3] (the original JPEG bytes), 'label' the category id
  (ClassLabel of NUM_CLASSES, named by the category names), 'supercategory'
  the top folder of the image in the tarball (the iconic group of its species, e.g.
  'Birds', 'Plants'; text, so that the features are known before the files are
  read; empty in 'test'), 'id' the image's file
  name without extension. The folder, not the taxonomy's 'kingdom', because it is the
  competition's own grouping (six groups, against three kingdoms).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The FGVC6 competition's files, as published in 2019."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  # TFDS looks checksums up in a file beside the builder's code, a lookup that
  # needs the `importlib_resources` package (TFDS issue #11212); this builder
  # downloads nothing, so it has no checksums and needs no code path.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          "supercategory": tfds.features.Text(),
          "id": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
      homepage=_HOMEPAGE,
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folder = dl_manager.manual_dir
    missing = missing_files(folder)
    if missing:
      raise FileNotFoundError(
        f"{NAME}: {', '.join(missing)} missing from the manual download folder "
        f"{folder}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    with_test = _has_test_files(folder)
    annotations = read_annotations(folder, with_test)
    self._name_labels(annotations)
    archives = {split: TRAIN_VAL_ARCHIVE for split in ANNOTATION_FILES}
    json_files = dict(ANNOTATION_FILES)
    if with_test:
      archives["test"], json_files["test"] = TEST_ARCHIVE, TEST_IMAGES_FILE
    # Each split streams its archive once, reading the members in archive order.
    return {
      split: self._generate_examples(
        archive=dl_manager.iter_archive(
          tfds.download.Resource(
            path=folder / archive, extract_method=tfds.download.ExtractMethod.TAR_GZ_STREAM
          )
        ),
        images=annotations.images[split],
        archive_name=archive,
        json_name=json_files[split],
      )
      for split, archive in archives.items()
    }

  def _name_labels(self, annotations: Annotations) -> None:
    features = self.info.features
    names = annotations.category_names
    if len(set(names)) == len(names):
      features["label"].names = names
    else:
      # Names only label the ids; the ids are the classes.
      logging.warning("The category names repeat; %s labels its classes by id.", NAME)

  def _generate_examples(
    self,
    archive: Iterable[tuple[str, Any]],
    images: Mapping[str, ImageEntry],
    archive_name: str,
    json_name: str,
  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (path in the archive, example) for the archive's members that `images` lists.

    Raises:
      ValueError: the archive is damaged, or, once it is read to its end, some listed
        images were not in it; both with the count of the images not read.
    """
    remaining = dict(images)
    unreadable = []
    try:
      for path, fobj in archive:
        # Members of the other split and stray files are skipped unread.
        entry = remaining.pop(path, None)
        if entry is None:
          continue
        data = fobj.read()
        try:
          data = rgb_decodable(data)
        except OSError:
          # Kept as it is: the input pipeline skips records that fail to decode.
          unreadable.append(path)
        yield (
          path,
          {
            "image": data,
            "label": entry.label,
            "supercategory": entry.supercategory or "",
            "id": os.path.splitext(os.path.basename(path))[0],
          },
        )
    # What a cut or damaged .tar.gz raises once the stream reaches the damage.
    except (tarfile.TarError, EOFError, zlib.error) as error:
      raise ValueError(
        f"{archive_name} is truncated or corrupt ({error}): "
        f"{_not_read(remaining, images, json_name)}"
      ) from error
    if unreadable:
      logging.warning(
        "%d images of %s cannot be decoded and were stored as they are, e.g. %s.",
        len(unreadable),
        json_name,
        unreadable[0],
      )
    if remaining:
      raise ValueError(f"{archive_name} is incomplete: {_not_read(remaining, images, json_name)}")


def _not_read(
  remaining: Mapping[str, ImageEntry], images: Mapping[str, ImageEntry], json_name: str
) -> str:
  example = f" (e.g. {min(remaining)})" if remaining else ""
  return (
    f"{len(remaining)} of the {len(images)} images that {json_name} lists were "
    f"not read from it{example}. Check its md5sum and download it again.\n"
    f"{MANUAL_DOWNLOAD_INSTRUCTIONS}"
  )
