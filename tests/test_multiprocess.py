"""Multi-host runs on one machine: 2 processes x 2 CPU devices against 1 process x 4 devices.

The processes are real (`python -m splitmask_jax.main`), started once through
the SLURM environment JAX reads and once through launch/local.sh's explicit
flags; their collectives go over gloo. The same config, seed and data must give
the same per-step losses and k-NN accuracy as one process with four devices.
"""

import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from splitmask_jax import train
from splitmask_jax.data import datasets
from splitmask_jax.runtime import distributed
from splitmask_jax.runtime import metric_log

from helpers import CONFIG_FILE
from helpers import ROOT
from helpers import load_config

# Every test here starts several processes of the whole program: the slow tier.
pytestmark = pytest.mark.slow

NUM_STEPS = 4
COMPARED = ("loss", "inpaint_loss", "match_loss", "grad_norm")


def _overrides(fake_dir, data_dir) -> dict:
  # Every step logged, a checkpoint every 2 steps; the test config's k-NN on.
  # Random patches for a codebook: XLA's CPU compiler rounds the k-means fit's
  # member sums differently with 4 local devices than with 2 (an ulp), and a
  # patch near a tie between two centroids then joins the other one, which
  # moves the codebook by 6e-4 and step 1's loss by 5e-5 (relative). The fit is
  # reproducible for one local device count, not across them; the steps are
  # what this file checks.
  return {
    "tokenizer.kind": "random_patches",
    "data.manual_dir": str(fake_dir),
    "data.data_dir": str(data_dir),
    "num_steps": NUM_STEPS,
    "log_every": 1,
    "checkpoint_every": 2,
    "eval_every": NUM_STEPS,
  }


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _clean_env(**extra) -> dict:
  """The test session's environment without its 8-device XLA_FLAGS or any SLURM job."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("SLURM_")}
  env.update(extra)
  return env


def _report(logs: dict) -> str:
  """What explains a failed multi-process run: every process's error lines
  (ERROR/FATAL lines in the console's form or absl's, exceptions) and the end of its log."""
  parts = []
  for i, log in logs.items():
    lines = log.splitlines()
    errors = [
      ln
      for ln in lines
      if re.match(r"([EF]\d{4}|\d\d:\d\d:\d\d (ERROR|CRITICAL)) ", ln) or "Error" in ln
    ]
    parts.append(f"--- process {i}: errors\n" + "\n".join(errors[-30:]))
    parts.append(f"--- process {i}: end of log\n" + "\n".join(lines[-25:]))
  return "\n".join(parts)


def _by_step(workdir) -> dict:
  """The training records of a workdir by step; each of steps 1..NUM_STEPS once."""
  records = [r for r in metric_log.read_metrics(str(workdir)) if "loss" in r]
  assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
  return {r["step"]: r for r in records}


@pytest.fixture(scope="module")
def data_dir(fake_fashion_mnist, tmp_path_factory):
  """The fake dataset, prepared before any multi-process run reads it."""
  folder = tmp_path_factory.mktemp("tfds")
  datasets.prepare_dataset("fashion_mnist", str(folder), str(fake_fashion_mnist))
  return folder


@pytest.fixture(scope="module")
def reference(fake_fashion_mnist, data_dir, tmp_path_factory):
  """Metrics of one process with 4 of the session's 8 CPU devices."""
  config = load_config("test")
  config.update_from_flattened_dict(_overrides(fake_fashion_mnist, data_dir))
  config.mesh.data = 4
  workdir = tmp_path_factory.mktemp("reference")
  final = train.train_and_evaluate(config, str(workdir))
  return _by_step(workdir), final


@pytest.fixture(scope="module")
def slurm_run(fake_fashion_mnist, data_dir, tmp_path_factory):
  """2 processes x 2 devices, data parallel, found by JAX from SLURM's variables."""
  workdir = tmp_path_factory.mktemp("slurm_run")
  port = _free_port()
  cmd = [
    sys.executable,
    "-m",
    "splitmask_jax.main",
    f"--config={CONFIG_FILE}:test",
    f"--workdir={workdir}",
    *_flags(_overrides(fake_fashion_mnist, data_dir)),
  ]
  procs = []
  for i in range(2):
    env = _clean_env(
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      SLURM_JOB_ID="1",
      SLURM_NTASKS="2",
      SLURM_PROCID=str(i),
      SLURM_LOCALID=str(i),
      SLURM_STEP_NODELIST="localhost",
      JAX_COORDINATOR_PORT=str(port),
    )
    procs.append(
      subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
    )
  logs = {i: proc.communicate(timeout=600)[0] for i, proc in enumerate(procs)}
  assert [proc.returncode for proc in procs] == [0, 0], _report(logs)
  for i, log in logs.items():
    assert f"Multi-host runtime (slurm): process {i} of 2, 2 local / 4 global" in log
  return workdir


