"""The fused training kernels against plain PyTorch: the output projection + cross-entropy, RMSNorm,
the gated FFN activation and RoPE. Each must give the loss/output AND the gradients of the
straightforward expression at float32 tolerance (float64 gradcheck where it applies)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from triform.config import get_preset
from triform.layers.feedforward import _GatedActivation
from triform.layers.fused_ce import Workspace, default_chunk, linear_cross_entropy
from triform.layers.norm import RMSNorm, _RMSNorm
from triform.layers.position import RotaryEmbedding
from triform.models.decoder import DecoderLM
from triform.objectives.causal_lm import CausalLM, causal_lm_loss, takes_targets

F32 = dict(atol=1e-5, rtol=1e-5)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ce_case(n: int, d: int, v: int, ignored: bool, seed: int = 0):
    g = _gen(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    if ignored:
        y[torch.rand(n, generator=g) < 0.3] = -100
        y[0] = -100
    return h, w, y


def _reference_ce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, scale: float = 0.37):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), y, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


# --------------------------------------------------------------------------------------------------
# output projection + cross-entropy


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 37, 64, 1000, None])
@pytest.mark.parametrize("ignored", [False, True])
def test_linear_cross_entropy_matches_cross_entropy_of_logits(chunk: int | None, ignored: bool) -> None:
    h, w, y = _ce_case(37, 24, 53, ignored)
    ref_loss, ref_dh, ref_dw = _reference_ce(h, w, y)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, y, chunk=chunk)
    (loss * 0.37).backward()
    torch.testing.assert_close(loss, ref_loss, **F32)
    torch.testing.assert_close(h.grad, ref_dh, **F32)
    torch.testing.assert_close(w.grad, ref_dw, **F32)
    if ignored:  # an ignored row gets no gradient at all
        assert h.grad[0].abs().max() == 0


def test_linear_cross_entropy_all_ignored_and_single_grad() -> None:
    h, w, y = _ce_case(10, 8, 11, ignored=False)
    y[:] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, y, chunk=4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and hh.grad.abs().max() == 0 and ww.grad.abs().max() == 0
    # Only one input needing a gradient: the other gets none, the one asked for is right.
    h, w, y = _ce_case(10, 8, 11, ignored=True, seed=1)
    _, ref_dh, ref_dw = _reference_ce(h, w, y, scale=1.0)
    hh = h.clone().requires_grad_()
    linear_cross_entropy(hh, w, y, chunk=3).backward()
    torch.testing.assert_close(hh.grad, ref_dh, **F32)
    ww = w.clone().requires_grad_()
    linear_cross_entropy(h, ww, y, chunk=3).backward()
    torch.testing.assert_close(ww.grad, ref_dw, **F32)


def test_linear_cross_entropy_without_grad_and_extreme_logits() -> None:
    h, w, y = _ce_case(29, 16, 40, ignored=True)
    with torch.no_grad():
        ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=6), ref, **F32)
    with torch.inference_mode():
        torch.testing.assert_close(linear_cross_entropy(h, w, y), ref, **F32)
    # Confident wrong predictions: losses of hundreds of nats, where a softmax underflows to 0.
    h = h * 40.0
    ref_loss, ref_dh, ref_dw = _reference_ce(h, w, y, scale=1.0)
    assert ref_loss > 1000
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, y, chunk=5)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(hh.grad, ref_dh, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ww.grad, ref_dw, atol=1e-4, rtol=1e-5)


def test_linear_cross_entropy_tied_weight_accumulates_both_gradients() -> None:
    """A tied head (GPT-2): the weight is also the embedding table, its gradient is the sum of both uses."""
    g = _gen(3)
    emb = torch.randn(31, 12, generator=g)
    tokens = torch.randint(0, 31, (4, 9), generator=g)
    y = torch.randint(0, 31, (36,), generator=g)
    y[5] = -100
    proj = torch.randn(12, 12, generator=g) * 0.3

    def run(fused: bool):
        w = emb.clone().requires_grad_()
        h = torch.tanh(F.embedding(tokens, w).reshape(-1, 12) @ proj)
        loss = linear_cross_entropy(h, w, y, chunk=7) if fused else F.cross_entropy(h @ w.t(), y, reduction="sum")
        (loss / 35).backward()
        return loss.detach(), w.grad

    (a, ga), (b, gb) = run(True), run(False)
    torch.testing.assert_close(a, b, **F32)
    torch.testing.assert_close(ga, gb, **F32)


def test_linear_cross_entropy_workspace_reused_across_shapes() -> None:
    ws = Workspace()
    for n, v, chunk in [(20, 30, 8), (9, 30, 8), (50, 17, 64), (20, 30, 8)]:
        h, w, y = _ce_case(n, 6, v, ignored=True, seed=n)
        ref_loss, ref_dh, ref_dw = _reference_ce(h, w, y, scale=1.0)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, y, chunk=chunk, workspace=ws)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, **F32)
        torch.testing.assert_close(hh.grad, ref_dh, **F32)
        torch.testing.assert_close(ww.grad, ref_dw, **F32)


def test_linear_cross_entropy_rejects_bad_shapes_and_chunks() -> None:
    h, w, y = _ce_case(5, 4, 6, ignored=False)
    with pytest.raises(ValueError):
        linear_cross_entropy(h[None], w, y)
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, y, chunk=0)
    assert default_chunk(8192) == 512 and default_chunk(50257) == 256


# --------------------------------------------------------------------------------------------------
# the model path: DecoderLM(x, targets=y) and CausalLM.loss


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama3-8b-tiny"])  # tied and untied heads
def test_decoder_targets_path_matches_logits_path(name: str) -> None:
    torch.manual_seed(0)
    model = DecoderLM(get_preset(name))
    assert model.cfg.tie_embeddings == (name == "gpt2-tiny")
    g = _gen(1)
    x = torch.randint(0, model.cfg.vocab_size, (3, 21), generator=g)
    y = torch.randint(0, model.cfg.vocab_size, (3, 21), generator=g)
    y[1, 4:9] = -100

    model.zero_grad(set_to_none=True)
    ref = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum")
    (ref / 50).backward()
    ref_grads = _grads(model)

    model.zero_grad(set_to_none=True)
    loss = model(x, targets=y)
    (loss / 50).backward()
    torch.testing.assert_close(loss, ref.detach(), **F32)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **F32, msg=n)


def test_decoder_targets_path_under_autocast_is_the_logits_expression() -> None:
    torch.manual_seed(0)
    model = DecoderLM(get_preset("llama3-8b-tiny"))
    x = torch.randint(0, 264, (2, 11), generator=_gen(2))
    y = torch.randint(0, 264, (2, 11), generator=_gen(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = causal_lm_loss(model(x), y, reduction="sum")
        got = model(x, targets=y)
    assert torch.equal(got, ref)


class _LogitsOnly(nn.Module):
    def __init__(self, model: DecoderLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_causal_lm_loss_uses_targets_when_the_model_takes_them() -> None:
    torch.manual_seed(0)
    model = DecoderLM(get_preset("gpt2-tiny"))
    wrapped = nn.DataParallel(model)  # on CPU it calls the model itself, as DDP does (it keeps it as .module)
    assert takes_targets(model) and takes_targets(wrapped) and not takes_targets(_LogitsOnly(model))
    ids = torch.randint(0, 264, (400,), generator=_gen(4))
    objective = CausalLM(ids, ids, context=16, batch_size=2, token_bytes=torch.ones(264, dtype=torch.long))
    w = ids[:34].view(2, 17)
    batch = objective.make(w[:, :-1], w[:, 1:])
    with torch.no_grad():
        expected = causal_lm_loss(model(batch["x"]), batch["y"], reduction="sum")
        for m in (model, wrapped, _LogitsOnly(model)):
            torch.testing.assert_close(objective.loss(m, batch)["loss"], expected, **F32)


# --------------------------------------------------------------------------------------------------
# RMSNorm, gated activation, RoPE


def test_rmsnorm_matches_f_rms_norm_with_gradients() -> None:
    g = _gen(5)
    x = torch.randn(3, 7, 40, generator=g) * 3
    w = torch.randn(40, generator=g)
    go = torch.randn(3, 7, 40, generator=g)

    def run(fn):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww)
        y.backward(go)
        return y.detach(), xx.grad, ww.grad

    ref = run(lambda a, b: F.rms_norm(a, (40,), b, 1e-5))
    got = run(lambda a, b: _RMSNorm.apply(a, b, 1e-5))
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)
    norm = RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        torch.testing.assert_close(norm(x), ref[0], **F32)
    xd = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (xd, wd))


@pytest.mark.parametrize("approximate", [None, "tanh"])
def test_gated_activation_matches_chunk_act_mul(approximate: str | None) -> None:
    g = _gen(6)
    h = torch.randn(2, 5, 2 * 9, generator=g)
    go = torch.randn(2, 5, 9, generator=g)

    def plain(t):
        gate, up = t.chunk(2, dim=-1)
        return (F.silu(gate) if approximate is None else F.gelu(gate, approximate=approximate)) * up

    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    ya, yb = plain(a), _GatedActivation.apply(b, approximate)
    ya.backward(go), yb.backward(go)
    torch.testing.assert_close(yb, ya, atol=0, rtol=0)
    torch.testing.assert_close(b.grad, a.grad, **F32)
    hd = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _GatedActivation.apply(t, approximate), (hd,))


def _rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama's convention: x·cos + rotate_half(x)·sin with the half tables repeated."""
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rope_rotate_and_rotate_qk_match_rotate_half() -> None:
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64)
    g = _gen(7)
    b, t, nq, nk, dh = 2, 11, 4, 2, 16
    pos = torch.arange(t)[None].expand(b, t) + torch.tensor([[0], [5]])
    cos, sin = rope.tables(pos)  # (B, 1, T, Dh/2)
    qkv = torch.randn(b, t, (nq + 2 * nk) * dh, generator=g)
    gq, gk = torch.randn(b, nq, t, dh, generator=g), torch.randn(b, nk, t, dh, generator=g)

    a = qkv.clone().requires_grad_()
    qa, ka, _ = a.split((nq * dh, nk * dh, nk * dh), dim=-1)
    qa = _rotate_half_reference(qa.view(b, t, nq, dh).transpose(1, 2), cos, sin)
    ka = _rotate_half_reference(ka.view(b, t, nk, dh).transpose(1, 2), cos, sin)
    torch.autograd.backward([qa, ka], [gq, gk])

    c = qkv.clone().requires_grad_()
    qk, _ = c.split(((nq + nk) * dh, nk * dh), dim=-1)
    qc, kc = RotaryEmbedding.rotate_qk(qk.unflatten(-1, (-1, dh)), cos, sin, nq)
    torch.autograd.backward([qc, kc], [gq, gk])
    torch.testing.assert_close(qc, qa, **F32)
    torch.testing.assert_close(kc, ka, **F32)
    torch.testing.assert_close(c.grad, a.grad, **F32)

    x = torch.randn(b, nq, t, dh, generator=g)
    torch.testing.assert_close(RotaryEmbedding.rotate(x, cos, sin), _rotate_half_reference(x, cos, sin), **F32)
    xd = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    cd, sd = torch.randn(1, 1, 3, 4, dtype=torch.float64), torch.randn(1, 1, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: RotaryEmbedding.rotate(v, cd, sd), (xd,))
    qkd = torch.randn(1, 3, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: RotaryEmbedding.rotate_qk(v, cd, sd, 2), (qkd,))
