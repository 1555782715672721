"""The cluster scripts around a preemption (exit status 42), run for real with
stand-ins for what a cluster has: `srun`, `scontrol`, `gcloud`, `pip` and the
training run itself (`python`, `python3`), put first on the PATH.

The run's stand-in exits with one scripted status per start (a line of
`statuses`; `term:42` first sends SIGTERM to its parent, as scancel does to the
batch shell) and records its arguments; `srun` runs its command once, `scontrol`
records its arguments, `gcloud` runs an ssh `--command` here once per simulated
worker (HOME is a folder of the test) and exits as gcloud does: with the first
worker's status, in worker order, that is not 0.
"""

import os
import re
import subprocess

import pytest

from helpers import ROOT

SLURM_SCRIPT = ROOT / "launch" / "slurm.sbatch"
TPU_SCRIPT = ROOT / "launch" / "tpu_pod.sh"
CONFIG = "configs/imagenet.py"
# An argument with a space and shell metacharacters: it must reach the run intact.
EXTRA = "--config.name=a b;$HOME"

FAKES = {
  "python": r"""#!/usr/bin/env bash
set -euo pipefail
n=$(($(cat "$FAKE_STATE/starts" 2>/dev/null || echo 0) + 1))
echo "$n" > "$FAKE_STATE/starts"
printf '%s\0' "$@" > "$FAKE_STATE/start.$n"
status=$(sed -n "${n}p" "$FAKE_STATE/statuses")
if [[ $status == term:* ]]; then
  kill -TERM "$PPID"
  status=${status#term:}
fi
exit "${status:-99}"
""",
  "srun": r"""#!/usr/bin/env bash
printf '%s\0' "$@" > "$FAKE_STATE/srun"
while [[ $1 == -* ]]; do shift; done
exec "$@"
""",
  "scontrol": r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_STATE/scontrol"
exit "${FAKE_SCONTROL_STATUS:-0}"
""",
  "pip": r"""#!/usr/bin/env bash
echo "$PWD $*" >> "$FAKE_STATE/pip"
""",
  "gcloud": r"""#!/usr/bin/env bash
set -euo pipefail
echo "$*" >> "$FAKE_STATE/gcloud"
if [[ $HOME != "$FAKE_STATE"/* ]]; then
  echo "fake gcloud: HOME is not the test's own" >&2
  exit 97
fi
if [[ " $* " == *" scp "* ]]; then
  mkdir -p "$HOME/splitmask_jax"
  exit 0
fi
command=
for arg; do
  if [[ $arg == --command=* ]]; then command=${arg#--command=}; fi
done
first=0
for ((worker = 0; worker < ${FAKE_WORKERS:-1}; worker++)); do
  status=0
  (cd "$HOME" && bash -c "$command") || status=$?
  if [[ $first -eq 0 ]]; then first=$status; fi
done
exit "$first"
""",
}


@pytest.fixture
def cluster(tmp_path):
  """The stand-ins in a folder of the test, first on the PATH of the scripts it runs."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in {**FAKES, "python3": FAKES["python"]}.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  state = tmp_path / "state"
  (state / "home" / "splitmask_jax").mkdir(parents=True)
  return Cluster(bin_dir, state)


class Cluster:
  """Runs a launch script with the stand-ins and reads what they recorded."""

  def __init__(self, bin_dir, state):
    self.bin_dir = bin_dir
    self.state = state
    self.workdir = state / "runs" / "b16"

  def run(self, script, statuses, *args, **env):
    (self.state / "statuses").write_text("".join(f"{s}\n" for s in statuses))
    environ = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith("SLURM_") and k not in ("MAX_REQUEUES", "MAX_RESTARTS", "SETUP")
    }
    environ.update(
      PATH=f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
      HOME=str(self.state / "home"),
      FAKE_STATE=str(self.state),
      **{k: str(v) for k, v in env.items()},
    )
    return subprocess.run(
      ["bash", str(script), *args], env=environ, capture_output=True, text=True, timeout=60
    )

  def slurm(self, statuses, **env):
    env = {"SLURM_JOB_ID": 1234, **env}
    return self.run(SLURM_SCRIPT, statuses, CONFIG, str(self.workdir), EXTRA, **env)

  def tpu(self, statuses, **env):
    env = {"TPU_NAME": "my-v4-64", "ZONE": "us-central2-b", **env}
    return self.run(TPU_SCRIPT, statuses, CONFIG, str(self.workdir), EXTRA, **env)

  def starts(self):
    """The run's arguments at each start."""
    count = int(self._read("starts") or 0)
    return [self._read(f"start.{i}").split("\0")[:-1] for i in range(1, count + 1)]

  def lines(self, name):
    return self._read(name).splitlines()

  def _read(self, name):
    path = self.state / name
    return path.read_text() if path.exists() else ""


def _run_args(cluster):
  return ["-m", "splitmask_jax.main", f"--config={CONFIG}", f"--workdir={cluster.workdir}", EXTRA]


def _sbatch_directives(path):
  """The options sbatch reads: #SBATCH lines before the first command."""
  directives = []
  for line in path.read_text().splitlines()[1:]:
    if line.startswith("#SBATCH"):
      directives.append(line.split(None, 1)[1])
    elif line.strip() and not line.startswith("#"):
      break
  return directives


# SLURM


def test_sbatch_asks_for_the_signal_before_the_time_limit_and_allows_requeueing():
  directives = _sbatch_directives(SLURM_SCRIPT)
  signal = [d for d in directives if d.startswith("--signal=")]
  assert len(signal) == 1, directives
  # TERM to the job steps (the tasks), not "B:" (the batch shell alone).
  match = re.fullmatch(r"--signal=(?:SIG)?TERM@(\d+)", signal[0])
  assert match, signal
  assert int(match.group(1)) >= 120  # finishing a step and a save takes time
  assert "--requeue" in directives
  # A requeued job writes to the same output file: append, don't truncate it.
  assert "--open-mode=append" in directives
  assert any(d.startswith("--time=") for d in directives)


def test_slurm_requeues_a_preempted_run_and_the_requeued_job_resumes(cluster):
  result = cluster.slurm([42])
  assert result.returncode == 0, result.stderr
  assert cluster.lines("scontrol") == ["requeue 1234"]
  assert "requeue 1 of at most 20" in result.stderr
  assert cluster.workdir.is_dir()
  srun_args = (cluster.state / "srun").read_text().split("\0")[:-1]
  assert srun_args == ["--kill-on-bad-exit=1", "python", *_run_args(cluster)]

  # SLURM starts the requeued job with the same arguments and SLURM_RESTART_COUNT.
  (cluster.state / "starts").unlink()
  result = cluster.slurm([0], SLURM_RESTART_COUNT=1)
  assert result.returncode == 0, result.stderr
  assert cluster.starts() == [_run_args(cluster)]
  assert cluster.lines("scontrol") == ["requeue 1234"]  # not again


def test_slurm_finished_run_is_not_requeued(cluster):
  result = cluster.slurm([0])
  assert result.returncode == 0, result.stderr
  assert cluster.starts() == [_run_args(cluster)]
  assert cluster.lines("scontrol") == []


@pytest.mark.parametrize("status", [1, 2, 130, 137])
def test_slurm_failed_run_ends_the_job_with_its_status(cluster, status):
  result = cluster.slurm([status])
  assert result.returncode == status
  assert cluster.lines("scontrol") == []


@pytest.mark.parametrize(
  "restarts,env,requeued",
  [
    (19, {}, True),
    (20, {}, False),
    (2, {"MAX_REQUEUES": 3}, True),
    (3, {"MAX_REQUEUES": 3}, False),
  ],
)
def test_slurm_requeues_at_most_max_requeues_times(cluster, restarts, env, requeued):
  result = cluster.slurm([42], SLURM_RESTART_COUNT=restarts, **env)
  if requeued:
    assert result.returncode == 0, result.stderr
    assert cluster.lines("scontrol") == ["requeue 1234"]
  else:
    assert result.returncode == 42
    assert cluster.lines("scontrol") == []
    assert "MAX_REQUEUES" in result.stderr and "resubmit" in result.stderr


def test_slurm_cancelled_job_is_not_requeued(cluster):
  # scancel (or SLURM's own preemption) sends SIGTERM to the batch shell too.
  result = cluster.slurm(["term:42"])
  assert result.returncode == 42
  assert cluster.lines("scontrol") == []
  assert "cancelled" in result.stderr


def test_slurm_failed_requeue_says_to_resubmit(cluster):
  result = cluster.slurm([42], FAKE_SCONTROL_STATUS=1)
  assert result.returncode == 42
  assert cluster.lines("scontrol") == ["requeue 1234"]
  assert "resubmit" in result.stderr


def test_slurm_preempted_run_outside_a_job_is_not_requeued(cluster):
  result = cluster.slurm([42], SLURM_JOB_ID="")
  assert result.returncode == 42
  assert cluster.lines("scontrol") == []
  assert "resubmit" in result.stderr


def test_slurm_usage(cluster):
  result = cluster.run(SLURM_SCRIPT, [], CONFIG)
  assert result.returncode == 2
  assert "usage" in result.stderr
  assert cluster.starts() == []


# Cloud TPU VM pod


def test_tpu_pod_restarts_a_preempted_run_until_it_finishes(cluster):
  result = cluster.tpu([42, 42, 0])
  assert result.returncode == 0, result.stderr
  assert cluster.starts() == [_run_args(cluster)] * 3
  calls = cluster.lines("gcloud")
  assert len(calls) == 3
  assert all(
    c.startswith("compute tpus tpu-vm ssh my-v4-64 --zone=us-central2-b --worker=all")
    for c in calls
  )
  assert "restart 2 of at most 20" in result.stderr


@pytest.mark.parametrize("status", [1, 130, 255])
def test_tpu_pod_does_not_restart_a_failed_run(cluster, status):
  result = cluster.tpu([status, 0])
  assert result.returncode == status
  assert len(cluster.starts()) == 1


@pytest.mark.parametrize("max_restarts,starts", [(None, 21), (2, 3), (0, 1)])
def test_tpu_pod_restarts_at_most_max_restarts_times(cluster, max_restarts, starts):
  env = {} if max_restarts is None else {"MAX_RESTARTS": max_restarts}
  result = cluster.tpu([42] * 30, **env)
  assert result.returncode == 42
  assert len(cluster.starts()) == starts
  assert "MAX_RESTARTS" in result.stderr


@pytest.mark.parametrize(
  "statuses,returncode,starts",
  [([42, 42, 0, 0], 0, 4), ([0, 1, 0, 0], 1, 2), ([42, 1, 0, 0], 0, 4)],
)
def test_tpu_pod_status_of_several_workers(cluster, statuses, returncode, starts):
  # gcloud reports the first worker's status that is not 0: 42 from worker 0
  # restarts even beside worker 1's error (MAX_RESTARTS bounds that).
  result = cluster.tpu(statuses, FAKE_WORKERS=2)
  assert result.returncode == returncode, result.stderr
  assert len(cluster.starts()) == starts


def test_tpu_pod_sets_up_once_then_restarts_only_the_run(cluster):
  result = cluster.tpu([42, 0], SETUP=1)
  assert result.returncode == 0, result.stderr
  calls = cluster.lines("gcloud")
  assert [c.split()[3] for c in calls] == ["ssh", "scp", "ssh", "ssh", "ssh"]
  assert calls[0].endswith("--command=rm -rf ~/splitmask_jax")
  assert "pip install" in calls[2]
  assert len(cluster.lines("pip")) == 1
  assert len(cluster.starts()) == 2


def test_tpu_pod_usage(cluster):
  result = cluster.tpu([], TPU_NAME="")
  assert result.returncode == 2
  assert "usage" in result.stderr
  assert cluster.lines("gcloud") == []
