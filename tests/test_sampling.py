"""Sampling: frequencies follow softmax(logits / T) (chi-square goodness of fit), top-p keeps exactly
the smallest set reaching p (boundaries, ties), top-k with top-p, greedy; and the seeding rule: one
seed gives one token stream through generate(), the engine and chat, whatever else is in the batch."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from triform.config import get_preset
from triform.inference.chat import ChatSession, render_chat
from triform.inference.decode import SEED_STRIDE, make_generator
from triform.inference.engine import Engine, EngineConfig
from triform.inference.generate import generate
from triform.inference.sampling import SamplingParams, filter_logits, sample_next
from triform.models.decoder import DecoderLM
from triform.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer()
LOGITS = torch.tensor([1.5, 1.0, 0.5, 0.0, -0.5, -1.0])
DRAWS = 20_000
# Upper 0.1% points of the chi-square distribution (scipy.stats.chi2.ppf(0.999, df)): a fit is
# accepted at significance 0.001 when the statistic stays below them.
CHI2_CRITICAL_001 = {2: 13.816, 5: 20.515}


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed ``counts`` against category probabilities ``probs``."""
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def _counts(logits: torch.Tensor, params: SamplingParams, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    draws = sample_next(logits.expand(DRAWS, -1), params, [g] * DRAWS)  # (DRAWS,)
    return torch.bincount(draws, minlength=logits.shape[-1])


def _kept(probs: list[float], **kwargs) -> list[int]:
    logits = torch.log(torch.tensor([probs]))
    return torch.nonzero(filter_logits(logits, SamplingParams(**kwargs)).isfinite()[0]).flatten().tolist()


def _model() -> DecoderLM:
    torch.manual_seed(31)
    return DecoderLM(get_preset("llama3-8b-tiny")).eval()


def _engine(model: DecoderLM) -> Engine:
    return Engine(model, TOK, EngineConfig(num_blocks=96, block_size=4, prefill_chunk=16, max_num_batched_tokens=40))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_frequencies_follow_softmax_over_temperature(temperature: float) -> None:
    counts = _counts(LOGITS, SamplingParams(temperature=temperature), seed=int(temperature * 10))
    stat = _chi_square(counts, torch.softmax(LOGITS.double() / temperature, dim=-1))
    assert stat < CHI2_CRITICAL_001[5], f"chi-square {stat:.1f} with 5 degrees of freedom: p < 0.001"
    # the test has power: the same draws are rejected against T = 1 and against a temperature 20% off
    for wrong in (1.0, temperature * 1.2):
        assert _chi_square(counts, torch.softmax(LOGITS.double() / wrong, dim=-1)) > CHI2_CRITICAL_001[5]


def test_top_k_with_top_p_samples_the_renormalised_survivors() -> None:
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3]))  # ranked: 1, 3, 2, 0
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.8)  # 0.4/0.9 + 0.3/0.9 < 0.8: all three stay
    counts = _counts(logits, params, seed=3)
    assert counts[0] == 0
    stat = _chi_square(counts[1:], torch.tensor([0.4, 0.2, 0.3]) / 0.9)
    assert stat < CHI2_CRITICAL_001[2], f"chi-square {stat:.1f} with 2 degrees of freedom: p < 0.001"


def test_top_p_keeps_exactly_the_smallest_set_reaching_p() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    assert _kept(probs, top_p=0.5) == [0]  # mass 0.5 reaches 0.5 exactly: nothing more
    assert _kept(probs, top_p=0.5001) == [0, 1]
    assert _kept(probs, top_p=0.8) == [0, 1]  # 0.5 + 0.3 equals p exactly
    assert _kept(probs, top_p=0.8001) == [0, 1, 2]
    assert _kept(probs, top_p=0.95) == [0, 1, 2]
    assert _kept(probs, top_p=1e-9) == [0]  # the best token always stays
    assert _kept(probs, top_p=1.0) == [0, 1, 2, 3]
    assert _kept([0.05, 0.15, 0.5, 0.3], top_p=0.8) == [2, 3]  # ranked by probability, not by id
    # many constructed distributions whose first m tokens (in rank order) have mass exactly p
    rng = random.Random(0)
    for _ in range(500):
        weights = [rng.randint(1, 20) for _ in range(rng.randint(2, 8))]
        total = sum(weights)
        rank = sorted(range(len(weights)), key=lambda i: (-weights[i], i))  # ties: lower id first
        m = rng.randint(1, len(weights) - 1)
        p = sum(weights[i] for i in rank[:m]) / total
        got = _kept([w / total for w in weights], top_p=p)
        assert got == sorted(rank[:m]), (weights, p)
        assert _kept([w / total for w in weights], top_p=min(1.0, p + 1e-4)) == sorted(rank[: m + 1])


def test_top_p_and_top_k_break_ties_by_lower_id() -> None:
    assert _kept([0.25] * 4, top_p=0.5) == [0, 1]  # any two reach 0.5: the lower ids
    assert _kept([0.25] * 4, top_p=0.5001) == [0, 1, 2]
    assert _kept([0.2, 0.4, 0.2, 0.2], top_p=0.6) == [0, 1]
    assert _kept([0.2, 0.4, 0.2, 0.2], top_p=0.7) == [0, 1, 2]
    assert _kept([0.3, 0.3, 0.3, 0.1], top_k=2) == [0, 1]  # exactly k, even among ties


