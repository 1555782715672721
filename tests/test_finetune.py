"""Fine-tuning and probing: layer decay, encoder loading, subsets, the end-to-end runs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from splitmask_jax import config_base
from splitmask_jax import finetune
from splitmask_jax import loop
from splitmask_jax import optim
from splitmask_jax import probe
from splitmask_jax.data import input_pipeline
from splitmask_jax.data import subsets
from splitmask_jax.models import pretrain
from splitmask_jax.models import vit
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import metric_log

from helpers import FINETUNE_CONFIG_FILE
from helpers import ROOT
from helpers import load_config


def _finetune_config(arg, fake_dir, data_dir, **overrides):
  config = load_config(arg, FINETUNE_CONFIG_FILE)
  config.data.manual_dir = str(fake_dir)
  config.data.data_dir = str(data_dir)
  config.update_from_flattened_dict(overrides)
  return config


# --- layer-wise learning-rate decay -------------------------------------------------


def test_layer_decay_multipliers_match_hand_table():
  arch, patch = vit.parse_variant("Test/8")
  model = finetune.build_classifier(load_config("test", FINETUNE_CONFIG_FILE), 10)
  shapes = jax.eval_shape(
    lambda k: model.init({"params": k}, jnp.zeros((1, 32, 32, 1)), train=False),
    jax.random.PRNGKey(0),
  )
  multipliers = optim.layer_decay_multipliers(shapes, arch["depth"], 0.5)
  flat = {
    "/".join(k.key for k in path): value
    for path, value in jax.tree_util.tree_flatten_with_path(multipliers)[0]
  }
  # depth 2, decay 0.5: layer 0 (embeddings) 0.5^3, block i 0.5^(2-i), top 1.
  expected = {
    "params/encoder/embedding/kernel": 0.125,
    "params/encoder/embedding/bias": 0.125,
    "params/encoder/pos_embedding": 0.125,
    "params/encoder/block_0/attn/qkv/kernel": 0.25,
    "params/encoder/block_0/norm1/scale": 0.25,
    "params/encoder/block_1/attn/q_bias": 0.5,
    "params/encoder/block_1/fc2/bias": 0.5,
    "params/encoder/norm/scale": 1.0,
    "params/fc_norm/scale": 1.0,  # BEiT's fc_norm learns with the head
    "params/head/kernel": 1.0,
    "params/head/bias": 1.0,
  }
  for name, value in expected.items():
    assert flat[name] == value, name
  assert set(flat.values()) == {0.125, 0.25, 0.5, 1.0}
  # BEiT's [MASK] embedding sits with the patch embedding.
  assert optim.layer_id(("params", "encoder", "mask_token"), 12) == 0
  assert optim.layer_id(("params", "encoder", "block_11", "fc1", "kernel"), 12) == 12


def test_layer_decay_scales_the_adamw_update():
  """Each parameter's update is the plain AdamW update times its multiplier."""
  params = {"a": jnp.ones((3, 2)), "b": jnp.full((4,), 2.0)}
  grads = {"a": jnp.arange(6.0).reshape(3, 2) - 2, "b": jnp.array([1.0, -1.0, 0.5, 3.0])}
  config = load_config("test", FINETUNE_CONFIG_FILE).optim
  schedule = optax.constant_schedule(0.1)
  plain = optim.make_optimizer(config, schedule)
  decayed = optim.make_optimizer(config, schedule, lr_multipliers={"a": 0.25, "b": 1.0})
  up_plain, _ = plain.update(grads, plain.init(params), params)
  up_decayed, _ = decayed.update(grads, decayed.init(params), params)
  np.testing.assert_allclose(up_decayed["a"], 0.25 * up_plain["a"], rtol=1e-6)
  np.testing.assert_allclose(up_decayed["b"], up_plain["b"], rtol=1e-6)


# --- loading a pre-trained encoder ----------------------------------------------------


