"""DINO (objectives/dino.py): its loss against a float64 NumPy reference, the teacher and
centre updates and their schedules, the multi-crop views, the train state through
accumulation, sharding and checkpoints, and a run through the CLI into fine-tuning."""

import re
import shutil
import subprocess
import sys
import types

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from safetensors import numpy as safetensors_numpy

from splitmask_jax import config_base
from splitmask_jax import export
from splitmask_jax import finetune
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import train
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.data import input_pipeline
from splitmask_jax.models import vit
from splitmask_jax.objectives import dino
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import sharding

from helpers import CONFIG_FILE
from helpers import FINETUNE_CONFIG_FILE
from helpers import ROOT
from helpers import load_config


def _config(**overrides):
  config = load_config("dino,test")
  config.update_from_flattened_dict(overrides)
  return config


def _logsumexp(x):
  top = np.max(x, axis=-1, keepdims=True)
  return top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))


def _reference_loss(student, teacher, centre, student_temp, teacher_temp):
  """DINOLoss.forward, float64, one (teacher crop, other student crop) pair at a time."""
  student, teacher = np.float64(student), np.float64(teacher)
  log_p = student / student_temp - _logsumexp(student / student_temp)
  t = (teacher - np.float64(centre)) / teacher_temp
  q = np.exp(t - _logsumexp(t))
  total, terms = 0.0, 0
  for i in range(teacher.shape[1]):
    for v in range(student.shape[1]):
      if v != i:
        total += np.mean(np.sum(-q[:, i] * log_p[:, v], axis=-1))
        terms += 1
  return total / terms


def test_cross_entropy_matches_numpy_reference():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(3, 4, 7)).astype(np.float32)  # 2 global + 2 local crops
  teacher = rng.normal(size=(3, 2, 7)).astype(np.float32)
  centre = rng.normal(size=(7,)).astype(np.float32)
  value, q = dino.cross_entropy(student, teacher, centre, student_temp=0.1, teacher_temp=0.05)
  expected = _reference_loss(student, teacher, centre, 0.1, 0.05)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(np.sum(q, axis=-1), 1.0, rtol=1e-6)


def _views_batch(config, num_images, seed=0):
  """Random images through the run's multi-crop: {'global', 'local'} uint8 arrays."""
  rng = np.random.default_rng(seed)
  views_fn = objectives.make_views_fn(config)
  images = rng.integers(0, 256, (num_images, 28, 28, 1), dtype=np.uint8)
  views = [views_fn(image, rng) for image in images]
  return {k: np.stack([v[k] for v in views]) for k in views[0]}


def _steps(config, parts, batch, mesh_config, accum_steps, start=None, num_steps=3):
  """`num_steps` train steps of `parts` on `batch`, its micro-batches `accum_steps`,
  from `start` (a host state; None: the initialisation): (the initial state, each
  step's state and loss on the host, the last state)."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_config))
  if start is None:
    state = train_step_lib.init_train_state(
      parts.model,
      parts.optimizer,
      jnp.zeros(train.codebook_shape(config)),
      parts.example_inputs,
      jax.random.PRNGKey(0),
      mesh,
      parts.step.init_objective_state,
    )
    start = jax.device_get(state)
  else:
    state = jax.device_put(start, train_step_lib.state_shardings(start, mesh))
  config = config.copy_and_resolve_references()
  config.accum_steps = accum_steps
  step = train.make_train_step(config, parts, mesh, state)
  states, losses = [], []
  for _ in range(num_steps):
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    states.append(jax.device_get(state))
    losses.append(float(metrics["loss"]))
  return types.SimpleNamespace(start=start, states=states, losses=losses, last=state)


@pytest.fixture(scope="module")
def steps():
  """Three steps of the test model on one device, on one batch of 16 images, at a
  learning rate of 1e-3 from the first step, and the head's outputs of each crop."""
  config = _config(**{"optim.base_lr": 0.016, "optim.warmup_epochs": 0.0})
  batch = _views_batch(config, 16)
  parts = train.build_training(config, total_steps=10, steps_per_epoch=5.0)
  head = jax.jit(lambda v, x: parts.model.apply(v, objectives.images_to_float(x), train=False))

  def heads(variables, crops):
    """float32 [B, n, K] of crops uint8 [B, n, h, w, C], one crop index at a time."""
    return np.stack([head(variables, crops[:, i]) for i in range(crops.shape[1])], axis=1)

  run = _steps(config, parts, batch, {"data": 1, "fsdp": 1}, 1)
  return types.SimpleNamespace(config=config, parts=parts, batch=batch, heads=heads, run=run)


