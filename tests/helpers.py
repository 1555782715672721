"""What several test files share: the repository's paths and its demo config."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "fashion_mnist.py"


def load_config(arg=None):
  """`configs/fashion_mnist.py`'s get_config(arg), as `--config=...:arg` loads it."""
  spec = importlib.util.spec_from_file_location("fashion_mnist_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
