"""Runs that survive preemption, Ctrl-C, a crash while saving, damaged checkpoints,
a full disk, a second run on the same workdir, divergence and bad input.

Every run reads a real TFDS dataset built here (ArrayRecord, PNG-encoded images)
in which a few records hold images that cannot be decoded, so every run also
exercises the skipping of unreadable images.
"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from splitmask_jax import config_base
from splitmask_jax import objectives
from splitmask_jax import train
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.data import datasets
from splitmask_jax.data import input_pipeline
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import preemption
from splitmask_jax.runtime import workdir as workdir_lib

from helpers import CONFIG_FILE
from helpers import ROOT
from helpers import load_config

DATASET = "unreadable_images"
NUM_TRAIN, NUM_TEST = 96, 32
# Generator keys of the records whose image cannot be decoded.
UNREADABLE_TRAIN, UNREADABLE_TEST = (7, 40, 41), (3,)
NUM_STEPS = 40  # of the runs compared with the unbroken reference run
# Loss parts and gradient norm: equal step for step between resumed and unbroken runs.
COMPARED = ("loss", "inpaint_loss", "match_loss", "grad_norm", "skipped_images")


def _png(image):
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buffer, format="PNG")
  return buffer.getvalue()


class _UnreadableImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """28x28 grey images and labels; the images of a few records are broken PNGs."""

  name = DATASET
  VERSION = tfds.core.Version("1.0.0")

  # No checksums to look up: nothing is downloaded (see datasets.py).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(28, 28, 1)),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      "train": self._generate_examples(NUM_TRAIN, UNREADABLE_TRAIN, seed=0),
      "test": self._generate_examples(NUM_TEST, UNREADABLE_TEST, seed=1),
    }

  def _generate_examples(self, count, unreadable, seed):
    rng = np.random.default_rng(seed)
    for key in range(count):
      image = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
      if key in unreadable:
        # Alternately: bytes that are no image at all, and a PNG cut short.
        data = b"not an image" if key % 2 else _png(image)[:60]
        image = io.BytesIO(data)  # TFDS stores a file's bytes as they are
      yield key, {"image": image, "label": key % 10}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  _UnreadableImages(data_dir=str(directory)).download_and_prepare(
    file_format=tfds.core.FileFormat.ARRAY_RECORD
  )
  return directory


def _unreadable_indices(source):
  """Source indices whose record fails to decode (TFDS orders records by key hash)."""
  bad = []
  for index in range(len(source)):
    try:
      source[index]
    except Exception:  # pylint: disable=broad-except
      bad.append(index)
  return bad


def _overrides(data_dir, **extra):
  """The run's config keys beyond the `test` variant, as `--config.key` would set them."""
  # One device: the sharded paths are tested in test_train.py, and a one-device
  # step compiles in less time.
  overrides = {
    "data.dataset": DATASET,
    "data.data_dir": str(data_dir),
    "mesh.data": 1,
    "num_steps": NUM_STEPS,
    "log_every": 1,
    "eval_every": 1000,
    "checkpoint_every": 1000,
    "knn.enabled": False,
  }
  overrides.update(extra)
  return overrides


def _config(data_dir, arg="test", **extra):
  config = load_config(arg)
  config.update_from_flattened_dict(_overrides(data_dir, **extra))
  return config


def _cli(workdir, data_dir, script=("-m", "splitmask_jax.main"), **extra):
  flags = [f"--config.{k}={v}" for k, v in _overrides(data_dir, **extra).items()]
  return [sys.executable, *script, f"--config={CONFIG_FILE}:test", f"--workdir={workdir}", *flags]


def _train_records(workdir):
  return {r["step"]: r for r in metric_log.read_metrics(str(workdir)) if "loss" in r}


def _assert_matches(records, expected, steps):
  assert sorted(records) == list(steps)
  for step in steps:
    for key in COMPARED:
      assert records[step][key] == expected[step][key], (step, key)


