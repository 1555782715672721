r"""ImageNet-1k: SplitMask (or BEiT) pre-training on its own images, then fine-tuning.

TFDS `imagenet2012`; 300 epochs (1,281,167 images); `share=0.1` / `share=0.01` pre-train
on a class-balanced share with the same number of updates (3,000 / 30,000 epochs, Table
1). Getting the data: TFDS's `imagenet2012` needs the manual download of
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar: put them in a folder and add
--config.data.manual_dir=FOLDER (prepared once, as ArrayRecord).

  python -m splitmask_jax.main --config=configs/imagenet.py --workdir=W
  python -m splitmask_jax.main --config=configs/imagenet.py:beit --workdir=W_beit
  python -m splitmask_jax.main --config=configs/imagenet.py:finetune \
      --config.init.workdir=W --workdir=W_ft

Options (comma-separated after the colon; splitmask_jax/config_args.py) and the recipe:
splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.get_config("imagenet", arg)
