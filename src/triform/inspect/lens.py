"""The logit lens: the residual stream after every block, decoded as if it were the last one
(the model's final norm, then its output projection), with the loss of each layer's predictions.

Row 0 is the stream entering the first block (the embeddings); row i is after block i; the last
row is exactly the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from triform.errors import ConfigError
from triform.inspect.hooks import run_with_cache
from triform.inspect.plotting import pyplot, save_figure


@dataclass
class Lens:
    logits: Tensor  # (L + 1, T, V) for one sequence
    tokens: Tensor  # (T,)
    loss: Tensor  # (L + 1,) nats per next-token prediction (T - 1 predictions)
    target_prob: Tensor  # (L + 1, T - 1) probability of the actual next token

    def top(self, k: int = 1) -> Tensor:
        return self.logits.topk(k, dim=-1).indices  # (L + 1, T, k)


def _decode(model: nn.Module, h: Tensor) -> Tensor:
    from triform.models.decoder import DecoderLM

    if isinstance(model, DecoderLM):
        return model.lm_head(model.norm(h))
    raise ConfigError("the logit lens reads decoders (their final norm and output projection).")


def logit_lens(model: nn.Module, tokens: Tensor) -> Lens:
    """Lens of one sequence ``tokens`` (T,) or (1, T) through a decoder."""
    tokens = tokens.reshape(1, -1)
    _, cache = run_with_cache(model, tokens, names=["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"])
    stream = torch.cat([cache["blocks.0.hook_resid_pre"][None], cache.stack("hook_resid_post")])  # (L+1, 1, T, d)
    with torch.no_grad():
        logits = _decode(model, stream[:, 0]).float()  # (L+1, T, V)
    targets = tokens[0, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, targets.expand(logits.shape[0], -1)[..., None])[..., 0]  # (L+1, T-1)
    return Lens(logits, tokens[0], -picked.mean(dim=-1), picked.exp())


def plot_lens(lens: Lens, labels: list[str], path: Path | str, *, title: str = "", max_positions: int = 40) -> Path:
    """Heat map: layers x positions, colour = probability of the actual next token, each cell
    labelled with the layer's top prediction."""
    plt = pyplot()

    L1, T1 = lens.target_prob.shape
    T1 = min(T1, max_positions)
    top = lens.top(1)[:, :T1, 0]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * T1 + 2), 0.45 * L1 + 2), dpi=110)
    im = ax.imshow(lens.target_prob[:, :T1], vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    for li in range(L1):
        for t in range(T1):
            ax.text(t, li, labels[int(top[li, t])] if int(top[li, t]) < len(labels) else "?", ha="center",
                    va="center", fontsize=6, color="white" if lens.target_prob[li, t] < 0.5 else "black")
    ax.set_yticks(range(L1))
    ax.set_yticklabels(["embed"] + [f"after {i}" for i in range(L1 - 1)])
    ax.set_xticks(range(T1))
    ax.set_xticklabels([labels[int(i)] if int(i) < len(labels) else "?" for i in lens.tokens[1 : T1 + 1]],
                       rotation=90, fontsize=7)
    ax.set_xlabel("next token (the target)")
    fig.colorbar(im, ax=ax, label="probability of the target")
    ax.set_title(title or "logit lens: top prediction per layer; loss " + ", ".join(f"{v:.2f}" for v in lens.loss))
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["Lens", "logit_lens", "plot_lens"]
