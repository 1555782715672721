"""What several test files share: the repository's paths, its demo configs, a crash."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "fashion_mnist.py"
FINETUNE_CONFIG_FILE = ROOT / "configs" / "fashion_mnist_finetune.py"


def load_config(arg=None, path=CONFIG_FILE):
  """A config file's get_config(arg), as `--config=<path>:arg` loads it (default:
  `configs/fashion_mnist.py`)."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def crash_after_saving(monkeypatch, step: int) -> None:
  """Makes `Checkpointer.save` raise RuntimeError('simulated crash') once the
  checkpoint of `step` is on disk: a run that dies right after a save.
  `monkeypatch.undo()` lets the next run save normally."""
  from splitmask_jax.runtime import checkpointing  # pylint: disable=import-outside-toplevel

  save = checkpointing.Checkpointer.save

  def save_then_die(self, at_step, state, data_iterator):
    save(self, at_step, state, data_iterator)
    if at_step == step:
      self.wait()
      raise RuntimeError("simulated crash")

  monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_die)
