"""Where a Vision Transformer looks: attention rollout over the patch grid (Abnar & Zuidema,
"Quantifying Attention Flow in Transformers", arXiv 2005.00928), read from the hook points.

Each layer's attention, averaged over heads, is mixed with the identity for the residual stream
(``0.5·A + 0.5·I``, rows renormalised); multiplying the layers' matrices from the first to the last
gives how much each input token flows into each output token. The class token's row, over the
patches, is the map. Works on ``VisionEncoder``, ``VisionClassifier`` and CLIP's image tower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from triform.errors import ConfigError
from triform.inspect.hooks import run_with_cache
from triform.inspect.plotting import pyplot, save_figure


def is_vision_model(model: nn.Module) -> bool:
    """Whether ``model`` reads images (a ViT, a ViT classifier or CLIP)."""
    from triform.models.clip import CLIP
    from triform.models.vision import VisionClassifier, VisionEncoder

    return isinstance(model, (VisionEncoder, VisionClassifier, CLIP))


def vision_tower(model: nn.Module) -> nn.Module:
    """The ViT inside ``model``: the model itself, a classifier's encoder, or CLIP's image tower."""
    from triform.models.clip import CLIP
    from triform.models.vision import VisionClassifier, VisionEncoder

    if isinstance(model, VisionEncoder):
        return model
    if isinstance(model, VisionClassifier):
        return model.encoder
    if isinstance(model, CLIP):
        return model.vision
    raise ConfigError(f"attention rollout reads vision models (ViT, CLIP), not {type(model).__name__}.")


@torch.inference_mode()
def attention_patterns(model: nn.Module, pixels: Tensor) -> Tensor:
    """Every layer's attention probabilities on ``pixels``: (L, B, H, 1 + N, 1 + N)."""
    tower = vision_tower(model)
    _, cache = run_with_cache(tower, pixels, names=lambda n: n.endswith("attn.hook_pattern"))
    names = sorted(cache.keys(), key=lambda n: int(n.split("blocks.")[1].split(".")[0]))
    return torch.stack([cache[n].float() for n in names])


def rollout(patterns: Tensor, *, residual: float = 0.5) -> Tensor:
    """Attention rollout (B, 1 + N, 1 + N) from patterns (L, B, H, T, T): per layer the head mean
    mixed with the identity, ``residual·I + (1 - residual)·A``, rows renormalised, multiplied from
    the first layer to the last."""
    eye = torch.eye(patterns.shape[-1], dtype=patterns.dtype)
    flow = eye.expand(patterns.shape[1], -1, -1)
    for layer in patterns:  # (B, H, T, T)
        a = residual * eye + (1 - residual) * layer.mean(dim=1)
        a = a / a.sum(dim=-1, keepdim=True)
        flow = a @ flow  # later layers read what earlier ones mixed
    return flow


def attention_rollout(model: nn.Module, pixels: Tensor, *, residual: float = 0.5) -> Tensor:
    """The class token's rollout over the patch grid, (B, rows, columns), each map summing to the
    share of the class token's flow that comes from patches (the rest stays on the class token)."""
    tower = vision_tower(model)
    p = tower.cfg.patch_size
    rows, cols = pixels.shape[-2] // p, pixels.shape[-1] // p
    flow = rollout(attention_patterns(model, pixels), residual=residual)
    return flow[:, 0, 1:].reshape(-1, rows, cols)


def plot_rollout(images: Tensor, maps: Tensor, path: Path | str, *, titles: list[str] | None = None,
                 title: str = "") -> Path:
    """Each image (C, H, W in [0, 1]) beside its rollout map drawn over it, one column per image."""
    plt = pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.6), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        cmap: Any = "gray_r" if img.shape[-1] == 1 else None
        shown = img[..., 0] if img.shape[-1] == 1 else img
        axes[0, i].imshow(shown, cmap=cmap, interpolation="nearest")
        axes[0, i].set_title(titles[i] if titles else f"image {i}", fontsize=8)
        m = maps[i] / maps[i].max().clamp(min=1e-12)
        up = torch.nn.functional.interpolate(m[None, None], size=img.shape[:2], mode="nearest")[0, 0]
        axes[1, i].imshow(shown, cmap=cmap, interpolation="nearest", alpha=0.35)
        axes[1, i].imshow(up.numpy(), cmap="inferno", alpha=0.65, interpolation="nearest", vmin=0, vmax=1)
        for row in (0, 1):
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
    axes[1, 0].set_ylabel("rollout", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)


def plot_confusion(matrix: Tensor, labels: list[str], path: Path | str, *, title: str = "") -> Path:
    """A confusion matrix (true rows, predicted columns) with its counts written in the cells."""
    plt = pyplot()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(0.45 * k + 1.8, 0.45 * k + 1.4))
    ax.imshow(matrix.numpy(), cmap="Blues")
    top = float(matrix.max()) or 1.0
    for i in range(k):
        for j in range(k):
            v = int(matrix[i, j])
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)


def confusion_matrix(true: Tensor, predicted: Tensor, k: int) -> Tensor:
    """Counts (k, k): row = true class, column = predicted class."""
    out = torch.zeros(k, k, dtype=torch.long)
    out.index_put_((true.long(), predicted.long()), torch.ones_like(true, dtype=torch.long), accumulate=True)
    return out


__all__ = ["is_vision_model", "attention_rollout", "attention_patterns", "rollout", "plot_rollout", "plot_confusion", "confusion_matrix",
           "vision_tower"]