def test_step_loss_compares_every_teacher_crop_with_the_other_crops(steps):
  """The second step's loss against the reference fed with each crop's head output
  computed on its own: the student's of the 4 crops, the teacher's (the EMA after
  step 1, other weights) of the 2 global ones, step 1's centre and temperature."""
  first, batch = steps.run.states[0], steps.batch
  student = np.concatenate(
    [steps.heads(first.params, batch["global"]), steps.heads(first.params, batch["local"])],
    axis=1,
  )
  teacher = steps.heads(first.objective_state["teacher"], batch["global"])
  # The temperature warms from 0.04 to 0.07 over 30% of the 10 steps: 0.05 at step 1.
  temperature = dino.teacher_temperature(steps.config, total_steps=10, steps_per_epoch=5.0)
  assert float(temperature(1)) == pytest.approx(0.05)
  expected = _reference_loss(student, teacher, first.objective_state["centre"], 0.1, 0.05)
  np.testing.assert_allclose(steps.run.losses[1], expected, rtol=1e-4)


def test_first_step_updates_the_centre_and_teacher(steps):
  """After one step the centre is a tenth of the teacher's mean output over the
  batch's global crops (from zero, momentum 0.9) and the teacher the EMA of its
  start (the initial student) and the updated student."""
  start, first = steps.run.start, steps.run.states[0]
  teacher_out = steps.heads(start.params, steps.batch["global"])
  np.testing.assert_allclose(
    first.objective_state["centre"], 0.1 * teacher_out.mean(axis=(0, 1)), rtol=1e-4, atol=1e-7
  )
  m = float(dino.teacher_momentum(steps.config, 10)(0))
  assert m == pytest.approx(0.99)  # the demo's momentum_teacher
  jax.tree.map(
    lambda t, s0, s1: np.testing.assert_allclose(t, m * s0 + (1 - m) * s1, rtol=1e-5, atol=1e-7),
    first.objective_state["teacher"],
    start.params,
    first.params,
  )


def test_steps_lower_the_loss(steps):
  assert steps.run.losses[2] < steps.run.losses[0]


@pytest.mark.slow
def test_sharded_and_accumulated_steps_equal_one_device(steps):
  """The same steps on a (data 2, fsdp 4) mesh with 2 micro-batches: the same losses,
  parameters, teacher and centre (the centre's batch mean is the whole batch's); the
  teacher is laid out like the parameters."""
  assert jax.device_count() >= 8, "conftest.py sets 8 fake CPU devices"
  one = steps.run
  sharded = _steps(steps.config, steps.parts, steps.batch, {"data": 2, "fsdp": 4}, 2, one.start)
  np.testing.assert_allclose(sharded.losses, one.losses, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    (sharded.states[-1].params, sharded.states[-1].objective_state),
    (one.states[-1].params, one.states[-1].objective_state),
  )
  kernel = sharded.last.params["params"]["encoder"]["block_0"]["attn"]["qkv"]["kernel"]
  teacher = sharded.last.objective_state["teacher"]["params"]["encoder"]["block_0"]["attn"]
  assert kernel.sharding.spec.count("fsdp") == 1
  assert teacher["qkv"]["kernel"].sharding == kernel.sharding