def _wait_for(predicate, process, what, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


def _steps(checkpoints):
  """Committed checkpoint steps in a checkpoint folder."""
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def _spy_restored_steps(monkeypatch):
  steps = []
  restore = checkpointing.Checkpointer.restore

  def spy(self, step, state_like, data_iterator):
    steps.append(step)
    return restore(self, step, state_like, data_iterator)

  monkeypatch.setattr(checkpointing.Checkpointer, "restore", spy)
  return steps


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """The unbroken run: workdir and its per-step records."""
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(_config(data_dir), str(workdir))
  return workdir, _train_records(workdir)


def test_unreadable_images_are_skipped_counted_and_deterministic(data_dir):
  """Full batches, an exact count, and the same batches on every pass."""
  source = datasets.load_source(DATASET, "train", str(data_dir))
  bad = set(_unreadable_indices(source))
  assert len(bad) == len(UNREADABLE_TRAIN)
  steps, batch_size = 9, 32  # three epochs

  def batches():
    it = iter(
      input_pipeline.pretrain_dataset(
        source, batch_size=batch_size, image_size=16, mask_fn=None, seed=3, count_skipped=True
      )
    )
    return [next(it) for _ in range(steps)]

  first, second = batches(), batches()
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["skipped_images"], b["skipped_images"])
  assert all(b["image"].shape == (batch_size, 16, 16, 1) for b in first)
  # Reference: the pipeline's global stream is the source shuffled per epoch;
  # an unreadable record is replaced by the next readable one in source order.
  stream = grain.MapDataset.range(len(source)).seed(3).shuffle().repeat()
  expected = []
  for i in range(steps * batch_size):
    index, skipped = stream[i], 0
    while (index + skipped) % len(source) in bad:
      skipped += 1
    expected.append(skipped)
  np.testing.assert_array_equal(np.concatenate([b["skipped_images"] for b in first]), expected)
  # Three epochs pass each unreadable record three times (more if two are adjacent).
  assert sum(expected) >= 3 * len(bad)

  test_source = datasets.load_source(DATASET, "test", str(data_dir))
  [bad_test] = _unreadable_indices(test_source)
  valid = np.concatenate(
    [b["valid"] for b in input_pipeline.eval_dataset(test_source, batch_size=8, image_size=16)]
  )
  assert np.flatnonzero(~valid).tolist() == [bad_test]


