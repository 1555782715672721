r"""SplitMask (or BEiT) pre-training on a folder of your own images, then fine-tuning.

One config value names the data: the folder. It is prepared once into TFDS /
ArrayRecord form in data_dir; undecodable and odd files are skipped or converted
and counted (splitmask_jax/data/image_folder.py). Images in class sub-folders are labelled (for
fine-tuning, probes and k-NN); a `train/` + `validation/` (or `val/`, `test/`)
layout gives the splits, otherwise 2% is held out for the validation loss.

  python -m splitmask_jax.main --config=configs/image_folder.py \
      --config.data.dataset=/path/to/images --workdir=W
  python -m splitmask_jax.main --config=configs/image_folder.py:finetune \
      --config.data.dataset=/path/to/images --config.init.workdir=W --workdir=W_ft

The schedule is the paper's rule for a new dataset: the updates of 300 ImageNet
epochs, capped at 5,000 epochs (`num_examples`, `max_epochs`); a few thousand
images want `:small_data` (the small-data recipe) and, on one GPU, a smaller
model or schedule (`--config.model.variant=S/16 --config.max_epochs=800`).
Options: splitmask_jax/recipes.py.
"""

from splitmask_jax import recipes


def get_config(arg: str | None = None):
  return recipes.image_folder_config(arg)
