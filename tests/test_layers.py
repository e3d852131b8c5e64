"""Shared layers: attention backends against the reference, masks, and positional encodings."""

from __future__ import annotations

import math

import pytest
import torch

from triform.config import StackConfig
from triform.layers.kernels import reference_attention, repeat_kv, sdpa_attention
from triform.layers.masks import (
    and_masks,
    causal,
    decoder_mask,
    materialize,
    positions_from_padding,
    sliding_window,
    valid_keys,
)
from triform.layers.position import ALiBi, RotaryEmbedding, alibi_slopes


def _qkv(b: int, hq: int, hkv: int, tq: int, tk: int, d: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(hq * 100 + hkv * 10 + tq)
    return tuple(torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))


def _padded_positions(b: int, t: int) -> torch.Tensor:
    lengths = torch.tensor([t - 3 * i for i in range(b)])
    mask = torch.arange(t)[None, :] >= (t - lengths)[:, None]  # left padding
    return positions_from_padding(mask)


HEADS = [(8, 8), (8, 2), (8, 1)]  # MHA, GQA, MQA


@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("kind", ["causal", "padding", "window", "causal+padding+window", "alibi"])
def test_sdpa_matches_reference(hq: int, hkv: int, kind: str) -> None:
    b, t = 3, 24
    q, k, v = _qkv(b, hq, hkv, t, t)
    pos = _padded_positions(b, t) if "padding" in kind else torch.arange(t).expand(b, t)
    fns = {"causal": [causal()], "padding": [valid_keys()], "window": [causal(), sliding_window(5)],
           "causal+padding+window": [causal(), valid_keys(), sliding_window(5)], "alibi": [causal()]}[kind]
    mask = materialize(and_masks(*fns), pos, pos)
    bias = ALiBi(hq)(pos, pos) if kind == "alibi" else None
    ref = reference_attention(q, k, v, mask=mask, bias=bias)
    out = sdpa_attention(q, k, v, mask=mask, bias=bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_is_causal_fast_path_matches_explicit_mask(hq: int, hkv: int) -> None:
    q, k, v = _qkv(2, hq, hkv, 20, 20)
    pos = torch.arange(20)[None]
    mask = materialize(causal(), pos, pos)
    ref = reference_attention(q, k, v, mask=mask)
    for kernel in (reference_attention, sdpa_attention):
        torch.testing.assert_close(kernel(q, k, v, mask=None, is_causal=True), ref, atol=1e-5, rtol=1e-5)
    bias = ALiBi(hq)(pos, pos)
    torch.testing.assert_close(
        sdpa_attention(q, k, v, bias=bias, is_causal=True), reference_attention(q, k, v, mask=mask, bias=bias), atol=1e-5, rtol=1e-5
    )


def test_gqa_equals_mha_with_repeated_heads() -> None:
    q, k, v = _qkv(2, 8, 2, 10, 10)
    out = reference_attention(q, k, v, is_causal=True)
    expanded = reference_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), is_causal=True)
    torch.testing.assert_close(out, expanded)
    assert torch.equal(repeat_kv(k, 4)[:, 5], k[:, 1])  # query head 5 reads kv head 5 // 4


def test_mask_functions_by_hand() -> None:
    q = torch.tensor([[0, 1, 2, 3]])
    m = materialize(decoder_mask(window=2), q, q)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    pos = positions_from_padding(torch.tensor([[False, False, True, True]]))
    assert pos.tolist() == [[-1, -1, 0, 1]]
    m = materialize(decoder_mask(None), pos, pos)[0, 0]
    assert m[3].tolist() == [False, False, True, True]
    assert m[0].all()  # a padding query's empty row is opened, so softmax stays finite


def test_rope_is_relative() -> None:
    rope = RotaryEmbedding(head_dim=32, max_seq_len=512)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 32, generator=g), torch.randn(1, 2, 6, 32, generator=g)

    def scores(offset: int) -> torch.Tensor:
        pos = torch.arange(6)[None] + offset
        cos, sin = rope.tables(pos)
        return RotaryEmbedding.rotate(q, cos, sin) @ RotaryEmbedding.rotate(k, cos, sin).transpose(-1, -2)

    torch.testing.assert_close(scores(0), scores(137), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(0), q @ k.transpose(-1, -2), atol=1e-3)  # it does rotate


def test_rope_preserves_norm_and_extends_past_table() -> None:
    rope = RotaryEmbedding(head_dim=8, max_seq_len=4)
    x = torch.randn(1, 1, 3, 8)
    cos, sin = rope.tables(torch.tensor([[10, 11, 12]]))
    y = RotaryEmbedding.rotate(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_alibi_slopes_follow_the_paper() -> None:
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s = alibi_slopes(12)  # non power of two: 8 geometric slopes, then odd ones from the 16-head series
    assert torch.allclose(s[:8], alibi_slopes(8))
    assert torch.allclose(s[8:], alibi_slopes(16)[0::2][:4])


def test_alibi_bias_is_linear_in_distance() -> None:
    pos = torch.arange(5)[None]
    bias = ALiBi(4)(pos, pos)[0]
    slopes = alibi_slopes(4)
    assert math.isclose(float(bias[2, 4, 1]), -3 * float(slopes[2]), rel_tol=1e-6)


def test_stack_config_feeds_attention_shapes() -> None:
    from triform.layers.attention import Attention, AttentionInputs

    cfg = StackConfig(d_model=64, n_layers=1, n_heads=8, n_kv_heads=2)
    attn = Attention(cfg, 0)
    assert attn.qkv.out_features == 64 + 2 * 2 * 8
    y = attn(torch.randn(2, 5, 64), AttentionInputs(is_causal=True))
    assert y.shape == (2, 5, 64)
