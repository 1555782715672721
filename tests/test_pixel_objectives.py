"""The pixel baselines MAE and SimMIM: losses against float64 NumPy, SimMIM's square
masks, learning, resume, sharding, pictures, fine-tuning's loading, and the CLI."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from splitmask_jax import config_base
from splitmask_jax import finetune
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import train
from splitmask_jax import train_step as train_step_lib
from splitmask_jax import visualize
from splitmask_jax.objectives import pixels
from splitmask_jax.objectives import simmim
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import sharding

import helpers
from helpers import CONFIG_FILE
from helpers import FINETUNE_CONFIG_FILE
from helpers import ROOT
from helpers import load_config

PIXEL_OBJECTIVES = ("mae", "simmim")


def _batch(config, batch_size, seed=0):
  """Random uint8 images with the objective's masks, and one example's masks."""
  grid = config_base.grid_size(config)
  rng = np.random.default_rng(seed)
  mask_fn = objectives.make_mask_fn(config, grid)
  masks = [mask_fn(rng) for _ in range(batch_size)]
  size, channels = config.model.image_size, config.model.num_channels
  batch = {k: np.stack([m[k] for m in masks]) for k in masks[0]}
  batch["image"] = rng.integers(0, 256, (batch_size, size, size, channels), dtype=np.uint8)
  return batch, masks[0]


@functools.cache
def _tiny(objective):
  """The `<objective>,test` model and its initial variables, built once per module
  (compiling the initialisation is most of a small test's time)."""
  config = load_config(f"{objective},test")
  _, example = _batch(config, 1)
  model = objectives.build_model(config, config_base.grid_size(config))
  inputs = objectives.example_inputs(config, example)
  init = jax.jit(lambda key: model.init(key, *inputs, train=False))
  return model, jax.device_get(init(jax.random.PRNGKey(0)))


def _loss(config, model, params, batch):
  """The objective's loss in evaluation mode, jitted (op by op is slower to run)."""
  loss_fn = objectives.build_loss_fn(config, model, config_base.grid_size(config))
  return jax.jit(lambda p, b: loss_fn(p, b, None, jax.random.PRNGKey(0), train=False))(
    params, batch
  )


def _patches_f64(images, patch):
  """uint8 [B, H, W, C] -> float64 [B, N, patch * patch * C] in [-1, 1], row-major."""
  x = images.astype(np.float64) / 127.5 - 1.0
  b, h, w, c = x.shape
  rows, cols = h // patch, w // patch
  out = np.empty((b, rows * cols, patch * patch * c))
  for r in range(rows):
    for q in range(cols):
      out[:, r * cols + q] = x[:, r * patch : (r + 1) * patch, q * patch : (q + 1) * patch].reshape(
        b, -1
      )
  return out


def _predictions(config, model, params, batch):
  keys = objectives.get(config.objective).MODEL_INPUTS
  apply = jax.jit(
    lambda p, b: model.apply(
      p, objectives.images_to_float(b["image"]), *(b[k] for k in keys), train=False
    )["pixels"]
  )
  return np.asarray(apply(params, batch), np.float64)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_matches_numpy(norm_pix_loss):
  config = load_config("mae,test")
  config.mae.norm_pix_loss = norm_pix_loss
  batch, _ = _batch(config, 3)
  masked = batch["masked"]
  assert masked.shape == (3, 12) and batch["visible"].shape == (3, 4)
  # A flat masked patch: its variance is 0, so only the epsilon keeps the target finite.
  r, q = divmod(int(masked[0, 0]), 4)
  batch["image"][0, 8 * r : 8 * r + 8, 8 * q : 8 * q + 8] = 200
  model, params = _tiny(config.objective)
  value, metrics = _loss(config, model, params, batch)

  predicted = _predictions(config, model, params, batch)
  target = np.take_along_axis(_patches_f64(batch["image"], 8), masked[..., None], axis=1)
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = ((target - mean) ** 2).sum(-1, keepdims=True) / (target.shape[-1] - 1)
    target = (target - mean) / np.sqrt(var + 1e-6)
    assert np.abs(target[0, 0]).max() < 1e-9
  expected = np.mean(np.mean((predicted - target) ** 2, axis=-1))
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  assert metrics == {"loss": value}


def test_simmim_loss_matches_numpy():
  config = load_config("simmim,test")
  batch, _ = _batch(config, 3)
  model, params = _tiny(config.objective)
  value, _ = _loss(config, model, params, batch)

  # SimMIM's form: an L1 map over every pixel, averaged where the mask is set.
  predicted = _predictions(config, model, params, batch)
  full = np.zeros((3, 16, 64))
  np.put_along_axis(full, batch["masked"][..., None], predicted, axis=1)
  errors = np.abs(full - _patches_f64(batch["image"], 8))
  weights = np.broadcast_to(batch["mask"][..., None], errors.shape)
  expected = (errors * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_pixel_normalisation_inverts():
  patches = np.random.default_rng(0).uniform(-1, 1, (2, 5, 64)).astype(np.float32)
  back = pixels.denormalize_patches(pixels.normalize_patches(patches), patches)
  np.testing.assert_allclose(back, patches, atol=1e-5)


def test_mae_mask_splits_the_patches():
  config = load_config("mae,test")
  mask_fn = objectives.make_mask_fn(config, (4, 4))
  rng = np.random.default_rng(0)
  seen = np.zeros(16)
  for _ in range(200):
    m = mask_fn(rng)
    assert len(m["visible"]) == 4 and len(m["masked"]) == 12
    np.testing.assert_array_equal(np.sort(np.concatenate([m["visible"], m["masked"]])), range(16))
    seen[m["visible"]] += 1
  assert seen.min() > 0  # uniform: every patch is seen sometimes


def test_simmim_masks_whole_squares_at_the_exact_ratio():
  # 64 px images of 8 px patches with 16 px squares: a 4x4 grid of 2x2-patch squares.
  config = load_config("simmim,test")
  config.model.image_size = 64
  grid = config_base.grid_size(config)
  assert simmim.mask_squares(config) == (2, 10)  # ceil(0.6 * 16)
  mask_fn = objectives.make_mask_fn(config, grid)
  rng = np.random.default_rng(0)
  counts = np.zeros((4, 4))
  for _ in range(300):
    m = mask_fn(rng)
    cells = m["mask"].reshape(4, 2, 4, 2)
    squares = cells[:, 0, :, 0]
    assert (cells == squares[:, None, :, None]).all(), "a square is partly masked"
    assert squares.sum() == 10 and m["mask"].sum() == 40
    np.testing.assert_array_equal(m["masked"], np.flatnonzero(m["mask"]))
    counts += squares
  # Uniform over the squares: each is masked 10 / 16 of the time.
  assert np.abs(counts / 300 - 10 / 16).max() < 0.12


@pytest.mark.parametrize(
  "key, value, named",
  [
    ("simmim.mask_patch_size", 12, "simmim.mask_patch_size"),
    ("simmim.mask_patch_size", 64, "simmim.mask_patch_size"),
    ("masking.kind", "block", "masking.kind"),
    ("masking.ratio", 0.9, "masking.ratio"),  # ceil(0.9 * 4) masks every square
  ],
)
def test_bad_simmim_config_fails_naming_the_key(key, value, named):
  config = load_config("simmim,test")
  config.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError, match=f"config.{named}="):
    config_base.validate_config(config)


@pytest.mark.parametrize("arg", ["mae", "simmim", "mae,test", "simmim,test"])
def test_demo_configs_validate(arg):
  config = load_config(arg)
  config_base.validate_config(config)
  assert config.objective == arg.split(",")[0] and config.masking.kind == "uniform"
  assert objectives.mask_ratio(config) == (0.75 if config.objective == "mae" else 0.6)
  assert objectives.get(config.objective).USES_TOKENIZER is False


def test_bad_mae_config_fails_naming_the_key():
  config = load_config("mae,test")
  config.mae.decoder_num_heads = 3
  with pytest.raises(ValueError, match="config.mae.decoder_width=32"):
    config_base.validate_config(config)


@pytest.mark.parametrize("objective", PIXEL_OBJECTIVES)
def test_a_few_steps_lower_the_loss(objective):
  config = load_config(f"{objective},test")
  batch, _ = _batch(config, 8)
  # Smooth images (bright bands on dark), which a few steps can learn to fill in.
  rows = np.arange(32)[None, :, None, None]
  batch["image"] = np.where(np.abs(rows - 4 * np.arange(8)[:, None, None, None]) < 4, 220, 30)
  batch["image"] = batch["image"].repeat(32, axis=2).astype(np.uint8)
  model, params = _tiny(config.objective)
  loss_fn = objectives.build_loss_fn(config, model, config_base.grid_size(config))
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    (value, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch, None, jax.random.PRNGKey(0), train=True
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  values = []
  for _ in range(15):
    params, opt_state, value = step(params, opt_state)
    values.append(float(value))
  assert values[-1] < 0.7 * values[0], values


@pytest.mark.slow
def test_sharded_steps_equal_one_device():
  """As test_train's test of the same name, for MAE (its decoder's parameters split
  over fsdp too): two steps on one device and on a (2, 4) mesh agree. SimMIM's model
  is BEiT's encoder and a dense head, whose sharding test_train covers."""
  assert jax.device_count() >= 8, "conftest.py sets 8 fake CPU devices"
  config = load_config("mae,test")
  config.model.drop_path = 0.1
  grid = config_base.grid_size(config)
  batch, example = _batch(config, 16)
  model = objectives.build_model(config, grid)
  loss_fn = objectives.step_loss(objectives.build_loss_fn(config, model, grid))
  schedule = optim.learning_rate_schedule(config.optim, config.batch_size, 10, 1.0)
  optimizer = optim.make_optimizer(config.optim, schedule)
  codebook = jnp.zeros(train.codebook_shape(config), jnp.float32)
  results = []
  for mesh_config in ({"data": 1, "fsdp": 1}, {"data": 2, "fsdp": 4}):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_config))
    state = train_step_lib.init_train_state(
      model,
      optimizer,
      codebook,
      objectives.example_inputs(config, example),
      jax.random.PRNGKey(0),
      mesh,
    )
    step = train_step_lib.make_train_step(loss_fn, optimizer, schedule, 0, mesh, state)
    losses = []
    for _ in range(2):
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state.params)))
  (losses_1, params_1), (losses_n, params_n) = results
  np.testing.assert_allclose(losses_n, losses_1, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_n, params_1
  )


