r"""Exports a run's encoder (or fine-tuned classifier) for PyTorch as a timm ViT.

  python -m splitmask_jax.export --workdir=RUN --output=DIR [--step=N]

writes `DIR/model.safetensors` (float32, timm's `VisionTransformer` parameter
names) and `DIR/config.json` in the layout of timm's model-hub exports
(`architecture`, `model_args`, `pretrained_cfg`), plus `exported_from` (the
source workdir, step and task). On the PyTorch side, timm builds the model from
the folder alone:

  import timm
  model = timm.create_model('local-dir:DIR', pretrained=True).eval()
  data_config = timm.data.resolve_data_config(model=model)  # size, mean/std 0.5, crop
  features = model(images)  # images: float [B, C, H, W] = (pixels / 255 - 0.5) / 0.5

or by hand, from the same two files:

  import json, timm
  from safetensors.torch import load_file
  with open('DIR/config.json') as f:
    config = json.load(f)
  model = timm.create_model(config['architecture'], pretrained=False,
                            pretrained_cfg_overlay=config['pretrained_cfg'],
                            **config['model_args'])
  model.load_state_dict(load_file('DIR/model.safetensors'))

A pre-training run gives a bare encoder (`num_classes=0`): the model returns the
pooled features [B, D], the mean of the normalised tokens, as the k-NN
evaluation reads them. A fine-tuning run also exports its head: the model
returns the logits [B, K]. `timm.create_model('local-dir:DIR', pretrained=True,
num_classes=K2)` swaps in a fresh head for further fine-tuning.

The architecture: no class token, learned position embeddings on the patches
only, average pooling (`global_pool='avg'`), exact GELU, LayerNorm epsilon 1e-6
(timm's default), query and value biases only (the key's third of timm's fused
qkv bias is zero). The pooling follows the final LayerNorm (`fc_norm=False`),
except for a fine-tuning run with `model.fc_norm` (BEiT's reading, the default):
its LayerNorm follows the pooling (`fc_norm=True`: timm's `norm` is then an
identity, `fc_norm` holds the classifier's `fc_norm`, and the encoder's unused
final LayerNorm is left out).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app
from absl import flags
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from splitmask_jax import loop
from splitmask_jax import objectives
from splitmask_jax.models import vit
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import workdir as workdir_lib

# The entrypoint only selects timm's VisionTransformer: `timm_kwargs` sets every
# argument of the architecture, so the registered name's ViT-B/16 sizes never apply.
ARCHITECTURE = "vit_base_patch16_224"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The encoder reads images in [-1, 1]: (x - 0.5) / 0.5 of x = pixels / 255.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
# Both the training crop and the evaluation resize are bicubic (data/input_pipeline.py).
_INTERPOLATION = "bicubic"
_TASKS = ("pretrain", "finetune")


def timm_kwargs(
  variant: str, image_size: int, num_channels: int, num_classes: int, *, fc_norm: bool = False
) -> dict:
  """Keyword arguments of timm's VisionTransformer that rebuild vit.Encoder.

  They suit `timm.models.vision_transformer.VisionTransformer(**kwargs)` and
  `timm.create_model(ARCHITECTURE, pretrained=False, **kwargs)` alike.

  Args:
    variant: the encoder variant, e.g. 'Mini/8' (see vit.VARIANTS).
    image_size: side of the square input images in pixels.
    num_channels: C, channels of the input images.
    num_classes: K of a classifier head; 0 for a bare encoder (pooled features).
    fc_norm: the LayerNorm after the pooling instead of before it (a classifier
      of `model.fc_norm`).

  Returns:
    A dict of JSON-serialisable values.

  Raises:
    ValueError: an unknown variant, or a size, channel or class count out of range.
  """
  arch, patch = vit.parse_variant(variant)
  if image_size <= 0 or image_size % patch:
    raise ValueError(
      f"model.image_size must be a positive multiple of the patch size {patch} "
      f"of variant {variant!r}, got {image_size}"
    )
  if num_channels <= 0:
    raise ValueError(f"model.num_channels must be positive, got {num_channels}")
  if num_classes < 0:
    raise ValueError(f"num_classes must be 0 (a bare encoder) or positive, got {num_classes}")
  return dict(
    img_size=image_size,
    patch_size=patch,
    in_chans=num_channels,
    num_classes=num_classes,
    embed_dim=arch["width"],
    depth=arch["depth"],
    num_heads=arch["num_heads"],
    mlp_ratio=arch["mlp_dim"] / arch["width"],
    qkv_bias=True,
    class_token=False,
    global_pool="avg",
    fc_norm=bool(fc_norm),
  )


def timm_pretrained_cfg(
  image_size: int, num_channels: int, num_classes: int, crop_pct: float
) -> dict:
  """timm's data configuration of an exported model (`pretrained_cfg` in config.json).

  `timm.data.resolve_data_config(model=model)` reads it: input size [C, H, W],
  per-channel mean and std 0.5, bicubic resizing and the test crop ratio
  `crop_pct` (resize to size / crop_pct, keep the central square).
  """
  return dict(
    input_size=[num_channels, image_size, image_size],
    fixed_input_size=True,
    interpolation=_INTERPOLATION,
    crop_pct=crop_pct,
    crop_mode="center",
    mean=[IMAGE_MEAN] * num_channels,
    std=[IMAGE_STD] * num_channels,
    num_classes=num_classes,
    first_conv="patch_embed.proj",
    classifier="head",
  )


def to_timm_state_dict(
  encoder_params: dict,
  head_params: dict | None = None,
  *,
  num_channels: int,
  fc_norm_params: dict | None = None,
) -> dict[str, np.ndarray]:
  """Renames and lays out an Encoder's parameters as timm's VisionTransformer's.

  Args:
    encoder_params: the `params` of a vit.Encoder (e.g. variables['params']['encoder']):
      'embedding' (kernel [p*p*C, D]), 'pos_embedding' [1, N, D], 'block_<i>'
      (or scanned 'blocks') and 'norm'; BEiT's 'mask_token' is left out.
    head_params: a linear head's {'kernel': [D, K], 'bias': [K]}, or None.
    num_channels: C, channels of the input images (fixes p from p*p*C).
    fc_norm_params: the LayerNorm after the pooling ({'scale': [D], 'bias': [D]},
      a classifier's `fc_norm`), or None. Given, it becomes timm's `fc_norm` and
      the encoder's final 'norm', which such a classifier skips, is left out.

  Returns:
    timm's names -> contiguous float32 arrays, PyTorch layouts: Linear weights
    [out, in], the patch embedding as a Conv2d weight [D, C, p, p].

  Raises:
    ValueError: a parameter is missing, unknown, or of an inconsistent shape.
  """
  encoder_params = vit.unscan_blocks(encoder_params)
  flat = {
    name: np.asarray(value, np.float32)
    for name, value in traverse_util.flatten_dict(encoder_params, sep="/").items()
  }
  flat.pop("mask_token", None)  # BEiT's [MASK] embedding serves pre-training only

  def take(name):
    if name not in flat:
      raise ValueError(f"the encoder parameters hold no {name!r}; they hold {sorted(flat)}")
    return flat.pop(name)

  out = {}

  def dense(target, source):
    out[f"{target}.weight"] = take(f"{source}/kernel").T
    out[f"{target}.bias"] = take(f"{source}/bias")

  def layer_norm(target, source):
    out[f"{target}.weight"] = take(f"{source}/scale")
    out[f"{target}.bias"] = take(f"{source}/bias")

  kernel = take("embedding/kernel")
  patch_dim, width = kernel.shape
  patch = int(round(np.sqrt(patch_dim / num_channels)))
  if patch * patch * num_channels != patch_dim:
    raise ValueError(
      f"the embedding kernel's {patch_dim} inputs are not p*p*{num_channels} for "
      f"an integer patch size p: check num_channels"
    )
  # Rows are patch pixels in (row, col, channel) order (vit.patchify); a Conv2d
  # weight is [out, channel, row, col].
  out["patch_embed.proj.weight"] = kernel.reshape(patch, patch, num_channels, width).transpose(
    3, 2, 0, 1
  )
  out["patch_embed.proj.bias"] = take("embedding/bias")
  out["pos_embed"] = take("pos_embedding")

  depth = 0
  while f"block_{depth}/norm1/scale" in flat:
    src, dst = f"block_{depth}", f"blocks.{depth}"
    layer_norm(f"{dst}.norm1", f"{src}/norm1")
    out[f"{dst}.attn.qkv.weight"] = take(f"{src}/attn/qkv/kernel").T
    q_bias = take(f"{src}/attn/q_bias")
    out[f"{dst}.attn.qkv.bias"] = np.concatenate(
      [q_bias, np.zeros_like(q_bias), take(f"{src}/attn/v_bias")]
    )
    dense(f"{dst}.attn.proj", f"{src}/attn/proj")
    layer_norm(f"{dst}.norm2", f"{src}/norm2")
    dense(f"{dst}.mlp.fc1", f"{src}/fc1")
    dense(f"{dst}.mlp.fc2", f"{src}/fc2")
    depth += 1
  if fc_norm_params is None:
    layer_norm("norm", "norm")
  else:
    for name in ("norm/scale", "norm/bias"):
      flat.pop(name, None)
    out["fc_norm.weight"] = np.asarray(fc_norm_params["scale"], np.float32)
    out["fc_norm.bias"] = np.asarray(fc_norm_params["bias"], np.float32)
  if flat:
    raise ValueError(f"encoder parameters with no timm counterpart: {sorted(flat)}")

  if head_params is not None:
    out["head.weight"] = np.asarray(head_params["kernel"], np.float32).T
    out["head.bias"] = np.asarray(head_params["bias"], np.float32)
    if out["head.weight"].shape[1] != width:
      raise ValueError(
        f"the head's kernel {out['head.weight'].T.shape} does not read the encoder's width {width}"
      )
  return {name: np.ascontiguousarray(value) for name, value in out.items()}


def _read_run_config(workdir: str) -> dict:
  path = workdir_lib.path(workdir, loop.CONFIG_FILE)
  if not path.exists():
    raise FileNotFoundError(
      f"{workdir} holds no {loop.CONFIG_FILE}: pass the workdir of a "
      "pre-training or fine-tuning run."
    )
  return json.loads(path.read_text())


def export(workdir: str, output_dir: str, *, step: int | None = None) -> dict[str, str]:
  """Writes a run's encoder (with its head after fine-tuning) as a timm model folder.

  Args:
    workdir: a pre-training or fine-tuning run's workdir (config.json, checkpoints/).
    output_dir: the folder to write (created if needed; existing files replaced).
    step: the checkpoint step to export; None for the latest.

  Returns:
    {'weights': path of model.safetensors, 'config': path of config.json}.

  Raises:
    FileNotFoundError: no config.json, no checkpoint, or not that step.
    ValueError: a task other than pretrain/finetune, or an invalid model config.
  """
  workdir = os.fspath(workdir_lib.path(workdir))
  config = _read_run_config(workdir)
  task = config.get("task", "pretrain")
  if task not in _TASKS:
    raise ValueError(
      f"config.task={task!r} of {workdir} has no model to export: allowed values are {_TASKS}"
    )
  model = config["model"]
  # Built before the checkpoint is read, to fail early on an invalid model; the
  # number of classes is known once the head is.
  # A fine-tuning config.json without the key is a run from before it: no fc_norm.
  fc_norm = task == "finetune" and bool(model.get("fc_norm", False))
  kwargs = timm_kwargs(
    model["variant"], model["image_size"], model["num_channels"], 0, fc_norm=fc_norm
  )
  variables, step = checkpointing.load_params(
    workdir, step, state_key=objectives.evaluated_state_key(config)
  )
  params = variables["params"]
  if fc_norm and "fc_norm" not in params:
    raise ValueError(
      f"{workdir}'s config.json has model.fc_norm=True but its checkpoint of step {step} "
      f"holds no fc_norm parameters: its top-level parameters are {sorted(params)}."
    )
  head = params["head"] if task == "finetune" else None
  num_classes = kwargs["num_classes"] = 0 if head is None else int(np.shape(head["kernel"])[1])
  state_dict = to_timm_state_dict(
    params["encoder"],
    head,
    num_channels=model["num_channels"],
    fc_norm_params=params["fc_norm"] if fc_norm else None,
  )
  # Pre-training evaluates whole images resized; fine-tuning its central crop.
  crop_pct = config.get("data", {}).get("test_crop_ratio", 1.0) if task == "finetune" else 1.0

  folder = workdir_lib.path(output_dir)
  folder.mkdir(parents=True, exist_ok=True)
  paths = {"weights": os.fspath(folder / WEIGHTS_FILE), "config": os.fspath(folder / CONFIG_FILE)}
  workdir_lib.write_atomically(paths["weights"], safetensors_numpy.save(state_dict))
  exported = dict(
    architecture=ARCHITECTURE,
    num_classes=num_classes,
    num_features=kwargs["embed_dim"],
    global_pool=kwargs["global_pool"],
    model_args=kwargs,
    pretrained_cfg=timm_pretrained_cfg(
      model["image_size"], model["num_channels"], num_classes, crop_pct
    ),
    exported_from=dict(workdir=workdir, step=int(step), task=task, variant=model["variant"]),
  )
  workdir_lib.write_atomically(paths["config"], json.dumps(exported, indent=2))
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  paths = export(flags.FLAGS.workdir, flags.FLAGS.output, step=flags.FLAGS.step)
  print(f"Wrote {paths['weights']} and {paths['config']}")


if __name__ == "__main__":
  # Defined here, not on import: main.py defines its own --workdir.
  flags.DEFINE_string("workdir", None, "The run to export (pre-training or fine-tuning).")
  flags.DEFINE_string("output", None, "Folder to write model.safetensors and config.json.")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.mark_flags_as_required(["workdir", "output"])
  app.run(main)
