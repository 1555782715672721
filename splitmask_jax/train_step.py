"""The train state, its sharded initialisation, and the jitted train and eval steps."""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from splitmask_jax.runtime import sharding

# `(params, state, batch, rng, *, train) -> (loss, metrics)`: the state supplies
# what the loss reads besides the parameters (the pre-training codebook, an
# objective's state).
StepLossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
# The metrics key under which a loss may return what its objective's state update
# reads (DINO: the teacher's mean output): any tree of arrays, averaged over the
# micro-batches like the metrics, never logged.
STATS_KEY = "stats"
# `(objective_state, params, stats, step) -> objective_state`: an objective's update
# of its state after the optimizer's, from the updated parameters, the loss's
# STATS_KEY tree and the updates done before this one.
StateUpdateFn = Callable[[Any, Any, Any, jax.Array], Any]


class StepParts(NamedTuple):
  """What an objective contributes to the train step (objectives.build_step_parts).

  Attributes:
    loss: the step's loss.
    init_objective_state: `params -> objective_state`, the TrainState field's
      initial value; None: the objective carries no state.
    update_objective_state: its update after each optimizer update (see
      `make_train_step`); None with `init_objective_state`.
    wrap_optimizer: what the objective changes in the run's optimizer (DINO holds
      its last layer still during the first epoch), applied inside the skipping
      wrapper; None: nothing.
  """

  loss: StepLossFn
  init_objective_state: Callable[[Any], Any] | None = None
  update_objective_state: StateUpdateFn | None = None
  wrap_optimizer: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = (
    None
  )


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and a checkpoint must hold.

  The codebook is not trained; it lives here so that a resumed or evaluated
  run tokenizes with exactly the codebook the run was trained with.
  `objective_state` is what an objective carries from step to step besides the
  trained parameters (DINO: the EMA teacher, laid out like the parameters, and
  the centre); None for the others, whose state tree and checkpoints are as
  they were before it existed (runtime/checkpointing.py leaves None fields out).
  """

  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  codebook: jax.Array  # float32 [V, d]
  objective_state: Any = None


def init_train_state(
  model,
  optimizer: optax.GradientTransformation,
  codebook: jax.Array,
  example_inputs: tuple,
  rng: jax.Array,
  mesh: Mesh,
  init_objective_state: Callable[[Any], Any] | None = None,
) -> TrainState:
  """Initialises the state directly into its sharding (see `state_shardings`).

  No device ever holds more than its shard: the initialisation itself is
  compiled with the sharded outputs.

  Args:
    codebook: float32 [V, d], the same value on every process.
    example_inputs: positional model inputs with a batch of one, used for shapes only.
    rng: the parameter-init key.
    init_objective_state: `params -> objective_state` (DINO's teacher and centre),
      or None for an objective that carries none.
  """

  init = _init_fn(model, optimizer, example_inputs, init_objective_state)
  abstract = jax.eval_shape(init, rng, codebook)
  return jax.jit(init, out_shardings=state_shardings(abstract, mesh))(rng, codebook)


def abstract_train_state(
  model,
  optimizer: optax.GradientTransformation,
  codebook_shape: tuple[int, int],
  example_inputs: tuple,
  init_objective_state: Callable[[Any], Any] | None = None,
) -> TrainState:
  """The TrainState's shapes and dtypes (jax.ShapeDtypeStruct leaves), computing nothing."""
  codebook = jax.ShapeDtypeStruct(codebook_shape, jnp.float32)
  init = _init_fn(model, optimizer, example_inputs, init_objective_state)
  return jax.eval_shape(init, jax.random.PRNGKey(0), codebook)


def _init_fn(model, optimizer, example_inputs, init_objective_state=None):
  def init(rng, codebook):
    params = model.init({"params": rng, "dropout": rng}, *example_inputs, train=False)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      codebook=codebook,
      objective_state=None if init_objective_state is None else init_objective_state(params),
    )

  return init


def state_shardings(state, mesh: Mesh):
  """Shardings of a TrainState (or its abstract shapes): large arrays split over 'fsdp'."""
  return sharding.fsdp_shardings(state, mesh)


