"""Linear probes on every block of a frozen encoder (the paper's Figure 5): the task,
the classifiers' fit and the report.

`probe_blocks(config, workdir)` runs a `config.task == 'probe'` config: it
extracts the average-pooled output of every block for the train and test
splits (test crop, no augmentation), once per encoder, trains one linear
classifier per block on them (`train_linear_probes`), and writes top-1 per block
as `probe.json`, `probe.md` and `probe.png` in the workdir (`write_probe_report`),
beside the same figures for a random-init encoder when
`config.probe.random_init_baseline`. Images are read at `config.model.image_size`,
which may differ from the pre-training run's (its position embeddings are then
resampled: finetune.adapt_to_image_size).

Each block's average-pooled output gets its own linear softmax classifier, and
all L classifiers train together: one vmap over the block axis, one AdamW over
the stacked parameters. Adam and decoupled weight decay act element by element
and the summed loss gives each classifier its own block's gradient, so this is
exactly L independent probes, at the cost of one.

Features are standardised with the train set's per-block, per-dimension mean
and standard deviation, which is what MAE's probe head does with a BatchNorm
without affine parameters in front of the linear layer (its statistics are the
train set's once the features are frozen). Without it, the blocks' very
different feature scales would each need their own learning rate.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from collections.abc import Mapping
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from splitmask_jax import config_base
from splitmask_jax import evaluation
from splitmask_jax import finetune
from splitmask_jax import loop
from splitmask_jax import objectives
from splitmask_jax.data import datasets
from splitmask_jax.data import input_pipeline
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import sharding
from splitmask_jax.runtime import workdir as workdir_lib

# BatchNorm1d's eps in MAE's probe: a constant feature standardises to 0.
_STD_EPS = 1e-6
# Rows per chunk when accumulating the train statistics in float64.
_STATS_CHUNK = 8192

PROBE_JSON = "probe.json"
PROBE_MARKDOWN = "probe.md"
PROBE_PLOT = "probe.png"


def probe_blocks(config, workdir: str) -> dict:
  """Probes every block of the encoder of `config.init.workdir` (and a random one).

  Returns:
    {'probe_top1_<encoder>_block_<k>': top-1} for k = 1..depth, encoder
    'pretrained' (when config.init.workdir is set) and 'random_init' (when
    config.probe.random_init_baseline).

  Raises:
    ValueError: an invalid config, nothing to probe, or an init run whose
      encoder does not fit `config.model`; raised before any data is read.
    workdir.WorkdirInUse: another run holds the workdir.
  """
  config_base.validate_config(config)
  if config.task != "probe":
    raise ValueError(f"config.task={config.task!r}: probe_blocks needs 'probe'.")
  if config.init.workdir is None and not config.probe.random_init_baseline:
    raise ValueError(
      "Nothing to probe: set config.init.workdir to a pre-training run, or "
      "config.probe.random_init_baseline=True."
    )
  mesh = sharding.make_mesh(config.mesh)
  local_batch = sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  pretrained = finetune.check_init_run(config)
  with workdir_lib.RunLock(workdir):
    return _probe(config, workdir, mesh, local_batch, pretrained)


def _probe(config, workdir: str, mesh, local_batch: int, pretrained) -> dict:
  """probe_blocks's work once the config is checked and the workdir is held."""
  # Probing keeps no state to resume: a rerun redoes it and rewrites the config.
  loop.save_config(config, workdir)

  data = config.data
  info = finetune.prepare_labelled_data(config)
  train_source = datasets.training_share(config.data)
  test_source = datasets.load_source(
    data.dataset, data.test_split, data.data_dir, data.in_memory_mib
  )

  def batches(source, num):
    return input_pipeline.eval_dataset(
      source,
      batch_size=local_batch,
      image_size=config.model.image_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_examples=None if num is None else min(num, len(source)),
      center_crop=data.test_crop_ratio,
    )

  model = finetune.build_classifier(config, info.num_classes, sharding.platform_of(mesh))
  random_params = jax.jit(finetune.classifier_init_fn(model, config))(
    jax.random.PRNGKey(config.seed)
  )
  encoders = {}
  if pretrained is not None:
    encoders["pretrained"] = finetune.load_pretrained_encoder(
      jax.device_get(random_params),
      finetune.adapt_to_image_size(pretrained, config),
      source=config.init.workdir,
    )
  if config.probe.random_init_baseline:
    encoders["random_init"] = random_params
  features_fn = jax.jit(
    lambda p, im: model.apply(p, objectives.images_to_float(im), method="block_features")
  )

  accuracies, values = {}, {}
  for name, params in encoders.items():
    t0 = time.time()
    train_x, train_y = evaluation.extract_outputs(
      features_fn, params, batches(train_source, config.probe.num_train), mesh
    )
    test_x, test_y = evaluation.extract_outputs(
      features_fn, params, batches(test_source, config.probe.num_test), mesh
    )
    accuracies[name] = train_linear_probes(
      train_x,
      train_y,
      test_x,
      test_y,
      num_classes=info.num_classes,
      epochs=config.probe.epochs,
      batch_size=config.probe.batch_size,
      learning_rate=config.probe.learning_rate,
      weight_decay=config.probe.weight_decay,
      seed=config.seed,
    )
    values.update(
      {f"probe_top1_{name}_block_{k + 1}": float(a) for k, a in enumerate(accuracies[name])}
    )
    logging.info(
      "Probed the %d blocks of the %s encoder in %.1fs: %s",
      model.depth,
      name,
      time.time() - t0,
      ", ".join(f"{a:.4f}" for a in accuracies[name]),
    )

  if jax.process_index() == 0:
    write_probe_report(
      workdir,
      {name: list(acc) for name, acc in accuracies.items()},
      title=f"Linear probe per block: {config.model.variant} on {data.dataset}",
    )
  log = metric_log.MetricLog(workdir)
  log.truncate_after(-1)
  log.write(0, values)
  log.close()
  loop.write_final_metrics(workdir, 0, values)
  return values


