r"""Pre-trains a ViT with SplitMask or BEiT, fine-tunes it, or probes its blocks.

  python -m splitmask_jax.main --config=configs/fashion_mnist.py --workdir=DIR \
      [--config.key=value ...]
  python -m splitmask_jax.main --config=configs/fashion_mnist_finetune.py \
      --config.init.workdir=DIR --workdir=FT_DIR

`config.task` says which: 'pretrain' (train.py), 'finetune' (finetune.py) or
'probe' (probe.py). Options after the config file's colon select a variant
(config_args.py): `--config=configs/fashion_mnist.py:beit,test`. Running again with the same workdir
resumes from its latest checkpoint.

The console shows a line per log step (loss and its parts, images/s, time left), per
evaluation and per save, and a summary at the end; `--verbosity=1` adds every
library's log and the full metric records (runtime/console.py).

Exit status: 0 when done; 42 (`preemption.EXIT_CODE`) when a preemption notice
(SIGTERM) stopped the run after saving its current step, 130 when Ctrl-C did: run
the same command again to resume; 1 on an error (an invalid config, a non-finite
loss, a full disk, a workdir in use by another run, ...). A command line that
names a config file, a config argument or a config key that does not exist fails
with one message before anything is loaded or compiled (command_line.py).
"""

import functools
import sys
import time

if __name__ == "__main__":
  # Before JAX is imported: the step's large host buffers on huge pages (see there).
  from splitmask_jax.runtime import host_memory

  host_memory.reexec_with_huge_pages()

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from splitmask_jax import command_line
from splitmask_jax import config_base
from splitmask_jax import finetune
from splitmask_jax import probe
from splitmask_jax import train
from splitmask_jax.runtime import console
from splitmask_jax.runtime import distributed
from splitmask_jax.runtime import preemption
from splitmask_jax.runtime import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume a workdir whose saved config.json differs from --config on keys that "
  "change what the run computes (by default such a workdir is refused).",
)
# Multi-host runs started by hand or by launch/local.sh; SLURM and Cloud TPU
# pods are detected from their environment (see runtime/distributed.py).
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "HOST:PORT of process 0's coordinator service."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def run(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Runs `config.task` in `workdir`; returns its final values.

  Raises:
    workdir.DiskFull: the workdir's disk filled up, whatever was being written
      (the error it caused is its cause).
  """
  config_base.schema_of(config)  # raises for an unknown task
  if config.task == "probe":
    task = functools.partial(probe.probe_blocks, config, workdir)
  else:
    run_task = (
      train.train_and_evaluate if config.task == "pretrain" else finetune.finetune_and_evaluate
    )
    task = functools.partial(run_task, config, workdir, allow_config_change=allow_config_change)
  try:
    return task()
  except workdir_lib.DiskFull:
    raise
  except Exception as e:
    disk_full = workdir_lib.disk_full_error(e, workdir)
    if disk_full is None:
      raise
    raise disk_full from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  console.setup()
  start = time.monotonic()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    results = run(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(e.exit_code)
  except (workdir_lib.DiskFull, workdir_lib.WorkdirInUse, NotADirectoryError) as e:
    # The message says what happened and what to do; a traceback adds nothing.
    logging.error("%s", e)
    sys.exit(1)
  logging.debug("Final: %s", results)
  logging.info(
    "%s", console.summary(config.task, workdir, results, time.monotonic() - start, sys.argv)
  )


if __name__ == "__main__":
  app.run(main, flags_parser=command_line.parse_flags)
