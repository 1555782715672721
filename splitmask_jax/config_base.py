"""The config schemas of the three tasks, their paper defaults, and their checks.

`config.task` selects what a run does: 'pretrain' (SplitMask or BEiT), 'finetune'
(supervised fine-tuning of a pre-trained or random-init encoder) or 'probe'
(linear probes on every block of a frozen encoder). Every config in `configs/`
starts from `base_config()` (pre-training) or `downstream_config()` (the other
two) and overrides what its dataset needs, so every key a run reads exists there
with a documented default. Pre-training defaults are the paper's ImageNet
ViT-B/16 recipe (BEiT's hyper-parameters), fine-tuning defaults its Table 9
(design.md section 2).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from splitmask_jax import objectives
from splitmask_jax.data import photometric
from splitmask_jax.models import vit
from splitmask_jax.runtime import sharding

TASKS = ("pretrain", "finetune", "probe")
OBJECTIVES = tuple(objectives.OBJECTIVES)
TOKENIZERS = ("random_projection", "random_patches", "kmeans")
MASKINGS = ("block", "uniform")
DTYPES = ("float32", "bfloat16", "float16")
INIT_CHECKPOINTS = ("latest", "best")


def base_config() -> ml_collections.ConfigDict:
  """Returns the default config: SplitMask, ViT-B/16 at 224 px, 300 epochs."""
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  # 'splitmask' (split, inpaint, match) or 'beit' ([MASK] tokens, one encoder pass);
  # the pixel baselines 'mae' (visible patches only, a light decoder) and 'simmim'.
  c.objective = "splitmask"

  c.model = _model_group()
  c.model.decoder_depth = 2  # decoder width = encoder width (the paper)
  # SplitMask: what maps each branch's pooled decoder output to the embedding the
  # InfoNCE match compares. 'none' (the paper's Eq. 2, read literally: the pooled
  # outputs themselves); 'mlp': SimCLR's / MoCo v3's projector, Dense(hidden) -
  # LayerNorm - ReLU - Dense(dim) (LayerNorm, not their BatchNorm: no running
  # statistics, nothing shared across images or micro-batches; see
  # pretrain.SplitMaskModel). Its parameters stay out of params['encoder'].
  c.model.projector = "none"
  c.model.projector_hidden_dim = 2048  # SimCLR's hidden width (MoCo v3's ViT: 4096)
  c.model.projector_dim = 256  # MoCo v3's output width

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
  # SplitMask: the share each branch does not observe (it observes 1 - ratio; 0.5: a
  # mask and its complement). BEiT, SimMIM: the share replaced by [MASK]. MAE: the
  # share the encoder does not see. None: the objective's own (its module's
  # DEFAULT_MASK_RATIO: SplitMask 0.5, BEiT 75/196, MAE 0.75, SimMIM 0.6).
  c.masking.ratio = placeholder(float)
  c.masking.min_block = placeholder(int)  # None: 16/196 of the patches (BEiT's 16 on 14x14)
  c.masking.max_block = placeholder(int)  # None: 75/196 of the patches

  c.loss = ml_collections.ConfigDict()
  c.loss.inpaint = True  # cross-entropy on every missing patch of both branches
  c.loss.match = True  # symmetric InfoNCE between the branches' pooled outputs
  c.loss.match_weight = 1.0
  c.loss.temperature = 0.2
  # What each branch inpaints when the ratio is above 0.5 (the small-data recipe's
  # 75% uniform masking: each branch sees 25%, so half of the patches neither sees).
  # The paper has a branch inpaint "the patches of the subset B", the other branch's,
  # and its loss "computed over all the patches of the image": both hold only at
  # 0.5, where the two choices coincide. 'missing': every patch the branch does not
  # see, so every patch is a target (design.md's reading); 'other_visible': only
  # the other branch's observed patches (at 75%, half of the patches are no target).
  c.loss.inpaint_targets = "missing"
  # The InfoNCE negatives of an anchor. 'other_branch': the other branch's
  # embeddings of the other images, B - 1 (Eq. 2's denominator: the positive and
  # "the representations of the other images in the batch", as MoCo v3 computes
  # it); 'both_branches': SimCLR's NT-Xent, both branches' embeddings of the other
  # images, 2B - 2 (the paper symmetrises the loss "following" SimCLR, whose loss
  # this is). See losses.symmetric_info_nce.
  c.loss.negatives = "other_branch"
  # MoCo v3 multiplies its InfoNCE by 2 * temperature, so that the gradient's scale
  # does not grow as 1 / temperature; the paper, which takes tau = 0.2 from MoCo v3,
  # does not say. False: the plain InfoNCE.
  c.loss.scale_by_temperature = False

  # MAE (objective 'mae'): the decoder over the encoder's tokens and mask tokens
  # (MAE's ViT-L decoder: 8 blocks of width 512, 16 heads, MLP 4 x width), and the
  # target: each masked patch normalised by its own mean and variance (True, as MAE)
  # or its raw pixels in [-1, 1].
  c.mae = ml_collections.ConfigDict()
  c.mae.decoder_width = 512
  c.mae.decoder_depth = 8
  c.mae.decoder_num_heads = 16
  c.mae.norm_pix_loss = True

  # SimMIM (objective 'simmim'): the side in pixels of its mask squares, a multiple of
  # the ViT patch that divides the image (SimMIM: 32 px on 16 px patches); a share
  # config.masking.ratio of them (rounded up) is masked, drawn uniformly, which needs
  # masking.kind='uniform'.
  c.simmim = ml_collections.ConfigDict()
  c.simmim.mask_patch_size = 32

  # DINO (objective 'dino', objectives/dino.py), its defaults at 224 px (DINO's
  # main_dino.py). Its optimizer is config.optim's: DINO's is AdamW at lr 5e-4 x
  # batch / 256 (base_lr=5e-4, base_batch_size=256), warmup_epochs=10, min_lr=1e-6,
  # weight_decay=0.04 with weight_decay_end=0.4, grad_clip=3.0. config.augment and
  # data.crop_scale do not apply: each view has DINO's own crop and augmentation.
  c.dino = ml_collections.ConfigDict()
  # The head: 3-layer MLP (GELU) to the bottleneck, L2 normalisation, a
  # weight-normalised layer to out_dim = K outputs; norm_last_layer fixes its
  # weight norm's scale at 1 (DINO's default, more stable), else it is learned.
  c.dino.out_dim = 65536
  c.dino.hidden_dim = 2048
  c.dino.bottleneck_dim = 256
  c.dino.norm_last_layer = True
  # Multi-crop: 2 global crops of model.image_size px and num_local_crops local
  # crops of local_crop_size px (a multiple of the patch size), each a random
  # resized crop of that share of the image area.
  c.dino.global_crop_scale = (0.4, 1.0)
  c.dino.num_local_crops = 8
  c.dino.local_crop_size = 96
  c.dino.local_crop_scale = (0.05, 0.4)
  # Temperatures: the student's, and the teacher's, linear from warmup_teacher_temp
  # to teacher_temp over the first warmup_teacher_temp_epochs, then constant.
  c.dino.student_temp = 0.1
  c.dino.warmup_teacher_temp = 0.04
  c.dino.teacher_temp = 0.07
  c.dino.warmup_teacher_temp_epochs = 30.0
  # The two epoch lengths (this one and freeze_last_layer_epochs) as shares of the
  # run's updates instead, when set: as optim.warmup_fraction, they keep their share
  # of the run when a constant-updates schedule adapts its epochs to a data share.
  c.dino.warmup_teacher_temp_fraction = ml_collections.FieldReference(None, field_type=float)
  # The teacher's EMA momentum, a cosine from momentum_teacher to 1 over the run,
  # and the momentum of the centre of its outputs.
  c.dino.momentum_teacher = 0.996
  c.dino.centre_momentum = 0.9
  # The head's last layer is held still (no gradient, no update) this long.
  c.dino.freeze_last_layer_epochs = 1.0
  c.dino.freeze_last_layer_fraction = ml_collections.FieldReference(None, field_type=float)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "imagenet2012"
  c.data.data_dir = placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  c.data.manual_dir = placeholder(str)  # a folder holding the raw files, for builders that read one
  c.data.train_split = "train"
  c.data.val_split = "validation"  # held-out MIM loss
  # Pre-training on a share of the split: ImageNet 1%, 10%, ... (Table 1, Figure 2).
  _add_share_keys(c.data)
  c.data.crop_scale = (0.08, 1.0)
  c.data.num_workers = 8  # grain worker processes per host (0: in-process)
  c.data.prefetch = 2
  # A split whose images decode to one shape and at most this many MiB is decoded
  # into memory once per process (data/in_memory.py); 0: read from disk every time.
  c.data.in_memory_mib = 256

  # Photometric augmentation after the crop and flip (data/photometric.py): off in the
  # paper's default recipe, on for its smallest datasets (the small-data recipe).
  c.augment = ml_collections.ConfigDict()
  c.augment.color_jitter = 0.4  # brightness / contrast / saturation strength
  c.augment.color_jitter_prob = 0.0
  c.augment.grayscale_prob = 0.0
  c.augment.blur_prob = 0.0
  c.augment.solarize_prob = 0.0

  c.optim = _optim_group(
    base_lr=1.5e-3, base_batch_size=2048, min_lr=1e-5, warmup_epochs=10.0, grad_clip=3.0
  )
  # Set: the weight decay follows a cosine from weight_decay at the first update to
  # this at the last (DINO: 0.04 -> 0.4); None: weight_decay throughout.
  c.optim.weight_decay_end = ml_collections.FieldReference(None, field_type=float)

  c.batch_size = 2048  # global, over all processes and devices
  _add_length_keys(c, num_epochs=300.0)
  _add_loop_keys(c)
  c.eval_every = 5000  # held-out MIM loss
  c.eval_batches = 10
  # Keep, beside the latest checkpoints, the one of the lowest held-out MIM loss
  # (`val_loss`) in <workdir>/best_checkpoint: the loss tracks fine-tuning quality
  # and rises when a long schedule overfits a small dataset (seed 002).
  c.keep_best_checkpoint = True
  # Validation images shown in TensorBoard at every evaluation: what each branch
  # sees, what it predicts and the target tokens (visualize.py); 0: off.
  c.summary_images = 8

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


def _model_group() -> ml_collections.ConfigDict:
  """The encoder keys shared by every task. A downstream run keeps its init run's
  variant and channels; its image size may differ (finetune.adapt_to_image_size)."""
  m = ml_collections.ConfigDict()
  m.variant = "B/16"  # a key of vit.VARIANTS, '/', the patch size
  # A multiple of the patch size. A downstream run may use another size than its
  # pre-training run (BEiT's 224 -> 384 px): the position embeddings are resampled.
  m.image_size = 224
  m.num_channels = 3
  m.drop_path = 0.1
  m.dtype = "bfloat16"  # compute dtype; parameters stay float32
  # What each block keeps for its backward pass (vit.remat_policy): 'none' (all
  # activations), 'full' (the block's input; the rest is recomputed), 'save_dots'
  # (the dense layers' outputs). Memory for compute; the same function.
  m.remat = "none"
  # The encoder's blocks under nn.scan: one compiled block body (ViT-B and larger
  # compile several times faster), parameters stacked under `blocks`. The same
  # function as unrolled blocks; checkpoints convert between the layouts.
  m.scan = True
  # The attention kernel (vit.resolve_attention): 'auto' takes cuDNN's fused kernel
  # on NVIDIA GPUs in bfloat16 / float16 and XLA's elsewhere; 'xla' or 'cudnn'.
  m.attention = "auto"
  return m


def _optim_group(
  *,
  base_lr: float,
  base_batch_size: int,
  min_lr: float,
  warmup_epochs: float,
  grad_clip: float | None,
) -> ml_collections.ConfigDict:
  """AdamW with linear warmup and cosine decay (optim.py)."""
  o = ml_collections.ConfigDict()
  o.base_lr = base_lr  # at base_batch_size, scaled linearly with the batch
  o.base_batch_size = base_batch_size
  o.min_lr = min_lr
  o.warmup_epochs = warmup_epochs
  # Warmup as a share of the run's steps; overrides warmup_epochs when set, so the
  # warmup keeps its share when a constant-updates schedule adapts its epochs.
  o.warmup_fraction = ml_collections.FieldReference(None, field_type=float)
  o.weight_decay = 0.05
  o.b1 = 0.9
  o.b2 = 0.999
  o.grad_clip = ml_collections.FieldReference(grad_clip, field_type=float)  # None: off
  return o


def _add_share_keys(data: ml_collections.ConfigDict) -> None:
  """`train_fraction` and `subset_seed`: a class-balanced, seeded share of the training
  split (datasets.training_share), the same subset for every `seed` of an experiment."""
  data.train_fraction = 1.0  # in (0, 1]
  data.subset_seed = 0


def _add_length_keys(c: ml_collections.ConfigDict, *, num_epochs: float) -> None:
  """How long a run is: in steps, in examples or in epochs (loop.num_steps).

  The first of num_steps, num_examples that is set wins, else num_epochs. A
  length in examples keeps the number of updates constant whatever the size of
  the training data (the paper's protocol: 300 ImageNet epochs of updates on any
  dataset or share), so its epochs adapt; `max_epochs` caps them, as the paper
  caps small datasets at 5,000 epochs. Epochs count passes over the data trained
  on (the share, when `data.train_fraction` < 1).
  """
  c.num_epochs = num_epochs
  c.num_steps = placeholder(int)
  c.num_examples = placeholder(int)
  c.max_epochs = ml_collections.FieldReference(None, field_type=float)  # None: no cap


def _add_loop_keys(c: ml_collections.ConfigDict) -> None:
  """Gradient accumulation, device layout, logging, checkpointing and divergence keys
  of a training loop."""
  # Gradient accumulation: each update averages the gradients of accum_steps
  # micro-batches of batch_size / accum_steps examples, run one after the other
  # in the one step (memory of a micro-batch, the update of batch_size). batch_size
  # stays the examples per update (learning-rate scaling, epochs); batch_size /
  # accum_steps must divide over the mesh's devices. Exact for the losses that are
  # means over examples (BEiT, SplitMask's inpainting, fine-tuning's cross-entropy),
  # given each micro-batch's own dropout keys; not for what compares the examples
  # of a batch: SplitMask's InfoNCE match has batch_size / accum_steps - 1 negatives
  # per image (not batch_size - 1), and fine-tuning's mixup / cutmix pairs images
  # and draws lam within each micro-batch. Probing trains no encoder and ignores it.
  c.accum_steps = 1
  c.mesh = ml_collections.ConfigDict()
  # Batches are split over data x fsdp devices; parameters and optimizer state
  # are sharded over fsdp (see runtime/sharding.py). -1 on one axis: the rest.
  c.mesh.data = -1  # devices on the data axis
  c.mesh.fsdp = 1  # devices on the fsdp axis

  c.log_every = 100
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


def downstream_config() -> ml_collections.ConfigDict:
  """The default fine-tuning (and probing) config: Table 9's recipe, ViT-B/16 at 224 px.

  The learning rate and layer decay are the small-dataset column (Cars,
  DomainNet); the large sets (iNaturalist, Food) use 1.4e-4, no layer decay and
  repeated augmentation.
  """
  c = ml_collections.ConfigDict()
  c.task = "finetune"  # or 'probe'
  c.seed = 0

  # The pre-training run whose encoder starts the model; None: random init
  # (the baseline, through the same code path).
  c.init = ml_collections.ConfigDict()
  c.init.workdir = placeholder(str)
  # 'latest': its latest checkpoint (or `step`); 'best': the one of its lowest
  # held-out MIM loss (pre-training's keep_best_checkpoint).
  c.init.checkpoint = "latest"
  c.init.step = placeholder(int)  # with 'latest'; None: the latest

  c.model = _model_group()
  # BEiT's head initialisation: truncated normal (0.02) scaled by this.
  c.model.head_init_scale = 0.001
  # What the head reads (models/classifier.py). True, as BEiT's fine-tuning: the mean
  # of the last block's tokens, then a LayerNorm of its own (`fc_norm`, new at
  # fine-tuning; the encoder's final LayerNorm goes unused). False: the mean of the
  # encoder's normalised tokens, the features k-NN reads. Probing reads every
  # block's raw output and ignores it.
  c.model.fc_norm = True

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "imagenet2012"
  c.data.data_dir = placeholder(str)
  c.data.manual_dir = placeholder(str)
  c.data.train_split = "train"
  c.data.test_split = "validation"  # top-1 at intervals and at the end
  # Fine-tuning on a share of the labelled examples (few-label settings).
  _add_share_keys(c.data)
  c.data.crop_scale = (0.08, 1.0)
  # Test images: resize to image_size / ratio, then the central image_size crop.
  c.data.test_crop_ratio = 0.875
  c.data.num_workers = 8
  c.data.prefetch = 2
  c.data.in_memory_mib = 256  # as in pre-training

  c.augment = ml_collections.ConfigDict()
  # RandAugment 'rand-m9-mstd0.5-inc1': ops per image, magnitude (0..10), its std.
  c.augment.randaugment_ops = 2
  c.augment.randaugment_magnitude = 9.0
  c.augment.randaugment_magnitude_std = 0.5
  # Applied only when RandAugment is off (randaugment_ops = 0), as in timm's
  # transforms that the paper's (BEiT's) fine-tuning code uses.
  c.augment.color_jitter = 0.4
  # Each image appears this many times per epoch, differently augmented, on
  # different devices (DeiT's repeated augmentation); 1: off.
  c.augment.repeats = 1
  c.augment.mixup = 0.8  # Beta(a, a) of mixup; 0: off
  c.augment.cutmix = 1.0  # Beta(a, a) of cutmix; 0: off
  c.augment.mix_switch_prob = 0.5  # chance of cutmix when both are on
  c.augment.label_smoothing = 0.1

  # No gradient clipping, as BEiT's fine-tuning.
  c.optim = _optim_group(
    base_lr=4e-3, base_batch_size=1024, min_lr=1e-6, warmup_epochs=5.0, grad_clip=None
  )
  c.optim.layer_decay = 0.65  # per-block learning-rate decay (1: none), see optim.py

  c.batch_size = 1024
  _add_length_keys(c, num_epochs=300.0)
  _add_loop_keys(c)
  c.eval_every = 5000  # top-1 on the test split
  c.eval_batch_size = 1024

  # Linear probes on every block (task 'probe'): features of the whole train and
  # test splits (or their first num_train / num_test images), then one softmax
  # classifier per block, for the init encoder and, beside it, a random-init one.
  c.probe = ml_collections.ConfigDict()
  c.probe.num_train = ml_collections.FieldReference(None, field_type=int)  # None: all
  c.probe.num_test = ml_collections.FieldReference(None, field_type=int)
  c.probe.epochs = 30
  c.probe.batch_size = 1024
  c.probe.learning_rate = 1e-2
  c.probe.weight_decay = 1e-4
  c.probe.random_init_baseline = True
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


def schema_of(config) -> ml_collections.ConfigDict:
  """The default config of `config.task`, which fixes the keys the config must hold."""
  task = config.get("task")
  if task not in TASKS:
    _fail("task", task, f"allowed values are {TASKS}")
  return base_config() if task == "pretrain" else downstream_config()


def _check_schema(config) -> None:
  """Raises for a key that the task's schema lacks (a typo in a config file), naming
  the keys allowed at its level, and for a key of the schema the config lacks."""
  root = "base_config()" if config.get("task") == "pretrain" else "downstream_config()"
  schema, keys = set(_flatten(schema_of(config).to_dict())), set(_flatten(config.to_dict()))
  groups = {k.rsplit(".", 1)[0] for k in schema if "." in k}
  for key in sorted(keys - schema):
    parts = key.split(".")
    # The first component that is neither a key nor a group of the schema.
    depth = next(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in schema | groups)
    parent = ".".join(parts[: depth - 1])
    siblings = sorted(
      {
        k[len(parent) + 1 :].split(".")[0] if parent else k.split(".")[0]
        for k in schema
        if not parent or k.startswith(parent + ".")
      }
    )
    where = f"in config.{parent}" if parent else "at the top level"
    raise ValueError(
      f"config.{'.'.join(parts[:depth])} is not a key of the config "
      f"schema (config_base.{root}): allowed keys {where} are "
      f"{siblings}."
    )
  missing = sorted(schema - keys)
  if missing:
    raise ValueError(
      f"config lacks the keys {missing}: start config files from config_base.{root}."
    )


def validate_config(config) -> None:
  """Raises ValueError naming the key for any value a run cannot use.

  Runs before anything is compiled or read, so a typo costs seconds.
  """
  _check_schema(config)
  _check_model(config.model)
  _check_loop(config)
  if config.task == "pretrain":
    _check_pretrain(config)
  else:
    _check_downstream(config)


def _check_model(model) -> None:
  try:
    _, patch = vit.parse_variant(model.variant)
  except ValueError as e:
    raise ValueError(f"config.model.variant: {e}") from None
  if model.image_size <= 0 or model.image_size % patch:
    below = model.image_size // patch * patch
    nearest = " or ".join(str(s) for s in (below, below + patch) if s > 0) or str(patch)
    _fail(
      "model.image_size",
      model.image_size,
      f"it must be a positive multiple of the patch size {patch} of "
      f"model.variant={model.variant!r} (e.g. {nearest}), so that the image is a whole "
      "grid of patches",
    )
  if model.dtype not in DTYPES:
    _fail("model.dtype", model.dtype, f"allowed values are {DTYPES}")
  if model.num_channels not in (1, 3):
    _fail("model.num_channels", model.num_channels, "allowed values are 1 and 3")
  if not 0 <= model.drop_path < 1:
    _fail("model.drop_path", model.drop_path, "it must lie in [0, 1)")
  if model.remat not in vit.REMAT_POLICIES:
    _fail("model.remat", model.remat, f"allowed values are {vit.REMAT_POLICIES}")
  if model.attention not in vit.ATTENTION_CHOICES:
    _fail("model.attention", model.attention, f"allowed values are {vit.ATTENTION_CHOICES}")


def _check_loop(config) -> None:
  """The keys every training loop reads: batch, length, optimizer, mesh, intervals."""
  if config.batch_size <= 0:
    _fail("batch_size", config.batch_size, "it must be positive")
  if config.accum_steps < 1 or config.batch_size % config.accum_steps:
    _fail(
      "accum_steps",
      config.accum_steps,
      f"it must be >= 1 and divide config.batch_size={config.batch_size} "
      "(the examples of one update, split into accum_steps micro-batches)",
    )
  if config.num_steps is not None and config.num_examples is not None:
    _fail(
      "num_examples",
      config.num_examples,
      f"num_steps={config.num_steps} is also set: state the length one way (the other None)",
    )
  if config.num_steps is None and config.num_examples is None and not config.num_epochs > 0:
    _fail("num_epochs", config.num_epochs, "it must be positive (or set num_steps or num_examples)")
  for key in ("num_steps", "num_examples", "max_epochs"):
    if config[key] is not None and config[key] <= 0:
      _fail(key, config[key], "it must be positive (or None)")
  if config.optim.grad_clip is not None and config.optim.grad_clip <= 0:
    _fail("optim.grad_clip", config.optim.grad_clip, "it must be positive (or None: off)")
  warmup = config.optim.warmup_fraction
  if warmup is not None and not 0 <= warmup < 1:
    _fail("optim.warmup_fraction", warmup, "it must lie in [0, 1) (or None: warmup_epochs)")
  if not config.data.dataset:
    _fail(
      "data.dataset",
      config.data.dataset,
      "set it to a TFDS name or to a folder of images (a path starting with /, ./, ../ or ~)",
    )
  lo, hi = config.data.crop_scale
  if not 0 < lo <= hi <= 1:
    _fail("data.crop_scale", config.data.crop_scale, "it needs 0 < min <= max <= 1")
  if not 0 < config.data.train_fraction <= 1:
    _fail("data.train_fraction", config.data.train_fraction, "it must lie in (0, 1]")
  if config.data.in_memory_mib < 0:
    _fail("data.in_memory_mib", config.data.in_memory_mib, "it must be >= 0 (0: never)")
  sharding.check_mesh_config(config.mesh)
  if config.profile.start_step < 1:
    _fail(
      "profile.start_step", config.profile.start_step, "it must be >= 1 (the first step compiles)"
    )
  if config.profile.num_steps < 0:
    _fail("profile.num_steps", config.profile.num_steps, "it must be >= 0 (0: off)")
  for key in (
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_consecutive_skips",
  ):
    if config[key] <= 0:
      _fail(key, config[key], "it must be positive")


def _check_pretrain(config) -> None:
  if config.objective not in OBJECTIVES:
    _fail("objective", config.objective, f"allowed values are {OBJECTIVES}")
  if config.tokenizer.kind not in TOKENIZERS:
    _fail("tokenizer.kind", config.tokenizer.kind, f"allowed values are {TOKENIZERS}")
  if config.tokenizer.vocab_size < 2:
    _fail("tokenizer.vocab_size", config.tokenizer.vocab_size, "it must be at least 2")
  if config.tokenizer.patch_size <= 0:
    _fail("tokenizer.patch_size", config.tokenizer.patch_size, "it must be positive")
  if config.masking.kind not in MASKINGS:
    _fail("masking.kind", config.masking.kind, f"allowed values are {MASKINGS}")
  _check_mask_ratio(config)
  if config.objective == "splitmask" and not (config.loss.inpaint or config.loss.match):
    _fail("loss", "inpaint=False, match=False", "enable inpaint, match or both")
  if config.loss.temperature <= 0:
    _fail("loss.temperature", config.loss.temperature, "it must be positive")
  _check_splitmask_choices(config)
  if config.summary_images < 0:
    _fail("summary_images", config.summary_images, "it must be >= 0 (0: off)")
  photometric.make_augment_fn(config.augment)  # raises naming a bad config.augment key
  _check_pixel_objectives(config)
  end = config.optim.weight_decay_end
  if end is not None and not end >= 0:
    _fail("optim.weight_decay_end", end, "it must be >= 0 (or None: a constant weight decay)")
  if config.objective == "dino":
    _check_dino(config)


def _check_mask_ratio(config) -> None:
  """The resolved mask ratio (`objectives.mask_ratio`: the key, or the objective's own
  default when it is None), for an objective that masks; one whose DEFAULT_MASK_RATIO
  is None (DINO) ignores the key."""
  if objectives.get(config.objective).DEFAULT_MASK_RATIO is None:
    return
  ratio = objectives.mask_ratio(config)
  if config.objective == "splitmask" and not 0.5 <= ratio < 1:
    _fail(
      "masking.ratio",
      ratio,
      "SplitMask needs 0.5 <= ratio < 1 (two disjoint subsets of 1 - ratio each)",
    )
  if not 0 < ratio < 1:
    _fail("masking.ratio", ratio, "it must lie in (0, 1)")


def _check_dino(config) -> None:
  """The `dino` group, for the objective that reads it."""
  d = config.dino
  for key in ("out_dim", "hidden_dim", "bottleneck_dim"):
    if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 1:
      _fail(f"dino.{key}", d[key], "it must be a positive integer")
  if isinstance(d.num_local_crops, bool) or d.num_local_crops < 0:
    _fail("dino.num_local_crops", d.num_local_crops, "it must be >= 0")
  _, patch = vit.parse_variant(config.model.variant)
  if d.num_local_crops and (d.local_crop_size <= 0 or d.local_crop_size % patch):
    _fail(
      "dino.local_crop_size",
      d.local_crop_size,
      f"it must be a positive multiple of the patch size {patch} of "
      f"model.variant={config.model.variant!r}",
    )
  for key in ("global_crop_scale", "local_crop_scale"):
    lo, hi = d[key]
    if not 0 < lo <= hi <= 1:
      _fail(f"dino.{key}", d[key], "it needs 0 < min <= max <= 1")
  for key in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
    if not d[key] > 0:
      _fail(f"dino.{key}", d[key], "it must be positive")
  for key in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
    if not d[key] >= 0:
      _fail(f"dino.{key}", d[key], "it must be >= 0 (0: none)")
  for key in ("warmup_teacher_temp_fraction", "freeze_last_layer_fraction"):
    if d[key] is not None and not 0 <= d[key] <= 1:
      _fail(f"dino.{key}", d[key], "it must lie in [0, 1] (or None: the epochs key)")
  if not 0 <= d.momentum_teacher <= 1:
    _fail("dino.momentum_teacher", d.momentum_teacher, "it must lie in [0, 1]")
  if not 0 <= d.centre_momentum < 1:
    _fail("dino.centre_momentum", d.centre_momentum, "it must lie in [0, 1)")
  for key in photometric.CONFIG_KEYS:
    if key.endswith("_prob") and config.augment[key]:
      _fail(
        f"augment.{key}",
        config.augment[key],
        "DINO's views have their own augmentations (objectives/dino.py, VIEW_AUGMENTS), "
        "which objective='dino' uses instead: leave it at 0",
      )


def _check_pixel_objectives(config) -> None:
  """The `mae` or `simmim` group, for the objective that reads it."""
  if config.objective == "mae":
    mae = config.mae
    for key in ("decoder_width", "decoder_depth", "decoder_num_heads"):
      if mae[key] < 1:
        _fail(f"mae.{key}", mae[key], "it must be positive")
    if mae.decoder_width % mae.decoder_num_heads:
      _fail(
        "mae.decoder_width",
        mae.decoder_width,
        f"it must be a multiple of mae.decoder_num_heads={mae.decoder_num_heads}",
      )
  elif config.objective == "simmim":
    # Raises naming simmim.mask_patch_size, masking.kind or masking.ratio.
    objectives.simmim.mask_squares(config)


# SplitMask's open choices: the key and its default (the paper's reading).
_SPLITMASK_CHOICES = {
  "loss.inpaint_targets": "missing",
  "loss.negatives": "other_branch",
  "loss.scale_by_temperature": False,
  "model.projector": "none",
}


def _check_splitmask_choices(config) -> None:
  """The keys of SplitMask's open choices: allowed values, and left at their defaults
  by the other objectives, which would ignore them."""
  loss, model = config.loss, config.model
  for key, value, allowed in (
    ("loss.inpaint_targets", loss.inpaint_targets, objectives.splitmask.INPAINT_TARGETS),
    ("loss.negatives", loss.negatives, objectives.splitmask.NEGATIVES),
    ("model.projector", model.projector, objectives.splitmask.PROJECTORS),
  ):
    if value not in allowed:
      _fail(key, value, f"allowed values are {allowed}")
  if not isinstance(loss.scale_by_temperature, bool):
    _fail("loss.scale_by_temperature", loss.scale_by_temperature, "it must be True or False")
  for key in ("projector_hidden_dim", "projector_dim"):
    if isinstance(model[key], bool) or not isinstance(model[key], int) or model[key] <= 0:
      _fail(f"model.{key}", model[key], "it must be a positive integer")
  if config.objective != "splitmask":
    for key, default in _SPLITMASK_CHOICES.items():
      group, name = key.split(".")
      if config[group][name] != default:
        _fail(
          key,
          config[group][name],
          f"it is a choice of SplitMask's, which objective={config.objective!r} would "
          f"ignore: leave it at {default!r}",
        )
  elif model.projector != "none" and not loss.match:
    _fail(
      "model.projector",
      model.projector,
      "the projector feeds the match loss only, which config.loss.match=False turns "
      "off: set it to 'none' or turn the match on",
    )


def _check_downstream(config) -> None:
  data, aug = config.data, config.augment
  if config.init.checkpoint not in INIT_CHECKPOINTS:
    _fail("init.checkpoint", config.init.checkpoint, f"allowed values are {INIT_CHECKPOINTS}")
  if config.init.checkpoint == "best" and config.init.step is not None:
    _fail("init.step", config.init.step, "init.checkpoint='best' picks the step: leave it None")
  if not 0 < data.test_crop_ratio <= 1:
    _fail("data.test_crop_ratio", data.test_crop_ratio, "it must lie in (0, 1]")
  if aug.randaugment_ops < 0:
    _fail("augment.randaugment_ops", aug.randaugment_ops, "it must be >= 0 (0: off)")
  if not 0 <= aug.randaugment_magnitude <= 10:
    _fail("augment.randaugment_magnitude", aug.randaugment_magnitude, "it must lie in [0, 10]")
  if aug.randaugment_magnitude_std < 0:
    _fail("augment.randaugment_magnitude_std", aug.randaugment_magnitude_std, "it must be >= 0")
  if aug.color_jitter < 0:
    _fail("augment.color_jitter", aug.color_jitter, "it must be >= 0 (0: off)")
  if aug.repeats < 1:
    _fail("augment.repeats", aug.repeats, "it must be >= 1 (1: off)")
  for key in ("mixup", "cutmix"):
    if aug[key] < 0:
      _fail(f"augment.{key}", aug[key], "it must be >= 0 (0: off)")
  if not 0 <= aug.mix_switch_prob <= 1:
    _fail("augment.mix_switch_prob", aug.mix_switch_prob, "it must lie in [0, 1]")
  if not 0 <= aug.label_smoothing < 1:
    _fail("augment.label_smoothing", aug.label_smoothing, "it must lie in [0, 1)")
  if not 0 < config.optim.layer_decay <= 1:
    _fail("optim.layer_decay", config.optim.layer_decay, "it must lie in (0, 1] (1: none)")
  if config.eval_batch_size <= 0:
    _fail("eval_batch_size", config.eval_batch_size, "it must be positive")
  probe = config.probe
  for key in ("epochs", "batch_size"):
    if probe[key] <= 0:
      _fail(f"probe.{key}", probe[key], "it must be positive")
  for key in ("num_train", "num_test"):
    if probe[key] is not None and probe[key] <= 0:
      _fail(f"probe.{key}", probe[key], "it must be positive (or None: all)")


# Keys that may differ between a run and its resumption: they say where the data
# is, how it is read, how often the run logs, evaluates and saves, how the work
# is laid out on devices, what happens to non-finite updates and how the end
# evaluation runs, but not what the run computes. A trailing '.' covers a group.
RESUMABLE_KEYS = (
  "data.data_dir",
  "data.manual_dir",
  "data.num_workers",
  "data.prefetch",
  "data.in_memory_mib",
  "log_every",
  "eval_every",
  "eval_batches",
  "eval_batch_size",
  "summary_images",
  "checkpoint_every",
  "keep_checkpoints",
  "keep_best_checkpoint",
  "skip_nonfinite_updates",
  "max_consecutive_skips",
  "mesh.",
  "profile.",
  "knn.",
  "probe.",
  # How the same function is computed: memory for compute, and which kernel.
  "model.remat",
  "model.attention",
)
# Keys added after runs were written, each with the value that computes what such
# a run computed (for model.scan: the parameter layout its checkpoints hold; for
# model.fc_norm: a head on the normalised tokens, no `fc_norm` parameters).
# Contract: a change that adds a config key whose default changes what a run
# computes, or how its checkpoints are laid out, adds the key here with its
# old-behaviour value. A saved config that lacks the key then resumes at that
# value (legacy_values), and compares at it (resume_conflicts); a new key whose
# default computes what the old runs computed (model.attention's 'auto') needs no
# entry: a saved config that lacks it compares at the schema's default.
ADDED_KEYS = {"model.scan": False, "model.fc_norm": False}
_ABSENT = "<absent>"


def _resolved_mask_ratio(ratio, flat: dict[str, Any]) -> Any:
  # None: the objective's own ratio (objectives.mask_ratio), from the same config.
  module = objectives.OBJECTIVES.get(flat.get("objective"))
  return module.DEFAULT_MASK_RATIO if ratio is None and module is not None else ratio


# Keys whose value None stands for a value that other keys of the config decide,
# each with `(value, flat config) -> the value a run uses`. A saved config and a new
# one compare at the values they resolve to: a run written when masking.ratio held
# its objective's ratio explicitly (0.5 for SplitMask) resumes with None.
RESOLVED_KEYS = {"masking.ratio": _resolved_mask_ratio}


def _json_flat(config) -> dict[str, Any]:
  # Through JSON, so that every side compares alike (tuples as lists, None as null).
  return _flatten(json.loads(config.to_json_best_effort()))


def _old_value(key: str, defaults: dict[str, Any]) -> Any:
  """What a run written before `key` existed computed with: its legacy value, or
  the schema's default; _ABSENT for a key neither knows."""
  if key in ADDED_KEYS:
    return json.loads(json.dumps(ADDED_KEYS[key]))
  return defaults.get(key, _ABSENT)


