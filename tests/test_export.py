"""Export to timm: the state dict's layout, the same outputs in PyTorch, real run folders."""

import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from splitmask_jax import export
from splitmask_jax import finetune
from splitmask_jax import loop
from splitmask_jax import objectives
from splitmask_jax.models import vit
from splitmask_jax.runtime import checkpointing

from helpers import FINETUNE_CONFIG_FILE
from helpers import ROOT
from helpers import load_config

SIZE = 32  # Test/8: a 4x4 grid of 8 px patches, width 32, 2 blocks, 2 heads, MLP 64


def _encoder(channels, use_mask_token=False):
  arch, patch = vit.parse_variant("Test/8")
  return vit.Encoder(
    **arch, patch_size=patch, grid=(SIZE // patch,) * 2, use_mask_token=use_mask_token
  )


def _images(seed, channels, batch=3):
  return (
    np.random.default_rng(seed).uniform(-1, 1, (batch, SIZE, SIZE, channels)).astype(np.float32)
  )


def _perturbed(variables, seed):
  """The variables plus noise: zero biases, unit scales and [MASK] all move."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: np.asarray(x, np.float32) + 0.2 * rng.standard_normal(x.shape, np.float32), variables
  )


def _init(model, channels, seed, *extra):
  images = jnp.zeros((1, SIZE, SIZE, channels))
  variables = model.init(jax.random.PRNGKey(seed), images, *extra, train=False)
  return _perturbed(variables, seed)


def test_state_dict_names_shapes_and_patch_embedding():
  """timm's names and PyTorch layouts; the Conv2d weight computes the Dense embedding."""
  channels = 3
  params = _init(_encoder(channels, use_mask_token=True), channels, 0)["params"]
  head = {"kernel": np.ones((32, 5), np.float32), "bias": np.arange(5, dtype=np.float32)}
  sd = export.to_timm_state_dict(params, head, num_channels=channels)

  expected = {
    "patch_embed.proj.weight": (32, 3, 8, 8),
    "patch_embed.proj.bias": (32,),
    "pos_embed": (1, 16, 32),
    "norm.weight": (32,),
    "norm.bias": (32,),
    "head.weight": (5, 32),
    "head.bias": (5,),
  }
  for i in range(2):
    expected.update(
      {
        f"blocks.{i}.norm1.weight": (32,),
        f"blocks.{i}.norm1.bias": (32,),
        f"blocks.{i}.attn.qkv.weight": (96, 32),
        f"blocks.{i}.attn.qkv.bias": (96,),
        f"blocks.{i}.attn.proj.weight": (32, 32),
        f"blocks.{i}.attn.proj.bias": (32,),
        f"blocks.{i}.norm2.weight": (32,),
        f"blocks.{i}.norm2.bias": (32,),
        f"blocks.{i}.mlp.fc1.weight": (64, 32),
        f"blocks.{i}.mlp.fc1.bias": (64,),
        f"blocks.{i}.mlp.fc2.weight": (32, 64),
        f"blocks.{i}.mlp.fc2.bias": (32,),
      }
    )
  assert {k: v.shape for k, v in sd.items()} == expected  # mask_token left out
  assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in sd.values())

  attn = params["block_1"]["attn"]
  np.testing.assert_array_equal(
    sd["blocks.1.attn.qkv.bias"],
    np.concatenate([attn["q_bias"], np.zeros(32, np.float32), attn["v_bias"]]),
  )
  np.testing.assert_array_equal(sd["blocks.1.mlp.fc1.weight"], params["block_1"]["fc1"]["kernel"].T)

  # A stride-p convolution written out pixel by pixel, against the Dense on patchify.
  images = _images(1, channels, batch=2)
  weight, bias = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
  tiles = images.reshape(2, 4, 8, 4, 8, channels)  # [B, gh, i, gw, j, C]
  conv = np.einsum("bgihjc,ocij->bgho", tiles, weight).reshape(2, 16, 32) + bias
  dense = (
    np.asarray(vit.patchify(images, 8)) @ params["embedding"]["kernel"]
    + (params["embedding"]["bias"])
  )
  np.testing.assert_allclose(conv, dense, rtol=1e-5, atol=1e-5)


def test_state_dict_refuses_what_it_cannot_map():
  params = _init(_encoder(1), 1, 0)["params"]
  with pytest.raises(ValueError, match="p\\*p\\*3"):
    export.to_timm_state_dict(params, num_channels=3)
  with pytest.raises(ValueError, match="no timm counterpart: \\['block_0/ls1'\\]"):
    export.to_timm_state_dict(
      {**params, "block_0": {**params["block_0"], "ls1": np.ones(32)}}, num_channels=1
    )
  incomplete = {k: v for k, v in params.items() if k != "norm"}
  with pytest.raises(ValueError, match="no 'norm/scale'"):
    export.to_timm_state_dict(incomplete, num_channels=1)


def test_timm_kwargs_checks_the_model():
  kwargs = export.timm_kwargs("Mini/8", 32, 1, 0)
  assert kwargs == dict(
    img_size=32,
    patch_size=8,
    in_chans=1,
    num_classes=0,
    embed_dim=128,
    depth=6,
    num_heads=4,
    mlp_ratio=4.0,
    qkv_bias=True,
    class_token=False,
    global_pool="avg",
    fc_norm=False,
  )
  with pytest.raises(ValueError, match="multiple of the patch size 8"):
    export.timm_kwargs("Mini/8", 30, 1, 0)
  with pytest.raises(ValueError, match="variant size"):
    export.timm_kwargs("Huge/8", 32, 1, 0)


