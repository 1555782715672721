"""The full pre-training config schema, its paper defaults, and its checks.

Every config in `configs/` starts from `base_config()` and overrides what its
dataset needs, so every key a run reads exists here with a documented default.
The defaults are the paper's ImageNet ViT-B/16 recipe (BEiT's hyper-parameters,
design.md section 2).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from splitmask_jax import sharding
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
  # Batches are split over data x fsdp devices; parameters and optimizer state
  # are sharded over fsdp (see sharding.py). -1 on one axis: the rest.
  c.mesh.data = -1  # devices on the data axis
  c.mesh.fsdp = 1  # devices on the fsdp axis

  c.log_every = 100
  c.eval_every = 5000  # held-out MIM loss
  c.eval_batches = 10
  c.checkpoint_every = 5000
  c.keep_checkpoints = 2
  # A non-finite loss or gradient stops the run at the next log step, naming the
  # step; the checkpoints before it stay. True: such an update is skipped instead
  # (counted as `skipped_updates`); more than max_consecutive_skips in a row is
  # applied, and so stops the run.
  c.skip_nonfinite_updates = False
  c.max_consecutive_skips = 10
  # XLA trace of steps start_step + 1 ... start_step + num_steps (0: no trace)
  # in <workdir>/profile, for TensorBoard's profile plugin or Perfetto.
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 10
  c.profile.num_steps = 0

  # k-NN accuracy of the pooled encoder features at the end of a run, beside
  # the same figure for the randomly initialised encoder.
  c.knn = ml_collections.ConfigDict()
  c.knn.enabled = True
  c.knn.train_split = "train"
  c.knn.test_split = "validation"
  # placeholder()'s second argument is `required`, not a default: an int field
  # that also takes None is a typed FieldReference.
  c.knn.num_train = ml_collections.FieldReference(50_000, field_type=int)  # None: all
  c.knn.num_test = ml_collections.FieldReference(10_000, field_type=int)  # None: all
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


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _check_schema(config) -> None:
  """Raises for a key that `base_config()` lacks (a typo in a config file), naming
  the keys allowed at its level, and for a key of the schema the config lacks."""
  schema, keys = set(_flatten(base_config().to_dict())), set(_flatten(config.to_dict()))
  groups = {k.rsplit(".", 1)[0] for k in schema if "." in k}
  for key in sorted(keys - schema):
    parts = key.split(".")
    # The first component that is neither a key nor a group of the schema.
    depth = next(i for i in range(1, len(parts) + 1)
                 if ".".join(parts[:i]) not in schema | groups)
    parent = ".".join(parts[:depth - 1])
    siblings = sorted({k[len(parent) + 1:].split(".")[0] if parent else k.split(".")[0]
                       for k in schema if not parent or k.startswith(parent + ".")})
    where = f"in config.{parent}" if parent else "at the top level"
    raise ValueError(f"config.{'.'.join(parts[:depth])} is not a key of the config "
                     f"schema (config_base.base_config()): allowed keys {where} are "
                     f"{siblings}.")
  missing = sorted(schema - keys)
  if missing:
    raise ValueError(f"config lacks the keys {missing}: start config files from "
                     "config_base.base_config().")


def validate_config(config) -> None:
  """Raises ValueError naming the key for any value a run cannot use.

  Runs before anything is compiled or read, so a typo costs seconds.
  """
  _check_schema(config)
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
  sharding.check_mesh_config(config.mesh)
  if config.profile.start_step < 1:
    _fail("profile.start_step", config.profile.start_step,
          "it must be >= 1 (the first step compiles)")
  if config.profile.num_steps < 0:
    _fail("profile.num_steps", config.profile.num_steps, "it must be >= 0 (0: off)")
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "max_consecutive_skips"):
    if config[key] <= 0:
      _fail(key, config[key], "it must be positive")


# Keys that may differ between a run and its resumption: they say where the data
# is, how it is read, how often the run logs, evaluates and saves, how the work
# is laid out on devices, what happens to non-finite updates and how the end
# evaluation runs, but not what the run computes. A trailing '.' covers a group.
RESUMABLE_KEYS = ("data.data_dir", "data.manual_dir", "data.num_workers", "data.prefetch",
                  "log_every", "eval_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints", "skip_nonfinite_updates", "max_consecutive_skips",
                  "mesh.", "profile.", "knn.")
_ABSENT = "<absent>"


def resume_conflicts(saved: dict, config) -> dict[str, tuple[Any, Any]]:
  """Keys on which `config` and a run's saved config disagree, beyond RESUMABLE_KEYS.

  Args:
    saved: the run's config as read back from its `config.json`.
    config: the config of the run that would resume it.

  Returns:
    {dotted key: (saved value, new value)}, sorted by key; '<absent>' stands for
    a key that one side lacks. Empty when the run may resume with `config`.
  """
  old = _flatten(saved)
  # Through JSON, so both sides compare alike (tuples as lists, None as null).
  new = _flatten(json.loads(config.to_json_best_effort()))
  conflicts = {}
  for key in sorted(old.keys() | new.keys()):
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
      continue
    if old.get(key, _ABSENT) != new.get(key, _ABSENT):
      conflicts[key] = (old.get(key, _ABSENT), new.get(key, _ABSENT))
  return conflicts
