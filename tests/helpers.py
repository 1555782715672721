"""What several test files share: the repository's paths and its demo configs."""

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