def test_teacher_and_centre_updates_by_hand():
  state = {"teacher": {"w": jnp.array([1.0, 2.0])}, "centre": jnp.array([0.5, -1.0])}
  params = {"w": jnp.array([3.0, 0.0])}
  stats = {"teacher_mean": jnp.array([1.5, 1.0])}
  new = dino.update_state(state, params, stats, 7, momentum=lambda step: 0.9, centre_momentum=0.8)
  np.testing.assert_allclose(new["teacher"]["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 0])
  np.testing.assert_allclose(new["centre"], [0.8 * 0.5 + 0.2 * 1.5, 0.8 * -1 + 0.2 * 1.0])


def test_schedules():
  config = _config(
    **{"dino.warmup_teacher_temp_epochs": 3.0, "dino.warmup_teacher_temp_fraction": None}
  )
  temp = dino.teacher_temperature(config, total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([temp(s) for s in (0, 15, 30, 50)], [0.04, 0.055, 0.07, 0.07])
  # A share of the run instead: the same updates whatever the epoch.
  config.dino.warmup_teacher_temp_fraction = 0.5
  for steps_per_epoch in (0.5, 10, 1000):
    temp = dino.teacher_temperature(config, total_steps=60, steps_per_epoch=steps_per_epoch)
    np.testing.assert_allclose([temp(s) for s in (0, 15, 30, 50)], [0.04, 0.055, 0.07, 0.07])
  config.dino.momentum_teacher = 0.996
  momentum = dino.teacher_momentum(config, total_steps=100)
  expected = [1 - 0.004 * (1 + np.cos(np.pi * s / 100)) / 2 for s in (0, 25, 50, 100)]
  np.testing.assert_allclose([momentum(s) for s in (0, 25, 50, 100)], expected, rtol=1e-6)
  np.testing.assert_allclose([momentum(0), momentum(50), momentum(100)], [0.996, 0.998, 1.0])
  config.optim.weight_decay, config.optim.weight_decay_end = 0.04, 0.4
  decay = optim.weight_decay_schedule(config.optim, total_steps=100)
  np.testing.assert_allclose([decay(0), decay(50), decay(100)], [0.04, 0.22, 0.4], rtol=1e-6)
  config.optim.weight_decay_end = None
  assert optim.weight_decay_schedule(config.optim, 100) == 0.04


def test_last_layer_is_held_still_for_the_first_updates():
  """No update at all (weight decay included) and no Adam moments while held."""
  params = {
    "params": {
      "head": {"last_layer": {"kernel": jnp.ones((2, 3))}, "fc1": {"kernel": jnp.ones((2, 2))}}
    }
  }
  config = _config(**{"optim.weight_decay": 0.1})
  optimizer = optim.hold_still(
    optim.make_optimizer(config.optim, optax.constant_schedule(0.1)), dino.last_layer_mask, 2
  )
  opt_state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(optimizer.update)
  history = []
  for _ in range(3):
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    history.append((params["params"]["head"], optax.tree_utils.tree_get(opt_state, "mu")))
  (held, held_mu), (free, _) = history[1], history[2]
  np.testing.assert_array_equal(held["last_layer"]["kernel"], 1.0)
  np.testing.assert_array_equal(held_mu["params"]["head"]["last_layer"]["kernel"], 0.0)
  assert np.all(free["last_layer"]["kernel"] < 1.0)
  assert np.all(history[0][0]["fc1"]["kernel"] < 1.0)


def test_encoder_resamples_position_embeddings_for_other_grids():
  """A 16 px local crop through the 32 px encoder is the 2x2-grid encoder with the
  position embeddings resampled as fine-tuning at another size resamples them."""
  arch, patch = vit.parse_variant("Test/8")
  big = vit.Encoder(**arch, patch_size=patch, grid=(4, 4), any_grid=True)
  small = vit.Encoder(**arch, patch_size=patch, grid=(2, 2))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  shapes = jax.eval_shape(lambda: big.init(jax.random.PRNGKey(0), images[:1], train=False))
  variables = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), shapes)
  encoder = variables["params"]
  resampled = dict(
    encoder, pos_embedding=vit.resample_pos_embedding(encoder["pos_embedding"], (2, 2))
  )
  tokens, _ = jax.jit(lambda v, x: big.apply(v, x, train=False))(variables, images)
  expected, _ = jax.jit(lambda v, x: small.apply(v, x, train=False))({"params": resampled}, images)
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="images must be"):
    small.apply({"params": resampled}, jnp.zeros((1, 32, 32, 1)), train=False)


