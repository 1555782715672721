"""SplitMask's open choices (config.loss.inpaint_targets, loss.negatives,
loss.scale_by_temperature, model.projector): each against an independent reference,
the defaults as the paper's reading, bad values named before any work."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from splitmask_jax import config_base
from splitmask_jax import finetune
from splitmask_jax import losses
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import tokenizers
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.objectives import splitmask
from splitmask_jax.objectives import targets
from splitmask_jax.runtime import sharding

from helpers import FINETUNE_CONFIG_FILE
from helpers import load_config

BATCH = 16
ALL_ON = {
  "loss.inpaint_targets": "other_visible",
  "loss.negatives": "both_branches",
  "loss.scale_by_temperature": True,
  "model.projector": "mlp",
  "model.projector_hidden_dim": 48,
  "model.projector_dim": 24,
  "masking.kind": "uniform",
  "masking.ratio": 0.75,
}


# InfoNCE: a float64 NumPy reference, one anchor at a time.


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_log_sum_exp(values):
  top = max(values)
  return top + np.log(sum(np.exp(v - top) for v in values))


def _np_info_nce(za, zb, tau, negatives, scale):
  """(loss, accuracy) in float64, written per anchor: for each image in each
  branch, its other view against the negatives the variant gives it."""
  za = np.asarray(za, np.float64)
  zb = np.asarray(zb, np.float64)
  za = za / np.linalg.norm(za, axis=1, keepdims=True)
  zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
  b = len(za)
  terms, hits = [], []
  for anchors, others in ((za, zb), (zb, za)):
    for i in range(b):
      positive = anchors[i] @ others[i] / tau
      candidates = [others[j] @ anchors[i] / tau for j in range(b) if j != i]
      if negatives == "both_branches":
        candidates += [anchors[j] @ anchors[i] / tau for j in range(b) if j != i]
      terms.append(_np_log_sum_exp([positive] + candidates) - positive)
      hits.append(all(positive > c for c in candidates))
  loss = np.mean(terms) * (2 * tau if scale else 1.0)
  return loss, np.mean(hits)


# Compiled, one program a call: quicker than running its operations one by one.
_info_nce = jax.jit(
  losses.symmetric_info_nce, static_argnames=("temperature", "negatives", "scale_by_temperature")
)


def _features(batch, dim, seed):
  rng = np.random.default_rng(seed)
  za = rng.normal(size=(batch, dim))
  return za, za + 0.8 * rng.normal(size=(batch, dim))


@pytest.mark.parametrize("negatives", losses.NEGATIVES)
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("batch, dim, tau", [(2, 3, 0.2), (5, 7, 0.3), (8, 16, 0.1)])
def test_info_nce_variants_match_numpy(negatives, scale, batch, dim, tau):
  za, zb = _features(batch, dim, batch * dim)
  loss, metrics = _info_nce(
    jnp.asarray(za, jnp.float32),
    jnp.asarray(zb, jnp.float32),
    tau,
    negatives=negatives,
    scale_by_temperature=scale,
  )
  ref_loss, ref_acc = _np_info_nce(za, zb, tau, negatives, scale)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], ref_acc, rtol=1e-6)


def test_info_nce_variants_hand_computed():
  """Identical embeddings: every logit is 1 / tau, so the loss is log(1 + negatives)."""
  same = jnp.ones((6, 4))
  for negatives, count in (("other_branch", 5), ("both_branches", 10)):
    loss, _ = _info_nce(same, same, 0.2, negatives=negatives)
    np.testing.assert_allclose(loss, np.log(1 + count), rtol=1e-6)
    scaled, _ = _info_nce(same, same, 0.2, negatives=negatives, scale_by_temperature=True)
    np.testing.assert_allclose(scaled, 0.4 * np.log(1 + count), rtol=1e-6)
  # One image: no negative at all, whichever the variant.
  one = jnp.asarray([[1.0, 2.0]])
  loss, metrics = _info_nce(one, -one, 0.2, negatives="both_branches")
  assert float(loss) == 0.0 and float(metrics["accuracy"]) == 1.0


@pytest.mark.parametrize("negatives", losses.NEGATIVES)
def test_info_nce_gradients_match_finite_differences(negatives):
  """jax.grad of the float32 loss against central differences of the float64 reference."""
  za, zb = _features(3, 4, 11)
  tau, eps = 0.2, 1e-6
  grads = jax.jit(
    jax.grad(
      lambda a, b: losses.symmetric_info_nce(
        a, b, tau, negatives=negatives, scale_by_temperature=True
      )[0],
      argnums=(0, 1),
    )
  )(jnp.asarray(za, jnp.float32), jnp.asarray(zb, jnp.float32))
  for which, grad in enumerate(grads):
    expected = np.zeros_like(za)
    for index in np.ndindex(za.shape):
      values = []
      for step in (eps, -eps):
        moved = [za.copy(), zb.copy()]
        moved[which][index] += step
        values.append(_np_info_nce(*moved, tau, negatives, True)[0])
      expected[index] = (values[0] - values[1]) / (2 * eps)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(expected).sum() > 0.1


def test_info_nce_rejects_unknown_negatives():
  with pytest.raises(ValueError, match="negatives"):
    losses.symmetric_info_nce(jnp.ones((2, 3)), jnp.ones((2, 3)), 0.2, negatives="memory")


# What each branch predicts.


def _split_config(ratio, kind, predict):
  config = load_config("test")
  config.masking.ratio = ratio
  config.masking.kind = kind
  config.loss.inpaint_targets = predict
  return config


def test_other_visible_predicts_only_the_other_branch():
  """75% uniform on 4x4: each branch sees 4 patches; 'missing' predicts the other 12,
  'other_visible' the other branch's 4; the 8 patches neither sees are predicted by
  neither."""
  grid = (4, 4)
  missing = splitmask.make_mask_fn(_split_config(0.75, "uniform", "missing"), grid)
  other = splitmask.make_mask_fn(_split_config(0.75, "uniform", "other_visible"), grid)
  for seed in range(20):
    a = missing(np.random.default_rng(seed))
    b = other(np.random.default_rng(seed))
    np.testing.assert_array_equal(a["visible_a"], b["visible_a"])
    np.testing.assert_array_equal(a["visible_b"], b["visible_b"])
    assert a["masked_a"].shape == (12,) and b["masked_a"].shape == (4,)
    np.testing.assert_array_equal(b["masked_a"], b["visible_b"])
    np.testing.assert_array_equal(b["masked_b"], b["visible_a"])
    assert b["masked_a"].dtype == np.int32 and np.all(np.diff(b["masked_a"]) > 0)
    assert not set(b["masked_a"]) & set(b["visible_a"])
    unseen = set(range(16)) - set(a["visible_a"]) - set(a["visible_b"])
    assert len(unseen) == 8 and not unseen & (set(b["masked_a"]) | set(b["masked_b"]))
    assert unseen <= set(a["masked_a"]) & set(a["masked_b"])


@pytest.mark.parametrize("kind", ["block", "uniform"])
def test_at_ratio_one_half_both_readings_coincide(kind):
  grid = (4, 4)
  missing = splitmask.make_mask_fn(_split_config(0.5, kind, "missing"), grid)
  other = splitmask.make_mask_fn(_split_config(0.5, kind, "other_visible"), grid)
  for seed in range(20):
    a, b = missing(np.random.default_rng(seed)), other(np.random.default_rng(seed))
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(a["masked_a"], a["visible_b"])


# The projector and the whole loss. Compiling is the cost here (the train step most
# of all), so one fixture compiles two programs once each: a forward pass with the
# batch sharded over 8 devices, and the train step.


def _parts(overrides, seed=0):
  """(config, model, loss_fn in the step's form, codebook, batch of BATCH smooth
  images and their masks, example model inputs)."""
  config = load_config("test")
  config.masking.ratio = 0.5  # SplitMask's default, unless overridden
  config.model.decoder_depth = 1  # quicker to compile
  config.update_from_flattened_dict(overrides)
  config_base.validate_config(config)
  grid = config_base.grid_size(config)
  rng = np.random.default_rng(seed)
  size, channels = config.model.image_size, config.model.num_channels
  # A random 4x4 field upsampled: visual words that the other patches predict.
  coarse = rng.integers(0, 256, (BATCH, 4, 4, channels))
  images = np.repeat(np.repeat(coarse, size // 4, 1), size // 4, 2).astype(np.uint8)
  mask_fn = objectives.make_mask_fn(config, grid)
  masks = [mask_fn(rng) for _ in range(BATCH)]
  batch = {k: np.stack([m[k] for m in masks]) for k in masks[0]}
  batch["image"] = images
  model = objectives.build_model(config, grid)
  loss_fn = objectives.step_loss(objectives.build_loss_fn(config, model, grid))
  codebook = tokenizers.random_projection_codebook(
    jax.random.PRNGKey(1),
    config.tokenizer.vocab_size,
    tokenizers.codebook_dim(config.tokenizer.patch_size, config.model.num_channels),
  )
  example = objectives.example_inputs(config, masks[0])
  return config, model, loss_fn, codebook, batch, example


def _host_init(model, example, seed=0):
  """Parameters drawn with NumPy in the shapes of `model.init`: norm scales 1, biases
  0, the rest N(0, 0.02). (Compiling flax's initialisers would cost a third of the
  step's compilation, for parameters that no test here depends on.)"""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example, train=False))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _mesh(data):
  return sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": 1}))


@pytest.fixture(scope="module")
def runs():
  """Every choice on: 75% uniform masking, two micro-batches per update.

  Returns {'config', 'codebook', 'batch', 'params' (at initialisation), 'metrics'
  and 'outputs' (train=False, the batch sharded over 8 devices: the InfoNCE sees the
  global batch), 'steps' (the metrics of 60 updates on that batch, one device),
  'trained' (the parameters after them)}.
  """
  config, model, loss_fn, codebook, batch, example = _parts(dict(ALL_ON, accum_steps=2))
  params = _host_init(model, example)
  state = train_step_lib.TrainState(
    step=np.zeros((), np.int32), params=params, opt_state=(), codebook=np.asarray(codebook)
  )

  def evaluate(state, batch):
    images = objectives.images_to_float(batch["image"])
    args = (batch[k] for k in splitmask.MODEL_INPUTS)
    out = model.apply(state.params, images, *args, train=False)
    return loss_fn(state.params, state, batch, jax.random.PRNGKey(0), train=False)[1], out

  metrics, out = jax.device_get(jax.jit(evaluate)(state, sharding.global_batch(batch, _mesh(8))))

  # A fixed batch learnt by heart (the steps cost little beside their compilation).
  config.optim.update(base_lr=3e-3, base_batch_size=BATCH, warmup_fraction=0.0)
  num_steps = 60
  schedule = optim.learning_rate_schedule(config.optim, config.batch_size, num_steps, 1.0)
  optimizer = optim.make_optimizer(config.optim, schedule)
  mesh = _mesh(1)
  state = state.replace(opt_state=jax.device_get(jax.jit(optimizer.init)(params)))
  state = jax.device_put(state, train_step_lib.state_shardings(state, mesh))
  step = train_step_lib.make_train_step(
    loss_fn, optimizer, schedule, 0, mesh, state, config.accum_steps
  )
  global_batch = sharding.global_batch(batch, mesh)
  history = []
  for _ in range(num_steps):
    state, step_metrics = step(state, global_batch)
    history.append(jax.device_get(step_metrics))
  return dict(
    config=config,
    codebook=codebook,
    batch=batch,
    params=params,
    metrics=metrics,
    outputs=out,
    steps=history,
    trained=jax.device_get(state.params),
  )


def test_defaults_are_the_paper_reading():
  """Left at their defaults, the keys give the match as it was: the pooled decoder
  outputs themselves (no projector parameters), other-branch negatives, no scaling;
  each branch predicts its complement."""
  config, model, _, _, batch, example = _parts({})
  assert (config.loss.inpaint_targets, config.loss.negatives) == ("missing", "other_branch")
  assert not config.loss.scale_by_temperature and config.model.projector == "none"
  np.testing.assert_array_equal(batch["masked_a"], batch["visible_b"])
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example, train=False))
  assert set(params["params"]) == {"encoder", "decoder"}
  out = jax.eval_shape(lambda p: model.apply(p, *example, train=False), params)
  assert out["embedding_a"].shape == (1, 32)  # the decoder's width


