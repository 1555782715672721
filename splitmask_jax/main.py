r"""Pre-trains a ViT with SplitMask or BEiT.

  python -m splitmask_jax.main --config=configs/fashion_mnist.py --workdir=DIR \
      [--config.key=value ...]

A config argument selects a variant: `--config=configs/fashion_mnist.py:beit`.
Running again with the same workdir resumes from its latest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from splitmask_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("Final: %s", results)


if __name__ == "__main__":
  app.run(main)
