"""Output projection fused with next-token cross-entropy: ``sum_i CE(h_i Wᵀ, y_i)`` without ever
holding the (N, V) logits, their log-softmax or its gradient in memory.

The standard path, ``F.cross_entropy(h @ W.t(), y, reduction="sum")``, writes the logits, a
log-softmax of the same size, and in the backward pass a zero-filled (N, V) gradient of the
log-softmax and the (N, V) gradient of the logits: four passes over a tensor that at a vocabulary of
8192 and 2048 tokens is 64 MiB each (and, being that large, is freshly mapped and page-faulted by
the allocator every step). Here the rows are taken ``chunk`` at a time into two reused (chunk, V)
blocks: the logits, then their softmax (one kernel); the loss of a row is logsumexp - logit of the
target, with logsumexp = max(z) - log(max(softmax)), so no second exp pass. Since the loss is the
end of the graph, its gradient with respect to the logits, ``softmax - onehot``, is formed in place
right away and multiplied out into the gradients of ``h`` (this chunk's rows) and of ``W``
(accumulated over chunks). The backward pass only scales those two by the incoming gradient.

The same function as the standard path (same sum, same ``ignore_index`` semantics), up to float
rounding; the matrix products are the same three per row (logits, d h, d W), so the FLOPs are equal.
The idea is the "fused linear cross-entropy" of Liger-Kernel (arXiv 2410.10989) and of Apple's
Cut Cross-Entropy (arXiv 2411.09009), written here in plain torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in float32): 512 rows at V = 8192
MIN_CHUNK_ROWS = 256  # fewer rows make the weight-gradient product (inner size = rows) inefficient


def default_chunk(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab``: about CHUNK_ELEMENTS logits, at least MIN_CHUNK_ROWS rows."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))


def _chunks(n: int, chunk: int) -> range:
    return range(0, n, chunk)


VOCAB_BLOCK = 1024  # logits columns per product in the forward pass


def _logits_into(out: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    """out = h @ weight.t(), written VOCAB_BLOCK columns at a time: with the inner size only d_model,
    MKL ran these narrower products ~10% faster on a 2-core AVX2 CPU than one (rows, V) product."""
    for j in range(0, weight.shape[0], VOCAB_BLOCK):
        torch.mm(h, weight[j : j + VOCAB_BLOCK].t(), out=out[:, j : j + VOCAB_BLOCK])
    return out


class Workspace:
    """Scratch buffers kept between calls (a model owns one): the two (chunk, V) blocks are only used
    inside the forward pass, never saved for backward, so reusing them is safe for sequential calls,
    and it spares the allocator mapping and page-faulting tens of MiB afresh every step."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        key = (name, like.dtype, like.device)
        buf = self._buffers.get(key)
        n = 1
        for s in shape:
            n *= s
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def _loss_only(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int) -> Tensor:
    """Summed cross-entropy without gradients (evaluation), chunk by chunk."""
    total = h.new_zeros((), dtype=torch.float32)
    for i in _chunks(h.shape[0], chunk):
        y = targets[i : i + chunk]
        lsm = torch.log_softmax(torch.mm(h[i : i + chunk], weight.t()), dim=1)
        keep = y != ignore_index
        picked = lsm.gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
        total -= torch.where(keep, picked, 0.0).sum()
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int,  # type: ignore[override]
                workspace: Workspace | None) -> Tensor:
        n, v = h.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        total = h.new_zeros((), dtype=torch.float32)
        rows_max = min(chunk, n)
        ws = workspace if workspace is not None else Workspace()
        logits, probs = ws.get("logits", (rows_max, v), h), ws.get("probs", (rows_max, v), h)  # reused by every chunk
        any_ignored = bool((targets == ignore_index).any())  # one check per call, not per chunk
        for i in _chunks(n, chunk):
            hc, y = h[i : i + chunk], targets[i : i + chunk]
            rows = hc.shape[0]
            z = _logits_into(logits[:rows], hc, weight)
            keep = y != ignore_index
            safe = torch.where(keep, y, 0) if any_ignored else y
            z_max, z_target = z.amax(dim=1), z.gather(1, safe[:, None])[:, 0]
            p = torch.softmax(z, dim=1, out=probs[:rows])  # becomes d loss / d logits below
            # logsumexp(z) = max(z) - log(softmax(z) at the argmax), which is 1/sum exp(z - max):
            # read off the softmax itself, so the only pass with exp is the softmax kernel's.
            lse = z_max - p.amax(dim=1).log()
            nats = lse - z_target
            total += (torch.where(keep, nats, 0.0) if any_ignored else nats).sum()
            p.view(-1).index_add_(0, torch.arange(rows, device=h.device) * v + safe, keep.to(p.dtype), alpha=-1.0)
            if any_ignored:
                p.masked_fill_(~keep[:, None], 0.0)  # ignored rows carry no gradient
            if grad_h is not None:
                torch.mm(p, weight, out=grad_h[i : i + rows])
            if grad_w is not None:
                grad_w.addmm_(p.t(), hc) if i else torch.mm(p.t(), hc, out=grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        g = grad_out.to(grad_h.dtype if grad_h is not None else grad_w.dtype)
        return (grad_h * g if grad_h is not None else None, grad_w * g if grad_w is not None else None, None, None, None, None)


def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX, chunk: int | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """``F.cross_entropy(h @ weight.t(), targets, ignore_index=ignore_index, reduction="sum")`` in
    nats, for h (N, d), weight (V, d), targets (N,), computed ``chunk`` rows at a time (see the module
    docstring). Differentiable in ``h`` and ``weight``; a tied weight gets this gradient added to its
    others by autograd as usual. ``workspace``: scratch buffers to reuse between calls (see Workspace)."""
    if h.dim() != 2 or weight.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h (N, d), weight (V, d), targets (N,); got {tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    chunk = default_chunk(weight.shape[0]) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk, workspace)
    return _loss_only(h, weight, targets, ignore_index, chunk)
