"""DecoderLM invariances: causality, sliding window, positions, caches, padding."""

from __future__ import annotations

import pytest
import torch

from triform.config import PRESETS, get_preset
from triform.models.decoder import DecoderLM

FAMILIES = ["gpt2-tiny", "llama2-7b-tiny", "llama3-8b-tiny", "mistral-7b-tiny", "shakespeare-tiny"]
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


def _model(name: str = "llama3-8b-tiny", **changes) -> DecoderLM:
    torch.manual_seed(0)
    cfg = get_preset(name).replace(**changes) if changes else get_preset(name)
    return DecoderLM(cfg).eval()


def _tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
def test_future_tokens_never_change_past_logits(name: str) -> None:
    model = _model(name)
    x = _tokens(1, 40)
    y = x.clone()
    y[0, 25:] = (y[0, 25:] + 7) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_token_beyond_window_has_no_effect(backend: str) -> None:
    # One layer, so the receptive field is exactly the window (stacked layers widen it).
    model = _model("mistral-7b-tiny", n_layers=1, sliding_window=8, attention=backend)
    x = _tokens(1, 30)
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, 18:], b[:, 18:])  # position 18 sees 11..18
    assert not torch.allclose(a[:, 10:18], b[:, 10:18])


def test_stacked_windows_reach_layers_times_window() -> None:
    model = _model("mistral-7b-tiny", n_layers=2, sliding_window=8)
    x = _tokens(1, 40)
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, 5 + 2 * 7 + 1 :], b[:, 5 + 2 * 7 + 1 :])


def _last_logits_after_shuffling_prefix(position: str) -> tuple[torch.Tensor, torch.Tensor]:
    # One layer: the last query attends to the *set* of earlier tokens, so without position
    # information reordering them cannot change its output.
    model = _model("gpt2-tiny", position=position, n_layers=1)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(10.0)  # sharpen attention: at init it is nearly uniform
    x = _tokens(1, 16)
    y = x.clone()
    y[0, :15] = x[0, torch.randperm(15, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        return model(x)[0, -1], model(y)[0, -1]


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "alibi"])
def test_positions_matter(position: str) -> None:
    a, b = _last_logits_after_shuffling_prefix(position)
    assert (a - b).abs().max() > 1e-3  # the position-blind model differs by ~1e-7


def test_no_position_encoding_is_order_blind() -> None:
    a, b = _last_logits_after_shuffling_prefix("none")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _cached_logits(model: DecoderLM, x: torch.Tensor, split: int) -> torch.Tensor:
    cache = model.new_cache(x.shape[0], x.shape[1])
    outs = [model(x[:, :split], cache=cache)]
    outs += [model(x[:, i : i + 1], cache=cache) for i in range(split, x.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("split", [3, 20])  # prefill shorter and longer than Mistral's window of 16
def test_cached_equals_uncached(name: str, backend: str, split: int) -> None:
    model = _model(name, attention=backend)
    x = _tokens(2, 48)
    with torch.no_grad():
        torch.testing.assert_close(_cached_logits(model, x, split), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_cached_equals_uncached_every_position_kind(position: str, placement: str) -> None:
    model = _model("gpt2-tiny", position=position, norm_placement=placement)
    x = _tokens(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(_cached_logits(model, x, 7), model(x), atol=1e-5, rtol=1e-5)


def test_rolling_cache_stays_at_window_size() -> None:
    model = _model("mistral-7b-tiny")  # window 16
    cache = model.new_cache(1, 100)
    x = _tokens(1, 60)
    with torch.no_grad():
        model(x[:, :30], cache=cache)
        for i in range(30, 60):
            model(x[:, i : i + 1], cache=cache)
    assert cache.k.shape[3] == 16
    assert sorted(cache.pos[0].tolist()) == list(range(44, 60))


@pytest.mark.parametrize("name", ["gpt2-tiny", "mistral-7b-tiny", "llama3-8b-tiny"])
def test_left_padded_batch_matches_single_sequences(name: str) -> None:
    model = _model(name)
    seqs = [_tokens(1, n, seed=n)[0] for n in (30, 21, 9)]
    t = max(len(s) for s in seqs)
    batch = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        batch[i, t - len(s) :], mask[i, t - len(s) :] = s, True
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(padded[i, t - len(s) :], model(s[None])[0], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage() -> None:
    tied, untied = _model("gpt2-tiny"), _model("llama2-7b-tiny")
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_dropout_only_in_training() -> None:
    model = _model("gpt2-tiny", dropout=0.5)
    x = _tokens(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_bias_switch() -> None:
    with_bias, without = _model("gpt2-tiny", bias=True), _model("gpt2-tiny", bias=False)
    assert with_bias.blocks[0].attn.qkv.bias is not None and without.blocks[0].attn.qkv.bias is None
    assert all(PRESETS[n].stack.bias is False for n in ("llama2-7b", "mistral-7b"))
