"""The one parser of config arguments (`configs/x.py:beit,test,share=0.1`), used by every
config file: typed values, one error for an unknown option, one meaning of `test`."""

import pytest

from splitmask_jax import config_args
from splitmask_jax import recipes

import helpers

OPTIONS = (config_args.BEIT, config_args.SHARE, config_args.TEST)
CONFIG_FILES = sorted((helpers.ROOT / "configs").glob("*.py"))


def test_flags_and_typed_values():
  args = config_args.parse("beit, share=0.25", OPTIONS)
  assert (args.beit, args.share, args.test) == (True, 0.25, False)
  assert isinstance(args.share, float)
  assert config_args.parse(None, OPTIONS).share == 1.0
  assert config_args.parse("", OPTIONS).beit is False
  assert config_args.parse("beit=false,test=1", OPTIONS).beit is False
  assert config_args.parse("beit=false,test=1", OPTIONS).test is True
  count = config_args.Option("steps", int, 10, "steps")
  assert config_args.parse("steps=7", (count,)).steps == 7


@pytest.mark.parametrize(
  "arg,message",
  [
    (
      "bait",
      r"Unknown config argument 'bait' \(did you mean 'beit'\?\); allowed: "
      r"beit, share=<fraction>, test",
    ),
    ("xyz", r"Unknown config argument 'xyz'; allowed: beit, share=<fraction>, test"),
    ("share=ten", r"'share=ten': share=<fraction> needs a number, e.g. share=0.1"),
    ("share", r"'share': share takes a value, share=<fraction>"),
    ("beit=maybe", r"'beit=maybe': beit is a flag"),
    ("test,test", r"'test' is given twice"),
  ],
)
def test_bad_arguments_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    config_args.parse(arg, OPTIONS)


def test_exclusive_options():
  options = (config_args.FINETUNE, config_args.PROBE)
  with pytest.raises(ValueError, match="'finetune' and 'probe' exclude each other"):
    config_args.parse("finetune,probe", options, exclusive=[("finetune", "probe")])


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_uses_the_parser(path):
  """One error for an unknown option, and `test` means the same everywhere."""
  with pytest.raises(ValueError, match=r"Unknown config argument 'nope'; allowed: .*test"):
    helpers.load_config("nope", path)
  tested = helpers.load_config("test", path)
  expected = helpers.load_config(None, path)
  recipes.use_test_settings(expected)
  if path.stem == "image_folder":
    tested.data.dataset = expected.data.dataset = "/data/images"
  assert tested.to_dict() == expected.to_dict()
  assert (tested.model.variant, tested.num_steps) == ("Test/8", 4)


def test_share_is_the_constant_updates_share_in_both_fashion_mnist_files():
  finetune = helpers.FINETUNE_CONFIG_FILE
  full, tenth = helpers.load_config(None, finetune), helpers.load_config("share=0.1", finetune)
  assert tenth.data.train_fraction == 0.1
  assert tenth.num_epochs == pytest.approx(10 * full.num_epochs)
  assert tenth.optim.warmup_epochs == pytest.approx(10 * full.optim.warmup_epochs)
