"""The SplitMask pre-training step in PyTorch with timm's ViT: the peer of throughput.py.

The same computation as splitmask_jax's step, written the way a PyTorch user
would: timm's `VisionTransformer` is the encoder; its patch embedding, position
embedding, blocks and final norm run on the visible patch tokens of both
branches (one batch of 2B, as SplitMask's encoder never sees the other
patches); a 2-block decoder of timm `Block`s fills the missing positions with a
mask token plus its own position embedding; a linear head predicts the visual
words (codebook argmax of the half-resolution tokenizer view); cross-entropy
plus symmetric InfoNCE on the L2-normalised pooled decoder outputs; AdamW with
weight decay on matrices and gradient clipping. The forward and loss are
`torch.compile`d; bfloat16 autocast where the JAX config computes in bfloat16
on a GPU, float32 otherwise.

Needs torch and timm (`pip install torch timm`), which the package itself does
not depend on.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from splitmask_jax import config_base
from splitmask_jax.models import vit


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
  """[B, N, D], int64 [B, n] -> [B, n, D]."""
  return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


class SplitMaskLoss(nn.Module):
  """Encoder (timm ViT) + shallow decoder + tokenizer + both losses, images in, loss out."""

  def __init__(self, config):
    super().__init__()
    arch, patch = vit.parse_variant(config.model.variant)
    self.grid = config_base.grid_size(config)
    self.token_patch = config.tokenizer.patch_size
    self.temperature = config.loss.temperature
    width, heads = arch["width"], arch["num_heads"]
    mlp_ratio = arch["mlp_dim"] / width
    num_patches = self.grid[0] * self.grid[1]
    self.encoder = VisionTransformer(
      img_size=config.model.image_size,
      patch_size=patch,
      in_chans=config.model.num_channels,
      num_classes=0,
      global_pool="",
      embed_dim=width,
      depth=arch["depth"],
      num_heads=heads,
      mlp_ratio=mlp_ratio,
      qkv_bias=True,
      class_token=False,
      drop_path_rate=config.model.drop_path,
    )
    self.decoder_input = nn.Linear(width, width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
    self.decoder_pos = nn.Parameter(torch.zeros(1, num_patches, width))
    nn.init.trunc_normal_(self.mask_token, std=0.02)
    nn.init.trunc_normal_(self.decoder_pos, std=0.02)
    self.decoder = nn.Sequential(
      *[Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(config.model.decoder_depth)]
    )
    self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, config.tokenizer.vocab_size)
    codebook = F.normalize(
      torch.rand(config.tokenizer.vocab_size, self.token_patch**2 * config.model.num_channels) * 2
      - 1,
      dim=-1,
    )
    self.register_buffer("codebook", codebook)

  def _tokens(self, images: torch.Tensor) -> torch.Tensor:
    """Visual words of the tokenizer view: [B, C, H, W] -> int64 [B, N]."""
    gh, gw, p = *self.grid, self.token_patch
    view = F.interpolate(images, size=(gh * p, gw * p), mode="bilinear", antialias=True)
    b, c = view.shape[:2]
    patches = view.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
    return (patches.reshape(b, gh * gw, -1) @ self.codebook.T).argmax(-1)

  def forward(self, images, visible_a, visible_b, masked_a, masked_b) -> torch.Tensor:
    """images uint8 [B, H, W, C]; index tensors int64 [B, n] / [B, m] -> scalar loss."""
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    visible = torch.cat([visible_a, visible_b])
    masked = torch.cat([masked_a, masked_b])
    enc = self.encoder
    x = enc.patch_embed(images) + enc.pos_embed
    x = _gather(torch.cat([x, x]), visible)  # each branch's visible tokens only
    x = enc.norm(enc.blocks(x))
    filler = (self.mask_token + self.decoder_pos).expand(x.shape[0], -1, -1)
    x = filler.scatter(1, visible[..., None].expand(-1, -1, x.shape[-1]), self.decoder_input(x))
    features = self.decoder_norm(self.decoder(x))
    logits = self.head(_gather(features, masked)).float()
    # Tokens from float32 similarities, as the JAX tokenizer computes them.
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
      tokens = self._tokens(images)
    targets = torch.gather(torch.cat([tokens, tokens]), 1, masked)
    inpaint = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    pooled = F.normalize(features.float().mean(1), dim=-1)
    a, b = pooled.chunk(2)
    similarity = a @ b.T / self.temperature
    labels = torch.arange(a.shape[0], device=a.device)
    match = 0.5 * (F.cross_entropy(similarity, labels) + F.cross_entropy(similarity.T, labels))
    return inpaint + match


def make_step(config, host_batch: dict[str, np.ndarray]) -> tuple[Callable[[], None], dict]:
  """The compiled PyTorch step on `host_batch` (throughput.synthetic_batch's), and where it runs.

  Each call runs one step (forward, backward, clipping, AdamW update) and
  waits for it; the first call compiles.
  """
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(config.seed)
  model = SplitMaskLoss(config).to(device)
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  optimizer = torch.optim.AdamW(
    [
      {"params": decay, "weight_decay": config.optim.weight_decay},
      {"params": no_decay, "weight_decay": 0.0},
    ],
    lr=1e-4,
    betas=(config.optim.b1, config.optim.b2),
  )
  loss_fn = torch.compile(model)
  keys = ("image", "visible_a", "visible_b", "masked_a", "masked_b")
  batch = [
    torch.from_numpy(np.asarray(host_batch[k], np.uint8 if k == "image" else np.int64)).to(device)
    for k in keys
  ]
  autocast = device.type == "cuda" and config.model.dtype == "bfloat16"

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      loss = loss_fn(*batch)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
      torch.cuda.synchronize()

  return step, {"device": str(device), "torch": torch.__version__}
