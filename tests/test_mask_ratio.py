"""Each objective's own mask ratio (config.masking.ratio None): the checks of the resolved
ratio, the objective picked by a flag, and the resumption of runs that stated the ratio."""

import json

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from splitmask_jax import config_base
from splitmask_jax import loop
from splitmask_jax import objectives
from splitmask_jax.objectives import beit

from helpers import CONFIG_FILE
from helpers import load_config


@pytest.mark.parametrize(
  "arg,ratio,resolved",
  [
    ("test", None, 0.5),
    ("test", 0.75, 0.75),
    ("beit,test", None, 75 / 196),
    ("beit,test", 0.2, 0.2),
    ("mae,test", None, 0.75),
    ("simmim,test", None, 0.6),
  ],
)
def test_valid_ratios_resolve_to_the_objectives_own(arg, ratio, resolved):
  config = load_config(arg)
  config.masking.ratio = ratio
  config_base.validate_config(config)
  assert objectives.mask_ratio(config) == resolved


@pytest.mark.parametrize(
  "arg,ratio,message",
  [
    ("test", 0.4, r"config.masking.ratio=0.4 is invalid: SplitMask needs 0.5 <= ratio < 1"),
    ("test", 1.0, r"config.masking.ratio=1.0 is invalid: SplitMask needs"),
    ("beit,test", 1.0, r"config.masking.ratio=1.0 is invalid: it must lie in \(0, 1\)"),
    ("beit,test", 0.0, r"config.masking.ratio=0.0 is invalid: it must lie in \(0, 1\)"),
    ("mae,test", 1.0, r"config.masking.ratio=1.0 is invalid: it must lie in \(0, 1\)"),
  ],
)
def test_invalid_ratios_name_the_key(arg, ratio, message):
  config = load_config(arg)
  config.masking.ratio = ratio
  with pytest.raises(ValueError, match=message):
    config_base.validate_config(config)


def test_the_resolved_default_is_checked_and_dino_ignores_the_key(monkeypatch):
  config = load_config("beit,test")
  monkeypatch.setattr(beit, "DEFAULT_MASK_RATIO", 1.0)
  with pytest.raises(ValueError, match=r"config.masking.ratio=1.0 is invalid"):
    config_base.validate_config(config)
  # DINO masks nothing (DEFAULT_MASK_RATIO None): any value is left alone.
  dino = load_config("dino,test")
  for ratio in (None, 0.3, 1.5):
    dino.masking.ratio = ratio
    config_base.validate_config(dino)


def _from_command_line(*args):
  """The config that `--config=...` and `--config.key=value` flags give, as main.py
  parses them."""
  flag_values, argv = flags.FlagValues(), ["main", *args]
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def test_objective_flag_on_a_config_file_gets_that_objectives_ratio():
  """--config.objective=beit on the SplitMask demo masks BEiT's 75 of 196 (6 of its
  16 patches), not SplitMask's half; and the other way round."""
  config = _from_command_line(f"--config={CONFIG_FILE}", "--config.objective=beit")
  config_base.validate_config(config)
  assert objectives.mask_ratio(config) == 75 / 196
  masks = objectives.make_mask_fn(config, config_base.grid_size(config))(np.random.default_rng(0))
  assert masks["mask"].sum() == 6  # round(75 / 196 * 16); the old demo's 0.5: 8
  config = _from_command_line(f"--config={CONFIG_FILE}:beit", "--config.objective=splitmask")
  assert objectives.mask_ratio(config) == 0.5


def _saved(config, **values):
  """`config` as its config.json holds it, with dotted `values` replaced: a run
  written before masking.ratio defaulted to None."""
  saved = json.loads(config.to_json_best_effort())
  for key, value in values.items():
    group, name = key.split(".")
    saved[group][name] = value
  return saved


def test_runs_that_stated_their_ratio_resume_at_the_same_resolved_ratio(tmp_path):
  # The SplitMask demo's workdirs hold 0.5, its objective's own ratio: they resume.
  config = load_config()
  assert config.masking.ratio is None
  old = _saved(config, **{"masking.ratio": 0.5})
  assert not config_base.resume_conflicts(old, config)
  (tmp_path / loop.CONFIG_FILE).write_text(json.dumps(old))
  assert loop._check_workdir_config(config, str(tmp_path), allow_config_change=False) is False
  # And a new run (None) resumed with the ratio stated.
  config.masking.ratio = 0.5
  assert not config_base.resume_conflicts(_saved(config, **{"masking.ratio": None}), config)
  # The paper-recipe BEiT configs held 75 / 196, now BEiT's own.
  beit_config = load_config("beit")
  assert not config_base.resume_conflicts(
    _saved(beit_config, **{"masking.ratio": 75 / 196}), beit_config
  )


def test_runs_of_another_resolved_ratio_are_refused(tmp_path):
  # The BEiT demo's workdirs hold 0.4, not BEiT's 75 / 196: another ratio, refused
  # unless asked for (on its 4x4 grid both mask 6 patches, but the key says 0.4).
  config = load_config("beit")
  old = _saved(config, **{"masking.ratio": 0.4})
  assert config_base.resume_conflicts(old, config) == {
    "masking.ratio": (0.4, f"<None: {75 / 196!r}>")
  }
  (tmp_path / loop.CONFIG_FILE).write_text(json.dumps(old))
  refusal = rf"another config \(masking.ratio: 0.4 -> '<None: {75 / 196!r}>'\)"
  with pytest.raises(ValueError, match=refusal):
    loop._check_workdir_config(config, str(tmp_path), allow_config_change=False)
  config.masking.ratio = 0.4
  assert loop._check_workdir_config(config, str(tmp_path), allow_config_change=False) is False
  # A SplitMask run of None (0.5) resumed at 0.75 differs, shown as what None meant.
  splitmask = load_config()
  new = _saved(splitmask)
  splitmask.masking.ratio = 0.75
  assert config_base.resume_conflicts(new, splitmask) == {"masking.ratio": ("<None: 0.5>", 0.75)}