def _pretrain_variables(variant="Test/8", objective="splitmask"):
  arch, patch = vit.parse_variant(variant)
  common = dict(arch, patch_size=patch, grid=(4, 4), vocab_size=16)
  images = jnp.zeros((1, 32, 32, 1))
  if objective == "beit":
    model = pretrain.BEiTModel(**common)
    args = (images, jnp.zeros((1, 16), bool), jnp.zeros((1, 4), jnp.int32))
  else:
    model = pretrain.SplitMaskModel(**common)
    idx = jnp.arange(8, dtype=jnp.int32)[None]
    args = (images, idx, idx + 8, idx + 8, idx)
  return jax.device_get(model.init({"params": jax.random.PRNGKey(3)}, *args, train=False))


@pytest.mark.parametrize("objective", ["splitmask", "beit"])
def test_loaded_encoder_is_bit_identical(objective):
  pretrained = _pretrain_variables(objective=objective)
  model = finetune.build_classifier(load_config("test", FINETUNE_CONFIG_FILE), 10)
  variables = jax.device_get(
    model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 1)), train=False)
  )
  loaded = finetune.load_pretrained_encoder(variables, pretrained)
  saved = pretrained["params"]["encoder"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(loaded["params"]["encoder"])[0]:
    source = saved
    for key in path:
      source = source[key.key]
    assert leaf.dtype == source.dtype and np.array_equal(leaf, source), path
  assert "mask_token" not in loaded["params"]["encoder"]
  np.testing.assert_array_equal(
    loaded["params"]["head"]["kernel"], variables["params"]["head"]["kernel"]
  )


def test_mismatched_encoder_is_rejected_with_the_shapes():
  pretrained = _pretrain_variables("Mini/8")
  model = finetune.build_classifier(load_config("test", FINETUNE_CONFIG_FILE), 10)
  variables = jax.device_get(
    model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 1)), train=False)
  )
  with pytest.raises(
    ValueError,
    match=r"in run_x does not fit this model \(83 parameters\): "
    r"block_0/attn/proj/bias: checkpoint \(128,\) vs model \(32,\)",
  ):
    finetune.load_pretrained_encoder(variables, pretrained, source="run_x")
  with pytest.raises(ValueError, match="holds no params/encoder"):
    finetune.load_pretrained_encoder(variables, {"params": {"backbone": {}}})


def test_init_run_with_another_model_fails_before_reading_data(pretrained_run, tmp_path):
  workdir, data_dir = pretrained_run
  config = _finetune_config(
    "test",
    "/nonexistent",
    tmp_path / "nothing",
    **{"init.workdir": str(workdir), "model.variant": "Mini/8"},
  )
  with pytest.raises(ValueError, match=r"config.model.variant='Mini/8' does not match"):
    finetune.finetune_and_evaluate(config, str(tmp_path / "ft"))
  config.model.variant = "Test/8"
  config.init.workdir = str(tmp_path / "no_run")
  with pytest.raises(FileNotFoundError, match="holds no config.json"):
    finetune.finetune_and_evaluate(config, str(tmp_path / "ft"))
  assert not (tmp_path / "ft").exists()


def test_load_params_reads_a_real_checkpoint(pretrained_run):
  workdir, _ = pretrained_run
  variables, step = checkpointing.load_params(str(workdir))
  assert step == 4
  assert set(variables["params"]) == {"encoder", "decoder"}
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 3"):
    checkpointing.load_params(str(workdir), step=3)


# --- data: subsets, repeated augmentation, test crop --------------------------------


def test_class_balanced_subset_is_balanced_and_deterministic():
  labels = np.repeat(np.arange(5), [100, 50, 30, 13, 7])
  indices = subsets.class_balanced_indices(labels, 0.1, seed=1)
  assert len(indices) == 20  # round(0.1 * 200)
  counts = np.bincount(labels[indices], minlength=5)
  assert counts.tolist() == [10, 5, 3, 1, 1]  # floor 10, 5, 3, 1, 0; remainders +1 to class 4
  np.testing.assert_array_equal(indices, subsets.class_balanced_indices(labels, 0.1, seed=1))
  assert not np.array_equal(indices, subsets.class_balanced_indices(labels, 0.1, seed=2))
  assert np.all(np.diff(indices) > 0)
  np.testing.assert_array_equal(subsets.class_balanced_indices(labels, 1.0, seed=0), np.arange(200))
  with pytest.raises(ValueError, match="fraction"):
    subsets.class_balanced_indices(labels, 0.0, seed=0)


