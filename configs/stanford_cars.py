r"""Stanford Cars: SplitMask (or BEiT) pre-training on its own images, then fine-tuning.

TFDS `cars196`; 5,000 epochs (8,144 images), the small-data recipe. Getting the data:
python -m splitmask_jax.data --dataset=cars196.

  python -m splitmask_jax.main --config=configs/stanford_cars.py --workdir=W
  python -m splitmask_jax.main --config=configs/stanford_cars.py:beit --workdir=W_beit
  python -m splitmask_jax.main --config=configs/stanford_cars.py:finetune \
      --config.init.workdir=W --workdir=W_ft

Options (comma-separated after the colon; splitmask_jax/config_args.py) and the recipe:
splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.get_config("stanford_cars", arg)
