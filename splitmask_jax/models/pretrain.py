"""Pre-training models: SplitMask (encoder + shallow decoder) and the BEiT baseline.

In both models the ViT encoder is the submodule `encoder`, so its parameters are
`variables['params']['encoder']` and can be loaded into a downstream classifier
(BEiT's encoder additionally holds `mask_token`, which a classifier does not use).
Construct from the variant table, e.g.
`SplitMaskModel(**VARIANTS['B'], patch_size=16, grid=(14, 14), vocab_size=8192)`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from splitmask_jax.models.vit import Decoder
from splitmask_jax.models.vit import Encoder
from splitmask_jax.models.vit import gather_tokens
from splitmask_jax.models.vit import logits_dense

Dtype = Any

_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class SplitMaskModel(nn.Module):
  """SplitMask: a shared encoder sees each branch's observed patches only, a shallow
  decoder inpaints the rest of the image for each branch.

  Attributes:
    width, depth, num_heads, mlp_dim: encoder size (see VARIANTS).
    patch_size, grid: patch side in pixels and (gh, gw) patch grid.
    vocab_size: number of visual words predicted by the decoder head.
    decoder_depth: decoder blocks (2 in the paper).
    decoder_width, decoder_num_heads, decoder_mlp_dim: decoder size; None = the
      encoder's (the paper matches the encoder width).
    drop_path_rate, decoder_drop_path_rate: stochastic depth of each stack.
    remat: what every block of both stacks keeps for the backward pass.
    scan: scan the encoder's blocks (see Encoder).
    attention: the attention kernel of both stacks (see Attention).
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  vocab_size: int
  decoder_depth: int = 2
  decoder_width: int | None = None
  decoder_num_heads: int | None = None
  decoder_mlp_dim: int | None = None
  drop_path_rate: float = 0.0
  decoder_drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  attention: str | None = None

  def setup(self):
    kw = dict(
      dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, attention=self.attention
    )
    self.encoder = Encoder(
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      patch_size=self.patch_size,
      grid=self.grid,
      drop_path_rate=self.drop_path_rate,
      scan=self.scan,
      **kw,
    )
    self.decoder = Decoder(
      width=self.decoder_width or self.width,
      num_heads=self.decoder_num_heads or self.num_heads,
      mlp_dim=self.decoder_mlp_dim or self.mlp_dim,
      num_patches=self.grid[0] * self.grid[1],
      vocab_size=self.vocab_size,
      depth=self.decoder_depth,
      drop_path_rate=self.decoder_drop_path_rate,
      **kw,
    )

  def __call__(
    self,
    images: jax.Array,
    visible_a: jax.Array,
    visible_b: jax.Array,
    masked_a: jax.Array,
    masked_b: jax.Array,
    *,
    train: bool,
  ) -> dict:
    """Runs both branches.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      visible_a, visible_b: int32 [B, n], patches observed by branch a / b.
      masked_a, masked_b: int32 [B, m], patches whose visual word branch a / b
        predicts (those it does not observe).
      train: enables stochastic depth (uses the 'dropout' rng).
    Returns:
      {'logits_a', 'logits_b': float32 [B, m, V],
       'features_a', 'features_b': [B, N, decoder width] in `dtype`, the decoder
       outputs at every position (average-pool them for the matching loss)}.
    """
    b = images.shape[0]
    if visible_a.shape != visible_b.shape or visible_a.ndim != 2 or visible_a.shape[0] != b:
      raise ValueError(
        f"visible_a and visible_b must both be [B={b}, n], got "
        f"{visible_a.shape} and {visible_b.shape}"
      )
    if masked_a.shape != masked_b.shape or masked_a.ndim != 2 or masked_a.shape[0] != b:
      raise ValueError(
        f"masked_a and masked_b must both be [B={b}, m], got {masked_a.shape} and {masked_b.shape}"
      )
    # Both branches as one batch of 2B: the weights are shared and one call
    # launches every kernel once instead of twice.
    both = lambda x, y: jnp.concatenate([x, y], axis=0)
    visible = both(visible_a, visible_b)
    tokens, _ = self.encoder(
      both(images, images), visible=visible, train=train, with_block_outputs=False
    )
    features, logits = self.decoder(tokens, visible, both(masked_a, masked_b), train=train)
    return {
      "logits_a": logits[:b],
      "logits_b": logits[b:],
      "features_a": features[:b],
      "features_b": features[b:],
    }

  def encode(self, images: jax.Array, *, train: bool = False):
    """Encoder over all patches: (tokens [B, N, width], aux), see Encoder."""
    return self.encoder(images, train=train)


class BEiTModel(nn.Module):
  """BEiT: an encoder over all patches, masked ones replaced by a learned [MASK]
  embedding, and a linear head predicting the masked patches' visual words.

  Attributes:
    width, depth, num_heads, mlp_dim: encoder size (see VARIANTS).
    patch_size, grid: patch side in pixels and (gh, gw) patch grid.
    vocab_size: number of visual words.
    drop_path_rate: stochastic depth of the last block.
    remat: what every block keeps for the backward pass.
    scan: scan the encoder's blocks (see Encoder).
    attention: the attention kernel (see Attention).
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  vocab_size: int
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  attention: str | None = None

  def setup(self):
    self.encoder = Encoder(
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      patch_size=self.patch_size,
      grid=self.grid,
      drop_path_rate=self.drop_path_rate,
      use_mask_token=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      remat=self.remat,
      scan=self.scan,
      attention=self.attention,
    )
    self.head = logits_dense(
      self.vocab_size, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype
    )

  def __call__(self, images: jax.Array, mask: jax.Array, masked: jax.Array, *, train: bool) -> dict:
    """Predicts the visual words of the masked patches.

    Args:
      images: float [B, H, W, C] in [-1, 1].
      mask: bool [B, N], True where the patch is replaced by [MASK].
      masked: int32 [B, m], the indices of the True entries of `mask`.
      train: enables stochastic depth (uses the 'dropout' rng).
    Returns:
      {'logits': float32 [B, m, V]}.
    """
    if masked.ndim != 2 or masked.shape[0] != images.shape[0]:
      raise ValueError(f"masked must be [B={images.shape[0]}, m], got {masked.shape}")
    tokens, _ = self.encoder(images, mask=mask, train=train, with_block_outputs=False)
    return {"logits": self.head(gather_tokens(tokens, masked))}

  def encode(self, images: jax.Array, *, train: bool = False):
    """Encoder over all patches, nothing masked: (tokens [B, N, width], aux)."""
    return self.encoder(images, train=train)
