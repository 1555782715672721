"""`python -m splitmask_jax.data --dataset=NAME [--data_dir=D] [--manual_dir=M]`:
prepares a dataset once as ArrayRecord (see `datasets.main`)."""

from splitmask_jax.data import datasets

if __name__ == "__main__":
  datasets.main()
