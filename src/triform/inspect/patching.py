"""Activation patching: which activations carry the difference between a clean and a corrupted
input. The metric is the logit difference of two tokens at the last position; each cell patches
one activation of the corrupted run with its clean value and reports

    (metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))

so 1 means that activation alone restores the clean behaviour and 0 that it does nothing. Sweeps:
the residual stream entering each block at each position, and each head's output z (all positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from triform.errors import ConfigError
from triform.inspect.hooks import patch_from, run_with_cache, run_with_hooks
from triform.inspect.plotting import pyplot, save_figure


def logit_diff(logits: Tensor, answer: int, wrong: int) -> float:
    """logit(answer) - logit(wrong) at the last position of the first row."""
    return float(logits[0, -1, answer] - logits[0, -1, wrong])


@dataclass
class Patching:
    by_position: Tensor  # (L, T): residual stream entering block l at position t
    by_head: Tensor  # (L, H): head h's output at every position
    clean: float
    corrupted: float

    def plot(self, path: Path | str, labels: list[str] | None = None, title: str = "") -> Path:
        plt = pyplot()

        fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
        for ax, data, xlabel in ((axes[0], self.by_position, "position"), (axes[1], self.by_head, "head")):
            im = ax.imshow(data, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", origin="lower")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, shrink=0.8)
        if labels and len(labels) == self.by_position.shape[1]:
            axes[0].set_xticks(range(len(labels)))
            axes[0].set_xticklabels(labels, rotation=90, fontsize=7)
        axes[0].set_title("residual stream (block input) patched per position")
        axes[1].set_title("head output z patched")
        fig.suptitle(title or f"logit difference clean {self.clean:.2f}, corrupted {self.corrupted:.2f}")
        fig.tight_layout()
        return save_figure(fig, path)


def patch_sweep(model: nn.Module, clean: Tensor, corrupted: Tensor, answer: int, wrong: int) -> Patching:
    """Both sweeps for a decoder; ``clean`` and ``corrupted`` (1, T) of the same length."""
    if clean.shape != corrupted.shape:
        raise ConfigError(f"the clean and corrupted inputs must have the same number of tokens "
                          f"({clean.shape[-1]} and {corrupted.shape[-1]}).")
    clean_logits, cache = run_with_cache(model, clean, names=["blocks.*.hook_resid_pre", "blocks.*.attn.hook_z"])
    with torch.no_grad():
        corrupted_logits = model(corrupted)
    m_clean, m_corrupt = logit_diff(clean_logits, answer, wrong), logit_diff(corrupted_logits, answer, wrong)
    span = m_clean - m_corrupt
    if abs(span) < 1e-6:
        raise ConfigError("the clean and corrupted inputs give the same logit difference; nothing to attribute.")
    L = sum(1 for k in cache if k.endswith("hook_resid_pre"))
    T = clean.shape[-1]
    H = cache["blocks.0.attn.hook_z"].shape[2]
    by_pos, by_head = torch.zeros(L, T), torch.zeros(L, H)
    for layer in range(L):
        for t in range(T):
            out = run_with_hooks(model, corrupted, hooks=[(f"blocks.{layer}.hook_resid_pre", patch_from(cache, [t]))])
            by_pos[layer, t] = (logit_diff(out, answer, wrong) - m_corrupt) / span
        for h in range(H):
            out = run_with_hooks(model, corrupted, hooks=[(f"blocks.{layer}.attn.hook_z", patch_from(cache, head=h))])
            by_head[layer, h] = (logit_diff(out, answer, wrong) - m_corrupt) / span
    return Patching(by_pos, by_head, m_clean, m_corrupt)


__all__ = ["Patching", "logit_diff", "patch_sweep"]