def legacy_values(saved: dict, config) -> dict[str, Any]:
  """The ADDED_KEYS that a resumption of the run saved as `saved` sets to their old value.

  A run written before a key of ADDED_KEYS existed ran at its old value. A
  `config` that holds the key at the schema's default asked for nothing else, so
  the run goes on as it was written; a value other than the default is a choice
  of the user's, which `resume_conflicts` reports where it differs.

  Args:
    saved: the run's config as read back from its `config.json`.
    config: the config of the run that would resume it.

  Returns:
    {dotted key: old value}, sorted by key, for the keys whose value in `config`
    differs from the old one; empty for a run saved with every key.
  """
  old, new = _flatten(saved), _json_flat(config)
  defaults = _json_flat(schema_of(config))
  return {
    key: ADDED_KEYS[key]
    for key in sorted(ADDED_KEYS)
    if key not in old
    and key in new
    and new[key] == defaults.get(key, _ABSENT)
    and new[key] != _old_value(key, defaults)
  }


def resume_conflicts(saved: dict, config) -> dict[str, tuple[Any, Any]]:
  """Keys on which `config` and a run's saved config disagree, beyond RESUMABLE_KEYS.

  Args:
    saved: the run's config as read back from its `config.json`.
    config: the config of the run that would resume it.

  Returns:
    {dotted key: (saved value, new value)}, sorted by key; '<absent>' stands for
    a key that one side lacks. A key that the saved config lacks (one added since
    the run was written) is compared at its value in ADDED_KEYS, or else at the
    schema's default, so that a new key left at its default resumes; as a saved
    value it then reads '<absent: value>'. A key of RESOLVED_KEYS compares at
    the value it resolves to; a None that differs reads '<None: value>'. Empty
    when the run may resume with `config`.
  """
  old, new = _flatten(saved), _json_flat(config)
  defaults = _json_flat(schema_of(config))
  conflicts = {}
  for key in sorted(old.keys() | new.keys()):
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
      continue
    before = old[key] if key in old else _old_value(key, defaults)
    after = new.get(key, _ABSENT)
    if key in RESOLVED_KEYS and _ABSENT not in (before, after):
      resolve = RESOLVED_KEYS[key]
      if resolve(before, old) == resolve(after, new):
        continue
      before, after = (
        f"<None: {resolve(v, flat)!r}>" if v is None and resolve(v, flat) is not None else v
        for v, flat in ((before, old), (after, new))
      )
    if before != after:
      shown = before if key in old or before == _ABSENT else f"<absent: {before!r}>"
      conflicts[key] = (shown, after)
  return conflicts
