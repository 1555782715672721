"""The (data, fsdp) mesh and the parameter sharding rule."""

import math

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from splitmask_jax import config_base
from splitmask_jax import masking
from splitmask_jax import objectives
from splitmask_jax import optim
from splitmask_jax import tokenizers
from splitmask_jax import train_step as train_step_lib
from splitmask_jax.runtime import sharding

from helpers import load_config


def _mesh_config(data, fsdp):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


@pytest.mark.parametrize(
  "data, fsdp, shape",
  [
    (-1, 1, (8, 1)),
    (2, -1, (2, 4)),
    (-1, 4, (2, 4)),
    (1, -1, (1, 8)),
    (4, 1, (4, 1)),
    (1, 2, (1, 2)),
  ],
)
def test_mesh_shape(data, fsdp, shape):
  mesh = sharding.make_mesh(_mesh_config(data, fsdp))
  assert mesh.axis_names == ("data", "fsdp")
  assert tuple(mesh.devices.shape) == shape
  assert list(mesh.devices.flat) == jax.devices()[: math.prod(shape)]


@pytest.mark.parametrize(
  "data, fsdp, match",
  [
    (3, 1, "must divide the 8 devices"),
    (2, 3, "data \\* fsdp = 6 must divide"),
    (-1, 3, r"config.mesh.fsdp=3 is invalid"),
    (-1, -1, "at most one axis"),
    (0, 1, r"config.mesh.data=0 is invalid"),
    (1, -2, r"config.mesh.fsdp=-2 is invalid"),
  ],
)
def test_bad_mesh_fails_naming_the_key(data, fsdp, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(_mesh_config(data, fsdp))


@pytest.mark.parametrize(
  "key, value", [("mesh.fsdp", 0), ("profile.start_step", 0), ("profile.num_steps", -1)]
)
def test_validate_config_names_mesh_and_profile_keys(key, value):
  config = load_config("test")
  config.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError, match=f"config.{key}="):
    config_base.validate_config(config)


@pytest.mark.parametrize(
  "shape, fsdp, spec",
  [
    ((1024, 4096), 8, P(None, "fsdp")),  # the largest divisible dimension
    ((4096, 1024), 8, P("fsdp", None)),
    ((1, 196, 768), 8, P(None, None, "fsdp")),  # 196 is not divisible by 8
    ((1, 196, 768), 4, P(None, None, "fsdp")),
    ((999, 30), 8, P()),  # no divisible dimension
    ((512,), 8, P()),  # too small to be worth a gather
    ((64, 64), 8, P("fsdp", None)),  # the first of equal dimensions
    ((1024, 4096), 1, P()),
    ((), 8, P()),
  ],
)
def test_fsdp_spec(shape, fsdp, spec):
  assert sharding.fsdp_spec(shape, fsdp) == spec


def _splitmask_abstract_state(config, mesh):
  grid = config_base.grid_size(config)
  model = objectives.build_model(config, grid)
  optimizer = optim.make_optimizer(config.optim, lambda step: 1e-3)
  mask_fn = masking.make_mask_fn("splitmask", grid, 0.5)
  inputs = objectives.example_inputs(config, mask_fn(np.random.default_rng(0)))
  codebook = jax.ShapeDtypeStruct(
    (
      config.tokenizer.vocab_size,
      tokenizers.codebook_dim(config.tokenizer.patch_size, config.model.num_channels),
    ),
    np.float32,
  )
  return jax.eval_shape(
    lambda key, cb: train_step_lib.init_train_state(model, optimizer, cb, inputs, key, mesh),
    jax.random.PRNGKey(0),
    codebook,
  )


def test_vit_l_state_divides_over_fsdp():
  """ViT-L/16 SplitMask (parameters, AdamW moments, codebook): each of 8 fsdp devices
  holds an eighth, up to the small replicated arrays."""
  config = config_base.base_config()
  config.model.variant = "L/16"
  mesh = sharding.make_mesh(_mesh_config(1, 8))
  state = _splitmask_abstract_state(config, mesh)
  shardings = train_step_lib.state_shardings(state, mesh)
  leaves = jax.tree.leaves(state)
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  per_device = sum(
    math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    for x, s in zip(leaves, jax.tree.leaves(shardings))
  )
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  assert 330e6 < num_params < 345e6  # encoder 303M, 2-block decoder, 8192-way head
  assert total > 3 * 4 * num_params  # parameters and two moments in float32
  assert per_device < 1.002 * total / 8
