"""How the encoder is computed, not what: scanned blocks against the unrolled loop,
rematerialisation policies, the attention kernel switch, float32 vocabulary logits,
and the parameter layouts that fine-tuning, the optimizer and fsdp read."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from splitmask_jax import config_base
from splitmask_jax import finetune
from splitmask_jax import optim
from splitmask_jax.models import pretrain
from splitmask_jax.models import vit
from splitmask_jax.runtime import sharding

import helpers

CFG = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8, grid=(4, 4))
B = 3


def _images(seed=0):
  return jax.random.uniform(jax.random.key(seed), (B, 32, 32, 1), minval=-1, maxval=1)


def _encoders(**kw):
  """(unrolled encoder, its variables, scanned encoder, the same variables scanned)."""
  loop = vit.Encoder(**CFG, **kw)
  scan = vit.Encoder(**CFG, scan=True, **kw)
  variables = loop.init(jax.random.key(1), _images(), train=False)
  return loop, variables, scan, {"params": vit.scan_blocks(variables["params"])}


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def test_scanned_blocks_compute_the_loop_s_function():
  loop, variables, scan, scanned = _encoders(drop_path_rate=0.1)
  # The same parameter tree as a scanned encoder initialises.
  own = scan.init(jax.random.key(1), _images(), train=False)
  assert jax.tree.structure(own) == jax.tree.structure(scanned)
  assert scanned["params"]["blocks"]["block"]["fc1"]["kernel"].shape == (3, 32, 64)
  tokens, aux = loop.apply(variables, _images(2), train=False)
  tokens_s, aux_s = scan.apply(scanned, _images(2), train=False)
  np.testing.assert_allclose(tokens_s, tokens, rtol=1e-5, atol=1e-5)
  assert _max_diff(aux_s["block_outputs"], aux["block_outputs"]) < 1e-5
  _, none = scan.apply(scanned, _images(2), train=False, with_block_outputs=False)
  assert none["block_outputs"] == ()

  def loss(encoder, params):
    return jnp.sum(encoder.apply(params, _images(3), train=False)[0] ** 2)

  grads = jax.grad(lambda p: loss(loop, p))(variables)["params"]
  grads_s = jax.grad(lambda p: loss(scan, p))(scanned)["params"]
  expected = jax.tree.leaves(vit.scan_blocks(grads))
  assert _max_diff(jax.tree.leaves(grads_s), expected) < 1e-4


def test_unrolled_scan_keeps_the_layout_and_the_function_without_a_loop():
  loop, variables, _, scanned = _encoders(drop_path_rate=0.1)
  unrolled = vit.Encoder(**CFG, scan=True, unroll_scan=True, drop_path_rate=0.1)
  # The scanned parameter tree: checkpoints do not depend on the platform.
  own = unrolled.init(jax.random.key(1), _images(), train=False)
  assert jax.tree.structure(own) == jax.tree.structure(scanned)

  # Concrete images: drawing them in the traced function would add a loop of its own.
  images = np.asarray(_images(3))

  def loss(encoder, params):
    return jnp.sum(encoder.apply(params, images, train=False)[0] ** 2)

  value, grads = jax.value_and_grad(lambda p: loss(unrolled, p))(scanned)
  value_loop, grads_loop = jax.value_and_grad(lambda p: loss(loop, p))(variables)
  np.testing.assert_allclose(value, value_loop, rtol=1e-5)
  expected = jax.tree.leaves(vit.scan_blocks(grads_loop["params"]))
  assert _max_diff(jax.tree.leaves(grads["params"]), expected) < 1e-4
  # The scan's loop is gone from the program (a plain scan keeps one).
  rolled = vit.Encoder(**CFG, scan=True, drop_path_rate=0.1)

  def program(encoder):
    return jax.jit(jax.grad(lambda p: loss(encoder, p))).lower(scanned).as_text()

  assert "while" in program(rolled)
  assert "while" not in program(unrolled)


def test_block_options_unroll_scanned_blocks_on_cpus_only():
  model = helpers.load_config("test").model
  model.scan = True
  assert vit.block_options(model, "cpu")["unroll_scan"]
  assert not vit.block_options(model, "gpu")["unroll_scan"]
  assert not vit.block_options(model, "tpu")["unroll_scan"]
  model.scan = False
  assert not vit.block_options(model, "cpu")["unroll_scan"]


def test_scanned_drop_path_gives_each_block_its_own_rate():
  """Block i drops with rate 0.5 * i / 2: the first block never drops, so a model
  whose other blocks are zeroed differs from dropping nothing only by chance."""
  _, _, scan, scanned = _encoders(drop_path_rate=0.5)
  outs = [
    scan.apply(scanned, _images(), train=True, rngs={"dropout": jax.random.key(s)})[0]
    for s in range(8)
  ]
  assert len({np.asarray(o).tobytes() for o in outs}) > 1  # some sample dropped something
  eval_out = scan.apply(scanned, _images(), train=False)[0]
  assert all(np.isfinite(np.asarray(o)).all() for o in outs) and eval_out.shape == outs[0].shape


def test_block_layouts_round_trip_and_match():
  _, variables, _, scanned = _encoders()
  back = vit.unscan_blocks(scanned["params"])
  assert jax.tree.all(jax.tree.map(np.array_equal, back, variables["params"]))
  assert vit.match_block_layout(variables["params"], scanned["params"]) is not None
  assert vit.is_scanned(vit.match_block_layout(variables["params"], scanned["params"]))
  assert not vit.is_scanned(vit.match_block_layout(scanned["params"], variables["params"]))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_keep_outputs_and_gradients(remat, scan):
  plain = vit.Encoder(**CFG, scan=scan)
  variables = plain.init(jax.random.key(0), _images(), train=False)
  remat_model = vit.Encoder(**CFG, scan=scan, remat=remat)

  def loss(model, params):
    return jnp.sum(model.apply(params, _images(1), train=False)[0] ** 2)

  g = jax.grad(lambda p: loss(plain, p))(variables)
  g_remat = jax.grad(lambda p: loss(remat_model, p))(variables)
  assert _max_diff(jax.tree.leaves(g_remat), jax.tree.leaves(g)) < 1e-5


def test_attention_switch_resolves_per_platform():
  resolve = vit.resolve_attention
  assert resolve("auto", "cpu", "bfloat16", 64) is None
  assert resolve("auto", "tpu", "bfloat16", 64) is None
  assert resolve("auto", "gpu", "float32", 64) is None  # cuDNN's kernel wants 16 bits
  assert resolve("auto", "gpu", "bfloat16", 64) == "cudnn"
  assert resolve("auto", "gpu", "bfloat16", 72) == "cudnn"
  assert resolve("auto", "gpu", "bfloat16", 160) is None  # head dimension too large
  assert resolve("xla", "gpu", "bfloat16", 64) is None
  with pytest.raises(ValueError, match="attention='cudnn' needs NVIDIA GPUs"):
    resolve("cudnn", "cpu", "bfloat16", 64)
  config = helpers.load_config("test")
  config.model.attention = "flash"
  with pytest.raises(ValueError, match=r"config.model.attention='flash' is invalid"):
    config_base.validate_config(config)


def test_explicit_xla_attention_equals_the_default_and_a_float64_reference():
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  default = vit.Attention(num_heads=2)
  explicit = vit.Attention(num_heads=2, implementation="xla")
  params = default.init(jax.random.key(1), x)
  out = default.apply(params, x)
  np.testing.assert_array_equal(explicit.apply(params, x), out)
  # The same attention in float64 NumPy.
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  xs = np.asarray(x, np.float64)
  qkv = xs @ p["qkv"]["kernel"] + np.concatenate([p["q_bias"], np.zeros(32), p["v_bias"]])
  q, k, v = (qkv[..., i * 32 : (i + 1) * 32].reshape(2, 5, 2, 16) for i in range(3))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(16)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  ref = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, 32)
  ref = ref @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_vocabulary_logits_are_accumulated_in_float32():
  """In bfloat16, logits rounded to bfloat16 err by up to 2^-9 relative; accumulated
  and returned in float32 they match a float64 product of the same bfloat16 inputs."""
  features = jax.random.normal(jax.random.key(0), (4, 256), jnp.float32)
  head = vit.logits_dense(
    8192,
    kernel_init=jax.nn.initializers.normal(1.0),
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
  )
  params = head.init(jax.random.key(1), features)
  logits = head.apply(params, features)
  assert logits.dtype == jnp.float32
  x = np.asarray(features.astype(jnp.bfloat16), np.float64)
  w = np.asarray(params["params"]["kernel"].astype(jnp.bfloat16), np.float64)
  ref = x @ w + np.asarray(params["params"]["bias"].astype(jnp.bfloat16), np.float64)
  err = np.abs(np.asarray(logits, np.float64) - ref).max() / np.abs(ref).max()
  rounded = np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float64)
  bf16_err = np.abs(rounded - ref).max() / np.abs(ref).max()
  assert err < 1e-5 < bf16_err
  model = pretrain.BEiTModel(**CFG, vocab_size=64, dtype=jnp.bfloat16, scan=True)
  mask = jnp.zeros((B, 16), bool).at[:, :4].set(True)
  masked = jnp.tile(jnp.arange(4, dtype=jnp.int32), (B, 1))
  variables = model.init(jax.random.key(0), _images(), mask, masked, train=False)
  assert model.apply(variables, _images(), mask, masked, train=False)["logits"].dtype == jnp.float32


def test_optimizer_treats_scanned_blocks_like_unrolled_ones():
  """Weight decay, layer-wise learning rates and fsdp: the same per block either way."""
  _, variables, _, scanned = _encoders()
  params, params_s = {"encoder": variables["params"]}, {"encoder": scanned["params"]}
  expected_mask = vit.scan_blocks(optim.decay_mask(params)["encoder"])
  same = jax.tree.map(
    lambda a, b: bool(np.all(a == b)), optim.decay_mask(params_s)["encoder"], expected_mask
  )
  assert jax.tree.all(same)
  assert optim.decay_mask(params_s)["encoder"]["blocks"]["block"]["attn"]["q_bias"] is False
  rates = optim.layer_decay_multipliers(params, depth=3, decay=0.5)
  rates_s = optim.layer_decay_multipliers(params_s, depth=3, decay=0.5)
  for name in ("fc1", "attn"):
    stacked = jax.tree.leaves(rates_s["encoder"]["blocks"]["block"][name])
    for i in range(3):
      per_block = jax.tree.leaves(rates["encoder"][f"block_{i}"][name])
      assert [float(np.ravel(r[i])[0]) for r in stacked] == per_block
  # One AdamW step moves every block exactly as the unrolled optimizer does.
  schedule = optax.constant_schedule(0.1)
  cfg = ml_collections.ConfigDict(dict(grad_clip=None, b1=0.9, b2=0.999, weight_decay=0.05))
  grads = jax.tree.map(jnp.ones_like, params)
  grads_s = jax.tree.map(jnp.ones_like, params_s)
  tx = optim.make_optimizer(cfg, schedule, lr_multipliers=rates)
  tx_s = optim.make_optimizer(cfg, schedule, lr_multipliers=rates_s)
  up, _ = tx.update(grads, tx.init(params), params)
  up_s, _ = tx_s.update(grads_s, tx_s.init(params_s), params_s)
  assert (
    _max_diff(jax.tree.leaves(up_s["encoder"]), jax.tree.leaves(vit.scan_blocks(up["encoder"])))
    < 1e-7
  )
  # fsdp never splits the axis a scan slices one block at a time.
  assert sharding.fsdp_spec((12, 768, 3072), 4, first_dim=1) == jax.sharding.PartitionSpec(
    None, None, "fsdp"
  )
  assert sharding.fsdp_spec((16, 64, 64), 16, first_dim=1) == jax.sharding.PartitionSpec(
    None, "fsdp", None
  )


@pytest.mark.parametrize("saved_scanned,model_scanned", [(True, False), (False, True)])
def test_finetuning_loads_either_block_layout(saved_scanned, model_scanned):
  config = helpers.load_config("test", helpers.FINETUNE_CONFIG_FILE)
  config.model.scan = model_scanned
  model = finetune.build_classifier(config, 10)
  variables = jax.device_get(jax.jit(finetune.classifier_init_fn(model, config))(jax.random.key(0)))
  pre = pretrain.SplitMaskModel(
    **vit.VARIANTS["Test"], patch_size=8, grid=(4, 4), vocab_size=8, scan=saved_scanned
  )
  masks = [jnp.zeros((1, 8), jnp.int32)] * 4
  pretrained = jax.device_get(
    pre.init(jax.random.key(5), jnp.zeros((1, 32, 32, 1)), *masks, train=False)
  )
  loaded = finetune.load_pretrained_encoder(variables, pretrained)
  encoder = loaded["params"]["encoder"]
  assert vit.is_scanned(encoder) == model_scanned
  saved = vit.match_block_layout(pretrained["params"]["encoder"], encoder)
  assert jax.tree.all(jax.tree.map(np.array_equal, encoder, saved))


def test_resume_keeps_the_block_layout_and_old_workdirs_resume(fake_fashion_mnist, tmp_path):
  """A workdir written before model.scan, remat policies and the attention switch
  existed resumes; resuming with the other block layout is refused by name."""
  from splitmask_jax import train  # pylint: disable=import-outside-toplevel

  config = helpers.load_config("test")
  config.data.manual_dir = str(fake_fashion_mnist)
  config.data.data_dir = str(tmp_path / "tfds")
  config.knn.enabled = False
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  # An interrupted run of an earlier version: no step-4 checkpoint, a config
  # without the new keys and with remat as a bool.
  shutil.rmtree(workdir / "checkpoints" / "4")
  saved = json.loads((workdir / "config.json").read_text())
  del saved["model"]["scan"], saved["model"]["attention"]
  saved["model"]["remat"] = False
  (workdir / "config.json").write_text(json.dumps(saved))
  final = train.train_and_evaluate(config, str(workdir))
  assert final["best_step"] == 4 and np.isfinite(final["loss"])

  config.model.scan = True
  with pytest.raises(ValueError, match=r"holds a run of another config \(model.scan: "):
    train.train_and_evaluate(config, str(workdir))
  with pytest.raises(
    ValueError,
    match=r"blocks unrolled, but config.model.scan=True: resume with "
    r"--config.model.scan=False",
  ):
    train.train_and_evaluate(config, str(workdir), allow_config_change=True)
