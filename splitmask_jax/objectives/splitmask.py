"""SplitMask: split the patches in two, inpaint each half's missing words, match the halves.

A shared encoder sees each branch's observed patches only; a shallow decoder
predicts the visual word of every patch the branch does not see (cross-entropy),
and the two branches' pooled decoder outputs of an image are matched with
symmetric InfoNCE against the other images of the global batch (of the
micro-batch under gradient accumulation, `config.accum_steps`).

Where the paper leaves a choice open, a config key makes it (config_base.py):
which patches a branch predicts when the ratio is above 0.5
(`loss.inpaint_targets`), the InfoNCE negatives (`loss.negatives`), MoCo v3's
2 tau scaling (`loss.scale_by_temperature`) and a projector before the match
(`model.projector`). The defaults are the paper's reading.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from splitmask_jax import losses
from splitmask_jax import masking
from splitmask_jax.models import pretrain
from splitmask_jax.objectives import targets

# The masks of `masking.split_patches` the model reads, in its argument order.
MODEL_INPUTS = ("visible_a", "visible_b", "masked_a", "masked_b")

# Each branch misses half of the patches: a block mask and its complement (the paper).
DEFAULT_MASK_RATIO = 0.5
# Targets are visual words of the run's codebook.
USES_TOKENIZER = True

# What each branch inpaints (config.loss.inpaint_targets). 'missing': every patch
# it does not see. 'other_visible': only the patches the other branch sees. They
# differ when the branches' observed sets leave patches out (ratio > 0.5).
INPAINT_TARGETS = ("missing", "other_visible")
# The InfoNCE negatives (config.loss.negatives), see losses.symmetric_info_nce.
NEGATIVES = losses.NEGATIVES
# What the match compares (config.model.projector), see pretrain.SplitMaskModel.
PROJECTORS = pretrain.SplitMaskModel.PROJECTORS


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
  negatives: str = "other_branch",
  scale_by_temperature: bool = False,
  train: bool,
):
  """SplitMask: split, inpaint (cross-entropy), match (symmetric InfoNCE).

  Args:
    batch: image uint8 [B, H, W, C]; visible_a, visible_b int32 [B, n];
      masked_a, masked_b int32 [B, m], the patches each branch predicts (see
      `make_mask_fn`: the complements of the visible sets, or each the other
      branch's visible set).
    codebook: float32 [V, d] unit rows.
    negatives, scale_by_temperature: see losses.symmetric_info_nce.
  Returns:
    (loss, metrics): the inpaint loss is the mean cross-entropy over the
    predicted patches of both branches; the match loss is InfoNCE between the
    model's embeddings (pooled decoder outputs, projected when the model has a
    projector) over the batch given (the global batch, or one micro-batch of it
    when the step accumulates gradients: fewer negatives, not the large batch's
    loss).
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
      out["embedding_a"],
      out["embedding_b"],
      temperature,
      negatives=negatives,
      scale_by_temperature=scale_by_temperature,
    )
    metrics["match_loss"] = match_loss
    metrics.update({f"match_{k}": v for k, v in match_metrics.items()})
    total += match_weight * match_loss
  metrics["loss"] = total
  return total, metrics


def build_model(config, **common) -> pretrain.SplitMaskModel:
  """The SplitMask model; `common` holds the keys every objective's model takes
  (encoder size, patch grid, vocabulary, dtype, ...)."""
  m = config.model
  return pretrain.SplitMaskModel(
    decoder_depth=m.decoder_depth,
    projector=m.projector,
    projector_hidden_dim=m.projector_hidden_dim,
    projector_dim=m.projector_dim,
    **common,
  )


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
    negatives=config.loss.negatives,
    scale_by_temperature=config.loss.scale_by_temperature,
  )


def make_mask_fn(
  config, grid: tuple[int, int]
) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
  """The split of one image: two disjoint observed subsets and what each predicts.

  `fn(rng)` returns `masking.split_patches`'s int32 index arrays, sorted: visible_a,
  visible_b [n] and masked_a, masked_b, the patches each branch predicts.
  config.loss.inpaint_targets='missing' (the paper's reading): each branch's
  complement [N - n]. 'other_visible': the other branch's visible set [n]
  (masked_a = visible_b, masked_b = visible_a), so that at a ratio above 0.5 the
  patches neither branch sees are decoded (they still enter the pooled match
  features) but not predicted. At ratio 0.5 on an even number of patches both
  are the same arrays.
  """
  m = config.masking
  ratio = DEFAULT_MASK_RATIO if m.ratio is None else m.ratio
  targets_kind = config.loss.inpaint_targets
  if targets_kind not in INPAINT_TARGETS:
    raise ValueError(
      f"config.loss.inpaint_targets={targets_kind!r} is invalid: allowed values are "
      f"{INPAINT_TARGETS}."
    )
  split_fn = masking.make_mask_fn(
    "splitmask", grid, ratio, kind=m.kind, min_block=m.min_block, max_block=m.max_block
  )
  if targets_kind == "missing":
    return split_fn

  def other_visible_fn(rng):
    split = split_fn(rng)
    return dict(split, masked_a=split["visible_b"].copy(), masked_b=split["visible_a"].copy())

  return other_visible_fn
