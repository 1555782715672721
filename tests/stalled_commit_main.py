"""`python -m splitmask_jax.main`, with the commit of one checkpoint step stalled.

A stand-in for a slow file system: orbax writes step $STALL_COMMIT_STEP into its
temporary folder as usual, then waits before the rename that commits it, so
that a test can kill the process in the middle of that save.

  STALL_COMMIT_STEP=8 python tests/stalled_commit_main.py --config=... --workdir=...
"""

import asyncio
import os

from absl import app
from orbax.checkpoint._src.path import atomicity

from splitmask_jax import main

_STEP = os.environ["STALL_COMMIT_STEP"]
_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _stalled_finalize(self):
  if self.get_final().name == _STEP:
    await asyncio.sleep(3600)
  await _finalize(self)


if __name__ == "__main__":
  atomicity.AtomicRenameTemporaryPath.finalize = _stalled_finalize
  app.run(main.main)
