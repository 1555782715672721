r"""Food-101: SplitMask (or BEiT) pre-training on its own images, then fine-tuning.

TFDS `food101`; 5,000 epochs (75,750 images). Getting the data: TFDS downloads it: tfds
build food101 --file_format=array_record.

  python -m splitmask_jax.main --config=configs/food101.py --workdir=W
  python -m splitmask_jax.main --config=configs/food101.py:beit --workdir=W_beit
  python -m splitmask_jax.main --config=configs/food101.py:finetune \
      --config.init.workdir=W --workdir=W_ft

Options (comma-separated after the colon; splitmask_jax/config_args.py) and the recipe:
splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.get_config("food101", arg)