def split_micro_batches(batch, accum_steps: int):
  """Splits a global batch into `accum_steps` micro-batches, one after the other.

  Micro-batch i holds the examples {j : j % accum_steps == i}: a device holding
  a contiguous slice of the batch (the data-parallel layout, `batch_sharded`)
  holds the same share of every micro-batch, so the split is a local reshape and
  transpose with no data movement, and every micro-batch stays spread over all
  the devices. (Contiguous blocks would put micro-batch i on a few devices only.)

  Args:
    batch: a tree of arrays [B, ...] with B divisible by accum_steps.

  Returns:
    The same tree of arrays [accum_steps, B // accum_steps, ...].
  """

  def split(x):
    rows = x.shape[0] // accum_steps
    return jnp.swapaxes(x.reshape(rows, accum_steps, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def accumulate_gradients(
  loss_fn: StepLossFn,
  params,
  state,
  batch,
  rng: jax.Array,
  accum_steps: int = 1,
  *,
  train: bool = True,
  mesh: Mesh | None = None,
  grad_shardings=None,
):
  """`value_and_grad(loss_fn, has_aux=True)` over `accum_steps` micro-batches.

  With accum_steps = 1 this is exactly `value_and_grad(loss_fn)(params, state,
  batch, rng, train=train)`: the same key and the same computation as before
  accumulation existed. Otherwise the micro-batches of `split_micro_batches` run
  one after the other (a `lax.scan`, so only one micro-batch's activations are
  live); micro-batch i draws its randomness from `fold_in(rng, i)`, and the loss,
  every metric and the gradients are their means over the micro-batches. For a
  loss that is a mean over examples (each example weighing the same) the result
  is the gradient of the whole batch; a loss that compares the examples of its
  batch with each other (SplitMask's InfoNCE match) sees only its micro-batch.

  Args:
    loss_fn: `(params, state, batch, rng, *, train) -> (loss, metrics)`.
    batch: a tree of arrays [B, ...], B divisible by accum_steps.
    mesh: where the batch is sharded; keeps each micro-batch split over all its
      devices (None: no constraint).
    grad_shardings: the parameters' shardings, for the gradients' running sum
      (None: no constraint).

  Returns:
    ((loss float32 [], metrics {name: []}), grads like params).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, state, batch, rng, train=train)
  devices = 1 if mesh is None else mesh.devices.size
  for size in {x.shape[0] for x in jax.tree.leaves(batch)}:
    if size % accum_steps or (size // accum_steps) % devices:
      raise ValueError(
        f"A batch of {size} cannot be split into accum_steps={accum_steps} micro-batches "
        f"that each divide over the {devices} devices of the mesh."
      )

  def constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

  micro = split_micro_batches(batch, accum_steps)
  if mesh is not None:
    micro = constrain(micro, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))

  def body(grad_sum, xs):
    micro_batch, index = xs
    (loss, metrics), grads = grad_fn(
      params, state, micro_batch, jax.random.fold_in(rng, index), train=train
    )
    grad_sum = jax.tree.map(jnp.add, grad_sum, constrain(grads, grad_shardings))
    return constrain(grad_sum, grad_shardings), (loss, metrics)

  zeros = constrain(jax.tree.map(jnp.zeros_like, params), grad_shardings)
  grad_sum, (losses, metrics) = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
  grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
  loss, metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), (losses, metrics))
  return (loss, metrics), grads


def make_train_step(
  loss_fn: StepLossFn,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  seed: int,
  mesh: Mesh,
  state,
  accum_steps: int = 1,
  update_objective_state: StateUpdateFn | None = None,
):
  """Returns the jitted `(state, batch) -> (state, metrics)`.

  `state` is a TrainState or any flax dataclass with `step`, `params` and
  `opt_state` (the fine-tuning state); it fixes the shardings.

  With `update_objective_state` the TrainState's `objective_state` is updated
  after the optimizer, in the same jitted step (no host synchronisation), from
  the new parameters and the STATS_KEY tree of the loss's metrics (the mean over
  the whole batch under accumulation); a step whose gradients `optax.apply_if_finite`
  found not finite (a skipped update, or one that stops the run) leaves it as it
  was. STATS_KEY never reaches the returned metrics.

  The dropout / drop-path key of step s is `fold_in(key(seed), s)`, so a
  resumed run draws the same randomness as an unbroken one. The state buffer is
  donated: the update happens in place.

  With accum_steps > 1 an update averages the gradients of `accum_steps`
  micro-batches of B / accum_steps examples, computed one after the other
  (`accumulate_gradients`: micro-batch i draws from `fold_in(step key, i)`);
  the metrics are their means. accum_steps = 1 is the plain step.
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps} is invalid: it must be >= 1.")
  base_rng = jax.random.PRNGKey(seed)
  shardings = state_shardings(state, mesh)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    (_, metrics), grads = accumulate_gradients(
      loss_fn,
      state.params,
      state,
      batch,
      rng,
      accum_steps,
      mesh=mesh,
      grad_shardings=shardings.params,
    )
    metrics = dict(metrics)
    stats = metrics.pop(STATS_KEY, None)
    # Gradients laid out like the parameters: the batch reduction ends in each
    # device's shard (a reduce-scatter where the backend forms one) and the
    # update runs on that shard only.
    grads = jax.lax.with_sharding_constraint(grads, shardings.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if update_objective_state is not None:
      updated = update_objective_state(state.objective_state, params, stats, state.step)
      if isinstance(opt_state, optax.ApplyIfFiniteState):
        updated = jax.tree.map(
          lambda new, old: jnp.where(opt_state.last_finite, new, old),
          updated,
          state.objective_state,
        )
      updated = jax.lax.with_sharding_constraint(updated, shardings.objective_state)
      new_state = new_state.replace(objective_state=updated)
    return new_state, metrics

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
    return {k: v for k, v in metrics.items() if k != STATS_KEY}

  return jax.jit(
    step,
    in_shardings=(state_shardings(state, mesh), sharding.batch_sharded(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
