"""AdamW with linear warmup, cosine decay, decay masking and gradient clipping."""

from __future__ import annotations

import jax
import optax

# Parameters that are embeddings rather than weights: BEiT and timm exempt them
# from weight decay, as they do every vector (norm scales, biases).
_NO_DECAY_NAMES = ("pos_embedding", "mask_token")


def decay_mask(params):
  """A pytree of bools: True where weight decay applies.

  Decay applies to matrices and kernels; not to norm scales, biases (ndim <= 1)
  or the position and mask embeddings.
  """
  def keep(path, leaf):
    names = {getattr(k, "key", None) for k in path}
    return leaf.ndim > 1 and not names.intersection(_NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(optim_config, batch_size: int, total_steps: int,
                           steps_per_epoch: float) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `min_lr`.

  The peak is `base_lr * batch_size / base_batch_size` (linear scaling).
  """
  peak = optim_config.base_lr * batch_size / optim_config.base_batch_size
  warmup = int(round(optim_config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=min(optim_config.min_lr, peak))


def make_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW with the decay mask."""
  return optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                  weight_decay=optim_config.weight_decay, mask=decay_mask),
  )