def test_top_k_then_top_p_on_the_renormalised_distribution() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    assert _kept(probs, top_k=2, top_p=0.5) == [0]  # 0.4 / 0.7 >= 0.5 (over all four, 0.4 < 0.5)
    assert _kept(probs, top_p=0.5) == [0, 1]
    assert _kept(probs, top_k=3, top_p=0.75) == [0, 1]  # 0.7 / 0.9 >= 0.75 (over all four, 0.7 < 0.75)
    assert _kept(probs, top_p=0.75) == [0, 1, 2]
    assert _kept(probs, top_k=3, top_p=0.8) == [0, 1, 2]
    assert _kept(probs, top_k=3) == [0, 1, 2]
    filtered = filter_logits(torch.log(torch.tensor([probs])), SamplingParams(top_k=2, top_p=0.9))
    torch.testing.assert_close(torch.softmax(filtered, dim=-1), torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))


def test_greedy_at_temperature_zero() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1  # a tie: the lower id wins
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    states = [g.get_state() for g in gens]
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)):
        got = sample_next(logits, params, gens)
        assert torch.equal(got, logits.argmax(dim=-1)) and int(got[0]) == 7
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))  # no random numbers drawn
    model = _model()
    greedy = [SamplingParams(temperature=0.0, max_new_tokens=12, seed=s) for s in (1, 2)]
    runs = [generate(model, TOK, ["Once"], p)[0] for p in greedy]
    assert runs[0].token_ids == runs[1].token_ids  # the seed plays no part


def test_seed_rule() -> None:
    for seed, index in [(0, 0), (5, 0), (5, 1), (5, 3), (2**64 - 1, 2), (-1, 0)]:
        g = make_generator(seed, index, torch.device("cpu"))
        assert g is not None and g.device == torch.device("cpu")
        assert g.initial_seed() == (seed + index * SEED_STRIDE) % 2**64
    assert make_generator(5, 0, "cpu").initial_seed() == 5  # completion 0: the seed itself
    assert torch.equal(torch.rand(8, generator=make_generator(-1, 0, "cpu")),
                       torch.rand(8, generator=torch.Generator().manual_seed(-1)))
    assert make_generator(None, 0, "cpu") is None and make_generator(None, 3, "cpu") is None
    assert len({make_generator(s, j, "cpu").initial_seed() for s in range(8) for j in range(8)}) == 64


def test_same_seed_same_tokens_from_generate_engine_and_chat() -> None:
    model = _model()
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, seed=77, ignore_eos=True)
    prompt = b"The king will speak"
    static = generate(model, TOK, [prompt], params)[0]
    engine = _engine(model).generate([prompt], params)[0].completions[0]
    assert engine.token_ids == static.token_ids and engine.text == static.text
    # completion j of n follows the rule: it equals a lone request seeded (seed + j * stride) mod 2^64
    parallel = _engine(model).generate([prompt], dataclasses.replace(params, n=3))[0].completions
    for j, c in enumerate(parallel):
        alone = dataclasses.replace(params, seed=(77 + j * SEED_STRIDE) % 2**64)
        assert c.token_ids == generate(model, TOK, [prompt], alone)[0].token_ids
    assert len({tuple(c.token_ids) for c in parallel}) == 3
    # a chat turn is completion 0 of its rendered transcript: the same tokens again
    chat_params = dataclasses.replace(params, stop=("\x00\x00",))
    session = ChatSession(model, TOK, chat_params)
    answer = session.reply("hi")
    rendered, stops = render_chat(TOK, [{"role": "user", "content": "hi"}])
    want = generate(model, TOK, [rendered], dataclasses.replace(chat_params, stop=chat_params.stop + stops))[0]
    assert answer == want.text and session.last is not None and session.last.generated_tokens == len(want.token_ids)


def test_batch_composition_does_not_change_a_seeded_request() -> None:
    model = _model()
    target = b"Once upon a time"
    params = SamplingParams(temperature=0.9, top_k=40, max_new_tokens=24, seed=2024, ignore_eos=True)
    alone = generate(model, TOK, [target], params)[0].token_ids
    others = [b"x", b"A much longer prompt than the target one", b"mid"]
    for position in (0, 2, 3):
        batch = others[:position] + [target] + others[position:]
        assert generate(model, TOK, batch, params)[position].token_ids == alone
        engine = _engine(model)
        ids = [engine.submit(p, SamplingParams(temperature=1.0, max_new_tokens=9 + i, seed=None if i % 2 else i,
                                               ignore_eos=True)) for i, p in enumerate(others[:position])]
        rid = engine.submit(target, params)
        ids += [engine.submit(p, SamplingParams(temperature=0.7, max_new_tokens=30, n=2, seed=i, ignore_eos=True))
                for i, p in enumerate(others[position:])]
        list(engine.stream())
        assert engine.result(rid).completions[0].token_ids == alone
    assert generate(model, TOK, [target], dataclasses.replace(params, seed=2025))[0].token_ids != alone