@pytest.mark.parametrize("objective", PIXEL_OBJECTIVES)
def test_reconstructions_paint_predicted_pixels(objective):
  config = load_config(f"{objective},test")
  grid = config_base.grid_size(config)
  batch, _ = _batch(config, 2, seed=3)
  model, params = _tiny(config.objective)
  norm_pix_loss = config.mae.norm_pix_loss and objective == "mae"
  out = jax.jit(
    lambda p, b: visualize.reconstructions(
      model, p, None, b, grid=grid, token_patch=8, norm_pix_loss=norm_pix_loss
    )
  )(params, batch)
  name = "MAE" if objective == "mae" else "SimMIM"
  # (jit returns the columns in key order, not display order)
  assert set(out) == {"original", f"{name} sees", f"{name} predicts"}

  predicted = _predictions(config, model, params, batch)
  true = np.take_along_axis(_patches_f64(batch["image"], 8), batch["masked"][..., None], axis=1)
  if objective == "mae":  # normalised pixels, drawn with the true patch's statistics
    mean = true.mean(-1, keepdims=True)
    std = np.sqrt(((true - mean) ** 2).sum(-1, keepdims=True) / 63 + 1e-6)
    predicted = predicted * std + mean
  expected_tiles = np.round(np.clip((predicted + 1) * 127.5, 0, 255))
  shown = _patches_f64(np.asarray(out[f"{name} predicts"]), 8)
  seen = _patches_f64(np.asarray(out[f"{name} sees"]), 8)
  original = _patches_f64(batch["image"], 8)
  for i in range(2):
    hidden = set(batch["masked"][i].tolist())
    for k in range(16):
      if k in hidden:
        j = batch["masked"][i].tolist().index(k)
        # Back to uint8 levels; rounding at the half may differ by one level.
        levels = np.round((shown[i, k] + 1) * 127.5)
        assert np.abs(levels - expected_tiles[i, j]).max() <= 1, (i, k)
        assert np.all(seen[i, k] == visualize.HIDDEN / 127.5 - 1), (i, k)
      else:
        np.testing.assert_array_equal(shown[i, k], original[i, k])
        np.testing.assert_array_equal(seen[i, k], original[i, k])


