"""Parameter anatomy: where a model's parameters are, by category, layer and head.

Every parameter tensor of a triform model is assigned to one category; fused projections are cut
into their parts (self-attention's one q/k/v matrix into W_Q, W_K and W_V by rows; cross-attention's
k/v matrix into W_K and W_V), biases go with their matrix, and a tied output matrix is counted once
(as the token embedding E). For a stack of width d, L stored layers, h query heads and g key/value
heads of size d_h, FFN width f and vocabulary V (GPT-2, Llama, BERT and T5 shapes alike):

    E       V x e                 (e = d, or ALBERT's smaller embedding width)
    W_Q     L x d x h d_h         W_K, W_V   L x d x g d_h      W_O   L x h d_h x d
    FFN     L x (k + 1) x d x f   (k = 2 for a gated FFN: gate and up; else 1; none when attention-only)
    (+ biases where the family has them; norms 1 or 2 vectors of d each)

``anatomy(model)`` measures the categories from the tensors and ``expected(model)`` computes them
from the config by these formulas; the tests hold the two equal, and the totals to
``num_parameters()`` and to published counts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from triform.inspect.plotting import pyplot, save_figure

CATEGORIES = (
    "token embedding (E)", "embedding projection", "token types", "positions",
    "W_Q", "W_K", "W_V", "W_O", "cross W_Q", "cross W_K", "cross W_V", "cross W_O",
    "FFN", "norms", "unembedding", "heads",
)


@dataclass(frozen=True)
class Part:
    """One parameter tensor, or one slice of a fused one."""

    name: str
    category: str
    stack: str  # "decoder", "encoder" or "" outside the blocks
    layer: int | None
    count: int


@dataclass
class Anatomy:
    parts: list[Part]
    shape: dict[str, int]
    stacks: dict[str, int] = field(default_factory=dict)  # stack -> layers applied per forward

    @property
    def total(self) -> int:
        return sum(p.count for p in self.parts)

    def by_category(self) -> OrderedDict[str, int]:
        out: OrderedDict[str, int] = OrderedDict((c, 0) for c in CATEGORIES)
        for p in self.parts:
            out[p.category] += p.count
        return OrderedDict((k, v) for k, v in out.items() if v)

    def by_layer(self) -> OrderedDict[tuple[str, int], dict[str, int]]:
        """(stack, layer) -> category -> count, for the parameters inside blocks."""
        out: OrderedDict[tuple[str, int], dict[str, int]] = OrderedDict()
        for p in self.parts:
            if p.layer is not None:
                row = out.setdefault((p.stack, p.layer), {})
                row[p.category] = row.get(p.category, 0) + p.count
        return out

    def per_head(self) -> dict[str, int]:
        """Weights (biases excluded) of one head in each attention matrix: W_Q and W_O per query
        head (d x d_h each), W_K and W_V per key/value head."""
        d, dh = self.shape["d_model"], self.shape["head_dim"]
        return {"W_Q": d * dh, "W_K": d * dh, "W_V": d * dh, "W_O": dh * d}

    def table(self) -> str:
        total = self.total
        lines = ["| category | parameters | share |", "|---|---:|---:|"]
        for k, v in self.by_category().items():
            lines.append(f"| {k} | {v:,} | {100 * v / total:.2f}% |")
        lines.append(f"| **total** | **{total:,}** | 100% |")
        return "\n".join(lines)

    def plot(self, path: Path | str, title: str = "") -> Path:
        """Two panels: the share of each category, and the parameters of each layer by category."""
        plt = pyplot()

        cats = self.by_category()
        layers = self.by_layer()
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110, gridspec_kw={"width_ratios": [1, 1.4]})
        names = list(cats)[::-1]
        axes[0].barh(names, [100 * cats[n] / self.total for n in names], color="#4c72b0")
        for i, n in enumerate(names):
            axes[0].text(100 * cats[n] / self.total, i, f" {cats[n]:,}", va="center", fontsize=8)
        axes[0].set_xlabel("% of parameters")
        axes[0].set_title(title or f"{self.total:,} parameters")
        keys = [f"{s[0]}{li}" if s else str(li) for s, li in layers]
        bottom = [0.0] * len(keys)
        block_cats = [c for c in CATEGORIES if any(c in row for row in layers.values())]
        for c in block_cats:
            vals = [row.get(c, 0) / 1e6 for row in layers.values()]
            axes[1].bar(keys, vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
        axes[1].set_ylabel("millions of parameters")
        axes[1].set_xlabel("layer (e = encoder, d = decoder)" if len(self.stacks) > 1 else "layer")
        axes[1].set_title("per layer")
        axes[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        return save_figure(fig, path)


def _stack_of(name: str, bare: str = "decoder") -> tuple[str, int | None]:
    """(stack, layer) of a parameter name; ``bare`` is the stack of a model whose blocks sit at its top
    level (a decoder, or an encoder without a head)."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("blocks", "encoder_blocks", "decoder_blocks") and parts[i + 1].isdigit():
            stack = "decoder" if p == "decoder_blocks" else "encoder" if p == "encoder_blocks" else ""
            if not stack:
                stack = "encoder" if "encoder" in parts[:i] else "decoder" if "decoder" in parts[:i] else bare
            return stack, int(parts[i + 1])
    return "", None


