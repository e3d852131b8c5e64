"""Generation: sampling filters, cached vs uncached, left-padded batches, stop strings, errors."""

from __future__ import annotations

import pytest
import torch

from triform.config import get_preset
from triform.errors import GenerationError
from triform.inference.generate import generate
from triform.inference.sampling import SamplingParams, filter_logits, sample_next
from triform.models.decoder import DecoderLM
from triform.tokenizers import ByteTokenizer


def _model(name: str) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(get_preset(name)).eval()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_sampling_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(GenerationError, match=match):
        SamplingParams(**kwargs)


def test_top_k_and_top_p_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, SamplingParams(top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, SamplingParams(top_p=0.7)).isfinite()  # 0.5 < 0.7 needs the 0.3 too
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, SamplingParams(top_p=0.5)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_sampling_frequencies_follow_temperature() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(4000, 3)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = sample_next(logits, SamplingParams(temperature=1.0), gens)
    freq = torch.bincount(draws, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama3-8b-tiny", "mistral-7b-tiny"])
def test_cached_and_uncached_greedy_tokens_identical(name: str) -> None:
    model, tok = _model(name), ByteTokenizer()
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    prompts = ["To be, or not", "Hi"]
    cached = generate(model, tok, prompts, params)
    uncached = generate(model, tok, prompts, params, use_cache=False)
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached]
    assert all(len(c.token_ids) == 40 for c in cached)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama3-8b-tiny", "mistral-7b-tiny"])
def test_left_padded_batch_equals_one_by_one(name: str) -> None:
    model, tok = _model(name), ByteTokenizer()
    params = SamplingParams(temperature=0.0, max_new_tokens=25)
    prompts = ["A much longer prompt than the others", "Short", "Mid-length one"]
    batch = generate(model, tok, prompts, params)
    single = [generate(model, tok, [p], params)[0] for p in prompts]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    model, tok = _model("llama3-8b-tiny"), ByteTokenizer()
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=30, seed=123)
    alone = generate(model, tok, ["Once upon"], params)[0].token_ids
    again = generate(model, tok, ["Once upon"], params)[0].token_ids
    in_batch = generate(model, tok, ["Something else entirely", "Once upon"], params)[1].token_ids
    other_seed = generate(model, tok, ["Once upon"], SamplingParams(temperature=1.0, top_k=50, max_new_tokens=30, seed=7))[0]
    assert alone == again == in_batch
    assert other_seed.token_ids != alone


def test_stop_string_ends_generation_and_is_not_returned() -> None:
    model, tok = _model("gpt2-tiny"), ByteTokenizer()
    full = generate(model, tok, ["abc"], SamplingParams(temperature=0.0, max_new_tokens=30))[0]
    stop = full.text[5:8]
    assert len(stop) == 3
    streamed: list[str] = []
    out = generate(model, tok, ["abc"], SamplingParams(temperature=0.0, max_new_tokens=30, stop=(stop,)),
                   on_text=lambda _, t: streamed.append(t))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]
    assert "".join(streamed) == out.text


def test_streamed_text_equals_final_text() -> None:
    model, tok = _model("llama3-8b-tiny"), ByteTokenizer()
    pieces: dict[int, list[str]] = {0: [], 1: []}
    outs = generate(model, tok, ["x", "yz"], SamplingParams(temperature=0.9, max_new_tokens=50, seed=1),
                    on_text=lambda i, t: pieces[i].append(t))
    for i, o in enumerate(outs):
        assert "".join(pieces[i]) == o.text
        assert o.finish_reason == "length"


def test_prompt_longer_than_context() -> None:
    model, tok = _model("gpt2-tiny"), ByteTokenizer()  # context 128
    with pytest.raises(GenerationError, match="context window is 128.*--truncate"):
        generate(model, tok, ["x" * 200], SamplingParams(max_new_tokens=5))
    out = generate(model, tok, ["x" * 200], SamplingParams(temperature=0.0, max_new_tokens=5), truncate=True)[0]
    assert len(out.token_ids) == 5
    with pytest.raises(GenerationError, match="empty"):
        generate(model, tok, [""], SamplingParams())


def _crop_reference(model: DecoderLM, prompt: list[int], n: int) -> list[int]:
    """nanoGPT's loop: re-run the model on the last `context` tokens, take the argmax."""
    ctx, seq = model.cfg.stack.max_seq_len, list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq[-ctx:]]))[0, -1, :260]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


def test_absolute_positions_generate_past_context_by_cropping() -> None:
    model, tok = _model("gpt2-tiny"), ByteTokenizer()  # learned positions, context 128
    out = generate(model, tok, ["To be, or not to be"], SamplingParams(temperature=0.0, max_new_tokens=150))[0]
    assert len(out.token_ids) == 150
    assert out.token_ids == _crop_reference(model, tok.encode("To be, or not to be"), 150)


def test_relative_positions_generate_past_context_with_rolling_cache() -> None:
    # With one layer, a rolling cache of the last context-1 tokens is exactly nanoGPT's crop for RoPE.
    torch.manual_seed(0)
    model, tok = DecoderLM(get_preset("llama3-8b-tiny").replace(n_layers=1)).eval(), ByteTokenizer()
    params = SamplingParams(temperature=0.0, max_new_tokens=200)
    cached = generate(model, tok, ["Once upon a time"], params)[0]
    uncached = generate(model, tok, ["Once upon a time"], params, use_cache=False)[0]
    assert len(cached.token_ids) == 200
    assert cached.token_ids == uncached.token_ids == _crop_reference(model, tok.encode("Once upon a time"), 200)
