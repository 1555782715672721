r"""DomainNet painting: SplitMask (or BEiT) pre-training on its own images, then fine-tuning.

TFDS `domainnet/painting`; 5,000 epochs (52,867 images), the small-data recipe. Getting
the data: TFDS downloads it: python -m splitmask_jax.data --dataset=domainnet/painting.

  python -m splitmask_jax.main --config=configs/domainnet_painting.py --workdir=W
  python -m splitmask_jax.main --config=configs/domainnet_painting.py:beit --workdir=W_beit
  python -m splitmask_jax.main --config=configs/domainnet_painting.py:finetune \
      --config.init.workdir=W --workdir=W_ft

Options (comma-separated after the colon; splitmask_jax/config_args.py) and the recipe:
splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.get_config("domainnet_painting", arg)
