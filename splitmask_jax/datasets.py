"""Moved to `splitmask_jax.data.datasets`; kept for the command earlier versions printed.

`python -m splitmask_jax.datasets --dataset=NAME` still prepares a dataset, after
saying that the command is now `python -m splitmask_jax.data --dataset=NAME`.
Importing this module is an error that names the new one.
"""

import sys

if __name__ != "__main__":
  raise ImportError("splitmask_jax.datasets moved to splitmask_jax.data.datasets.")

from splitmask_jax.data import datasets  # pylint: disable=g-import-not-at-top

print(
  "Note: the command is now `python -m splitmask_jax.data " + " ".join(sys.argv[1:]) + "`.",
  file=sys.stderr,
)
datasets.main()
