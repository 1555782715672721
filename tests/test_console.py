"""The console's lines and its filter (runtime/console.py). A whole run's console
is checked in test_install.py."""

import logging as std_logging
import os

import pytest
from absl import logging

from splitmask_jax.runtime import console

from helpers import ROOT


def test_step_line_shows_the_loss_parts_rate_and_time_left():
  values = {
    "loss": 6.3812,
    "inpaint_loss": 3.4211,
    "match_loss": 2.9601,
    "inpaint_acc": 0.2,
    "lr": 1e-3,
    "images_per_sec": 1234.4,
    "skipped_images": 0.0,
  }
  line = console.step_line(250, 704, values, steps_per_sec=2.0)
  assert line == "step 250/704  loss 6.381 (inpaint 3.421, match 2.96)  1,234 img/s  3m47s left"
  # The last step has no time left; skipped images are shown when there are any.
  line = console.step_line(704, 704, {"loss": 6.1, "skipped_images": 3.0}, steps_per_sec=2.0)
  assert line == "step 704/704  loss 6.1  skipped images 3"
  # Before a rate is known (the first window holds the compile) nothing is guessed.
  assert "left" not in console.step_line(50, 704, {"loss": 7.0}, steps_per_sec=None)


def test_values_line_puts_the_losses_first():
  values = {
    "val_loss": 6.12,
    "val_inpaint_loss": 3.5,
    "val_match_loss": 2.62,
    "val_match_accuracy": 0.51,
    "best_val_loss": 6.1,
  }
  assert console.values_line("eval", 500, values) == (
    "eval @ 500: val_loss 6.12 (inpaint 3.5, match 2.62), best 6.1, val_match_accuracy 0.51"
  )
  assert console.values_line("eval", 235, {"test_top1": 0.6471}) == "eval @ 235: test_top1 0.6471"


@pytest.mark.parametrize(
  "seconds, text", [(42.4, "42s"), (492, "8m12s"), (11100, "3h05m"), (float("inf"), "?")]
)
def test_duration(seconds, text):
  assert console.duration(seconds) == text


def test_summary_of_a_pretraining_run(monkeypatch):
  results = {
    "knn_top1": 0.7706,
    "knn_top1_random_init": 0.683,
    "val_loss": 6.12,
    "best_val_loss": 6.11,
    "best_step": 704,
  }
  argv = ["main.py", "--config=configs/fashion_mnist.py", "--workdir=workdirs/fmnist"]
  monkeypatch.chdir(ROOT)  # where the config paths of the command line are
  text = console.summary("pretrain", "workdirs/fmnist", results, 492.0, argv)
  lines = text.splitlines()
  assert lines[0] == (
    "Done: pretrain in 8m12s. k-NN top-1 77.1% (random init 68.3%); "
    "val_loss 6.12 (best 6.11 at step 704)"
  )
  assert "best_checkpoint/" in lines[1] and "tensorboard --logdir workdirs/fmnist" in lines[1]
  assert lines[2].endswith(
    "python -m splitmask_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fmnist"
  )
  # The demo's config has a fine-tuning sibling; others take the `finetune` option.
  assert lines[3] == (
    "  fine-tune: python -m splitmask_jax.main --config=configs/fashion_mnist_finetune.py "
    "--config.init.workdir=workdirs/fmnist --workdir=workdirs/fmnist_finetune"
  )
  argv[1] = "--config=configs/food101.py:test"
  assert "--config=configs/food101.py:finetune " in console.summary(
    "pretrain", "w", results, 1.0, argv
  )


def test_summary_of_a_probe_names_the_best_block():
  results = {"probe_top1_pretrained_block_1": 0.7, "probe_top1_pretrained_block_2": 0.79}
  text = console.summary("probe", "w", results, 1.0, ["main.py"])
  assert "linear probe (pretrained): best block 2, top-1 79.0%" in text
  assert "resume" not in text and "checkpoints/" not in text


def _record(pathname, level, message="m"):
  return std_logging.LogRecord("absl", level, pathname, 1, message, None, None)


def test_filter_keeps_this_package_and_third_party_warnings():
  keep = console._Filter().filter
  own = os.path.join(console._PACKAGE_DIR, "loop.py")
  other = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert keep(_record(own, std_logging.INFO))
  assert not keep(_record(own, std_logging.DEBUG))
  assert not keep(_record(other, std_logging.INFO))
  assert keep(_record(other, std_logging.WARNING))
  assert keep(_record(other, std_logging.ERROR))
  assert not keep(_record(other, std_logging.WARNING, "OpenCV is not installed. We recommend"))


def test_verbosity_one_keeps_everything(monkeypatch):
  handler = logging.get_absl_handler()
  monkeypatch.setattr(handler, "filters", list(handler.filters))
  formatter = handler.python_handler.formatter
  monkeypatch.setattr(logging, "get_verbosity", lambda: logging.DEBUG)
  console.setup()
  assert not any(isinstance(f, console._Filter) for f in handler.filters)
  assert handler.python_handler.formatter is formatter
  monkeypatch.setattr(logging, "get_verbosity", lambda: logging.INFO)
  try:
    console.setup()
    assert any(isinstance(f, console._Filter) for f in handler.filters)
    line = handler.format(_record("/x/orbax.py", std_logging.WARNING, "disk slow"))
    assert line.endswith(" WARNING disk slow") and line[2] == ":" and line[5] == ":"
  finally:
    handler.setFormatter(formatter)
