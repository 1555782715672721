"""AdamW with linear warmup, cosine decay, decay masking, gradient clipping and
layer-wise learning-rate decay."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from splitmask_jax.runtime import sharding

# Parameters that are embeddings rather than weights: BEiT and timm exempt them
# from weight decay, as they do every vector (norm scales, biases).
_NO_DECAY_NAMES = ("pos_embedding", "mask_token")
# The parameters of scanned blocks (vit.Encoder.scan): one leaf per kind, stacked.
_SCANNED = sharding.SCANNED


def decay_mask(params):
  """A pytree of bools: True where weight decay applies.

  Decay applies to matrices and kernels; not to norm scales, biases (ndim <= 1)
  or the position and mask embeddings. Scanned blocks (`blocks`) carry a leading
  axis of blocks, which does not count.
  """

  def keep(path, leaf):
    names = {getattr(k, "key", None) for k in path}
    ndim = leaf.ndim - (_SCANNED in names)
    return ndim > 1 and not names.intersection(_NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(keep, params)


def schedule_steps(
  epochs: float, fraction: float | None, *, total_steps: int, steps_per_epoch: float
) -> int:
  """The updates of a phase of a schedule (a warmup, a freeze): `fraction` of the
  run's `total_steps` when it is set, else `epochs` epochs. A fraction keeps the
  phase's share of the run when a constant-updates protocol changes the epoch (a
  share of the data); epochs follow the data."""
  if fraction is not None:
    return int(round(fraction * total_steps))
  return int(round(epochs * steps_per_epoch))


def learning_rate_schedule(
  optim_config, batch_size: int, total_steps: int, steps_per_epoch: float
) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `min_lr`.

  The peak is `base_lr * batch_size / base_batch_size` (linear scaling). The
  warmup lasts `warmup_fraction` of the steps when that is set, else
  `warmup_epochs` epochs.
  """
  peak = optim_config.base_lr * batch_size / optim_config.base_batch_size
  warmup = schedule_steps(
    optim_config.warmup_epochs,
    optim_config.warmup_fraction,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
  )
  warmup = min(warmup, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=min(optim_config.min_lr, peak),
  )


_BLOCK = re.compile(r"block_(\d+)")


def layer_id(path: tuple[str, ...], depth: int) -> int | np.ndarray:
  """BEiT's layer index of an encoder parameter, from its path of names.

  0: the patch embedding and position / mask embeddings; i + 1: block i;
  depth + 1: everything above the blocks (the final norm, the head). A leaf of
  scanned blocks holds every block: int [depth], 1 ... depth.
  """
  if "encoder" not in path:
    return depth + 1
  if _SCANNED in path:
    return np.arange(1, depth + 1)
  for name in path:
    match = _BLOCK.fullmatch(name)
    if match:
      return int(match.group(1)) + 1
  if path[-1] in ("pos_embedding", "mask_token") or "embedding" in path:
    return 0
  return depth + 1


def layer_decay_multipliers(params, depth: int, decay: float):
  """A pytree of floats: the learning-rate multiplier of each parameter.

  A parameter of layer l (see `layer_id`) learns at decay ** (depth + 1 - l)
  times the rate: the head at the full rate, each block below at `decay` times
  the one above (BEiT's layer-wise decay; 1.0 gives all ones). A leaf of scanned
  blocks gets float64 [depth, 1, ...], block i's multiplier in row i.
  """

  def multiplier(path, leaf):
    names = tuple(str(getattr(k, "key", k)) for k in path)
    layer = layer_id(names, depth)
    if isinstance(layer, np.ndarray):  # scanned blocks: one rate per block, broadcast
      return (decay ** (depth + 1 - layer)).reshape((depth,) + (1,) * (leaf.ndim - 1))
    return float(decay ** (depth + 1 - layer))

  return jax.tree_util.tree_map_with_path(multiplier, params)


def weight_decay_schedule(optim_config, total_steps: int) -> float | optax.Schedule:
  """The weight decay of a pre-training run: `weight_decay`, or when
  `weight_decay_end` is set a schedule of the update count, a cosine from
  `weight_decay` at the first update to `weight_decay_end` at `total_steps` (DINO's
  0.04 -> 0.4)."""
  start, end = optim_config.weight_decay, optim_config.weight_decay_end
  if end is None:
    return start

  def decay(count):
    progress = jnp.minimum(count, total_steps) / max(total_steps, 1)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))

  return decay


def make_optimizer(
  optim_config,
  schedule: optax.Schedule,
  *,
  lr_multipliers=None,
  weight_decay: float | optax.Schedule | None = None,
) -> optax.GradientTransformation:
  """Gradient clipping by global norm (unless grad_clip is None), AdamW with the
  decay mask, then per-parameter learning-rate multipliers.

  Scaling AdamW's final update scales its weight decay with it, as the
  per-group learning rates of PyTorch's AdamW do.

  Args:
    lr_multipliers: a pytree like the parameters (`layer_decay_multipliers`),
      or None for one rate.
    weight_decay: a rate or a schedule of the update count
      (`weight_decay_schedule`); None: `optim_config.weight_decay`.
  """
  parts = []
  if optim_config.grad_clip is not None:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
  parts.append(
    optax.adamw(
      schedule,
      b1=optim_config.b1,
      b2=optim_config.b2,
      weight_decay=optim_config.weight_decay if weight_decay is None else weight_decay,
      mask=decay_mask,
    )
  )
  if lr_multipliers is not None:
    parts.append(
      optax.stateless(lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, lr_multipliers))
    )
  return optax.chain(*parts)


def hold_still(
  optimizer: optax.GradientTransformation, mask, steps: int
) -> optax.GradientTransformation:
  """`optimizer` with the parameters where `mask` is True held still for its first
  `steps` updates (DINO's last layer during the first epoch).

  Their gradients are zeroed before `optimizer` (so its clipping does not count
  them and its moments stay zero, as PyTorch leaves a parameter without a
  gradient alone), and their updates after it (no weight decay either).

  Args:
    mask: a pytree of bools like the parameters, or a function of them giving one.
    steps: updates to hold them for; 0 returns `optimizer` itself.
  """
  if steps <= 0:
    return optimizer
  gate = optax.masked(
    optax.scale_by_schedule(lambda count: (count >= steps).astype(jnp.float32)), mask
  )
  return optax.chain(gate, optimizer, gate)
