"""Gradient accumulation (`config.accum_steps`): N micro-batches against one large batch.

Exact for the losses that are means over examples (BEiT, SplitMask's inpainting,
fine-tuning's cross-entropy); SplitMask's InfoNCE match sees only the negatives
of its micro-batch. accum_steps = 1 is the plain step, bit for bit.
"""

import functools
import json

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
from splitmask_jax import tokenizers
from splitmask_jax import train
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import sharding

from helpers import FINETUNE_CONFIG_FILE
from helpers import load_config

BATCH = 16
# float32: 4 micro-batch gradients summed against one batch's reduction differ
# by rounding only (measured: at most 1e-7 on gradients up to 0.14; relative
# differences reach 1e-3 only on entries near zero, hence the absolute term).
RTOL, ATOL = 1e-5, 1e-6


def _pretrain_parts(arg, **loss_keys):
  """(config, loss_fn in the step's form, params, state with the codebook, batch)."""
  config = load_config(arg)
  config.loss.update(loss_keys)
  grid = config_base.grid_size(config)
  rng = np.random.default_rng(0)
  mask_fn = objectives.make_mask_fn(config, grid)
  masks = [mask_fn(rng) for _ in range(BATCH)]
  size, channels = config.model.image_size, config.model.num_channels
  batch = {k: np.stack([m[k] for m in masks]) for k in masks[0]}
  batch["image"] = rng.integers(0, 256, (BATCH, size, size, channels), dtype=np.uint8)
  model = objectives.build_model(config, grid)
  loss_fn = objectives.step_loss(objectives.build_loss_fn(config, model, grid))
  codebook = tokenizers.random_projection_codebook(
    jax.random.PRNGKey(1),
    config.tokenizer.vocab_size,
    tokenizers.codebook_dim(config.tokenizer.patch_size, config.model.num_channels),
  )
  example = objectives.example_inputs(config, masks[0])
  params = model.init(
    {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}, *example, train=False
  )
  state = train_step_lib.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=(), codebook=codebook
  )
  return config, loss_fn, params, state, batch


@functools.cache
def _jitted(loss_fn, accum_steps):
  return jax.jit(
    functools.partial(
      train_step_lib.accumulate_gradients, loss_fn, accum_steps=accum_steps, train=True
    )
  )


def _accumulate(loss_fn, params, state, batch, accum_steps, rng=jax.random.PRNGKey(7)):
  """((loss, metrics), grads) of `accum_steps` micro-batches, jitted once per loss."""
  return _jitted(loss_fn, accum_steps)(params, state, batch, rng)


def _micro(batch, i, accum_steps):
  """Micro-batch i as split_micro_batches lays it out: examples i, i + N, i + 2N, ..."""
  return jax.tree.map(lambda x: x[i::accum_steps], batch)


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_micro_batches_take_every_nth_example():
  x = np.arange(12 * 2).reshape(12, 2)
  micro = train_step_lib.split_micro_batches({"x": x}, 3)["x"]
  assert micro.shape == (3, 4, 2)
  for i in range(3):
    np.testing.assert_array_equal(micro[i], x[i::3])


def test_micro_batch_keys_are_folded_from_the_step_key():
  """Micro-batch i draws from fold_in(step key, i); the metrics are means."""

  def loss_fn(params, state, batch, rng, *, train):
    del state, train
    draw = jax.random.uniform(rng)
    loss = jnp.mean(batch["x"] * params["w"]) * draw
    return loss, {"loss": loss, "draw": draw}

  rng = jax.random.PRNGKey(3)
  params, batch = {"w": jnp.float32(2.0)}, {"x": jnp.arange(8, dtype=jnp.float32)}
  (_, metrics), _ = train_step_lib.accumulate_gradients(loss_fn, params, (), batch, rng, 4)
  draws = [jax.random.uniform(jax.random.fold_in(rng, i)) for i in range(4)]
  np.testing.assert_allclose(metrics["draw"], np.mean(draws), rtol=1e-6)
  (_, plain), _ = train_step_lib.accumulate_gradients(loss_fn, params, (), batch, rng, 1)
  assert plain["draw"] == jax.random.uniform(rng)  # accum_steps=1: the step key itself


@pytest.mark.parametrize("arg, loss_keys", [("beit,test", {}), ("test", {"match": False})])
def test_mean_over_examples_accumulates_to_the_full_batch_gradient(arg, loss_keys):
  """BEiT's loss and SplitMask's inpainting are means over the missing patches,
  the same count in every image: the mean of 4 micro-batch gradients is the
  gradient of the large batch."""
  _, loss_fn, params, state, batch = _pretrain_parts(arg, **loss_keys)
  (loss_1, metrics_1), grads_1 = _accumulate(loss_fn, params, state, batch, 1)
  (loss_4, metrics_4), grads_4 = _accumulate(loss_fn, params, state, batch, 4)
  np.testing.assert_allclose(loss_4, loss_1, rtol=RTOL)
  _assert_trees_close(metrics_4, metrics_1)
  _assert_trees_close(grads_4, grads_1)
  assert optax.tree.norm(grads_1) > 0


