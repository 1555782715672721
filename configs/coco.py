r"""COCO 2017 images: SplitMask (or BEiT) pre-training on its own images.

TFDS `coco/2017`; 3,000 epochs (118,287 images); pre-training only (the paper fine-tunes
for detection). Getting the data: TFDS downloads it: python -m splitmask_jax.data --dataset=coco/2017.

  python -m splitmask_jax.main --config=configs/coco.py --workdir=W
  python -m splitmask_jax.main --config=configs/coco.py:beit --workdir=W_beit

Options (comma-separated after the colon; splitmask_jax/config_args.py) and the recipe:
splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.get_config("coco", arg)