@pytest.mark.parametrize("channels", [1, 3])
def test_timm_model_computes_the_same_features(channels):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  encoder = _encoder(channels)
  variables = _init(encoder, channels, channels)
  model = timm.models.vision_transformer.VisionTransformer(
    **export.timm_kwargs("Test/8", SIZE, channels, 0)
  ).eval()
  model.load_state_dict(
    {
      k: torch.from_numpy(v)
      for k, v in export.to_timm_state_dict(variables["params"], num_channels=channels).items()
    },
    strict=True,
  )

  images = _images(channels, channels)
  tokens, _ = encoder.apply(variables, images, train=False)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch_tokens = model.forward_features(x).numpy()
    torch_features = model(x).numpy()
  np.testing.assert_allclose(torch_tokens, tokens, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(torch_features, vit.pooled_features(tokens), rtol=1e-5, atol=1e-5)


def _save_run(workdir, config, variables_by_step):
  """A workdir as a run leaves it: config.json and orbax checkpoints."""
  os.makedirs(workdir)
  loop.save_config(config, str(workdir))
  checkpointer = checkpointing.Checkpointer(str(workdir), keep=5)
  data = iter(grain.MapDataset.range(4).to_iter_dataset())
  for step, variables in variables_by_step.items():
    checkpointer.save(step, {"step": np.int32(step), "params": variables}, data)
  checkpointer.wait()
  checkpointer.close()


def test_export_cli_from_a_beit_pretraining_run(tmp_path):
  """The CLI writes the asked step's encoder and a timm-style config.json."""
  config = load_config("beit,test")
  grid = (SIZE // 8,) * 2
  model = objectives.build_model(config, grid)
  mask_fn = objectives.make_mask_fn(config, grid)
  inputs = objectives.example_inputs(config, mask_fn(np.random.default_rng(0)))
  init = model.init(jax.random.PRNGKey(0), *inputs, train=False)
  steps = {2: _perturbed(init, 2), 4: _perturbed(init, 4)}
  assert "mask_token" in steps[2]["params"]["encoder"]
  _save_run(tmp_path / "run", config, steps)

  out = tmp_path / "exported"
  cmd = [
    sys.executable,
    "-m",
    "splitmask_jax.export",
    f"--workdir={tmp_path / 'run'}",
    f"--output={out}",
    "--step=2",
  ]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]

  saved = safetensors_numpy.load_file(str(out / "model.safetensors"))
  expected = export.to_timm_state_dict(steps[2]["params"]["encoder"], num_channels=1)
  assert saved.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(saved[name], expected[name])
  with open(out / "config.json") as f:
    written = json.load(f)
  assert written["model_args"] == export.timm_kwargs("Test/8", SIZE, 1, 0)
  assert written["pretrained_cfg"]["mean"] == [0.5] and written["pretrained_cfg"]["std"] == [0.5]
  assert written["exported_from"] == dict(
    workdir=str(tmp_path / "run"), step=2, task="pretrain", variant="Test/8"
  )


@pytest.mark.parametrize("fc_norm", [True, False, None])
def test_export_of_a_finetuning_run_loads_in_timm(tmp_path, fc_norm):
  """timm builds the classifier from the folder alone and gives the same logits, with
  the LayerNorm after the pooling (model.fc_norm, BEiT's) or before it (False, and a
  run from before the key existed: None)."""
  config = load_config("test", path=FINETUNE_CONFIG_FILE)
  config.model.fc_norm = bool(fc_norm)
  classifier = finetune.build_classifier(config, num_classes=7)
  variables = _init(classifier, 1, 5)
  assert ("fc_norm" in variables["params"]) is bool(fc_norm)
  _save_run(tmp_path / "run", config, {3: variables})
  if fc_norm is None:
    saved = json.loads((tmp_path / "run" / loop.CONFIG_FILE).read_text())
    del saved["model"]["fc_norm"]
    (tmp_path / "run" / loop.CONFIG_FILE).write_text(json.dumps(saved))
  paths = export.export(str(tmp_path / "run"), str(tmp_path / "exported"))
  assert paths == {
    "weights": str(tmp_path / "exported" / "model.safetensors"),
    "config": str(tmp_path / "exported" / "config.json"),
  }

  weights = safetensors_numpy.load_file(paths["weights"])
  assert ("fc_norm.weight" in weights) is bool(fc_norm)
  assert ("norm.weight" in weights) is not bool(fc_norm)

  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  model = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
  assert isinstance(model.norm, torch.nn.Identity) is bool(fc_norm)
  data_config = timm.data.resolve_data_config(model=model)
  assert data_config["input_size"] == (1, SIZE, SIZE)
  assert list(data_config["mean"]) == [0.5] and list(data_config["std"]) == [0.5]
  assert data_config["crop_pct"] == config.data.test_crop_ratio
  images = _images(7, 1)
  with torch.no_grad():
    logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(
    logits, classifier.apply(variables, images, train=False), rtol=1e-5, atol=1e-5
  )


def test_export_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no config.json"):
    export.export(str(tmp_path), str(tmp_path / "out"))
  os.makedirs(tmp_path / "no_checkpoint")
  loop.save_config(load_config("test"), str(tmp_path / "no_checkpoint"))
  with pytest.raises(FileNotFoundError, match="holds no checkpoints/"):
    export.export(str(tmp_path / "no_checkpoint"), str(tmp_path / "out"))
  os.makedirs(tmp_path / "probe")
  loop.save_config(load_config("probe,test", path=FINETUNE_CONFIG_FILE), str(tmp_path / "probe"))
  with pytest.raises(ValueError, match="config.task='probe'"):
    export.export(str(tmp_path / "probe"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
