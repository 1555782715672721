r"""ADE20k images: SplitMask (or BEiT) pre-training on its own images.

TFDS `scene_parse150`; 21,000 epochs (20,210 images), crops of at most 25% of an image;
pre-training only (the paper fine-tunes for segmentation). Getting the data: TFDS
downloads it as scene_parse150: python -m splitmask_jax.data --dataset=scene_parse150.

  python -m splitmask_jax.main --config=configs/ade20k.py --workdir=W
  python -m splitmask_jax.main --config=configs/ade20k.py:beit --workdir=W_beit

Options (comma-separated after the colon; splitmask_jax/config_args.py) and the recipe:
splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.get_config("ade20k", arg)