def test_projector_has_its_own_parameters_and_changes_the_loss(runs):
  config, params, metrics, out = runs["config"], runs["params"], runs["metrics"], runs["outputs"]
  head = params["params"]["projection_head"]
  assert jax.tree.map(np.shape, head) == {
    "layers_0": {"kernel": (32, 48), "bias": (48,)},
    "layers_1": {"scale": (48,), "bias": (48,)},
    "layers_3": {"kernel": (48, 24), "bias": (24,)},
  }
  assert set(params["params"]) == {"encoder", "decoder", "projection_head"}
  # The embeddings are Dense - LayerNorm - ReLU - Dense of the pooled decoder outputs
  # (float64 reference), each image on its own.
  for x in "ab":
    h = np.mean(np.asarray(out[f"features_{x}"], np.float64), axis=1)
    h = h @ head["layers_0"]["kernel"] + head["layers_0"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = np.maximum(h * head["layers_1"]["scale"] + head["layers_1"]["bias"], 0.0)
    h = h @ head["layers_3"]["kernel"] + head["layers_3"]["bias"]
    np.testing.assert_allclose(out[f"embedding_{x}"], h, rtol=1e-4, atol=1e-5)
  # The match compares the projections, not the pooled features: NT-Xent over the
  # global batch of 16 (sharded over 8 devices), scaled by 2 tau.
  pooled = [np.mean(np.asarray(out[f"features_{x}"], np.float64), axis=1) for x in "ab"]
  embedded = [np.asarray(out[f"embedding_{x}"], np.float64) for x in "ab"]
  args = (config.loss.temperature, "both_branches", True)
  np.testing.assert_allclose(metrics["match_loss"], _np_info_nce(*embedded, *args)[0], rtol=1e-5)
  assert abs(float(metrics["match_loss"]) - _np_info_nce(*pooled, *args)[0]) > 1e-3
  # The projector learns: the updates moved every one of its parameters.
  trained = runs["trained"]["params"]["projection_head"]
  for before, after in zip(jax.tree.leaves(head), jax.tree.leaves(trained)):
    assert np.abs(after - before).max() > 0

  # Fine-tuning loads the encoder alone, and it loads.
  ft_config = load_config("test", FINETUNE_CONFIG_FILE)
  classifier = finetune.build_classifier(ft_config, 10)
  # Its shapes are all the loading reads: no need to compile its initialisation.
  shapes = jax.eval_shape(finetune.classifier_init_fn(classifier, ft_config), jax.random.PRNGKey(5))
  variables = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
  loaded = finetune.load_pretrained_encoder(variables, params)
  assert set(loaded["params"]) == set(variables["params"])
  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), y),
    loaded["params"]["encoder"],
    params["params"]["encoder"],
  )