def test_multi_crop_views_are_drawn_like_the_other_augmentations():
  """Shapes, and the same views again from the seed, from a restored iterator and,
  for evaluation, on every pass."""
  config = _config()
  views_fn = objectives.make_views_fn(config)
  rng = np.random.default_rng(0)
  source = [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)} for _ in range(12)]

  def stream():
    return iter(
      input_pipeline.pretrain_dataset(
        source, batch_size=4, image_size=32, mask_fn=None, views_fn=views_fn, seed=3
      )
    )

  first = stream()
  batch = next(first)
  assert set(batch) == {"global", "local"}
  assert batch["global"].shape == (4, 2, 32, 32, 1) and batch["global"].dtype == np.uint8
  assert batch["local"].shape == (4, 2, 16, 16, 1) and batch["local"].dtype == np.uint8
  assert not np.array_equal(batch["global"][:, 0], batch["global"][:, 1])
  position = first.get_state()
  following = next(first)
  resumed = stream()
  resumed.set_state(position)
  for key in batch:
    np.testing.assert_array_equal(next(stream())[key], batch[key])
  jax.tree.map(np.testing.assert_array_equal, next(resumed), following)

  def held_out():
    data = input_pipeline.eval_dataset(
      source, batch_size=8, image_size=32, views_fn=views_fn, with_labels=False, seed=3
    )
    return list(data)

  first_pass, second_pass = held_out(), held_out()
  assert set(first_pass[0]) == {"global", "local", "valid"}
  assert not first_pass[1]["valid"][4:].any()  # 12 records in batches of 8: padding
  jax.tree.map(np.testing.assert_array_equal, first_pass, second_pass)


@flax.struct.dataclass
class _TrainStateBeforeDINO:
  """The train state as it was before `objective_state`."""

  step: jax.Array
  params: object
  opt_state: object
  codebook: jax.Array


def test_checkpoint_of_the_earlier_state_format_restores(tmp_path):
  """A SplitMask checkpoint written before TrainState had `objective_state` restores
  into today's state, whose tree (None there) is the same."""
  params = {"params": {"encoder": {"kernel": jnp.arange(6.0).reshape(2, 3)}}}
  optimizer = optax.apply_if_finite(optax.adamw(1e-3), 0)
  old = _TrainStateBeforeDINO(
    step=jnp.int32(5), params=params, opt_state=optimizer.init(params), codebook=jnp.ones((4, 2))
  )
  data = iter(grain.MapDataset.range(10).to_iter_dataset())
  checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=2)
  checkpointer.save(5, old, data)
  checkpointer.wait()
  blank = jax.tree.map(jnp.zeros_like, old)
  like = train_step_lib.TrainState(
    step=blank.step, params=blank.params, opt_state=blank.opt_state, codebook=blank.codebook
  )
  restored, step = checkpointer.restore_latest(like, data)
  # And today's state of an objective without one writes the same tree.
  checkpointer.save(6, restored, data)
  checkpointer.wait()
  assert checkpointer.saved_names(6, ()) == checkpointer.saved_names(5, ())
  assert checkpointer.saved_names(6, ()) == {"step", "params", "opt_state", "codebook"}
  checkpointer.close()
  assert step == 5 and restored.objective_state is None
  jax.tree.map(
    np.testing.assert_array_equal,
    (restored.step, restored.params, restored.opt_state, restored.codebook),
    (old.step, old.params, old.opt_state, old.codebook),
  )


def _cli(workdir, fake_dir, data_dir):
  """`python -m splitmask_jax.main --config=configs/fashion_mnist.py:dino,test` on one
  device (4 steps, saved at 2 and 4, evaluated at 4, k-NN at the end)."""
  command = [
    sys.executable,
    "-m",
    "splitmask_jax.main",
    f"--config={CONFIG_FILE}:dino,test",
    f"--workdir={workdir}",
    f"--config.data.manual_dir={fake_dir}",
    f"--config.data.data_dir={data_dir}",
    "--config.mesh.data=1",
  ]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def dino_run(fake_fashion_mnist, tmp_path_factory):
  """A run of `_cli`: (its workdir, its TFDS data_dir)."""
  tmp = tmp_path_factory.mktemp("dino")
  _cli(tmp / "run", fake_fashion_mnist, tmp / "tfds")
  return tmp / "run", tmp / "tfds"


def test_cli_end_to_end_with_knn(dino_run):
  workdir, *_ = dino_run
  records = metric_log.read_metrics(str(workdir))
  steps = [r for r in records if "teacher_entropy" in r and "loss" in r]
  assert [r["step"] for r in steps] == [2, 4]
  assert all(np.isfinite([r["loss"], r["teacher_entropy"], r["grad_norm"]]).all() for r in steps)
  assert any(np.isfinite(r.get("val_loss", np.nan)) for r in records)
  [final] = [r for r in records if "knn_top1" in r]
  assert 0.0 <= final["knn_top1"] <= 1.0 and 0.0 <= final["knn_top1_random_init"] <= 1.0
  saved, _ = checkpointing.load_arrays(str(workdir), ("objective_state",))
  assert saved["objective_state"]["centre"].shape == (64,)
  assert (workdir / "best_checkpoint").is_dir()