def train_linear_probes(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  *,
  num_classes: int,
  epochs: int = 30,
  batch_size: int = 1024,
  learning_rate: float = 1e-2,
  weight_decay: float = 1e-4,
  seed: int = 0,
) -> np.ndarray:
  """Test top-1 accuracy of a linear classifier trained on each block's features.

  Mini-batch AdamW, learning rate decayed from `learning_rate` to 0 by a cosine
  over all steps, decoupled weight decay on the weights (not the biases),
  weights and biases initialised to zero (the loss is convex, so the start
  point hardly matters and `seed` only drives the shuffling). Each epoch visits
  the train set in a fresh random order, in `N // batch_size` full batches: the
  last `N % batch_size` examples of that order sit the epoch out, a different
  set each epoch. A batch size above N is lowered to N (one full batch).

  Args:
    train_features: float [N, L, D]: block l's pooled output for each image.
    train_labels: int [N], in [0, num_classes).
    test_features: float [M, L, D].
    test_labels: int [M], in [0, num_classes).
    num_classes: C >= 2.
    epochs: passes over the train set.
    batch_size: examples per step.
    learning_rate: the peak (first step) learning rate.
    weight_decay: AdamW's decoupled weight decay coefficient.
    seed: seed of the shuffling; the same seed gives the same accuracies.

  Returns:
    float64 [L]: the fraction of test images each block's probe classifies right.
  """
  train_features, test_features = _check_inputs(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes=num_classes,
    epochs=epochs,
    batch_size=batch_size,
    learning_rate=learning_rate,
    weight_decay=weight_decay,
  )
  mean, inv_std = _standardisation(train_features)
  params = _train(
    jax.random.key(seed),
    jnp.asarray(train_features),
    jnp.asarray(train_labels, jnp.int32),
    mean,
    inv_std,
    jnp.float32(learning_rate),
    jnp.float32(weight_decay),
    num_classes=int(num_classes),
    epochs=int(epochs),
    batch_size=min(int(batch_size), len(train_features)),
  )
  return _accuracy(
    params, mean, inv_std, test_features, np.asarray(test_labels), batch_size=int(batch_size)
  )


