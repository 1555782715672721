"""The train state, its sharded initialisation, and the jitted train and eval steps."""

from __future__ import annotations

from typing import Any
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from splitmask_jax.runtime import sharding

# `(params, state, batch, rng, *, train) -> (loss, metrics)`: the state supplies
# what the loss reads besides the parameters (the pre-training codebook).
StepLossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and a checkpoint must hold.

  The codebook is not trained; it lives here so that a resumed or evaluated
  run tokenizes with exactly the codebook the run was trained with.
  """

  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  codebook: jax.Array  # float32 [V, d]


def init_train_state(
  model,
  optimizer: optax.GradientTransformation,
  codebook: jax.Array,
  example_inputs: tuple,
  rng: jax.Array,
  mesh: Mesh,
) -> TrainState:
  """Initialises the state directly into its sharding (see `state_shardings`).

  No device ever holds more than its shard: the initialisation itself is
  compiled with the sharded outputs.

  Args:
    codebook: float32 [V, d], the same value on every process.
    example_inputs: positional model inputs with a batch of one, used for shapes only.
    rng: the parameter-init key.
  """

  init = _init_fn(model, optimizer, example_inputs)
  abstract = jax.eval_shape(init, rng, codebook)
  return jax.jit(init, out_shardings=state_shardings(abstract, mesh))(rng, codebook)


def abstract_train_state(
  model,
  optimizer: optax.GradientTransformation,
  codebook_shape: tuple[int, int],
  example_inputs: tuple,
) -> TrainState:
  """The TrainState's shapes and dtypes (jax.ShapeDtypeStruct leaves), computing nothing."""
  codebook = jax.ShapeDtypeStruct(codebook_shape, jnp.float32)
  return jax.eval_shape(_init_fn(model, optimizer, example_inputs), jax.random.PRNGKey(0), codebook)


def _init_fn(model, optimizer, example_inputs):
  def init(rng, codebook):
    params = model.init({"params": rng, "dropout": rng}, *example_inputs, train=False)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      codebook=codebook,
    )

  return init


def state_shardings(state, mesh: Mesh):
  """Shardings of a TrainState (or its abstract shapes): large arrays split over 'fsdp'."""
  return sharding.fsdp_shardings(state, mesh)


def make_train_step(
  loss_fn: StepLossFn,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  seed: int,
  mesh: Mesh,
  state,
):
  """Returns the jitted `(state, batch) -> (state, metrics)`.

  `state` is a TrainState or any flax dataclass with `step`, `params` and
  `opt_state` (the fine-tuning state); it fixes the shardings.

  The dropout / drop-path key of step s is `fold_in(key(seed), s)`, so a
  resumed run draws the same randomness as an unbroken one. The state buffer is
  donated: the update happens in place.
  """
  base_rng = jax.random.PRNGKey(seed)
  shardings = state_shardings(state, mesh)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, state, batch, rng, train=True)
    # Gradients laid out like the parameters: the batch reduction ends in each
    # device's shard (a reduce-scatter where the backend forms one) and the
    # update runs on that shard only.
    grads = jax.lax.with_sharding_constraint(grads, shardings.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(
    step,
    in_shardings=(shardings, sharding.batch_sharded(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def make_eval_step(loss_fn: StepLossFn, mesh: Mesh, state: TrainState):
  """Returns the jitted `(state, batch) -> metrics` (no dropout, no update)."""

  def step(state: TrainState, batch):
    _, metrics = loss_fn(state.params, state, batch, jax.random.PRNGKey(0), train=False)
    return metrics

  return jax.jit(
    step,
    in_shardings=(state_shardings(state, mesh), sharding.batch_sharded(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