def test_resumed_run_ends_like_an_unbroken_one(dino_run, fake_fashion_mnist, tmp_path):
  """The CLI run interrupted after its step-2 checkpoint (its workdir without step 4)
  and run again ends with the unbroken run's parameters, teacher and centre, bit
  for bit: the checkpoint holds them and the input pipeline's position."""
  unbroken, data_dir = dino_run
  workdir = tmp_path / "run"
  shutil.copytree(unbroken, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  _cli(workdir, fake_fashion_mnist, data_dir)
  names = ("params", "objective_state")
  expected, _ = checkpointing.load_arrays(str(unbroken), names, step=4)
  resumed, _ = checkpointing.load_arrays(str(workdir), names, step=4)
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)
  steps = [r["step"] for r in metric_log.read_metrics(str(workdir)) if "teacher_entropy" in r]
  assert steps == [2, 4]  # step 4 logged again, once


def test_finetuning_loads_the_teacher_encoder(dino_run):
  """DINO is judged by its EMA teacher: fine-tuning (and probing) start from it."""
  workdir, data_dir = dino_run
  config = load_config("test", FINETUNE_CONFIG_FILE)
  config.init.workdir = str(workdir)
  config.data.data_dir = str(data_dir)
  pretrained = finetune.check_init_run(config)
  model = finetune.build_classifier(config, num_classes=10)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}))
  state = finetune.init_classifier_state(
    finetune.classifier_init_fn(model, config),
    optax.sgd(0.1),
    jax.random.PRNGKey(0),
    mesh,
    pretrained,
  )
  saved, _ = checkpointing.load_arrays(str(workdir), ("params", "objective_state"))
  student = saved["params"]["params"]["encoder"]
  teacher = saved["objective_state"]["teacher"]["params"]["encoder"]
  encoder = jax.device_get(state.params["params"]["encoder"])
  jax.tree.map(np.testing.assert_array_equal, encoder, teacher)
  assert not np.array_equal(
    encoder["block_0"]["fc1"]["kernel"], student["block_0"]["fc1"]["kernel"]
  )


def test_export_writes_the_teacher_encoder(dino_run, tmp_path):
  workdir, *_ = dino_run
  paths = export.export(str(workdir), str(tmp_path / "timm"))
  weights = safetensors_numpy.load_file(paths["weights"])
  saved, _ = checkpointing.load_arrays(str(workdir), ("objective_state",))
  teacher = saved["objective_state"]["teacher"]["params"]["encoder"]
  np.testing.assert_array_equal(weights["pos_embed"], teacher["pos_embedding"])
  np.testing.assert_array_equal(
    weights["blocks.0.mlp.fc1.weight"], teacher["block_0"]["fc1"]["kernel"].T
  )
  assert not any(name.startswith("head") for name in weights)


def test_knn_and_downstream_runs_read_the_teacher():
  params, state = {"params": {"w": 1}}, {"teacher": {"params": {"w": 2}}, "centre": 0}
  dino = ml_collections.ConfigDict({"task": "pretrain", "objective": "dino"})
  assert objectives.evaluated_params(dino, params, state) is state["teacher"]
  assert objectives.evaluated_state_key({"objective": "dino"}) == "teacher"  # older config.json
  for other in ({"task": "pretrain", "objective": "splitmask"}, {"task": "finetune"}):
    assert objectives.evaluated_params(other, params, None) is params


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("dino.local_crop_size", 12, "it must be a positive multiple of the patch size 8"),
    ("dino.global_crop_scale", (0.5, 0.4), "it needs 0 < min <= max <= 1"),
    ("dino.teacher_temp", 0.0, "it must be positive"),
    ("dino.centre_momentum", 1.0, r"it must lie in \[0, 1\)"),
    ("dino.freeze_last_layer_fraction", 1.5, r"it must lie in \[0, 1\] \(or None"),
    ("augment.solarize_prob", 0.2, "DINO's views have their own augmentations"),
    ("optim.weight_decay_end", -0.1, "it must be >= 0"),
  ],
)
def test_bad_values_fail_naming_the_key(key, value, message):
  config = _config(**{key: value})
  with pytest.raises(ValueError, match=rf"config\.{re.escape(key)}=.* is invalid: {message}"):
    config_base.validate_config(config)
