"""Every config file builds and validates; the paper's datasets run under mocked TFDS
data and fail with instructions when their data is missing; the schedules keep the
paper's number of updates."""

import contextlib
import json
import math
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from splitmask_jax import config_base
from splitmask_jax import loop
from splitmask_jax import main
from splitmask_jax import optim
from splitmask_jax import recipes
from splitmask_jax.data import datasets
from splitmask_jax.objectives import dino

import helpers

CONFIG_FILES = sorted((helpers.ROOT / "configs").glob("*.py"))
PAPER_CONFIGS = sorted(recipes.DATASETS)
CLASSIFICATION = [name for name in PAPER_CONFIGS if recipes.DATASETS[name].finetune]


def _variants(path):
  if path.stem.startswith("fashion_mnist"):
    module_variants = (
      ("beit", "mae", "simmim", "dino", "test", "dino,test")
      if path.stem == "fashion_mnist"
      else ("probe", "share=0.1", "test")
    )
    return [None, *module_variants]
  return [
    None,
    "beit",
    "mae",
    "simmim",
    "dino",
    "small_data",
    "dino,small_data",
    "mae,small_data",
    "share=0.1",
    "test",
    "finetune",
    "probe",
    "finetune,share=0.1",
    "finetune,test",
    "probe,test",
  ]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_builds_and_validates(path):
  detection = path.stem in ("coco", "ade20k")
  for arg in _variants(path):
    if detection and arg and ("finetune" in arg or "probe" in arg):
      with pytest.raises(ValueError, match="detection or segmentation"):
        helpers.load_config(arg, path)
      continue
    config = helpers.load_config(arg, path)
    if path.stem == "image_folder":
      config.data.dataset = "/data/my_images"
    config_base.validate_config(config)


def test_image_folder_config_names_the_missing_folder_key():
  config = helpers.load_config(None, helpers.ROOT / "configs" / "image_folder.py")
  with pytest.raises(ValueError, match=r"config\.data\.dataset=None.*folder of images"):
    config_base.validate_config(config)


def test_unknown_variant_names_the_allowed_ones():
  with pytest.raises(ValueError, match="allowed.*small_data"):
    recipes.get_config("food101", "finetune,smal_data")
  with pytest.raises(ValueError, match="share=<fraction> needs a number"):
    recipes.get_config("imagenet", "share=ten")
  config = recipes.get_config("imagenet", "share=2")
  with pytest.raises(ValueError, match=r"data\.train_fraction=2\.0"):
    config_base.validate_config(config)
  config = recipes.get_config("imagenet", None)
  config.data.in_memory_mib = -1
  with pytest.raises(ValueError, match=r"data\.in_memory_mib=-1 .*>= 0"):
    config_base.validate_config(config)


def test_baselines_take_their_papers_changes_to_the_recipe():
  mae = helpers.load_config("mae", helpers.ROOT / "configs" / "stanford_cars.py")
  assert (mae.objective, mae.masking.kind, mae.optim.b2) == ("mae", "uniform", 0.95)
  assert mae.augment.solarize_prob == 0.2  # the small sets' augmentations, as SplitMask's
  simmim = helpers.load_config("simmim", helpers.ROOT / "configs" / "imagenet.py")
  assert (simmim.masking.kind, simmim.simmim.mask_patch_size) == ("uniform", 32)
  dino = helpers.load_config("dino,small_data", helpers.ROOT / "configs" / "stanford_cars.py")
  assert (dino.optim.weight_decay, dino.optim.weight_decay_end) == (0.04, 0.4)
  # DINO's views carry its own photometric augmentations.
  assert dino.augment.solarize_prob == 0 and dino.augment.blur_prob == 0
  with pytest.raises(ValueError, match="'dino'.* are pre-training options"):
    helpers.load_config("dino,finetune", helpers.ROOT / "configs" / "imagenet.py")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_pretraining_schedule_is_table_3(name):
  dataset = recipes.DATASETS[name]
  config = recipes.get_config(name)
  steps, per_epoch = loop.num_steps(config, dataset.train_size)
  assert steps / per_epoch == pytest.approx(dataset.pretrain_epochs, rel=1e-3)
  # Every one of them performs roughly the updates of 300 ImageNet epochs: the
  # paper rounds the epochs, and caps the small sets at 5,000.
  reference = recipes.REFERENCE_EXAMPLES / config.batch_size
  assert 0.9 * reference <= steps <= 1.25 * reference or dataset.max_epochs == 5000
  small = name in ("stanford_cars", "domainnet_clipart", "domainnet_painting", "domainnet_sketch")
  assert (config.masking.kind == "uniform") == small
  assert (config.augment.solarize_prob > 0) == small
  assert config.data.crop_scale[1] == (0.25 if name == "ade20k" else 1.0)