def test_splitmask_match_sees_only_its_micro_batch():
  """With the InfoNCE match on, inpainting still accumulates to the large batch's
  value, but the match is the mean of each micro-batch's own InfoNCE (B / N - 1
  negatives per image), not the large batch's (B - 1 negatives)."""
  accum = 4
  config, loss_fn, params, state, batch = _pretrain_parts("test")
  assert config.loss.inpaint and config.loss.match
  (_, full), full_grads = _accumulate(loss_fn, params, state, batch, 1)
  (_, acc), acc_grads = _accumulate(loss_fn, params, state, batch, accum)

  np.testing.assert_allclose(acc["inpaint_loss"], full["inpaint_loss"], rtol=RTOL)
  np.testing.assert_allclose(acc["inpaint_acc"], full["inpaint_acc"], rtol=RTOL)

  # Each micro-batch on its own (the loss alone, no gradient), with its own key.
  value = jax.jit(lambda b, rng: loss_fn(params, state, b, rng, train=True)[1]["match_loss"])
  rng = jax.random.PRNGKey(7)
  per_micro = [value(_micro(batch, i, accum), jax.random.fold_in(rng, i)) for i in range(accum)]
  np.testing.assert_allclose(acc["match_loss"], np.mean(per_micro), rtol=RTOL)
  np.testing.assert_allclose(
    acc["loss"], acc["inpaint_loss"] + config.loss.match_weight * acc["match_loss"], rtol=RTOL
  )
  # Fewer negatives: near-random features give InfoNCE ~ log(batch), log 4 against log 16.
  assert abs(float(acc["match_loss"]) - float(full["match_loss"])) > 0.5
  assert not np.allclose(
    jax.tree.leaves(acc_grads)[0], jax.tree.leaves(full_grads)[0], rtol=1e-3, atol=0
  )


def test_finetune_accumulated_gradient_equals_full_batch():
  """The fine-tuning cross-entropy is a mean over examples (mixing off: mixup and
  cutmix pair images and draw lam within each micro-batch)."""
  config = load_config("test", FINETUNE_CONFIG_FILE)
  config.model.drop_path = 0.0
  config.augment.mixup = config.augment.cutmix = 0.0
  num_classes = 10
  model = finetune.build_classifier(config, num_classes)
  params = finetune.classifier_init_fn(model, config)(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  size = config.model.image_size
  batch = {
    "image": rng.integers(0, 256, (BATCH, size, size, 1), dtype=np.uint8),
    "label": rng.integers(0, num_classes, (BATCH,), dtype=np.int32),
  }
  loss_fn = functools.partial(
    finetune.classification_loss, model=model, num_classes=num_classes, augment=config.augment
  )
  (loss_1, _), grads_1 = _accumulate(loss_fn, params, None, batch, 1)
  (loss_4, _), grads_4 = _accumulate(loss_fn, params, None, batch, 4)
  np.testing.assert_allclose(loss_4, loss_1, rtol=RTOL)
  _assert_trees_close(grads_4, grads_1)


def _pretrain_step_inputs(arg, mesh_config, drop_path):
  config, loss_fn, params, state, batch = _pretrain_parts(arg)
  config.model.drop_path = drop_path
  grid = config_base.grid_size(config)
  model = objectives.build_model(config, grid)
  loss_fn = objectives.step_loss(objectives.build_loss_fn(config, model, grid))
  schedule = optim.learning_rate_schedule(config.optim, config.batch_size, 10, 1.0)
  optimizer = optim.make_optimizer(config.optim, schedule)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_config))
  example = {k: v[0] for k, v in batch.items() if k != "image"}
  state = train_step_lib.init_train_state(
    model,
    optimizer,
    state.codebook,
    objectives.example_inputs(config, example),
    jax.random.PRNGKey(0),
    mesh,
  )
  return loss_fn, optimizer, schedule, mesh, state, batch