def test_model_rejects_an_unknown_projector():
  _, model, _, _, _, example = _parts({})
  with pytest.raises(ValueError, match="projector"):
    jax.eval_shape(
      lambda: model.clone(projector="batchnorm").init(jax.random.PRNGKey(0), *example, train=False)
    )


def test_other_visible_inpaints_the_other_branch_patches(runs):
  """The inpaint loss covers only the other branch's patches: the cross-entropy of
  the logits the model gives at those positions, against their visual words."""
  config, batch, out = runs["config"], runs["batch"], runs["outputs"]
  assert batch["masked_a"].shape == (BATCH, 4)
  np.testing.assert_array_equal(batch["masked_a"], batch["visible_b"])
  images = objectives.images_to_float(batch["image"])
  grid = config_base.grid_size(config)
  expected = []
  for x, other in (("a", "b"), ("b", "a")):
    words = targets.target_tokens(
      images, runs["codebook"], grid, config.tokenizer.patch_size, batch[f"visible_{other}"]
    )
    log_probs = _np_log_softmax(np.asarray(out[f"logits_{x}"], np.float64))
    expected.append(-np.take_along_axis(log_probs, np.asarray(words)[..., None], -1).mean())
  np.testing.assert_allclose(runs["metrics"]["inpaint_loss"], np.mean(expected), rtol=1e-5)