def test_two_processes_equal_one_process(reference, slurm_run):
  expected, expected_final = reference
  records = _by_step(slurm_run)
  for step, record in records.items():
    for key in COMPARED:
      np.testing.assert_allclose(
        record[key], expected[step][key], rtol=1e-5, err_msg=f"step {step}, {key}"
      )
  everything = metric_log.read_metrics(str(slurm_run))
  val = next(r for r in everything if "val_loss" in r)
  np.testing.assert_allclose(val["val_loss"], expected_final["val_loss"], rtol=1e-5)
  # Both processes' features gathered: the same neighbours as one process.
  knn = everything[-1]
  assert knn["knn_top1"] == expected_final["knn_top1"]
  assert knn["knn_top1_random_init"] == expected_final["knn_top1_random_init"]
  # Both processes wrote their share of every checkpoint; only process 0 wrote logs.
  assert sorted(
    p.name for p in (slurm_run / "checkpoints" / "4" / "data").iterdir() if p.suffix == ".json"
  ) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert len(list(slurm_run.glob("events.out.tfevents.*"))) == 1


def test_fsdp_restart_from_data_parallel_checkpoint(
  reference, slurm_run, fake_fashion_mnist, data_dir, tmp_path
):
  """launch/local.sh restarts the step-2 checkpoint of the data-parallel run with
  parameters and optimizer state sharded over all 4 devices of both processes;
  steps 3 and 4 match the one-process run, and both processes trace step 4."""
  expected, _ = reference
  workdir = tmp_path / "fsdp"
  shutil.copytree(slurm_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
  overrides = dict(
    _overrides(fake_fashion_mnist, data_dir),
    **{
      "mesh.data": 1,
      "mesh.fsdp": -1,
      "knn.enabled": False,
      "profile.start_step": 3,
      "profile.num_steps": 1,
    },
  )
  env = _clean_env(
    NUM_PROCESSES="2", CPU_DEVICES="2", PORT=str(_free_port()), PYTHON=sys.executable
  )
  result = subprocess.run(
    [str(ROOT / "launch" / "local.sh"), f"{CONFIG_FILE}:test", str(workdir), *_flags(overrides)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  logs = {i: (workdir / f"process_{i}.log").read_text() for i in range(2)}
  assert result.returncode == 0, result.stderr[-2000:] + _report(logs)
  assert "Resumed from step 2" in logs[1]

  records = _by_step(workdir)
  for step in (3, 4):
    for key in COMPARED:
      np.testing.assert_allclose(
        records[step][key], expected[step][key], rtol=1e-5, err_msg=f"step {step}, {key}"
      )
  for i in range(2):
    trace = workdir / "profile" / f"process_{i}"
    assert list(trace.glob("plugins/profile/*/*.xplane.pb")), f"no trace of process {i}"
    assert list(trace.glob("plugins/profile/*/perfetto_trace.json.gz"))


_SLURM_JOB = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}


@pytest.mark.parametrize(
  "flags, environ, tpu_vm, expected",
  [
    (("localhost:1234", 2, 1), _SLURM_JOB, True, distributed.EXPLICIT),
    ((None, None, None), _SLURM_JOB, True, distributed.SLURM),
    ((None, None, None), dict(_SLURM_JOB, SLURM_NTASKS="1"), False, distributed.SINGLE),
    ((None, None, None), {}, True, distributed.TPU),
    ((None, None, None), {}, False, distributed.SINGLE),
  ],
)
def test_detect_precedence(flags, environ, tpu_vm, expected, monkeypatch):
  monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: tpu_vm)
  assert distributed.detect(*flags, environ=environ) == expected


def test_libtpu_without_tpu_chips_is_not_a_tpu_vm():
  """The planner's libtpu (this machine has no TPU) leaves a plain run single-process."""
  assert distributed.detect(environ={}) == distributed.SINGLE


@pytest.mark.parametrize(
  "flags, match",
  [
    (("localhost:1234", 2, None), "--process_id"),
    ((None, 2, 0), "--coordinator_address"),
    (("localhost:1234", 2, 2), "process_id < num_processes"),
  ],
)
def test_detect_rejects_incomplete_flags(flags, match):
  with pytest.raises(ValueError, match=match):
    distributed.detect(*flags, environ={})