@pytest.mark.slow
def test_sigterm_saves_exits_42_and_restart_matches_unbroken_run(
  data_dir, reference, tmp_path, monkeypatch
):
  _, expected = reference
  workdir = tmp_path / "run"
  with open(tmp_path / "log.txt", "w") as log:
    process = subprocess.Popen(
      _cli(workdir, data_dir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    try:
      metrics = workdir / metric_log.METRICS_FILE
      _wait_for(
        lambda: metrics.exists() and max(_train_records(workdir), default=0) >= 2, process, "step 2"
      )
      process.send_signal(signal.SIGTERM)
      assert process.wait(timeout=120) == preemption.EXIT_CODE
    finally:
      process.kill()
  output = (tmp_path / "log.txt").read_text()
  [saved] = _steps(workdir / "checkpoints")
  assert 2 <= saved < NUM_STEPS, "the run was not stopped mid-way"
  assert f"Preempted: saved step {saved}" in output
  assert max(_train_records(workdir)) == saved  # the steps up to the save are logged

  restored = _spy_restored_steps(monkeypatch)
  train.train_and_evaluate(_config(data_dir), str(workdir))
  assert restored == [saved]
  _assert_matches(_train_records(workdir), expected, range(1, NUM_STEPS + 1))


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(
  data_dir, reference, tmp_path, monkeypatch
):
  _, expected = reference
  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"
  partial = checkpoints / "8.orbax-checkpoint-tmp"
  with open(tmp_path / "log.txt", "w") as log:
    process = subprocess.Popen(
      _cli(
        workdir,
        data_dir,
        script=(str(ROOT / "tests" / "stalled_commit_main.py"),),
        checkpoint_every=4,
      ),
      cwd=ROOT,
      stdout=log,
      stderr=subprocess.STDOUT,
      env=dict(os.environ, PYTHONPATH=str(ROOT), STALL_COMMIT_STEP="8"),
    )
    try:
      _wait_for(partial.exists, process, "the save of step 8")
      process.send_signal(signal.SIGKILL)
      process.wait(timeout=60)
    finally:
      process.kill()
  assert _steps(checkpoints) == [4] and partial.is_dir()

  restored = _spy_restored_steps(monkeypatch)
  train.train_and_evaluate(_config(data_dir, checkpoint_every=4), str(workdir))
  assert restored == [4]
  _assert_matches(_train_records(workdir), expected, range(1, NUM_STEPS + 1))
  # The partial folder is gone; the latest keep_checkpoints steps are kept.
  assert not partial.exists()
  assert _steps(checkpoints) == [NUM_STEPS - 4, NUM_STEPS]


def test_preemption_watcher_flags_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatcher() as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: this process lives on
    assert watcher.should_stop(2) and watcher.signalled
  assert signal.getsignal(signal.SIGTERM) is before


def _poison_steps(monkeypatch, seed, steps):
  """Makes the loss and gradient of the updates `steps` (1-based) NaN.

  The train step draws its randomness from fold_in(PRNGKey(seed), updates done
  before it), so the loss function recognises those updates by their key.
  """
  build = objectives.build_loss_fn

  def build_poisoned(*args, **kwargs):
    loss_fn = build(*args, **kwargs)

    def poisoned(params, batch, codebook, rng, *, train):
      loss, metrics = loss_fn(params, batch, codebook, rng, train=train)
      keys = [jax.random.fold_in(jax.random.PRNGKey(seed), s - 1) for s in steps]
      hit = jnp.any(
        jnp.stack([jnp.all(jax.random.key_data(rng) == jax.random.key_data(k)) for k in keys])
      )
      factor = jnp.where(hit, jnp.nan, 1.0)
      return loss * factor, {k: v * factor for k, v in metrics.items()}

    return poisoned

  monkeypatch.setattr(objectives, "build_loss_fn", build_poisoned)


def test_nan_stops_the_run_naming_the_step_and_keeps_the_checkpoint(
  data_dir, tmp_path, monkeypatch
):
  config = _config(data_dir, num_steps=12, log_every=4, checkpoint_every=4)
  _poison_steps(monkeypatch, config.seed, [6])
  workdir = tmp_path / "run"
  with pytest.raises(FloatingPointError) as failure:
    train.train_and_evaluate(config, str(workdir))
  message = str(failure.value)
  assert "Non-finite loss or gradient at step 6:" in message
  for part in ("loss=nan", "inpaint_loss=nan", "match_loss=nan", "grad_norm=nan"):
    assert part in message
  assert "stopped at step 8" in message and "skip_nonfinite_updates" in message
  # Step 8 was neither logged nor saved; step 4 restores finite parameters.
  assert max(_train_records(workdir)) == 4
  assert _steps(workdir / "checkpoints") == [4]
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "state")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_skip_nonfinite_updates_skips_counts_and_gives_up_after_too_many(
  data_dir, tmp_path, monkeypatch
):
  config = _config(
    data_dir,
    num_steps=12,
    log_every=4,
    checkpoint_every=4,
    skip_nonfinite_updates=True,
    max_consecutive_skips=2,
  )
  # Step 2 is skipped; of steps 6, 7, 8 in a row the third is applied.
  _poison_steps(monkeypatch, config.seed, [2, 6, 7, 8])
  workdir = tmp_path / "run"
  with pytest.raises(
    FloatingPointError,
    match=r"Non-finite loss or gradient at step 8: "
    r".*loss=nan.*The run stopped at step 8",
  ):
    train.train_and_evaluate(config, str(workdir))
  [record] = _train_records(workdir).values()
  # Steps 1, 3 and 4 make the mean, without the skipped step 2.
  assert record["step"] == 4 and record["skipped_updates"] == 1
  assert all(np.isfinite(record[k]) for k in COMPARED)
  assert _steps(workdir / "checkpoints") == [4]


def _fails_before_any_work(monkeypatch):
  """Makes any step past the config checks fail the test."""

  def too_late(*args, **kwargs):
    raise AssertionError("the config was accepted: the run went on to read data")

  monkeypatch.setattr(datasets, "prepare_dataset", too_late)
  monkeypatch.setattr(train_step_lib, "init_train_state", too_late)


@pytest.mark.parametrize(
  "arg, overrides, pattern",
  [
    (
      "test",
      {"model.image_size": 30},
      r"config.model.image_size=30 is invalid: it must be a positive multiple of the "
      r"patch size 8",
    ),
    (
      "beit,test",
      {"masking.ratio": 1.0},
      r"config.masking.ratio=1.0 is invalid: it must lie in \(0, 1\)",
    ),
    ("test", {"masking.ratio": 0.0}, r"config.masking.ratio=0.0 is invalid"),
    ("test", {"batch_size": 12, "mesh.data": 8}, r"config.batch_size=12 is invalid: .*divisible"),
    (
      "test",
      {"max_consecutive_skips": 0},
      r"config.max_consecutive_skips=0 is invalid: it must be positive",
    ),
  ],
)
def test_bad_values_fail_before_any_work(arg, overrides, pattern, data_dir, tmp_path, monkeypatch):
  assert jax.device_count() == 8  # batch_size 12 cannot be split over 8 devices
  _fails_before_any_work(monkeypatch)
  with pytest.raises(ValueError, match=pattern):
    train.train_and_evaluate(_config(data_dir, arg, **overrides), str(tmp_path / "run"))


def test_keys_outside_the_schema_fail(data_dir, tmp_path, monkeypatch):
  _fails_before_any_work(monkeypatch)
  config = _config(data_dir)
  config.model.depth = 12  # a config file adding a key the schema lacks
  with pytest.raises(
    ValueError,
    match=r"config.model.depth is not a key of the config "
    r"schema .* allowed keys in config.model are \['attention', 'decoder_depth', ",
  ):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  # On the command line, the key is rejected while parsing flags, with the closest keys.
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "splitmask_jax.main",
      f"--config={CONFIG_FILE}:test",
      f"--workdir={tmp_path / 'cli'}",
      "--config.model.varient=Mini/8",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert "config.model.varient is not a key of the config" in result.stderr
  assert "(did you mean config.model.variant?)" in result.stderr
  assert not (tmp_path / "cli").exists()


def test_workdir_of_another_config_is_refused(data_dir, reference, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  _fails_before_any_work(monkeypatch)
  with pytest.raises(
    ValueError,
    match=r"holds a run of another config \(masking.ratio: '<None: 0.5>' "
    r"-> 0.6; seed: 0 -> 1\).*--allow_config_change",
  ):
    train.train_and_evaluate(_config(data_dir, **{"masking.ratio": 0.6, "seed": 1}), str(workdir))
  # Told to resume anyway, a codebook of another size still cannot be restored.
  with pytest.raises(
    ValueError,
    match=r"config.tokenizer.vocab_size=32 is invalid: the "
    r"checkpoint of step 40 in .* holds a codebook of 64 visual words, "
    r"so the allowed value is 64",
  ):
    train.train_and_evaluate(
      _config(data_dir, **{"tokenizer.vocab_size": 32}), str(workdir), allow_config_change=True
    )
  # Keys that do not change what the run computes may change on resume.
  saved = json.loads((workdir / train.CONFIG_FILE).read_text())
  assert not config_base.resume_conflicts(
    saved,
    _config(
      data_dir,
      log_every=5,
      eval_every=7,
      checkpoint_every=9,
      skip_nonfinite_updates=True,
      **{"data.num_workers": 2, "knn.enabled": True, "mesh.data": 4},
    ),
  )


def _truncate(files):
  """Cuts each file to half its length, as a crash of the machine leaves files."""
  files = [f for f in files if f.is_file()]
  assert files
  for f in files:
    os.truncate(f, f.stat().st_size // 2)


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_the_run_resumes_before_them(
  data_dir, reference, tmp_path, monkeypatch
):
  _, expected = reference
  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"
  config = _config(data_dir, checkpoint_every=4, keep_checkpoints=3)
  train.train_and_evaluate(config, str(workdir))
  assert _steps(checkpoints) == [32, 36, 40]
  # Step 40's arrays read back as garbage; step 36's metadata is cut short.
  _truncate((checkpoints / "40" / "state").glob("ocdbt.process_0/d/*"))
  _truncate((checkpoints / "36").rglob("*"))

  restored = _spy_restored_steps(monkeypatch)
  train.train_and_evaluate(config, str(workdir))
  # 40 and 36 fail while restoring (36 already at its metadata): both are kept aside.
  assert restored == [40, 36, 32]
  damaged = workdir / checkpointing.DAMAGED_DIR
  assert sorted(p.name for p in damaged.iterdir()) == ["36", "40"]
  assert _steps(checkpoints) == [32, 36, 40]  # 36 and 40 saved again by the resumed run
  _assert_matches(_train_records(workdir), expected, range(1, NUM_STEPS + 1))

  # With nothing left that reads, the run stops and names what it set aside.
  for step in _steps(checkpoints):
    _truncate((checkpoints / str(step)).rglob("*"))
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in .* can be read.*'32', '36', "):
    train.train_and_evaluate(config, str(workdir))
  assert _steps(checkpoints) == []
  assert (workdir / metric_log.METRICS_FILE).exists()  # nothing was truncated or restarted


def test_a_config_that_does_not_fit_an_intact_checkpoint_moves_nothing(
  data_dir, reference, tmp_path
):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  config = _config(data_dir, **{"model.decoder_depth": 1})
  with pytest.raises(Exception) as failure:
    train.train_and_evaluate(config, str(workdir), allow_config_change=True)
  assert not isinstance(failure.value, FileNotFoundError), failure.value
  assert _steps(workdir / "checkpoints") == [NUM_STEPS]
  assert not (workdir / checkpointing.DAMAGED_DIR).exists()


def _mount_tmpfs(folder, size) -> bool:
  """Mounts a tmpfs of `size` at `folder`; False where this machine does not allow it."""
  folder.mkdir()
  try:
    result = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
      capture_output=True,
      timeout=30,
    )
  except FileNotFoundError:
    return False
  return result.returncode == 0


def _assert_disk_full_message(message, workdir):
  intact = _steps(workdir / "checkpoints")
  assert intact, "no checkpoint was saved before the disk filled"
  assert f"No space left on the disk of {workdir} for the checkpoint of step" in message
  assert f"The latest intact checkpoint is step {intact[-1]}" in message
  assert "Free space and run the same command to resume." in message
  # No half-written step is left to block the resume.
  assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp"))


@pytest.mark.slow
def test_full_disk_stops_with_one_clear_error_and_resumes_once_freed(
  data_dir, reference, tmp_path, monkeypatch
):
  """On a 3 MiB tmpfs (two checkpoints of 0.7 MiB fit, with logs, not a third); where
  no tmpfs can be mounted, the free space the run reads is made too small instead."""
  _, expected = reference
  disk = tmp_path / "disk"
  workdir = disk / "run"
  extra = {"checkpoint_every": 4, "keep_checkpoints": 3}
  if _mount_tmpfs(disk, "3m"):
    try:
      result = subprocess.run(
        _cli(workdir, data_dir, **extra), cwd=ROOT, capture_output=True, text=True, timeout=600
      )
      assert result.returncode == 1, result.stderr[-3000:]
      [message] = [line for line in result.stderr.splitlines() if "No space left" in line]
      assert "Traceback" not in result.stderr
      _assert_disk_full_message(message, workdir)
      subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
      result = subprocess.run(
        _cli(workdir, data_dir, **extra), cwd=ROOT, capture_output=True, text=True, timeout=600
      )
      assert result.returncode == 0, result.stderr[-3000:]
      records = _train_records(workdir)
    finally:
      subprocess.run(["umount", str(disk)], check=False)
  else:
    free_bytes = workdir_lib.free_bytes
    saved = []
    monkeypatch.setattr(
      workdir_lib, "free_bytes", lambda d: 2**20 if len(saved) >= 2 else free_bytes(d)
    )
    monkeypatch.setattr(checkpointing.Checkpointer, "wait", lambda self: saved.append(1))
    with pytest.raises(workdir_lib.DiskFull) as failure:
      train.train_and_evaluate(_config(data_dir, **extra), str(workdir))
    _assert_disk_full_message(str(failure.value), workdir)
    monkeypatch.undo()
    train.train_and_evaluate(_config(data_dir, **extra), str(workdir))
    records = _train_records(workdir)
  _assert_matches(records, expected, range(1, NUM_STEPS + 1))


@pytest.mark.slow
def test_a_second_run_on_a_workdir_is_refused_and_ctrl_c_saves_the_first(data_dir, tmp_path):
  workdir = tmp_path / "run"
  # Long enough to be still running while the second starts and is refused.
  command = _cli(workdir, data_dir, num_steps=100_000)
  with open(tmp_path / "log.txt", "w") as log:
    first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
      metrics = workdir / metric_log.METRICS_FILE
      _wait_for(
        lambda: metrics.exists() and max(_train_records(workdir), default=0) >= 2, first, "step 2"
      )
      second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
      assert first.poll() is None, "the second run stopped the first"
      first.send_signal(signal.SIGINT)
      assert first.wait(timeout=120) == preemption.INTERRUPT_EXIT_CODE
    finally:
      first.kill()
  assert second.returncode == 1
  assert "is in use by the run started" in second.stderr
  assert f"(pid {first.pid})" in second.stderr and "Traceback" not in second.stderr
  output = (tmp_path / "log.txt").read_text()
  [saved] = _steps(workdir / "checkpoints")
  assert f"Interrupted (Ctrl-C): saved step {saved} in" in output
  assert "KeyboardInterrupt" not in output
  assert not (workdir / workdir_lib.LOCK_FILE).exists()
  # Nothing lost: every step trained was logged once and is in the checkpoint
  # (test_sigterm_... shows that a resumed run then matches an unbroken one).
  assert sorted(_train_records(workdir)) == list(range(1, saved + 1))


def test_a_second_ctrl_c_stops_at_once():
  before = signal.getsignal(signal.SIGINT)
  with preemption.PreemptionWatcher() as watcher:
    os.kill(os.getpid(), signal.SIGINT)  # handled: the loop would save and stop
    assert watcher.should_stop(1) and watcher.interrupted
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs between two bytecodes
  assert signal.getsignal(signal.SIGINT) is before


def test_run_lock_takes_over_a_dead_runs_lock_and_refuses_a_live_one(tmp_path, caplog):
  lock_file = tmp_path / workdir_lib.LOCK_FILE
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  holder = {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier", "command": "x"}
  lock_file.write_text(json.dumps(holder))
  with workdir_lib.RunLock(tmp_path):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert "Taking over" in caplog.text and f"'pid': {dead.pid}" in caplog.text
    # Held by a live run (this one): a second lock on the workdir is refused.
    with pytest.raises(workdir_lib.WorkdirInUse, match=rf"\(pid {os.getpid()}\)"):
      workdir_lib.RunLock(tmp_path).__enter__()
  assert not lock_file.exists()
  # A lock from another host is never taken over: its process cannot be checked.
  lock_file.write_text(json.dumps(dict(holder, host="elsewhere")))
  with pytest.raises(workdir_lib.WorkdirInUse, match=rf"on elsewhere .*delete {lock_file}"):
    workdir_lib.RunLock(tmp_path).__enter__()
  assert lock_file.exists()


def test_a_workdir_that_is_a_file_is_refused(data_dir, tmp_path, monkeypatch):
  _fails_before_any_work(monkeypatch)
  path = tmp_path / "notes.txt"
  path.write_text("not a workdir")
  with pytest.raises(NotADirectoryError, match=r"notes.txt is a file, not a directory"):
    train.train_and_evaluate(_config(data_dir), str(path))
  assert path.read_text() == "not a workdir"
