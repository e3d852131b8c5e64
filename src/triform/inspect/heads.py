"""Attention heads: their patterns as pictures, and what kind of head each one is.

Template scores, per layer and head, from ``attn.hook_pattern`` on repeated random token sequences
(a random sequence r of n tokens followed by r again; batches seeded). For a query at position t:

* previous-token: the attention on t-1, averaged over t >= 1;
* duplicate-token: in the second copy, the attention on the same token's earlier occurrence (t - n);
* induction: in the second copy, the attention on the token *after* the earlier occurrence
  (t - n + 1), the head that lets a model continue a sequence it has seen (Olsson et al. 2022,
  "In-context Learning and Induction Heads");
* first-token (sink): the attention on position 0, averaged over t >= 1.

A score is the mean attention probability on the template's position (1.0: all of it, always);
``classify`` names a head by every template it scores above ``threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from triform.inspect.hooks import run_with_cache
from triform.inspect.plotting import pyplot, save_figure

KINDS = ("previous-token", "duplicate-token", "induction", "first-token")


def repeated_tokens(vocab: int, n: int = 24, batch: int = 8, seed: int = 0, low: int = 0) -> Tensor:
    """(batch, 2n) rows of n random token ids in [low, vocab) followed by the same n again."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(low, vocab, (batch, n), generator=g)
    return torch.cat([r, r], dim=1)


def patterns(model: nn.Module, tokens: Tensor, **kwargs) -> Tensor:
    """Attention probabilities of every self-attention layer: (L, B, H, T, T)."""
    _, cache = run_with_cache(model, tokens, names="blocks.*.attn.hook_pattern", **kwargs)
    return cache.stack("attn.hook_pattern")


def head_scores(pattern: Tensor, n: int) -> dict[str, Tensor]:
    """Template scores (L, H) from patterns (L, B, H, 2n, 2n) of repeated sequences of length n."""
    L, B, H, T, _ = pattern.shape
    t = torch.arange(T)
    prev = pattern[..., t[1:], t[1:] - 1].mean(dim=(1, 3))
    first = pattern[..., t[1:], 0].mean(dim=(1, 3))
    second = t[n:]
    dup = pattern[..., second, second - n].mean(dim=(1, 3))
    ind_q = second[: n - 1]
    induction = pattern[..., ind_q, ind_q - n + 1].mean(dim=(1, 3))
    return {"previous-token": prev, "duplicate-token": dup, "induction": induction, "first-token": first}


@dataclass
class HeadReport:
    scores: dict[str, Tensor]  # kind -> (L, H)
    threshold: float

    def heads(self, kind: str) -> list[tuple[int, int]]:
        s = self.scores[kind]
        return [(int(li), int(h)) for li, h in (s > self.threshold).nonzero()]

    def table(self) -> str:
        L, H = self.scores["induction"].shape
        lines = ["| head | " + " | ".join(KINDS) + " | kind |", "|---|" + "---:|" * len(KINDS) + "---|"]
        for li in range(L):
            for h in range(H):
                vals = [float(self.scores[k][li, h]) for k in KINDS]
                kind = ", ".join(k for k, v in zip(KINDS, vals) if v > self.threshold) or "-"
                lines.append(f"| L{li}H{h} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {kind} |")
        return "\n".join(lines)

    def plot(self, path: Path | str, title: str = "") -> Path:
        plt = pyplot()

        fig, axes = plt.subplots(1, len(KINDS), figsize=(3.2 * len(KINDS), 3.2), dpi=110)
        for ax, kind in zip(axes, KINDS):
            s = self.scores[kind]
            im = ax.imshow(s, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(kind, fontsize=9)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(s.shape[1]))
            ax.set_yticks(range(s.shape[0]))
        fig.colorbar(im, ax=axes, shrink=0.8, label="mean attention on the template position")
        if title:
            fig.suptitle(title)
        return save_figure(fig, path, bbox_inches="tight")


def classify_heads(model: nn.Module, *, vocab: int | None = None, n: int = 24, batch: int = 8, seed: int = 0,
                   threshold: float = 0.4, low: int = 0) -> HeadReport:
    """Template scores of every head of a decoder (or encoder) on seeded repeated random sequences."""
    vocab = vocab or model.cfg.vocab_size
    tokens = repeated_tokens(vocab, n, batch, seed, low)
    return HeadReport(head_scores(patterns(model, tokens), n), threshold)


def plot_attention(pattern: Tensor, labels: list[str], path: Path | str, *, title: str = "", max_heads: int = 8) -> Path:
    """A grid of attention maps (layers x heads) for one text: pattern (L, H, T, T)."""
    plt = pyplot()

    L, H, T, _ = pattern.shape
    H = min(H, max_heads)
    fig, axes = plt.subplots(L, H, figsize=(2.2 * H, 2.2 * L), dpi=100, squeeze=False)
    for li in range(L):
        for h in range(H):
            ax = axes[li][h]
            ax.imshow(pattern[li, h], vmin=0, vmax=1, cmap="Blues")
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
    if T <= 32 and labels:
        for ax in axes[-1]:
            ax.set_xticks(range(T))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
        for row in axes:
            row[0].set_yticks(range(T))
            row[0].set_yticklabels(labels, fontsize=6)
    fig.suptitle(title or "attention patterns (rows: queries, columns: keys)")
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["KINDS", "HeadReport", "classify_heads", "head_scores", "patterns", "plot_attention", "repeated_tokens"]