def _records(n):
  return [{"image": np.full((8, 8, 1), i, np.uint8), "label": i % 10} for i in range(n)]


def test_repeated_augmentation_keeps_epochs_and_repeats_records():
  source = _records(12)
  ds = input_pipeline.finetune_dataset(
    source, batch_size=6, image_size=8, crop_scale=(0.5, 1.0), repeats=3, seed=0
  )
  batches = [b for _, b in zip(range(4), ds)]
  # Crops of a constant image are constant: the pixel value names the record.
  ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches]).astype(int)
  epoch_1, epoch_2 = ids[:12], ids[12:]
  for epoch in (epoch_1, epoch_2):
    assert np.all(epoch.reshape(4, 3) == epoch.reshape(4, 3)[:, :1])  # 3 in a row
    assert len(set(epoch)) == 4  # 12 / 3 records per epoch
  assert set(epoch_1) != set(epoch_2)  # reshuffled
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), ids % 10)


def test_center_crop_matches_resize_then_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (40, 40, 3), np.uint8)
  source = [{"image": image, "label": 0}]
  batch = next(
    iter(input_pipeline.eval_dataset(source, batch_size=1, image_size=16, center_crop=0.8))
  )
  expected = np.asarray(
    Image.fromarray(image).resize((16, 16), Image.Resampling.BICUBIC, box=(4, 4, 36, 36))
  )
  np.testing.assert_array_equal(batch["image"][0], expected)


def test_downstream_config_checks():
  config = load_config("test", FINETUNE_CONFIG_FILE)
  config_base.validate_config(config)
  for key, value, message in (
    ("optim.layer_decay", 0.0, "optim.layer_decay"),
    ("data.train_fraction", 1.5, "data.train_fraction"),
    ("augment.repeats", 0, "augment.repeats"),
    ("task", "pretrian", "config.task='pretrian'"),
  ):
    bad = load_config("test", FINETUNE_CONFIG_FILE)
    bad.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=message):
      config_base.validate_config(bad)
  bad = load_config("test", FINETUNE_CONFIG_FILE)
  bad.augment.mixupp = 0.5
  with pytest.raises(ValueError, match=r"config.augment.mixupp is not a key .*downstream"):
    config_base.validate_config(bad)


# --- the pooled-feature norm (model.fc_norm) -------------------------------------------