def test_every_choice_on_accumulates_and_trains(runs):
  """Accumulation: the inpaint loss of the 2 micro-batches is the large batch's (each
  image predicts as many patches), the match the mean of each micro-batch's own
  NT-Xent (the reference on the embeddings of images i::2: the projector has no
  statistics across images). Training: the loss falls, and the match well below
  chance (identical embeddings: 2 tau log(2 * 8 - 1) with 8 images a micro-batch)."""
  config, metrics, out, steps = runs["config"], runs["metrics"], runs["outputs"], runs["steps"]
  first = steps[0]
  np.testing.assert_allclose(first["inpaint_loss"], metrics["inpaint_loss"], rtol=1e-5)
  tau = config.loss.temperature
  per_micro = [
    _np_info_nce(out["embedding_a"][i::2], out["embedding_b"][i::2], tau, "both_branches", True)[0]
    for i in range(2)
  ]
  np.testing.assert_allclose(first["match_loss"], np.mean(per_micro), rtol=1e-5)
  assert abs(float(first["match_loss"]) - float(metrics["match_loss"])) > 0.01
  curve = [float(m["loss"]) for m in steps]
  assert np.isfinite(curve).all()
  assert curve[-1] < 0.5 * curve[0], curve
  micro = BATCH // config.accum_steps
  chance = 2 * tau * np.log(2 * micro - 1)
  assert steps[-1]["match_loss"] < 0.8 * chance, [float(m["match_loss"]) for m in steps]


