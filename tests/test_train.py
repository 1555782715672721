"""The training loop: end to end through the CLI, resume, and sharded == single device."""

import jax
import ml_collections
import numpy as np
import pytest

from splitmask_jax import config_base
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import tokenizers
from splitmask_jax import train
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import sharding

import helpers
from helpers import load_config


def _test_config(fake_dir, data_dir, **overrides):
  config = load_config("test")
  config.data.manual_dir = str(fake_dir)
  config.data.data_dir = str(data_dir)
  config.update_from_flattened_dict(overrides)
  return config


def test_cli_end_to_end(cli_run):
  """`python -m splitmask_jax.main` prepares the data, trains, evaluates, writes."""
  _, workdir = cli_run
  records = metric_log.read_metrics(str(workdir))
  train_records = [r for r in records if "inpaint_loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6]
  for r in train_records:
    assert np.isfinite([r["loss"], r["inpaint_loss"], r["match_loss"]]).all()
    assert r["loss"] == pytest.approx(r["inpaint_loss"] + r["match_loss"], rel=1e-5)
  assert any("val_loss" in r for r in records)
  final = [r for r in records if any("knn" in k for k in r)]
  assert len(final) == 1
  assert 0.0 <= final[0]["knn_top1"] <= 1.0
  assert 0.0 <= final[0]["knn_top1_random_init"] <= 1.0
  assert (workdir / "config.json").exists()
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard file"
  assert (workdir / "checkpoints" / "6").is_dir()


def test_beit_runs(fake_fashion_mnist, tmp_path):
  config = load_config("beit,test")
  config.data.manual_dir = str(fake_fashion_mnist)
  config.data.data_dir = str(tmp_path / "tfds")
  config.knn.enabled = False
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(final["loss"]) and final["loss"] == final["inpaint_loss"]
  assert "match_loss" not in final
  # Before any training, the loss of a V-way classifier is near log(V).
  first = next(r for r in metric_log.read_metrics(str(tmp_path / "run")) if "loss" in r)
  assert abs(first["loss"] - np.log(config.tokenizer.vocab_size)) < 1.0


@pytest.mark.slow
def test_resume_matches_unbroken_run(fake_fashion_mnist, tmp_path, monkeypatch):
  """A run that dies after its step-4 checkpoint and restarts logs the same losses."""

  def config():
    return _test_config(
      fake_fashion_mnist,
      tmp_path / "tfds",
      num_steps=8,
      log_every=1,
      checkpoint_every=2,
      eval_every=100,
      **{"knn.enabled": False},
    )

  train.train_and_evaluate(config(), str(tmp_path / "unbroken"))
  expected = {
    r["step"]: r for r in metric_log.read_metrics(str(tmp_path / "unbroken")) if "loss" in r
  }

  helpers.crash_after_saving(monkeypatch, 4)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(config(), str(tmp_path / "broken"))
  monkeypatch.undo()
  train.train_and_evaluate(config(), str(tmp_path / "broken"))

  resumed = [r for r in metric_log.read_metrics(str(tmp_path / "broken")) if "loss" in r]
  assert [r["step"] for r in resumed] == list(range(1, 9))  # no step logged twice
  for r in resumed:
    for key in ("loss", "inpaint_loss", "match_loss", "grad_norm"):
      assert r[key] == expected[r["step"]][key], (r["step"], key)


def _random_batch(config, grid, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  mask_fn = objectives.make_mask_fn(config, grid)
  masks = [mask_fn(rng) for _ in range(batch_size)]
  size, channels = config.model.image_size, config.model.num_channels
  batch = {k: np.stack([m[k] for m in masks]) for k in masks[0]}
  batch["image"] = rng.integers(0, 256, (batch_size, size, size, channels), dtype=np.uint8)
  return batch, masks[0]


@pytest.mark.slow
@pytest.mark.parametrize("arg, data, fsdp", [("test", 8, 1), ("beit,test", 8, 1), ("test", 2, 4)])
def test_sharded_steps_equal_one_device(arg, data, fsdp):
  """The same two steps on one device and on a (data, fsdp) mesh of 8 devices agree."""
  assert jax.device_count() >= 8, "conftest.py sets 8 fake CPU devices"
  config = load_config(arg)
  config.model.drop_path = 0.1  # exercise the per-sample randomness too
  grid = config_base.grid_size(config)
  batch, example = _random_batch(config, grid, batch_size=16)
  model = objectives.build_model(config, grid)
  loss_fn = objectives.build_loss_fn(config, model, grid)
  schedule = optim.learning_rate_schedule(config.optim, config.batch_size, 10, 1.0)
  optimizer = optim.make_optimizer(config.optim, schedule)
  codebook = tokenizers.random_projection_codebook(
    jax.random.PRNGKey(1),
    config.tokenizer.vocab_size,
    tokenizers.codebook_dim(config.tokenizer.patch_size, config.model.num_channels),
  )

  results = []
  for mesh_config in (
    ml_collections.ConfigDict({"data": 1, "fsdp": 1}),
    ml_collections.ConfigDict({"data": data, "fsdp": fsdp}),
  ):
    mesh = sharding.make_mesh(mesh_config)
    state = train_step_lib.init_train_state(
      model,
      optimizer,
      codebook,
      objectives.example_inputs(config, example),
      jax.random.PRNGKey(0),
      mesh,
    )
    step = train_step_lib.make_train_step(
      objectives.step_loss(loss_fn), optimizer, schedule, 0, mesh, state
    )
    losses = []
    for _ in range(2):
      global_batch = sharding.global_batch(batch, mesh)
      assert len(global_batch["image"].sharding.device_set) == mesh.devices.size
      state, metrics = step(state, global_batch)
      losses.append(float(metrics["loss"]))
    results.append((losses, state))

  (losses_1, state_1), (losses_n, state_n) = results
  np.testing.assert_allclose(losses_n, losses_1, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    jax.device_get(state_n.params),
    jax.device_get(state_1.params),
  )
  if fsdp > 1:
    # After the update, a kernel, its AdamW moments and the codebook still hold
    # 1/fsdp of their elements per device.
    kernel = state_n.params["params"]["encoder"]["block_0"]["attn"]["qkv"]["kernel"]
    moments = [x for x in jax.tree.leaves(state_n.opt_state) if x.shape == kernel.shape]
    assert len(moments) >= 2
    for x in [kernel, state_n.codebook] + moments:
      assert x.sharding.spec.count("fsdp") == 1
      assert x.addressable_shards[0].data.size == x.size // fsdp
