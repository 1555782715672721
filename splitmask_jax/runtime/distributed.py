"""Starting JAX's multi-host runtime from explicit flags or the cluster's environment.

Every process of a multi-host run calls `initialize` before anything touches a
device. What says the run is multi-host, in order of precedence:

  1. explicit flags: `--coordinator_address=HOST:PORT --num_processes=N
     --process_id=I` on every process (launch/local.sh sets them for N local
     processes; any other launcher can too).
  2. SLURM: `srun` sets SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID
     and SLURM_STEP_NODELIST for each task (launch/slurm.sbatch); with more than
     one task, JAX derives the coordinator (the first node), the process count
     and id, and gives each GPU process the GPU of its SLURM_LOCALID.
  3. a Cloud TPU VM (libtpu is installed, as `jax[tpu]` does, and the machine has
     TPU chips on its PCI bus): JAX reads the pod's workers from the VM's metadata
     (launch/tpu_pod.sh runs the same command on every worker); a one-host TPU VM
     becomes a one-process runtime. libtpu alone is not enough: the planner
     installs it to compile for TPUs on machines that have none.
  4. otherwise: one process, nothing to start.

On CPU the processes exchange collectives over gloo (TCP), so several local
processes with a few fake devices each run the multi-host code path on one
machine.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Mapping

import jax
from absl import logging

EXPLICIT, SLURM, TPU, SINGLE = "explicit", "slurm", "tpu", "single"


def detect(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  environ: Mapping[str, str] | None = None,
) -> str:
  """How this process joins the run: EXPLICIT, SLURM, TPU or SINGLE (see the module doc).

  Raises:
    ValueError: some but not all of the three explicit flags are set, or they
      are inconsistent.
  """
  environ = os.environ if environ is None else environ
  flags = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  given = {k for k, v in flags.items() if v is not None}
  if given and given != set(flags):
    raise ValueError(
      f"--{', --'.join(sorted(given))} given without "
      f"--{', --'.join(sorted(set(flags) - given))}: a multi-process run "
      "needs all three of --coordinator_address, --num_processes, "
      "--process_id."
    )
  if given:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
        f"--num_processes={num_processes} --process_id={process_id} are "
        "invalid: need num_processes >= 1 and 0 <= process_id < "
        "num_processes."
      )
    return EXPLICIT
  if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return SLURM
  if _on_tpu_vm():
    return TPU
  return SINGLE


# The PCI vendor id of Google's TPU chips.
_GOOGLE_PCI_VENDOR = "0x1ae0"


def _on_tpu_vm() -> bool:
  """libtpu is installed and the machine has TPU chips (Google devices on its PCI bus)."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> str:
  """Starts the multi-host runtime when the run is multi-host; returns `detect`'s answer.

  Must run before any JAX computation or device query. Calling it again once
  the runtime is up does nothing.
  """
  kind = detect(coordinator_address, num_processes, process_id)
  if kind == SINGLE or jax.distributed.is_initialized():
    return kind
  # Gloo is JAX's default for CPU collectives today; pinning it keeps
  # multi-process CPU runs (the local tests) working should that change.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if kind == EXPLICIT:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()  # JAX's own SLURM / Cloud TPU detection.
  logging.info(
    "Multi-host runtime (%s): process %d of %d, %d local / %d global devices",
    kind,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return kind