def _check_inputs(
  train_features,
  train_labels,
  test_features,
  test_labels,
  *,
  num_classes,
  epochs,
  batch_size,
  learning_rate,
  weight_decay,
):
  """Raises ValueError naming the first bad argument; returns float32 features."""
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  for name, value in (("epochs", epochs), ("batch_size", batch_size)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
  if not weight_decay >= 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
  features = {
    "train_features": np.asarray(train_features),
    "test_features": np.asarray(test_features),
  }
  for name, x in features.items():
    if x.ndim != 3 or 0 in x.shape:
      raise ValueError(f"{name} must be a non-empty float array [N, L, D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if not np.isfinite(x).all():
      raise ValueError(f"{name} holds NaN or infinite values")
  train_shape = features["train_features"].shape
  test_shape = features["test_features"].shape
  if test_shape[1:] != train_shape[1:]:
    raise ValueError(
      f"test_features [M, L, D] must have train_features' L and D "
      f"{train_shape[1:]}, got {test_shape[1:]}"
    )
  for name, labels, count in (
    ("train_labels", train_labels, train_shape[0]),
    ("test_labels", test_labels, test_shape[0]),
  ):
    labels = np.asarray(labels)
    if labels.shape != (count,):
      raise ValueError(
        f"{name} must have shape ({count},), one label per feature row, got {labels.shape}"
      )
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(
        f"{name} must lie in [0, num_classes={num_classes}), got values "
        f"in [{labels.min()}, {labels.max()}]"
      )
  return (
    features["train_features"].astype(np.float32, copy=False),
    features["test_features"].astype(np.float32, copy=False),
  )


def _standardisation(features: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """Per-block, per-dimension mean and 1 / sqrt(var + eps) of `features` [N, L, D].

  Two passes over row chunks in float64: exact enough for features with a large
  offset, without a float64 copy of the whole array.
  """
  n = len(features)
  chunks = range(0, n, _STATS_CHUNK)
  mean = sum(features[i : i + _STATS_CHUNK].sum(0, dtype=np.float64) for i in chunks) / n
  var = sum(np.square(features[i : i + _STATS_CHUNK] - mean).sum(0) for i in chunks) / n
  return (jnp.asarray(mean, jnp.float32), jnp.asarray(1.0 / np.sqrt(var + _STD_EPS), jnp.float32))


def _block_loss(params, x, y):
  """Mean cross-entropy of one block's classifier: x [B, D], y int [B]."""
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _train(
  key,
  features,
  labels,
  mean,
  inv_std,
  learning_rate,
  weight_decay,
  *,
  num_classes,
  epochs,
  batch_size,
):
  """The probes' parameters {"w": [L, D, C], "b": [L, C]} after `epochs` epochs.

  The whole run is one program: a scan over epochs, each a scan over batches.
  """
  n, num_blocks, dim = features.shape
  steps_per_epoch = n // batch_size
  features = (features - mean) * inv_std
  schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
  optimizer = optax.adamw(schedule, weight_decay=weight_decay, mask={"w": True, "b": False})
  params = {
    "w": jnp.zeros((num_blocks, dim, num_classes), jnp.float32),
    "b": jnp.zeros((num_blocks, num_classes), jnp.float32),
  }
  # Blocks are independent, so the gradient of the sum is each block's own.
  total_loss = lambda p, x, y: jax.vmap(_block_loss, in_axes=(0, 1, None))(p, x, y).sum()

  def step(carry, idx):
    params, opt_state = carry
    grads = jax.grad(total_loss)(params, features[idx], labels[idx])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def epoch(carry, epoch_key):
    order = jax.random.permutation(epoch_key, n)[: steps_per_epoch * batch_size]
    carry, _ = jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch_size))
    return carry, None

  (params, _), _ = jax.lax.scan(
    epoch, (params, optimizer.init(params)), jax.random.split(key, epochs)
  )
  return params


@jax.jit
def _correct(params, mean, inv_std, features, labels):
  """Bool [B, L]: whether each block's probe gets each example right."""
  x = (features - mean) * inv_std
  logits = jnp.einsum("bld,ldc->blc", x, params["w"]) + params["b"]
  return jnp.argmax(logits, axis=-1) == labels[:, None]


def _accuracy(params, mean, inv_std, features, labels, *, batch_size):
  """Float64 [L] top-1 over `features` [M, L, D], evaluated `batch_size` rows at a time.

  The last chunk is padded to the full size (padding rows are not counted), so
  the evaluation compiles once.
  """
  m = len(features)
  size = min(batch_size, m)
  correct = np.zeros(features.shape[1], np.int64)
  for start in range(0, m, size):
    x, y = features[start : start + size], labels[start : start + size]
    valid = len(x)
    if valid < size:
      x = np.concatenate([x, np.zeros((size - valid,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(size - valid, y.dtype)])
    hits = np.asarray(_correct(params, mean, inv_std, jnp.asarray(x), jnp.asarray(y, jnp.int32)))
    correct += hits[:valid].sum(0)
  return correct / m


def write_probe_report(
  directory: str, accuracies: Mapping[str, Sequence[float]], *, title: str
) -> dict[str, str]:
  """Writes the per-block probe accuracies of one or more encoders as numbers,
  a Markdown table and a plot.

  Files (each replaced atomically): `probe.json` ({"title", "num_blocks",
  "top1": {encoder: [L fractions]}}), `probe.md` (a table: one row per block
  1..L, one column per encoder, top-1 in percent with one decimal) and
  `probe.png` (top-1 in percent against block index, one line per encoder).

  Args:
    directory: output folder, created if missing.
    accuracies: {encoder name: L top-1 fractions in [0, 1]}, the same L for all.
    title: heading of the table and the plot.

  Returns:
    {"json": path, "markdown": path, "plot": path}.
  """
  if not accuracies:
    raise ValueError("accuracies must name at least one encoder")
  top1 = {str(name): [float(a) for a in values] for name, values in accuracies.items()}
  lengths = {name: len(values) for name, values in top1.items()}
  num_blocks = next(iter(lengths.values()))
  if num_blocks == 0 or any(length != num_blocks for length in lengths.values()):
    raise ValueError(
      f"accuracies must give every encoder the same number (>= 1) of blocks, got {lengths}"
    )
  for name, values in top1.items():
    if not all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in values):
      raise ValueError(f"accuracies[{name!r}] must be top-1 fractions in [0, 1], got {values}")
  folder = workdir_lib.path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  files = {"json": PROBE_JSON, "markdown": PROBE_MARKDOWN, "plot": PROBE_PLOT}
  paths = {kind: os.fspath(folder / name) for kind, name in files.items()}
  workdir_lib.write_atomically(
    paths["json"],
    json.dumps({"title": title, "num_blocks": num_blocks, "top1": top1}, indent=2) + "\n",
  )
  workdir_lib.write_atomically(paths["markdown"], _markdown_table(top1, num_blocks, title))
  _write_plot(paths["plot"], top1, num_blocks, title)
  return paths


def _markdown_table(top1: dict[str, list[float]], num_blocks: int, title: str) -> str:
  names = list(top1)
  lines = [
    f"## {title}",
    "",
    "| block | " + " | ".join(names) + " |",
    "|---:|" + "---:|" * len(names),
  ]
  for block in range(num_blocks):
    cells = " | ".join(f"{100 * top1[name][block]:.1f}" for name in names)
    lines.append(f"| {block + 1} | {cells} |")
  lines += [
    "",
    "Linear-probe top-1 accuracy (%) on the test split, one probe per "
    "encoder block on its average-pooled output.",
  ]
  return "\n".join(lines) + "\n"


def _write_plot(path: str, top1: dict[str, list[float]], num_blocks: int, title: str) -> None:
  """Saves the plot as a PNG, replacing `path` atomically."""
  # A Figure with its own Agg canvas: no pyplot global state, no display needed.
  figure = Figure(figsize=(6, 4), dpi=100)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  blocks = np.arange(1, num_blocks + 1)
  for name, values in top1.items():
    axes.plot(blocks, 100 * np.asarray(values), marker="o", label=name)
  axes.set_xlabel("block")
  axes.set_ylabel("linear-probe top-1 accuracy (%)")
  axes.set_xticks(blocks)
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  png = io.BytesIO()
  figure.savefig(png, format="png")
  workdir_lib.write_atomically(path, png.getvalue())
