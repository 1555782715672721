"""The downstream image classifier: the pre-trained ViT encoder and a linear head.

Its encoder is the submodule `encoder`, with the same parameter names as the
pre-training models' encoder, so a pre-trained encoder loads into it unchanged
(see `finetune.load_pretrained_encoder`). Two readings of the tokens:
  * `use_fc_norm=True` (BEiT's fine-tuning, `use_mean_pooling`): the average of the
    last block's raw tokens, then a new LayerNorm `fc_norm`, then the head. The
    encoder's final LayerNorm is skipped (BEiT's fine-tuning model has none); its
    parameters stay in the tree, unused, so any pre-trained encoder loads as it is.
  * `use_fc_norm=False`: the average of the encoder's normalised tokens, the features
    the k-NN evaluation and the match loss use, straight into the head.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from splitmask_jax.models.vit import _LN_EPS
from splitmask_jax.models.vit import Encoder
from splitmask_jax.models.vit import logits_dense
from splitmask_jax.models.vit import pooled_features

Dtype = Any


class Classifier(nn.Module):
  """ViT encoder, average pooling, (LayerNorm,) linear head: images [B, H, W, C] ->
  logits [B, K].

  Attributes:
    width, depth, num_heads, mlp_dim: encoder size (see VARIANTS).
    patch_size, grid: patch side in pixels and (gh, gw) patch grid.
    num_classes: K.
    drop_path_rate: stochastic depth of the last block (linear from 0 over depth).
    head_init_scale: the head's kernel is truncated normal (std 0.02) times this
      (BEiT's 0.001), so fine-tuning starts from near-uniform predictions.
    remat: what every block keeps for the backward pass (vit.remat_policy).
    scan, unroll_scan: scan the encoder's blocks (see vit.Encoder).
    attention: the attention kernel (see vit.Attention).
    use_fc_norm: pool the last block's raw tokens and normalise the pooled vector with
      a LayerNorm of its own (`fc_norm`, BEiT's fine-tuning), instead of pooling
      the encoder's normalised tokens.
  """

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: tuple[int, int]
  num_classes: int
  drop_path_rate: float = 0.0
  head_init_scale: float = 0.001
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str | bool = "none"
  scan: bool = False
  unroll_scan: bool = False
  attention: str | None = None
  use_fc_norm: bool = True

  def setup(self):
    self.encoder = Encoder(
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      patch_size=self.patch_size,
      grid=self.grid,
      drop_path_rate=self.drop_path_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      remat=self.remat,
      scan=self.scan,
      unroll_scan=self.unroll_scan,
      attention=self.attention,
    )
    scale = self.head_init_scale

    def head_init(key, shape, dtype=jnp.float32):
      return scale * nn.initializers.truncated_normal(stddev=0.02)(key, shape, dtype)

    if self.use_fc_norm:
      self.fc_norm = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype)
    self.head = logits_dense(
      self.num_classes, kernel_init=head_init, dtype=self.dtype, param_dtype=self.param_dtype
    )

  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """Class logits, float32 [B, num_classes], of float images [B, H, W, C] in [-1, 1]."""
    tokens, aux = self.encoder(images, train=train, with_block_outputs=False)
    if self.use_fc_norm:
      pooled = self.fc_norm(pooled_features(aux["last_block_output"]).astype(self.dtype))
    else:
      pooled = pooled_features(tokens).astype(self.dtype)
    return self.head(pooled)

  def block_features(self, images: jax.Array) -> jax.Array:
    """Average-pooled output of every block, float32 [B, depth, width] (no dropout).

    Block k's features are its raw output (before the final LayerNorm), the
    representation a linear probe at depth k reads (the paper's Figure 5).
    """
    _, aux = self.encoder(images, train=False)
    return jnp.stack([pooled_features(x) for x in aux["block_outputs"]], axis=1)
