"""SplitMask: split the patches in two, inpaint each half's missing words, match the halves.

A shared encoder sees each branch's observed patches only; a shallow decoder
predicts the visual word of every patch the branch does not see (cross-entropy),
and the two branches' pooled decoder outputs of an image are matched with
symmetric InfoNCE against the other images of the global batch (of the
micro-batch under gradient accumulation, `config.accum_steps`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from splitmask_jax import losses
from splitmask_jax import masking
from splitmask_jax.models import pretrain
from splitmask_jax.models import vit
from splitmask_jax.objectives import targets

# The masks of `masking.split_patches` the model reads, in its argument order.
MODEL_INPUTS = ("visible_a", "visible_b", "masked_a", "masked_b")


def loss(
  params,
  batch,
  codebook,
  rng,
  *,
  model,
  grid,
  token_patch,
  inpaint: bool,
  match: bool,
  match_weight: float,
  temperature: float,
  train: bool,
):
  """SplitMask: split, inpaint (cross-entropy), match (symmetric InfoNCE).

  Args:
    batch: image uint8 [B, H, W, C]; visible_a, visible_b int32 [B, n];
      masked_a, masked_b int32 [B, m] (the complements of the visible sets).
    codebook: float32 [V, d] unit rows.
  Returns:
    (loss, metrics): the inpaint loss is the mean cross-entropy over the
    missing patches of both branches; the match loss is InfoNCE over the
    batch given (the global batch, or one micro-batch of it when the step
    accumulates gradients: fewer negatives, not the large batch's loss).
  """
  images = targets.images_to_float(batch["image"])
  out = model.apply(
    params, images, *(batch[k] for k in MODEL_INPUTS), train=train, rngs={"dropout": rng}
  )
  metrics = {}
  total = jnp.zeros((), jnp.float32)
  if inpaint:
    targets_a = targets.target_tokens(images, codebook, grid, token_patch, batch["masked_a"])
    targets_b = targets.target_tokens(images, codebook, grid, token_patch, batch["masked_b"])
    inpaint_loss = 0.5 * (
      losses.token_cross_entropy(out["logits_a"], targets_a)
      + losses.token_cross_entropy(out["logits_b"], targets_b)
    )
    metrics["inpaint_loss"] = inpaint_loss
    metrics["inpaint_acc"] = 0.5 * (
      targets.token_accuracy(out["logits_a"], targets_a)
      + targets.token_accuracy(out["logits_b"], targets_b)
    )
    total += inpaint_loss
  if match:
    match_loss, match_metrics = losses.symmetric_info_nce(
      vit.pooled_features(out["features_a"]), vit.pooled_features(out["features_b"]), temperature
    )
    metrics["match_loss"] = match_loss
    metrics.update({f"match_{k}": v for k, v in match_metrics.items()})
    total += match_weight * match_loss
  metrics["loss"] = total
  return total, metrics


def build_model(config, **common) -> pretrain.SplitMaskModel:
  """The SplitMask model; `common` holds the keys every objective's model takes
  (encoder size, patch grid, vocabulary, dtype, ...)."""
  return pretrain.SplitMaskModel(decoder_depth=config.model.decoder_depth, **common)


def build_loss_fn(config, model, grid: tuple[int, int]):
  """`loss_fn(params, batch, codebook, rng, train=...) -> (loss, metrics)`."""
  return functools.partial(
    loss,
    model=model,
    grid=grid,
    token_patch=config.tokenizer.patch_size,
    inpaint=config.loss.inpaint,
    match=config.loss.match,
    match_weight=config.loss.match_weight,
    temperature=config.loss.temperature,
  )


def make_mask_fn(
  config, grid: tuple[int, int]
) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
  """The split of one image: two disjoint observed subsets and what each predicts."""
  m = config.masking
  return masking.make_mask_fn(
    "splitmask", grid, m.ratio, kind=m.kind, min_block=m.min_block, max_block=m.max_block
  )
