"""Filling masks with a byte-level encoder's masked-LM head: the top candidates at each ``[MASK]``,
or iterative mask-predict (Ghazvininejad et al., arXiv 1904.09324) over masks appended to a text —
which shows why an encoder that predicts every position at once is no natural left-to-right writer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from triform.errors import GenerationError
from triform.tokenizers.byte import ByteTokenizer

MASK = b"[MASK]"


@dataclass
class MaskCandidates:
    """The most likely bytes at one masked position, with their probabilities."""

    position: int
    candidates: list[tuple[bytes, float]]


def masked_ids(tok: ByteTokenizer, text: bytes, *, extra_masks: int = 0, limit: int | None = None) -> list[int]:
    """``[CLS] text [SEP]`` with each ``[MASK]`` in the text (and ``extra_masks`` appended) as the
    mask token; an error if there is nothing to fill or the input exceeds ``limit`` tokens."""
    if extra_masks < 0:
        raise GenerationError(f"the number of masks to append must be >= 0, got {extra_masks}.")
    parts = text.split(MASK)
    ids = [tok.bos_id]
    for i, part in enumerate(parts):
        ids += list(part)
        if i < len(parts) - 1:
            ids.append(tok.mask_id)
    ids += [tok.mask_id] * extra_masks + [tok.eos_id]
    if limit is not None and len(ids) > limit:
        raise GenerationError(f"the input is {len(ids)} tokens; the model takes at most {limit}.")
    if tok.mask_id not in ids:
        raise GenerationError("the text has no [MASK] to fill; add some, or pass --generate N.")
    return ids


def render(tok: ByteTokenizer, ids: list[int]) -> str:
    """The row between [CLS] and [SEP] as text, a masked position shown as ▯."""
    return "".join("▯" if t == tok.mask_id else chr(t) if t < 256 and chr(t).isprintable() or t == 10 else "" for t in ids[1:-1])


@torch.inference_mode()
def fill_masks(model: nn.Module, tok: ByteTokenizer, ids: list[int], *, top_k: int = 5) -> tuple[list[MaskCandidates], list[int]]:
    """One forward pass: the ``top_k`` bytes at every mask, and the row with each mask replaced by its best byte."""
    if top_k < 1:
        raise GenerationError(f"top_k must be a positive integer, got {top_k}.")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    probs = model(x).mlm_logits[0, :, :256].float().softmax(-1)  # (T, 256): bytes only
    out = []
    for pos in (x[0] == tok.mask_id).nonzero().flatten().tolist():
        p, c = probs[pos].topk(min(top_k, 256))
        out.append(MaskCandidates(pos, [(bytes([int(i)]), float(q)) for q, i in zip(p, c)]))
        x[0, pos] = int(c[0])
    return out, x[0].tolist()


@torch.inference_mode()
def mask_predict(model: nn.Module, tok: ByteTokenizer, ids: list[int], *, rounds: int) -> Iterator[list[int]]:
    """Fill the masks over ``rounds`` passes, each committing the most confident of the remaining
    predictions (the remaining masks spread evenly over the remaining rounds); yields the row after
    each round."""
    if rounds < 1:
        raise GenerationError(f"the number of rounds must be a positive integer, got {rounds}.")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    for r in range(1, rounds + 1):
        masked = (x[0] == tok.mask_id).nonzero().flatten()
        if masked.numel() == 0:
            return
        probs = model(x).mlm_logits[0, :, :256].float().softmax(-1)
        conf, best = probs[masked].max(-1)
        k = -(-masked.numel() // (rounds - r + 1))
        pick = conf.topk(k).indices
        x[0, masked[pick]] = best[pick]
        yield x[0].tolist()