def _reference_step(loss_fn, optimizer, schedule, seed, mesh, state):
  """The train step as it was before accumulation existed, verbatim."""
  base_rng = jax.random.PRNGKey(seed)
  shardings = train_step_lib.state_shardings(state, mesh)

  def step(state, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, state, batch, rng, train=True)
    grads = jax.lax.with_sharding_constraint(grads, shardings.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(
    step,
    in_shardings=(shardings, sharding.batch_sharded(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


@pytest.mark.parametrize("arg", ["test", "beit,test"])
def test_one_accum_step_is_the_old_step_bit_for_bit(arg):
  """accum_steps=1 (the default) is the step as it was: the same program (keys,
  shardings and donation included), so resumed runs and old checkpoints see the
  same numbers."""
  loss_fn, optimizer, schedule, mesh, state, batch = _pretrain_step_inputs(
    arg, {"data": 8, "fsdp": 1}, drop_path=0.1
  )
  global_batch = sharding.global_batch(batch, mesh)
  reference = _reference_step(loss_fn, optimizer, schedule, 0, mesh, state)
  programs = [
    step.lower(state, global_batch).as_text()
    for step in (
      reference,
      train_step_lib.make_train_step(loss_fn, optimizer, schedule, 0, mesh, state),
      train_step_lib.make_train_step(loss_fn, optimizer, schedule, 0, mesh, state, 1),
    )
  ]
  assert programs[1] == programs[0] and programs[2] == programs[0]


@pytest.mark.slow
def test_sharded_accumulated_step_equals_one_device_and_moves_no_examples():
  """On 8 data-parallel devices the micro-batches (8 examples each) split without
  moving examples between devices, and the step equals the one-device step."""
  results = []
  for mesh_config in ({"data": 1, "fsdp": 1}, {"data": 8, "fsdp": 1}):
    loss_fn, optimizer, schedule, mesh, state, batch = _pretrain_step_inputs(
      "beit,test", mesh_config, drop_path=0.1
    )
    step = train_step_lib.make_train_step(loss_fn, optimizer, schedule, 0, mesh, state, 2)
    global_batch = sharding.global_batch(batch, mesh)
    compiled = step.lower(state, global_batch).compile()
    if mesh.devices.size > 1:
      hlo = compiled.as_text()
      # BEiT has no op across examples: only the gradients' all-reduce communicates.
      for op in ("all-to-all", "collective-permute", "all-gather"):
        assert op not in hlo, op
    state, metrics = compiled(state, global_batch)
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (metrics_1, params_1), (metrics_8, params_8) = results
  _assert_trees_close(metrics_8, metrics_1, rtol=1e-5, atol=1e-6)
  _assert_trees_close(params_8, params_1, rtol=1e-4, atol=1e-6)


def test_invalid_accum_steps_fail_before_any_work(tmp_path):
  config = load_config("test")
  config.accum_steps = 3  # does not divide batch_size=16
  with pytest.raises(ValueError, match=r"config\.accum_steps=3 is invalid: .*batch_size=16"):
    config_base.validate_config(config)
  config.accum_steps = 0
  with pytest.raises(ValueError, match=r"config\.accum_steps=0 is invalid"):
    config_base.validate_config(config)

  # 16 / 4 = 4 examples per micro-batch cannot split over 8 devices: refused
  # before the workdir is touched.
  config.accum_steps = 4
  config_base.validate_config(config)
  config.mesh.data = 8
  workdir = tmp_path / "run"
  with pytest.raises(
    ValueError, match=r"config\.batch_size=16 with config\.accum_steps=4 is invalid"
  ):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()

  ft = load_config("test", FINETUNE_CONFIG_FILE)
  ft.accum_steps = 5
  with pytest.raises(ValueError, match=r"config\.accum_steps=5 is invalid"):
    config_base.validate_config(ft)


def test_resume_compares_accum_steps_at_its_default():
  """A run saved before the key existed resumes at accum_steps=1, and not at 2."""
  config = load_config("test")
  saved = json.loads(config.to_json_best_effort())  # as config.json reads back
  del saved["accum_steps"]
  assert config_base.resume_conflicts(saved, config) == {}
  config.accum_steps = 2
  assert config_base.resume_conflicts(saved, config) == {"accum_steps": ("<absent: 1>", 2)}


@pytest.mark.slow
def test_train_and_evaluate_with_accumulation(fake_fashion_mnist, tmp_path):
  config = load_config("test")
  config.data.manual_dir = str(fake_fashion_mnist)
  config.data.data_dir = str(tmp_path / "tfds")
  # The step alone: no k-means codebook, no evaluation, no k-NN.
  config.update_from_flattened_dict(
    {
      "accum_steps": 2,
      "num_steps": 2,
      "log_every": 1,
      "eval_every": 100,
      "tokenizer.kind": "random_projection",
      "knn.enabled": False,
    }
  )
  train.train_and_evaluate(config, str(tmp_path / "run"))
  records = [r for r in metric_log.read_metrics(str(tmp_path / "run")) if "match_loss" in r]
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert np.isfinite([r["loss"], r["inpaint_loss"], r["match_loss"], r["grad_norm"]]).all()
    assert r["loss"] == pytest.approx(r["inpaint_loss"] + r["match_loss"], rel=1e-5)
