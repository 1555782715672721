"""Linear probes on every block of a frozen encoder (the paper's Figure 5).

`probe_blocks(config, workdir)` runs a `config.task == 'probe'` config: it
extracts the average-pooled output of every block for the train and test
splits (test crop, no augmentation), once per encoder, trains one linear
classifier per block on them (linear_probe.py), and writes top-1 per block as
`probe.json`, `probe.md` and `probe.png` in the workdir, beside the same
figures for a random-init encoder when `config.probe.random_init_baseline`.
"""

from __future__ import annotations

import os
import time

import jax
from absl import logging

from splitmask_jax import config_base
from splitmask_jax import datasets
from splitmask_jax import evaluation
from splitmask_jax import finetune
from splitmask_jax import input_pipeline
from splitmask_jax import linear_probe
from splitmask_jax import loop
from splitmask_jax import metric_log
from splitmask_jax import objectives
from splitmask_jax import sharding


def probe_blocks(config, workdir: str) -> dict:
  """Probes every block of the encoder of `config.init.workdir` (and a random one).

  Returns:
    {'probe_top1_<encoder>_block_<k>': top-1} for k = 1..depth, encoder
    'pretrained' (when config.init.workdir is set) and 'random_init' (when
    config.probe.random_init_baseline).

  Raises:
    ValueError: an invalid config, nothing to probe, or an init run whose
      encoder does not fit `config.model`; raised before any data is read.
  """
  config_base.validate_config(config)
  if config.task != "probe":
    raise ValueError(f"config.task={config.task!r}: probe_blocks needs 'probe'.")
  if config.init.workdir is None and not config.probe.random_init_baseline:
    raise ValueError("Nothing to probe: set config.init.workdir to a pre-training run, or "
                     "config.probe.random_init_baseline=True.")
  mesh = sharding.make_mesh(config.mesh)
  local_batch = sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  pretrained = finetune.check_init_run(config)
  # Probing keeps no state to resume: a rerun redoes it and rewrites the config.
  os.makedirs(workdir, exist_ok=True)
  loop.save_config(config, workdir)

  data = config.data
  info = finetune.prepare_labelled_data(config)
  train_source = datasets.training_share(config.data)
  test_source = datasets.load_source(data.dataset, data.test_split, data.data_dir)

  def batches(source, num):
    return input_pipeline.eval_dataset(
        source, batch_size=local_batch, image_size=config.model.image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_examples=None if num is None else min(num, len(source)),
        center_crop=data.test_crop_ratio)

  model = finetune.build_classifier(config, info.num_classes)
  random_params = jax.jit(finetune.classifier_init_fn(model, config))(
      jax.random.PRNGKey(config.seed))
  encoders = {}
  if pretrained is not None:
    encoders["pretrained"] = finetune.load_pretrained_encoder(
        jax.device_get(random_params), pretrained, source=config.init.workdir)
  if config.probe.random_init_baseline:
    encoders["random_init"] = random_params
  features_fn = jax.jit(lambda p, im: model.apply(p, objectives.images_to_float(im),
                                                  method="block_features"))

  accuracies, values = {}, {}
  for name, params in encoders.items():
    t0 = time.time()
    train_x, train_y = evaluation.extract_outputs(
        features_fn, params, batches(train_source, config.probe.num_train), mesh)
    test_x, test_y = evaluation.extract_outputs(
        features_fn, params, batches(test_source, config.probe.num_test), mesh)
    accuracies[name] = linear_probe.train_linear_probes(
        train_x, train_y, test_x, test_y, num_classes=info.num_classes,
        epochs=config.probe.epochs, batch_size=config.probe.batch_size,
        learning_rate=config.probe.learning_rate, weight_decay=config.probe.weight_decay,
        seed=config.seed)
    values.update({f"probe_top1_{name}_block_{k + 1}": float(a)
                   for k, a in enumerate(accuracies[name])})
    logging.info("Probed the %d blocks of the %s encoder in %.1fs: %s", model.depth, name,
                 time.time() - t0, ", ".join(f"{a:.4f}" for a in accuracies[name]))

  if jax.process_index() == 0:
    linear_probe.write_probe_report(
        workdir, {name: list(acc) for name, acc in accuracies.items()},
        title=f"Linear probe per block: {config.model.variant} on {data.dataset}")
  log = metric_log.MetricLog(workdir)
  log.truncate_after(-1)
  log.write(0, values)
  log.close()
  loop.write_final_metrics(workdir, 0, values)
  return values