def _layer_norm(x, scale, bias, eps=1e-6):
  """float64 LayerNorm over the last axis."""
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("fc_norm", [True, False])
def test_head_reads_the_pooled_features_where_beit_normalises_them(fc_norm):
  """fc_norm: mean of the last block's raw tokens, then fc_norm, then the head (BEiT's
  use_mean_pooling); without it: mean of the encoder's normalised tokens. float64
  NumPy from the blocks' raw outputs, every parameter moved off its initial value."""
  config = load_config("test", FINETUNE_CONFIG_FILE)
  assert config.model.fc_norm  # BEiT's fine-tuning is the default
  config.model.fc_norm = fc_norm
  model = finetune.build_classifier(config, 10)
  images = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
  variables = model.init({"params": jax.random.PRNGKey(0)}, jnp.asarray(images), train=False)
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape), variables)
  params = variables["params"]
  assert ("fc_norm" in params) is fc_norm
  if fc_norm:
    assert {k: v.shape for k, v in params["fc_norm"].items()} == {"scale": (32,), "bias": (32,)}

  blocks = model.apply(
    variables, jnp.asarray(images), method=lambda m, x: m.encoder(x, train=False)[1]
  )["block_outputs"]
  raw = np.asarray(blocks[-1], np.float64)  # [B, N, D], before the encoder's norm
  enc_norm, head = params["encoder"]["norm"], params["head"]
  if fc_norm:
    pooled = _layer_norm(raw.mean(1), params["fc_norm"]["scale"], params["fc_norm"]["bias"])
  else:
    pooled = _layer_norm(raw, enc_norm["scale"], enc_norm["bias"]).mean(1)
  expected = pooled @ head["kernel"] + head["bias"]
  logits = model.apply(variables, jnp.asarray(images), train=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

  # The encoder's final norm is unused with fc_norm (BEiT has none), read without.
  moved = jax.tree.map(lambda x: x, variables)
  moved["params"]["encoder"]["norm"] = {k: 2 * v + 1 for k, v in enc_norm.items()}
  changed = model.apply(moved, jnp.asarray(images), train=False)
  assert np.array_equal(changed, logits) is fc_norm


def test_finetuning_run_from_before_fc_norm_resumes_without_it(tmp_path):
  """A run whose config.json lacks model.fc_norm trained a head on the normalised
  tokens: it resumes with fc_norm=False, the parameters its checkpoints hold."""
  config = load_config("test", FINETUNE_CONFIG_FILE)
  old = config.copy_and_resolve_references()
  old.model.fc_norm = False
  saved = json.loads(old.to_json_best_effort())
  del saved["model"]["fc_norm"]
  (tmp_path / loop.CONFIG_FILE).write_text(json.dumps(saved))
  assert config_base.legacy_values(saved, config) == {"model.fc_norm": False}
  assert loop._check_workdir_config(config, str(tmp_path), allow_config_change=False) is False
  assert config.model.fc_norm is False

  def param_shapes(c):
    model = finetune.build_classifier(c, 10)
    init = finetune.classifier_init_fn(model, c)
    return jax.tree.map(lambda x: x.shape, jax.eval_shape(init, jax.random.PRNGKey(0)))

  assert param_shapes(config) == param_shapes(old)
  # Asked for explicitly, BEiT's reading is a change of what the run computes.
  config.model.fc_norm = True
  assert config_base.resume_conflicts(saved, config) == {"model.fc_norm": ("<absent: False>", True)}


# --- end to end ------------------------------------------------------------------------


def test_finetune_from_pretrained_then_probe(pretrained_run, fake_fashion_mnist, tmp_path):
  workdir, data_dir = pretrained_run
  ft_dir = tmp_path / "ft"
  cmd = [
    sys.executable,
    "-m",
    "splitmask_jax.main",
    f"--config={FINETUNE_CONFIG_FILE}:test",
    f"--workdir={ft_dir}",
    f"--config.init.workdir={workdir}",
    f"--config.data.manual_dir={fake_fashion_mnist}",
    f"--config.data.data_dir={data_dir}",
    "--config.data.train_fraction=0.5",
  ]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  records = metric_log.read_metrics(str(ft_dir))
  assert records[0]["num_train_examples"] == 80  # half of the 160 training images
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 2 and np.isfinite(losses).all()
  top1 = [r["test_top1"] for r in records if "test_top1" in r]
  assert len(top1) == 1 and 0.0 <= top1[0] <= 1.0
  assert json.loads((ft_dir / "final_metrics.json").read_text())["test_top1"] == top1[0]
  assert list(ft_dir.glob("events.out.tfevents.*")), "no TensorBoard file"
  assert (ft_dir / "checkpoints" / "4").is_dir()
  # The saved classifier's encoder trained on from the pre-trained one.
  start, _ = checkpointing.load_params(str(workdir))
  tuned, _ = checkpointing.load_params(str(ft_dir))
  assert tuned["params"]["head"]["kernel"].shape == (32, 10)
  assert not np.array_equal(
    tuned["params"]["encoder"]["block_0"]["fc1"]["kernel"],
    start["params"]["encoder"]["block_0"]["fc1"]["kernel"],
  )

  probe_dir = tmp_path / "probe"
  config = _finetune_config(
    "probe,test", fake_fashion_mnist, data_dir, **{"init.workdir": str(workdir)}
  )
  values = probe.probe_blocks(config, str(probe_dir))
  for name in ("pretrained", "random_init"):
    for block in (1, 2):
      assert 0.0 <= values[f"probe_top1_{name}_block_{block}"] <= 1.0
  report = json.loads((probe_dir / "probe.json").read_text())
  assert json.dumps(report)  # numbers, not objects
  assert (probe_dir / "probe.md").exists() and (probe_dir / "probe.png").exists()
