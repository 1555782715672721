"""Clear errors before any work: config files, config arguments and config keys that
do not exist fail on the command line with one message, and an upgrade that adds
config keys does not block resuming a run written before them."""

import json
import logging
import subprocess
import sys

import pytest

from splitmask_jax import config_base
from splitmask_jax import loop

from helpers import CONFIG_FILE
from helpers import ROOT
from helpers import load_config


def _main(workdir, *args):
  """`python -m splitmask_jax.main --workdir=<workdir> <args>`, run at the repository root."""
  return subprocess.run(
    [sys.executable, "-m", "splitmask_jax.main", f"--workdir={workdir}", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _fails_with_one_message(result, workdir):
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  assert "FATAL Flags parsing error: " in result.stderr
  assert not workdir.exists()  # nothing ran


def test_unknown_config_keys_are_named_with_the_closest_keys(tmp_path):
  workdir = tmp_path / "run"
  result = _main(
    workdir,
    f"--config={CONFIG_FILE.relative_to(ROOT)}:test",
    "--config.foo=1",
    "--config.optim.warmup_epoch=2",  # optim.warmup_epochs, one letter short
    "--config.model.fo=1",
  )
  _fails_with_one_message(result, workdir)
  err = result.stderr
  assert (
    "flag --config.foo: config.foo is not a key of the config configs/fashion_mnist.py:test" in err
  )
  assert "the keys at the top level are accum_steps, augment, batch_size," in err
  assert "config.optim.warmup_epoch is not a key" in err
  assert "(did you mean config.optim.warmup_epochs" in err
  assert "the keys in config.optim are b1, b2, base_batch_size, base_lr," in err
  assert "config.model.fo is not a key" in err
  assert "the keys in config.model are attention, decoder_depth," in err


def test_missing_config_file_lists_the_config_files(tmp_path):
  workdir = tmp_path / "run"
  result = _main(workdir, "--config=configs/nope.py:test", "--config.foo=1")
  _fails_with_one_message(result, workdir)
  assert (
    "flag --config=configs/nope.py:test: there is no config file configs/nope.py; "
    "the config files in configs/ are ade20k.py, coco.py," in result.stderr
  )
  assert "fashion_mnist.py, fashion_mnist_finetune.py," in result.stderr


def test_bad_config_argument_is_one_message(tmp_path):
  workdir = tmp_path / "run"
  result = _main(workdir, f"--config={CONFIG_FILE}:tset")
  _fails_with_one_message(result, workdir)
  assert (
    "Unknown config argument 'tset' (did you mean 'test'?); allowed: beit, mae, simmim, dino, test"
    in result.stderr
  )


def test_value_of_the_wrong_type_is_one_message(tmp_path):
  workdir = tmp_path / "run"
  result = _main(workdir, f"--config={CONFIG_FILE}:test", "--config.num_steps=abc")
  _fails_with_one_message(result, workdir)
  assert "flag --config.num_steps=abc: invalid literal for int()" in result.stderr


def _saved_without(config, *keys):
  """`config` as a run's config.json holds it, without the dotted `keys`: a run
  written before they existed."""
  saved = json.loads(config.to_json_best_effort())
  for key in keys:
    group, name = key.rsplit(".", 1)
    del saved[group][name]
  return saved


def test_added_keys_resume_at_their_old_values():
  config = config_base.base_config()  # model.scan and model.attention at their defaults
  saved = _saved_without(config, "model.scan", "model.attention")
  # The run was unrolled: it resumes unrolled, the attention at the default.
  assert config_base.legacy_values(saved, config) == {"model.scan": False}
  assert config_base.resume_conflicts(saved, config) == {"model.scan": ("<absent: False>", True)}
  config.update_from_flattened_dict(config_base.legacy_values(saved, config))
  assert not config_base.resume_conflicts(saved, config)
  # A config file that sets the old value already: nothing to fill, nothing differs.
  demo = load_config("test")
  assert demo.model.scan is False
  demo_saved = _saved_without(demo, "model.scan", "model.attention")
  assert not config_base.legacy_values(demo_saved, demo)
  assert not config_base.resume_conflicts(demo_saved, demo)
  # Saved with the keys: compared as they are.
  assert not config_base.legacy_values(json.loads(config.to_json_best_effort()), config)


def test_missing_keys_compare_at_the_schema_default():
  config = config_base.base_config()
  saved = _saved_without(config, "model.drop_path")
  assert not config_base.resume_conflicts(saved, config)
  config.model.drop_path = 0.2
  assert config_base.resume_conflicts(saved, config) == {"model.drop_path": ("<absent: 0.1>", 0.2)}
  # A key the new schema lacks (a removed one) still differs.
  saved["model"]["depth"] = 12
  config.model.drop_path = 0.1
  assert config_base.resume_conflicts(saved, config) == {"model.depth": (12, "<absent>")}


def test_an_explicit_value_of_an_added_key_still_conflicts(monkeypatch):
  # An added key whose old value is not its default: drop_path, once 0.
  monkeypatch.setattr(config_base, "ADDED_KEYS", {"model.drop_path": 0.0})
  config = config_base.base_config()
  saved = _saved_without(config, "model.drop_path")
  assert config_base.legacy_values(saved, config) == {"model.drop_path": 0.0}
  config.model.drop_path = 0.2  # asked for: not replaced, and a change
  assert not config_base.legacy_values(saved, config)
  assert config_base.resume_conflicts(saved, config) == {"model.drop_path": ("<absent: 0.0>", 0.2)}
  config.model.drop_path = 0.0
  assert not config_base.legacy_values(saved, config)
  assert not config_base.resume_conflicts(saved, config)


def test_workdir_of_an_old_run_resumes_with_the_old_values(tmp_path, monkeypatch, caplog):
  config = config_base.base_config()
  config.lock()  # as the command line loads it
  saved = _saved_without(config, "model.scan", "model.attention")
  (tmp_path / loop.CONFIG_FILE).write_text(json.dumps(saved))
  with caplog.at_level(logging.INFO):
    assert loop._check_workdir_config(config, str(tmp_path), allow_config_change=False) is False
  assert config.model.scan is False and config.model.attention == "auto"
  assert "with the values it ran with: model.scan=False." in caplog.text

  monkeypatch.setattr(config_base, "ADDED_KEYS", {"model.drop_path": 0.0})
  (tmp_path / loop.CONFIG_FILE).write_text(json.dumps(_saved_without(config, "model.drop_path")))
  config.model.drop_path = 0.2
  with pytest.raises(
    ValueError, match=r"holds a run of another config \(model.drop_path: '<absent: 0.0>' -> 0.2\)"
  ):
    loop._check_workdir_config(config, str(tmp_path), allow_config_change=False)
  assert loop._check_workdir_config(config, str(tmp_path), allow_config_change=True) is True
  assert config.model.drop_path == 0.2
