"""The full pre-training config schema, its paper defaults, and its checks.

Every config in `configs/` starts from `base_config()` and overrides what its
dataset needs, so every key a run reads exists here with a documented default.
The defaults are the paper's ImageNet ViT-B/16 recipe (BEiT's hyper-parameters,
design.md section 2).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from splitmask_jax.models import vit

OBJECTIVES = ("splitmask", "beit")
TOKENIZERS = ("random_projection", "random_patches", "kmeans")
MASKINGS = ("block", "uniform")
DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
  """Returns the default config: SplitMask, ViT-B/16 at 224 px, 300 epochs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # 'splitmask' (split, inpaint, match) or 'beit' ([MASK] tokens, one encoder pass).
  c.objective = "splitmask"

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"  # a key of vit.VARIANTS, '/', the patch size
  c.model.image_size = 224
  c.model.num_channels = 3
  c.model.decoder_depth = 2  # decoder width = encoder width (the paper)
  c.model.drop_path = 0.1
  c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32
  c.model.remat = False

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "random_projection"
  c.tokenizer.vocab_size = 8192
  # Pixels per token patch in the tokenizer's view. The view has one token
  # patch per ViT patch, so 8 for 16 px ViT patches is the paper's 112 px view.
  c.tokenizer.patch_size = 8
  # k-means: patches sampled from the training split, and Lloyd iterations.
  c.tokenizer.kmeans_num_patches = 3_000_000
  c.tokenizer.kmeans_iters = 20

  c.masking = ml_collections.ConfigDict()
  c.masking.kind = "block"
  # SplitMask: each branch observes (1 - ratio) of the patches (0.5: a mask and
  # its complement). BEiT: the share of patches replaced by [MASK] (0.4).
  c.masking.ratio = 0.5
  c.masking.min_block = placeholder(int)  # None: 16/196 of the patches (BEiT's 16 on 14x14)
  c.masking.max_block = placeholder(int)  # None: 75/196 of the patches

  c.loss = ml_collections.ConfigDict()
  c.loss.inpaint = True  # cross-entropy on every missing patch of both branches
  c.loss.match = True  # symmetric InfoNCE between the branches' pooled outputs
  c.loss.match_weight = 1.0
  c.loss.temperature = 0.2

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "imagenet2012"
  c.data.data_dir = placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  c.data.manual_dir = placeholder(str)  # a folder holding the raw files, for builders that read one
  c.data.train_split = "train"
  c.data.val_split = "validation"  # held-out MIM loss
  c.data.crop_scale = (0.08, 1.0)
  c.data.num_workers = 8  # grain worker processes per host (0: in-process)
  c.data.prefetch = 2

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-3  # at base_batch_size, scaled linearly with the batch
  c.optim.base_batch_size = 2048
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 10.0
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 3.0

  c.batch_size = 2048  # global, over all processes and devices
  c.num_epochs = 300.0
  c.num_steps = placeholder(int)  # overrides num_epochs when set

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis; -1: all of them

  c.log_every = 100
  c.eval_every = 5000  # held-out MIM loss
  c.eval_batches = 10
  c.checkpoint_every = 5000
  c.keep_checkpoints = 2

  # k-NN accuracy of the pooled encoder features at the end of a run, beside
  # the same figure for the randomly initialised encoder.
  c.knn = ml_collections.ConfigDict()
  c.knn.enabled = True
  c.knn.train_split = "train"
  c.knn.test_split = "validation"
  c.knn.num_train = placeholder(int, 50_000)  # None: the whole split
  c.knn.num_test = placeholder(int, 10_000)  # None: the whole split
  c.knn.k = 20
  c.knn.temperature = 0.07
  c.knn.batch_size = 256
  return c


def grid_size(config) -> tuple[int, int]:
  """The ViT patch grid (rows, cols) of a config."""
  _, patch = vit.parse_variant(config.model.variant)
  side = config.model.image_size // patch
  return side, side


def _fail(key: str, value, allowed: str):
  raise ValueError(f"config.{key}={value!r} is invalid: {allowed}.")


def validate_config(config) -> None:
  """Raises ValueError naming the key for any value a run cannot use.

  Runs before anything is compiled or read, so a typo costs seconds.
  """
  if config.objective not in OBJECTIVES:
    _fail("objective", config.objective, f"allowed values are {OBJECTIVES}")
  try:
    _, patch = vit.parse_variant(config.model.variant)
  except ValueError as e:
    raise ValueError(f"config.model.variant: {e}") from None
  if config.model.image_size <= 0 or config.model.image_size % patch:
    _fail("model.image_size", config.model.image_size,
          f"it must be a positive multiple of the patch size {patch}")
  if config.model.dtype not in DTYPES:
    _fail("model.dtype", config.model.dtype, f"allowed values are {DTYPES}")
  if config.model.num_channels not in (1, 3):
    _fail("model.num_channels", config.model.num_channels, "allowed values are 1 and 3")
  if config.tokenizer.kind not in TOKENIZERS:
    _fail("tokenizer.kind", config.tokenizer.kind, f"allowed values are {TOKENIZERS}")
  if config.tokenizer.vocab_size < 2:
    _fail("tokenizer.vocab_size", config.tokenizer.vocab_size, "it must be at least 2")
  if config.tokenizer.patch_size <= 0:
    _fail("tokenizer.patch_size", config.tokenizer.patch_size, "it must be positive")
  if config.masking.kind not in MASKINGS:
    _fail("masking.kind", config.masking.kind, f"allowed values are {MASKINGS}")
  ratio = config.masking.ratio
  if config.objective == "splitmask" and not 0.5 <= ratio < 1:
    _fail("masking.ratio", ratio,
          "SplitMask needs 0.5 <= ratio < 1 (two disjoint subsets of 1 - ratio each)")
  if not 0 < ratio < 1:
    _fail("masking.ratio", ratio, "it must lie in (0, 1)")
  if config.objective == "splitmask" and not (config.loss.inpaint or config.loss.match):
    _fail("loss", "inpaint=False, match=False", "enable inpaint, match or both")
  if config.loss.temperature <= 0:
    _fail("loss.temperature", config.loss.temperature, "it must be positive")
  if config.batch_size <= 0:
    _fail("batch_size", config.batch_size, "it must be positive")
  if config.num_steps is None and not config.num_epochs > 0:
    _fail("num_epochs", config.num_epochs, "it must be positive (or set num_steps)")
  if config.num_steps is not None and config.num_steps <= 0:
    _fail("num_steps", config.num_steps, "it must be positive")
  lo, hi = config.data.crop_scale
  if not 0 < lo <= hi <= 1:
    _fail("data.crop_scale", config.data.crop_scale, "it needs 0 < min <= max <= 1")
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    if config[key] <= 0:
      _fail(key, config[key], "it must be positive")
