r"""iNaturalist 2019: SplitMask (or BEiT) pre-training on its own images, then fine-tuning.

TFDS `i_naturalist2019`; 1,400 epochs (265,240 images). Getting the data: Download
train_val2019.tar.gz, train2019.json and val2019.json of the iNat 2019 (FGVC6)
competition into one folder and add --config.data.manual_dir=FOLDER (prepared once by
splitmask_jax/data/inaturalist2019.py).

  python -m splitmask_jax.main --config=configs/inaturalist2019.py --workdir=W
  python -m splitmask_jax.main --config=configs/inaturalist2019.py:beit --workdir=W_beit
  python -m splitmask_jax.main --config=configs/inaturalist2019.py:finetune \
      --config.init.workdir=W --workdir=W_ft

Options (comma-separated after the colon; splitmask_jax/config_args.py) and the recipe:
splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.get_config("inaturalist2019", arg)