def test_a_share_keeps_the_updates_and_the_cap_stops_them():
  full = recipes.get_config("imagenet")
  total, _ = loop.num_steps(full, recipes.IMAGENET_TRAIN_SIZE)
  for share, epochs in ((0.1, 3000), (0.01, 30000)):  # section 4.1, Table 1
    config = recipes.get_config("imagenet", f"share={share}")
    size = round(share * recipes.IMAGENET_TRAIN_SIZE)
    steps, per_epoch = loop.num_steps(config, size)
    assert steps == total
    assert steps / per_epoch == pytest.approx(epochs, rel=1e-3)
    # The warmup keeps its share of the run (BEiT's 10 of 300 epochs).
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, steps, per_epoch)
    warmup = round(steps / 30)
    peak = config.optim.base_lr * config.batch_size / config.optim.base_batch_size
    assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-5)
    assert float(schedule(warmup // 2)) == pytest.approx(peak / 2, rel=1e-3)
    # So does DINO's teacher-temperature warmup (30 of 300 epochs, 0.04 -> 0.07).
    dino_config = recipes.get_config("imagenet", f"dino,share={share}")
    temperature = dino.teacher_temperature(
      dino_config, total_steps=steps, steps_per_epoch=per_epoch
    )
    assert float(temperature(round(steps / 20))) == pytest.approx(0.055, rel=1e-3)
    assert float(temperature(round(steps / 10))) == pytest.approx(0.07)
  cars = recipes.get_config("stanford_cars", "share=0.5")
  steps, per_epoch = loop.num_steps(cars, 4072)
  assert steps == math.ceil(5000 * per_epoch)
  # A length in steps is taken as it is; stating two lengths is refused.
  cars.num_steps = 7
  with pytest.raises(ValueError, match="state the length one way"):
    config_base.validate_config(cars)
  cars.num_examples = None
  assert loop.num_steps(cars, 4072)[0] == 7


def test_finetune_configs_are_table_9():
  for name in CLASSIFICATION:
    config = recipes.get_config(name, "finetune")
    large = name in ("inaturalist2018", "inaturalist2019", "food101")
    if name == "imagenet":
      continue
    assert config.optim.base_lr == (1.4e-4 if large else 4e-3)
    assert config.optim.layer_decay == (1.0 if large else 0.65)
    assert config.optim.warmup_epochs == (5 if large else 60)
    assert (config.augment.repeats > 1) == large
    assert config.augment.randaugment_magnitude == (7 if large else 9)
    assert (
      config.num_epochs,
      config.batch_size,
      config.augment.mixup,
      config.augment.cutmix,
      config.augment.label_smoothing,
      config.model.drop_path,
      config.data.test_crop_ratio,
    ) == (300, 1024, 0.8, 1.0, 0.1, 0.1, 0.875)
  few = recipes.get_config("stanford_cars", "finetune,share=0.1")
  steps, per_epoch = loop.num_steps(few, 814)
  assert steps / per_epoch == pytest.approx(3000, rel=1e-3)


def _mock_getitems(record_keys, generator, serialized=False):
  # TFDS's mock sets its batched read as a plain attribute of a MagicMock, which
  # calls it without the `self` its signature expects; the single read works.
  return [
    mocking._getitem(None, key, generator, serialized)  # pylint: disable=protected-access
    for key in record_keys
  ]


@contextlib.contextmanager
def _mocked_tfds(num_examples):
  """TFDS's random examples for any dataset, seen as prepared ArrayRecord."""
  array_record = tfds.core.FileFormat.ARRAY_RECORD
  with (
    tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE),
    mock.patch.object(mocking, "_getitems", _mock_getitems),
    mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    mock.patch.object(
      tfds.core.DatasetInfo,
      "file_format",
      new_callable=mock.PropertyMock,
      return_value=array_record,
    ),
  ):
    yield


def _final(workdir):
  return json.loads((workdir / "final_metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_pretrains_on_mocked_data(name, tmp_path):
  config = recipes.get_config(name, "test")
  # The k-NN and image summaries are the same code for every dataset: one
  # labelled and one unlabelled set cover them (the suite's time is compiling).
  full = name in ("stanford_cars", "coco")
  if not full:
    config.knn.enabled = False
    config.summary_images = 0
  with _mocked_tfds(num_examples=48):
    final = main.run(config, str(tmp_path))
  assert _final(tmp_path)["step"] == 4
  assert np.isfinite(final["loss"]) and np.isfinite(final["val_loss"])
  assert final["best_step"] == 4
  if full:
    assert ("knn_top1" in final) == recipes.DATASETS[name].labelled


@pytest.mark.slow
@pytest.mark.parametrize(
  "name,arg",
  [
    ("inaturalist2018", "finetune,test"),
    ("domainnet_sketch", "finetune,share=0.5,test"),
    ("food101", "probe,test"),
  ],
)
def test_paper_config_finetunes_on_mocked_data(name, arg, tmp_path):
  config = recipes.get_config(name, arg)
  with _mocked_tfds(num_examples=48):
    final = main.run(config, str(tmp_path))
  if config.task == "finetune":
    assert _final(tmp_path)["step"] == 4
    assert 0 <= final["test_top1"] <= 1
  else:
    assert (tmp_path / "probe.json").exists()


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_missing_data_fails_with_instructions_before_anything_runs(name, tmp_path):
  config = recipes.get_config(name, "test")
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(datasets.DatasetNotPreparedError) as error:
    main.run(config, str(tmp_path / "workdir"))
  message = str(error.value)
  assert recipes.DATASETS[name].tfds_name in message
  assert "python -m splitmask_jax.data --dataset=" in message
  assert ("--manual_dir=FOLDER" in message) == (name in ("imagenet", "inaturalist2019"))
  assert not (tmp_path / "workdir" / "metrics.jsonl").exists()
