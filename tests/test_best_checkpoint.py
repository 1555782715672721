"""The checkpoint of the lowest held-out loss: kept, restored after a restart, read
for fine-tuning."""

import numpy as np
import pytest

from splitmask_jax import config_base
from splitmask_jax.runtime import checkpointing


def _state(value):
  return {"params": {"w": np.full((3, 2), value, np.float32)}, "step": np.int32(value)}


def test_keeps_the_lowest_finite_value_across_restarts(tmp_path):
  best = checkpointing.BestCheckpointer(str(tmp_path), "val_loss")
  assert best.best() is None
  offered = [(10, 3.0), (20, 2.0), (30, 2.5), (40, float("nan")), (50, 2.0)]
  saved = [best.offer(step, _state(step), value) for step, value in offered]
  assert saved == [True, True, False, False, False]  # ties do not replace the best
  assert best.best() == (20, 2.0)
  best.close()

  again = checkpointing.BestCheckpointer(str(tmp_path), "val_loss")
  assert again.best() == (20, 2.0)
  assert again.offer(60, _state(60), 1.5)
  again.close()
  kept = sorted(p.name for p in (tmp_path / checkpointing.BEST_DIR).iterdir() if p.name.isdigit())
  assert kept == ["60"]
  params, step = checkpointing.load_params(str(tmp_path), best=True)
  assert step == 60
  np.testing.assert_array_equal(params["w"], np.full((3, 2), 60, np.float32))


def test_reading_the_best_of_a_run_without_one_says_why(tmp_path):
  with pytest.raises(FileNotFoundError, match="keep_best_checkpoint=True"):
    checkpointing.load_params(str(tmp_path), best=True)
  with pytest.raises(ValueError, match="best=True reads the best checkpoint's own step"):
    checkpointing.load_params(str(tmp_path), 3, best=True)


def test_init_checkpoint_is_validated():
  config = config_base.downstream_config()
  config.init.checkpoint = "lowest"
  with pytest.raises(ValueError, match=r"init\.checkpoint='lowest'.*\('latest', 'best'\)"):
    config_base.validate_config(config)
  config.init.checkpoint = "best"
  config.init.step = 5
  with pytest.raises(ValueError, match=r"init\.step=5"):
    config_base.validate_config(config)
