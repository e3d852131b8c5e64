"""CLIP (arXiv 2103.00020): a text tower and an image tower from the shared block stack, embedding
captions and images into one space where matching pairs have the largest cosine similarity.

text  (B, T) -> token + learned positions -> causal pre-norm blocks -> LayerNorm -> the hidden
              state at each row's first end-of-text token -> linear (no bias) -> (B, P)
image (B, C, H, W) -> ViT (CLIP's pre-norm, class-token pooling) -> linear (no bias) -> (B, P)
logits_per_image = exp(logit_scale) · normalised images @ normalised texts.T

The temperature is learned: ``logit_scale`` starts at log(1/0.07) and is clamped to [0, log 100]
where it is used (open_clip clamps the parameter after each step; clamping on use gives the same
forward pass without a hook in the training loop; a checkpoint stored a hair above log 100, as
OpenAI's 4.6052 is, scores about 3e-5 relatively lower than HF, which does not clamp). The contrastive loss lives in
``triform.objectives.contrastive``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.config import CLIPConfig
from triform.layers.block import Block
from triform.layers.hooks import HookScope, enter_block, hook
from triform.layers.position import LearnedPositions
from triform.models.encoder import run_blocks
from triform.models.vision import VisionEncoder

MAX_LOGIT_SCALE = math.log(100.0)


class TextEncoder(nn.Module):
    """CLIP's text tower: ``forward(tokens)`` -> final-normed hidden states (B, T, d); ``pool`` reads
    each row at its first end-of-text token. Rows are right-padded: causal attention keeps padding
    from reaching any earlier position, so no padding mask is needed."""

    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.text
        self.tok_emb = nn.Embedding(cfg.vocab_size, s.d_model)
        self.position = LearnedPositions(s.max_seq_len, s.d_model)
        self.drop = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(Block(s, i) for i in range(s.n_layers))
        self.norm = nn.LayerNorm(s.d_model, eps=s.norm_eps)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.01)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.cfg.max_tokens:
            raise ValueError(f"{t} tokens exceed the text tower's {self.cfg.max_tokens} positions")
        enter_block(self, 0, "text.")
        pos = torch.arange(t, device=tokens.device)[None]
        x = hook(self, "hook_embed", self.tok_emb(tokens), in_block=False)
        x = self.drop(x + hook(self, "hook_pos_embed", self.position(pos).expand_as(x), in_block=False))
        x = run_blocks(self, self.blocks, x, causal=True)
        return hook(self, "ln_final.hook_normalized", self.norm(x), in_block=False)  # (B, T, d)

    def pool(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """(B, d): each row at its first end-of-text token (its last token if it has none)."""
        is_eos = tokens == self.cfg.eos_id
        last = torch.full_like(tokens[:, 0], tokens.shape[1] - 1)
        at = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), last)
        return hidden[torch.arange(len(tokens), device=tokens.device), at]


@dataclass
class CLIPOutput:
    logits_per_image: Tensor  # (B_images, B_texts)
    logits_per_text: Tensor  # (B_texts, B_images)
    image_embeds: Tensor  # (B_images, P), unit length
    text_embeds: Tensor  # (B_texts, P), unit length


class CLIP(nn.Module):
    """Both towers, their projections and the learned temperature. ``embed_images`` and
    ``embed_texts`` give unit vectors in the shared space; ``forward`` scores every image against
    every text."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg)
        self.vision = VisionEncoder(cfg.vision, hook_prefix="vision.")
        self.text_proj = nn.Linear(cfg.text.d_model, cfg.projection_dim, bias=False)
        self.image_proj = nn.Linear(cfg.vision.stack.d_model, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        nn.init.normal_(self.text_proj.weight, std=cfg.text.d_model ** -0.5)
        nn.init.normal_(self.image_proj.weight, std=cfg.vision.stack.d_model ** -0.5)

    def scale(self) -> Tensor:
        """exp(logit_scale), with logit_scale clamped to [0, log 100]."""
        return self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()

    def embed_images(self, pixels: Tensor, *, normalize: bool = True) -> Tensor:
        """Image embeddings (B, P), L2-normalised unless ``normalize`` is False."""
        v = self.vision
        out = self.image_proj(v.pool(v(pixels)))
        return F.normalize(out, dim=-1) if normalize else out

    def embed_texts(self, tokens: Tensor, *, normalize: bool = True) -> Tensor:
        """Text embeddings (B, P) of right-padded token rows that each hold an end-of-text token."""
        out = self.text_proj(self.text.pool(self.text(tokens), tokens))
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, pixels: Tensor, tokens: Tensor) -> CLIPOutput:
        image, text = self.embed_images(pixels), self.embed_texts(tokens)
        logits = self.scale() * image @ text.t()  # (B_images, B_texts)
        return CLIPOutput(logits, logits.t(), image, text)


__all__ = ["CLIP", "CLIPOutput", "TextEncoder", "MAX_LOGIT_SCALE"]
