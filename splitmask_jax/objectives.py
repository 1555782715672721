"""The pre-training objectives: a batch and parameters in, a loss and its parts out.

Both objectives tokenize the image on the device (the tokenizer is a fixed
codebook, so this is one matmul and an argmax) and compare the model's
predictions with those tokens; SplitMask adds the InfoNCE match between the
two branches' pooled decoder outputs.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from splitmask_jax import losses
from splitmask_jax import tokenizers
from splitmask_jax.models import pretrain
from splitmask_jax.models import vit

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 in [-1, 1], the model's and tokenizer's input."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def _token_accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))


def _targets(images, codebook, grid, token_patch, positions):
  """Visual tokens of the patches at `positions` [B, m] -> int32 [B, m]."""
  patches = tokenizers.tokenizer_patches(images, grid, token_patch)
  tokens = tokenizers.tokenize(patches, codebook)
  return jnp.take_along_axis(tokens, positions, axis=1)


def splitmask_loss(params, batch, codebook, rng, *, model, grid, token_patch,
                   inpaint: bool, match: bool, match_weight: float,
                   temperature: float, train: bool):
  """SplitMask: split, inpaint (cross-entropy), match (symmetric InfoNCE).

  Args:
    batch: image uint8 [B, H, W, C]; visible_a, visible_b int32 [B, n];
      masked_a, masked_b int32 [B, m] (the complements of the visible sets).
    codebook: float32 [V, d] unit rows.
  Returns:
    (loss, metrics): the inpaint loss is the mean cross-entropy over the
    missing patches of both branches; the match loss is InfoNCE over the
    global batch.
  """
  images = images_to_float(batch["image"])
  out = model.apply(params, images, batch["visible_a"], batch["visible_b"],
                    batch["masked_a"], batch["masked_b"], train=train,
                    rngs={"dropout": rng})
  metrics = {}
  loss = jnp.zeros((), jnp.float32)
  if inpaint:
    targets_a = _targets(images, codebook, grid, token_patch, batch["masked_a"])
    targets_b = _targets(images, codebook, grid, token_patch, batch["masked_b"])
    inpaint_loss = 0.5 * (losses.token_cross_entropy(out["logits_a"], targets_a) +
                          losses.token_cross_entropy(out["logits_b"], targets_b))
    metrics["inpaint_loss"] = inpaint_loss
    metrics["inpaint_acc"] = 0.5 * (_token_accuracy(out["logits_a"], targets_a) +
                                    _token_accuracy(out["logits_b"], targets_b))
    loss += inpaint_loss
  if match:
    match_loss, match_metrics = losses.symmetric_info_nce(
        vit.pooled_features(out["features_a"]), vit.pooled_features(out["features_b"]),
        temperature)
    metrics["match_loss"] = match_loss
    metrics.update({f"match_{k}": v for k, v in match_metrics.items()})
    loss += match_weight * match_loss
  metrics["loss"] = loss
  return loss, metrics


def beit_loss(params, batch, codebook, rng, *, model, grid, token_patch, train: bool):
  """BEiT: cross-entropy on the masked patches' tokens.

  Args:
    batch: image uint8 [B, H, W, C]; mask bool [B, N]; masked int32 [B, m].
  """
  images = images_to_float(batch["image"])
  out = model.apply(params, images, batch["mask"], batch["masked"], train=train,
                    rngs={"dropout": rng})
  targets = _targets(images, codebook, grid, token_patch, batch["masked"])
  loss = losses.token_cross_entropy(out["logits"], targets)
  return loss, {"loss": loss, "inpaint_loss": loss,
                "inpaint_acc": _token_accuracy(out["logits"], targets)}


def build_model(config, grid: tuple[int, int]):
  """The pre-training model of `config.objective` (not yet initialised)."""
  arch, patch = vit.parse_variant(config.model.variant)
  common = dict(arch, patch_size=patch, grid=grid, vocab_size=config.tokenizer.vocab_size,
                drop_path_rate=config.model.drop_path, dtype=jnp.dtype(config.model.dtype),
                remat=config.model.remat)
  if config.objective == "beit":
    return pretrain.BEiTModel(**common)
  return pretrain.SplitMaskModel(decoder_depth=config.model.decoder_depth, **common)


def step_loss(loss_fn: LossFn):
  """The train step's form of a loss: `(params, state, batch, rng, *, train)`,
  reading the codebook from the train state."""
  def loss(params, state, batch, rng, *, train: bool):
    return loss_fn(params, batch, state.codebook, rng, train=train)
  return loss


def build_loss_fn(config, model, grid: tuple[int, int]) -> LossFn:
  """`loss_fn(params, batch, codebook, rng, train=...) -> (loss, metrics)`."""
  common = dict(model=model, grid=grid, token_patch=config.tokenizer.patch_size)
  if config.objective == "beit":
    return functools.partial(beit_loss, **common)
  return functools.partial(
      splitmask_loss, inpaint=config.loss.inpaint, match=config.loss.match,
      match_weight=config.loss.match_weight, temperature=config.loss.temperature,
      **common)


def example_inputs(config, example_masks: dict) -> tuple:
  """Positional model inputs with a batch of one, for initialisation.

  Args:
    example_masks: one example's output of the mask function.
  """
  size, channels = config.model.image_size, config.model.num_channels
  images = jnp.zeros((1, size, size, channels), jnp.float32)
  keys = ("mask", "masked") if config.objective == "beit" else (
      "visible_a", "visible_b", "masked_a", "masked_b")
  return (images,) + tuple(jnp.asarray(example_masks[k])[None] for k in keys)
