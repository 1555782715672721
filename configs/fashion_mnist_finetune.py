r"""Fine-tuning (or linear probing) on Fashion-MNIST, after configs/fashion_mnist.py.

Table 9's recipe at the demo's scale: the pre-training run's Mini/8 encoder at
32 px, layer-wise lr decay 0.65, RandAugment m9/std0.5, mixup 0.8, cutmix 1.0,
label smoothing 0.1, stochastic depth 0.1, test crop 0.875.

  python -m splitmask_jax.main --config=configs/fashion_mnist_finetune.py \
      --config.init.workdir=workdirs/fmnist --workdir=workdirs/fmnist_ft
  python -m splitmask_jax.main --config=configs/fashion_mnist_finetune.py:probe \
      --config.init.workdir=workdirs/fmnist --workdir=workdirs/fmnist_probe

Without --config.init.workdir the encoder starts from random init (the
baseline). Options, comma-separated after the colon: `probe` (linear probes on
every block instead of fine-tuning), `share=<fraction>` (a class-balanced share
of the training labels, e.g. `share=0.1`, with as many updates as on the full
split), `test` (a tiny model for a few steps, for smoke tests).
"""

from splitmask_jax import config_args
from splitmask_jax import config_base
from splitmask_jax import recipes

OPTIONS = (config_args.PROBE, config_args.SHARE, config_args.TEST)


def get_config(arg: str | None = None):
  args = config_args.parse(arg, OPTIONS)
  c = config_base.downstream_config()
  c.task = "probe" if args.probe else "finetune"

  # Variant and channels must be the pre-training run's (configs/fashion_mnist.py);
  # another image size (a multiple of 8) resamples its position embeddings.
  c.model.variant = "Mini/8"
  c.model.image_size = 32
  c.model.num_channels = 1
  c.model.drop_path = 0.1
  c.model.dtype = "float32"
  c.model.scan = False

  c.data.dataset = "fashion_mnist"
  c.data.manual_dir = "/usr/share/datasets/fashion-mnist"
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.crop_scale = (0.35, 1.0)  # the pre-training crop: 28 px images have little to spare
  c.data.num_workers = 0

  c.batch_size = 256
  c.eval_batch_size = 1000
  c.num_epochs = 5.0
  c.optim.base_lr = 2e-3
  c.optim.base_batch_size = 256
  c.optim.warmup_epochs = 1.0
  c.optim.layer_decay = 0.65

  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500

  # On a share of the labels, as many updates as the full split gets (the
  # constant-updates protocol).
  c.data.train_fraction = args.share
  c.num_epochs /= args.share
  c.optim.warmup_epochs /= args.share

  if args.test:
    recipes.use_test_settings(c)
  return c