def _stack_cfg(model: nn.Module):
    cfg = model.cfg
    return getattr(cfg, "stack", None) or getattr(cfg, "encoder", None)


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def anatomy(model: nn.Module) -> Anatomy:
    """The parameters of ``model`` (a DecoderLM, an encoder with any head, or a Seq2Seq) by category."""
    s = _stack_cfg(model)
    if s is None:
        raise TypeError(f"no anatomy for {type(model).__name__}: it has no stack config.")
    q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    parts: list[Part] = []
    embeddings = _embedding_ids(model)
    from triform.models.encoder import Encoder

    bare = "encoder" if isinstance(model, Encoder) else "decoder"
    for name, p in model.named_parameters():  # a tied tensor appears once
        stack, layer = _stack_of(name, bare)
        n = p.numel()
        leaf = name.rsplit(".", 1)
        owner, kind = (leaf[0], leaf[1]) if len(leaf) == 2 else ("", leaf[0])
        if layer is not None:
            if owner.endswith("attn.qkv"):
                rows = {"W_Q": q_out, "W_K": kv_out, "W_V": kv_out}
                per_row = p.shape[1] if p.dim() == 2 else 1
                for cat, r in rows.items():
                    parts.append(Part(f"{name}[{cat}]", cat, stack, layer, r * per_row))
                continue
            if owner.endswith("cross_attn.kv"):
                per_row = p.shape[1] if p.dim() == 2 else 1
                for cat in ("cross W_K", "cross W_V"):
                    parts.append(Part(f"{name}[{cat}]", cat, stack, layer, kv_out * per_row))
                continue
            cross = ".cross_attn." in f".{name}"
            if owner.endswith("attn.q"):
                cat = "cross W_Q" if cross else "W_Q"
            elif owner.endswith("attn.k"):
                cat = "W_K"
            elif owner.endswith("attn.v"):
                cat = "W_V"
            elif owner.endswith("attn.o"):
                cat = "cross W_O" if cross else "W_O"
            elif ".ffn." in f".{name}":
                cat = "FFN"
            elif "norm" in owner.rsplit(".", 1)[-1]:
                cat = "norms"
            else:
                cat = "FFN" if "mlp" in name else "norms"
            parts.append(Part(name, cat, stack, layer, n))
            continue
        last = owner.rsplit(".", 1)[-1]
        if "abs_pos" in owner or last == "position":
            cat = "positions"
        elif id(p) in embeddings and "token_type" in owner:
            cat = "token types"
        elif id(p) in embeddings and ("bias" in last or owner.endswith("_bias")):
            cat = "positions"  # T5's relative position buckets
        elif id(p) in embeddings:
            cat = "token embedding (E)"
        elif last == "proj" and "embeddings" in owner:
            cat = "embedding projection"
        elif "norm" in last:
            cat = "norms" if not owner.startswith(("mlm", "head", "pair")) else "heads"
        elif owner == "lm_head":
            cat = "unembedding"
        else:
            cat = "heads"
        parts.append(Part(name, cat, stack, None, n))
    shape = {"d_model": s.d_model, "n_layers": s.n_layers, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
             "head_dim": s.head_dim, "d_ff": s.d_ff, "vocab_size": model.cfg.vocab_size}
    stacks = {}
    for part in parts:
        if part.layer is not None:
            stacks[part.stack] = max(stacks.get(part.stack, 0), part.layer + 1)
    return Anatomy(parts, shape, stacks)


def expected(model: nn.Module) -> dict[str, int]:
    """The attention, FFN and embedding categories computed from the config by the formulas above."""
    s = _stack_cfg(model)
    cfg = model.cfg
    d, h, g, dh, f = s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff
    b = 1 if s.bias else 0
    k = 2 if s.ffn in ("swiglu", "geglu") else 1
    stored = anatomy(model).stacks
    out: dict[str, int] = {}
    layers = sum(stored.values())
    out["W_Q"] = layers * (d * h * dh + b * h * dh)
    out["W_K"] = out["W_V"] = layers * (d * g * dh + b * g * dh)
    out["W_O"] = layers * (h * dh * d + b * d)
    if s.ffn != "none":  # an attention-only stack has no FFN parameters at all
        out["FFN"] = layers * ((k + 1) * d * f + b * (k * f + d))
    if "decoder" in stored and "encoder" in stored:  # encoder-decoder: cross-attention in decoder blocks
        n = stored["decoder"]
        out["cross W_Q"] = n * (d * h * dh + b * h * dh)
        out["cross W_K"] = out["cross W_V"] = n * (d * g * dh + b * g * dh)
        out["cross W_O"] = n * (h * dh * d + b * d)
    e = getattr(cfg, "embedding_dim", None) or d
    out["token embedding (E)"] = cfg.vocab_size * e
    return out


def meta_model(build) -> nn.Module:
    """``build()`` on the meta device: shapes only, no memory, no initialisation time."""
    with torch.device("meta"):
        return build()


__all__ = ["Anatomy", "Part", "anatomy", "expected", "meta_model", "CATEGORIES"]