@pytest.mark.parametrize("objective", PIXEL_OBJECTIVES)
def test_finetuning_loads_the_encoder(objective):
  _, pretrained = _tiny(objective)
  assert ("mask_token" in pretrained["params"]["encoder"]) == (objective == "simmim")
  classifier = finetune.build_classifier(load_config("test", FINETUNE_CONFIG_FILE), 10)
  variables = jax.device_get(
    classifier.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 1)), train=False)
  )
  loaded = finetune.load_pretrained_encoder(variables, pretrained)
  flat = jax.tree_util.tree_flatten_with_path(loaded["params"]["encoder"])[0]
  for path, leaf in flat:
    source = pretrained["params"]["encoder"]
    for key in path:
      source = source[key.key]
    np.testing.assert_array_equal(leaf, source, err_msg=str(path))


@pytest.fixture(scope="module", params=PIXEL_OBJECTIVES)
def cli_run(request, fake_fashion_mnist, tmp_path_factory):
  """`python -m splitmask_jax.main --config=configs/fashion_mnist.py:<objective>,test`
  (4 steps, k-NN at the end) on fake Fashion-MNIST: (objective, the finished process,
  its workdir, the TFDS data_dir it prepared)."""
  objective = request.param
  tmp = tmp_path_factory.mktemp(f"cli_{objective}")
  command = [
    sys.executable,
    "-m",
    "splitmask_jax.main",
    f"--config={CONFIG_FILE}:{objective},test",
    f"--workdir={tmp / 'run'}",
    f"--config.data.manual_dir={fake_fashion_mnist}",
    f"--config.data.data_dir={tmp / 'tfds'}",
    # One device compiles faster than conftest's eight; test_train covers the mesh.
    "--config.mesh.data=1",
  ]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return objective, result, tmp / "run", tmp / "tfds"


