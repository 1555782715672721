r"""iNaturalist 2018: SplitMask (or BEiT) pre-training on its own images, then fine-tuning.

TFDS `i_naturalist2018`; 800 epochs (437,513 images). Getting the data: TFDS downloads
it: python -m splitmask_jax.data --dataset=i_naturalist2018.

  python -m splitmask_jax.main --config=configs/inaturalist2018.py --workdir=W
  python -m splitmask_jax.main --config=configs/inaturalist2018.py:beit --workdir=W_beit
  python -m splitmask_jax.main --config=configs/inaturalist2018.py:finetune \
      --config.init.workdir=W --workdir=W_ft

Options (comma-separated after the colon; splitmask_jax/config_args.py) and the recipe:
splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.get_config("inaturalist2018", arg)
