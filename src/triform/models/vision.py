"""The Vision Transformer (ViT, arXiv 2010.11929) from the shared block stack, and its classifier.

pixels (B, C, H, W) -> p×p patches, each flattened and projected (B, N, d) -> [class token; patches]
+ learned positions (B, 1+N, d) (-> CLIP's pre-norm) -> N bidirectional pre-norm blocks -> LayerNorm
-> hidden states (B, 1+N, d) -> pooled (B, d): the class token, or the mean of the patch tokens.

The patch embedding is written as a reshape + linear layer, which is exactly a Conv2d with kernel
and stride p whose weight is the linear weight viewed as (d, C, p, p). The blocks are the ones every
family uses, run by ``run_blocks`` over the patch embeddings just as the text encoder runs them over
token embeddings. Images of another size than the training size get their position grid resized
(bicubic, as DINO and HF ``interpolate_pos_encoding`` do); at the training size the table is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.config import VisionConfig
from triform.layers.block import Block
from triform.layers.hooks import HookScope, enter_block, hook
from triform.models.encoder import run_blocks


class PatchEmbedding(nn.Module):
    """Non-overlapping p×p patches, flattened channel-major (C, p, p) and projected to d."""

    def __init__(self, channels: int, patch: int, d_model: int, bias: bool) -> None:
        super().__init__()
        self.channels, self.patch = channels, patch
        self.proj = nn.Linear(channels * patch * patch, d_model, bias=bias)

    def patches(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, C·p·p), row by row over the patch grid (F.unfold's order)."""
        b, c, h, w = pixels.shape
        p = self.patch
        x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(self.patches(pixels))  # (B, N, d)

    def conv_weight(self) -> Tensor:
        """The equivalent Conv2d weight (d, C, p, p)."""
        return self.proj.weight.view(-1, self.channels, self.patch, self.patch)


def resize_positions(table: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """A (1 + grid², d) position table for a ``size`` = (rows, columns) patch grid: the class
    position as is, the patch grid resized bicubically; the table itself when the grid is unchanged."""
    if size == (grid, grid):
        return table
    d = table.shape[-1]
    patches = table[1:].reshape(1, grid, grid, d).permute(0, 3, 1, 2)  # (1, d, grid, grid)
    patches = F.interpolate(patches, size=size, mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(-1, d)])  # (1 + rows·cols, d)


class VisionEncoder(nn.Module):
    """ViT backbone: ``forward(pixels)`` -> final-normed hidden states (B, 1 + N, d); ``pool`` reads
    them as one vector per image. ``pixels`` are normalised by the caller (see ``ImageProcessor``)."""

    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def __init__(self, cfg: VisionConfig, *, hook_prefix: str = "") -> None:
        super().__init__()
        self.cfg = cfg
        self.hook_prefix = hook_prefix  # "vision." inside CLIP
        s = cfg.stack
        self.patch = PatchEmbedding(cfg.channels, cfg.patch_size, s.d_model, cfg.patch_bias)
        self.cls = nn.Parameter(torch.zeros(s.d_model))
        self.position = nn.Parameter(torch.zeros(cfg.n_patches + 1, s.d_model))
        self.drop = nn.Dropout(s.dropout)
        self.pre_norm = nn.LayerNorm(s.d_model, eps=s.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(s, i) for i in range(s.n_layers))
        self.norm = nn.LayerNorm(s.d_model, eps=s.norm_eps)
        self.pooler = nn.Linear(s.d_model, s.d_model) if cfg.pooler else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT's initialisation as in HF: truncated N(0, 0.02) weights, class token and positions,
        zero biases, unit LayerNorm gains."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)

    def embed(self, pixels: Tensor) -> Tensor:
        """Class token + patch embeddings + positions (B, 1 + N, d), resized for another image size."""
        if pixels.dim() != 4 or pixels.shape[1] != self.cfg.channels:
            raise ValueError(f"expected images (B, {self.cfg.channels}, H, W), got shape {tuple(pixels.shape)}")
        b, _, h, w = pixels.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}×{w} is not a multiple of the patch size {p}")
        x = self.patch(pixels)  # (B, N, d)
        x = torch.cat([self.cls.to(x.dtype).expand(b, 1, -1), x], dim=1)  # (B, 1 + N, d)
        x = hook(self, "hook_embed", x, in_block=False)
        pos = resize_positions(self.position, self.cfg.grid, (h // p, w // p)).to(x.dtype)
        x = x + hook(self, "hook_pos_embed", pos.expand(b, -1, -1), in_block=False)
        x = self.drop(x)
        if self.pre_norm is not None:
            x = hook(self, "ln_pre.hook_normalized", self.pre_norm(x), in_block=False)
        return x

    def forward(self, pixels: Tensor) -> Tensor:
        enter_block(self, 0, self.hook_prefix)
        x = run_blocks(self, self.blocks, self.embed(pixels))
        return hook(self, "ln_final.hook_normalized", self.norm(x), in_block=False)  # (B, 1 + N, d)

    def pool(self, hidden: Tensor) -> Tensor:
        """One vector per image (B, d): the class token (through the tanh pooler when there is one)
        or the mean of the patch tokens."""
        out = hidden[:, 0] if self.cfg.pool == "cls" else hidden[:, 1:].mean(dim=1)
        return torch.tanh(self.pooler(out)) if self.pooler is not None else out


class VisionClassifier(nn.Module):
    """A ViT with a linear head on the pooled output: ``forward(pixels)`` -> logits (B, num_labels)."""

    def __init__(self, cfg: VisionConfig, num_labels: int) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError("an image classifier needs at least two labels")
        self.cfg, self.num_labels = cfg, num_labels
        self.encoder = VisionEncoder(cfg)
        self.head = nn.Linear(cfg.stack.d_model, num_labels)
        nn.init.zeros_(self.head.weight)  # a zero head starts every class level (the ViT paper's fine-tuning head)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.encoder.pool(self.encoder(pixels)))  # (B, num_labels)


__all__ = ["PatchEmbedding", "VisionEncoder", "VisionClassifier", "resize_positions"]