# Bad values, named before anything runs.


@pytest.mark.parametrize(
  "overrides, key",
  [
    ({"loss.inpaint_targets": "all"}, "loss.inpaint_targets"),
    ({"loss.negatives": "simclr"}, "loss.negatives"),
    ({"model.projector": "batchnorm"}, "model.projector"),
    ({"model.projector": "mlp", "model.projector_hidden_dim": 0}, "model.projector_hidden_dim"),
    ({"model.projector_dim": -3}, "model.projector_dim"),
    ({"model.projector": "mlp", "loss.match": False}, "model.projector"),
    ({"objective": "beit", "loss.negatives": "both_branches"}, "loss.negatives"),
    ({"objective": "beit", "model.projector": "mlp"}, "model.projector"),
  ],
)
def test_bad_values_name_the_key(overrides, key):
  config = load_config("test")
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=rf"config\.{key}=.* is invalid"):
    config_base.validate_config(config)


def test_non_bool_scale_names_the_key():
  # A typed config refuses a non-bool outright; one read back from JSON holds anything.
  raw = load_config("test").to_dict()
  raw["loss"]["scale_by_temperature"] = "yes"
  with pytest.raises(ValueError, match=r"config\.loss\.scale_by_temperature='yes' is invalid"):
    config_base.validate_config(ml_collections.ConfigDict(raw))


def test_mask_fn_names_a_bad_inpaint_targets_key():
  config = load_config("test")
  config.loss.inpaint_targets = "both"
  with pytest.raises(ValueError, match=r"config\.loss\.inpaint_targets='both' is invalid"):
    splitmask.make_mask_fn(config, (4, 4))