def test_cli_end_to_end(cli_run):
  """The CLI trains, evaluates with k-NN and writes its outputs, fitting no codebook."""
  _, result, workdir, _ = cli_run
  output = result.stdout + result.stderr
  assert "No codebook" in output and "Tokenizer patches" not in output
  records = metric_log.read_metrics(str(workdir))
  assert [r["step"] for r in records if "loss" in r] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert any("val_loss" in r for r in records)
  final = [r for r in records if "knn_top1" in r]
  assert len(final) == 1 and 0.0 <= final[0]["knn_top1"] <= 1.0
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard file"
  arrays, _ = checkpointing.load_arrays(str(workdir), ("codebook",))
  assert arrays["codebook"].shape == (64, 64) and not np.any(arrays["codebook"])


# MAE's only: resuming restores the same TrainState and input-pipeline state for every
# objective, and each run pair costs tens of seconds of compiling.
@pytest.mark.parametrize("cli_run", ["mae"], indirect=True)
def test_resume_ends_with_the_unbroken_parameters(
  cli_run, fake_fashion_mnist, tmp_path, monkeypatch
):
  """A run that dies after its step-2 checkpoint and restarts ends with the parameters
  of the unbroken CLI run, bit for bit (the same config but for keys that change
  nothing it computes: no k-NN, evaluation or pictures)."""
  objective, _, unbroken, data_dir = cli_run

  def config():
    c = load_config(f"{objective},test")
    c.data.manual_dir = str(fake_fashion_mnist)
    c.data.data_dir = str(data_dir)
    c.mesh.data = 1
    c.knn.enabled = False
    c.eval_every = 100
    c.summary_images = 0
    return c

  def no_codebook(*args, **kwargs):
    raise AssertionError("a pixel objective built a codebook")

  monkeypatch.setattr(train, "build_codebook", no_codebook)
  with monkeypatch.context() as crash:
    helpers.crash_after_saving(crash, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
      train.train_and_evaluate(config(), str(tmp_path / "broken"))
  train.train_and_evaluate(config(), str(tmp_path / "broken"))

  expected, step = checkpointing.load_arrays(str(unbroken), ("params",))
  resumed, resumed_step = checkpointing.load_arrays(str(tmp_path / "broken"), ("params",))
  assert step == resumed_step == 4
  jax.tree.map(np.testing.assert_array_equal, resumed["params"], expected["params"])
  losses = {r["step"]: r["loss"] for r in metric_log.read_metrics(str(unbroken)) if "loss" in r}
  records = [r for r in metric_log.read_metrics(str(tmp_path / "broken")) if "loss" in r]
  assert {r["step"]: r["loss"] for r in records} == losses
