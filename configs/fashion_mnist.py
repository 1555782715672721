r"""SplitMask (or BEiT) on Fashion-MNIST: the demo that runs on a laptop CPU.

Pre-trains a small ViT on the 60k training images alone, then reports the
k-NN accuracy of its features on the test split beside a random-init encoder.

  python -m splitmask_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
  python -m splitmask_jax.main --config=configs/fashion_mnist.py:beit --workdir=workdirs/fmnist_beit

Options, comma-separated after the colon: `beit` (the BEiT objective instead of
SplitMask), `test` (a tiny model for a few steps, for smoke tests).
"""

from splitmask_jax import config_args
from splitmask_jax import config_base
from splitmask_jax import recipes

OPTIONS = (config_args.BEIT, config_args.TEST)


def get_config(arg: str | None = None):
  args = config_args.parse(arg, OPTIONS)
  c = config_base.base_config()
  c.objective = "beit" if args.beit else "splitmask"

  # 28 px images cropped and resized to 32 px: a 4x4 grid of 8 px patches keeps
  # a step cheap enough for ~400 images/s on 2 CPU cores.
  c.model.variant = "Mini/8"
  c.model.image_size = 32
  c.model.num_channels = 1
  c.model.drop_path = 0.0
  c.model.dtype = "float32"  # CPUs gain nothing from bfloat16
  c.model.scan = False  # six small blocks compile quickly unrolled

  # At 32 px the images are already small: the tokenizer reads them at full
  # resolution, one 8x8 token patch per ViT patch (d = 64).
  c.tokenizer.kind = "kmeans"
  c.tokenizer.vocab_size = 512
  c.tokenizer.patch_size = 8
  c.tokenizer.kmeans_num_patches = 200_000
  c.tokenizer.kmeans_iters = 10

  c.masking.kind = "block"
  c.masking.ratio = 0.4 if c.objective == "beit" else 0.5

  c.data.dataset = "fashion_mnist"
  # Debian's dataset-fashion-mnist package installs the four IDX files here.
  c.data.manual_dir = "/usr/share/datasets/fashion-mnist"
  c.data.train_split = "train"
  c.data.val_split = "test"
  c.data.crop_scale = (0.35, 1.0)
  c.data.num_workers = 0

  c.batch_size = 256
  c.num_epochs = 3.0
  c.optim.base_lr = 1e-3
  c.optim.base_batch_size = 256
  c.optim.warmup_epochs = 0.5

  c.log_every = 50
  c.eval_every = 250
  c.eval_batches = 8
  c.checkpoint_every = 250

  c.knn.train_split = "train"
  c.knn.test_split = "test"
  c.knn.num_train = 20_000
  c.knn.num_test = 5_000
  c.knn.batch_size = 512

  if args.test:
    recipes.use_test_settings(c)
  return c
