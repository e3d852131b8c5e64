"""Denoising pretraining for both families: the prefix-LM mask of DecoderLM, example batches, the
byte vocabulary with sentinels and mode tokens, and models that learn to fill spans and continue text."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import WORDS, synthetic_text

from triform.checkpoint import load_checkpoint
from triform.config import SEQ2SEQ_PRESETS, get_preset
from triform.errors import ConfigError, GenerationError
from triform.inference.generate import generate
from triform.inference.sampling import SamplingParams
from triform.inference.seq2seq import seq2seq_generate
from triform.models.decoder import DecoderLM
from triform.objectives.denoise import IGNORE, prefix_lm_batch, seq2seq_batch, task_for
from triform.objectives.span_corruption import reconstruct
from triform.tokenizers.byte import (
    denoising_tokenizer,
    encode_with_specials,
    render_with_specials,
    sentinel_ids,
)
from triform.training.denoise import DenoiseConfig, pretrain_denoiser


def _decoder(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(get_preset("llama3-8b-tiny").replace(vocab_size=520)).eval()


def test_prefix_lm_mask_is_bidirectional_over_the_prefix_only() -> None:
    model = _decoder()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 20), generator=g)
    prefix = torch.tensor([8, 13])
    with torch.no_grad():
        base = model(x, prefix_lengths=prefix)
        torch.testing.assert_close(model(x, prefix_lengths=torch.zeros(2, dtype=torch.long)), model(x))
        for row, p in enumerate(prefix.tolist()):
            inside = x.clone()
            inside[row, p - 1] = (inside[row, p - 1] + 1) % 256  # the last prefix token
            out = model(inside, prefix_lengths=prefix)
            assert (out[row, : p - 1] - base[row, : p - 1]).abs().amax() > 1e-4  # earlier positions see it
            after = x.clone()
            after[row, p + 2] = (after[row, p + 2] + 1) % 256  # a target token
            out = model(after, prefix_lengths=prefix)
            torch.testing.assert_close(out[row, : p + 2], base[row, : p + 2], atol=0, rtol=0)  # nothing before it does
            other = 1 - row
            torch.testing.assert_close(out[other], base[other], atol=0, rtol=0)


def test_prefix_lm_cached_decoding_equals_full_forward() -> None:
    model = _decoder()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (1, 16), generator=g)
    p = 10
    with torch.no_grad():
        full = model(x, prefix_lengths=torch.tensor([p]))
        cache = model.new_cache(1, 16)
        steps = [model(x[:, :p], cache=cache, prefix_lengths=torch.tensor([p]))]
        steps += [model(x[:, i : i + 1], cache=cache) for i in range(p, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_prefix_lm_generation_is_the_same_alone_and_left_padded() -> None:
    model = _decoder()
    tok = denoising_tokenizer()
    prompts = [[261, *b"KING:\nThe"], [263, *b"A longer prompt, read both ways"]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    together = generate(model, tok, prompts, params, prefix_lm=True)
    for p, t in zip(prompts, together):
        assert generate(model, tok, [p], params, prefix_lm=True)[0].token_ids == t.token_ids
    # and the prefix mask matters: causal reading of the same prompt gives other logits
    with torch.no_grad():
        x = torch.tensor([prompts[1]])
        assert (model(x, prefix_lengths=torch.tensor([x.shape[1]]))[0, -1] - model(x)[0, -1]).abs().amax() > 1e-4


def test_denoising_tokenizer_specials_and_round_trip() -> None:
    tok = denoising_tokenizer()
    assert tok.vocab_size == 514 and len(sentinel_ids(tok)) == 250
    for name in ("<pad>", "<eos>", "<unk>", "[NLU]", "[NLG]", "[S2S]", "<extra_id_0>", "<extra_id_249>"):
        assert tok.special_id(name) >= 256
    s = sentinel_ids(tok)
    assert s == sorted(s) and len(set(s)) == 250
    ids = encode_with_specials(tok, "Fill <extra_id_0> and <extra_id_12>, [S2S] é".encode())
    assert ids.count(s[0]) == 1 and ids.count(s[12]) == 1 and tok.special_id("[S2S]") in ids
    assert render_with_specials(tok, ids) == "Fill <extra_id_0> and <extra_id_12>, [S2S] é"


@pytest.mark.parametrize("objective", ["span", "prefix-lm", "ul2"])
def test_batches_reconstruct_the_text(objective: str) -> None:
    tok = denoising_tokenizer()
    task = task_for(tok, objective, mean_span=5)
    rng = random.Random(0)
    windows = [[rng.randrange(256) for _ in range(96)] for _ in range(6)]
    pairs = [task.example(w, rng) for w in windows]
    bound = task.max_length(96)
    modes = {tok.special_id(m) for m in ("[NLU]", "[NLG]", "[S2S]")}
    for w, (i, o) in zip(windows, pairs):
        assert len(i) <= bound and len(o) <= bound and i[-1] == o[-1] == tok.eos_id
        body = i[1:] if objective == "ul2" else i
        if objective == "ul2":
            assert i[0] in modes
        if any(t in sentinel_ids(tok) for t in body):
            assert reconstruct(body[:-1], o[:-1], sentinel_ids(tok)) == w
        else:
            assert body[:-1] + o[:-1] == w
    b = seq2seq_batch(pairs, pad_id=tok.pad_id, start_id=tok.pad_id)
    for r, (i, o) in enumerate(pairs):
        assert b.source[r, : len(i)].tolist() == i and int(b.source_mask[r].sum()) == len(i)
        assert b.labels[r, : len(o)].tolist() == o and bool((b.labels[r, len(o) :] == IGNORE).all())
        assert b.decoder_input[r, 0] == tok.pad_id and b.decoder_input[r, 1 : len(o)].tolist() == o[:-1]
    tokens, labels, prefix = prefix_lm_batch(pairs, pad_id=tok.pad_id)
    for r, (i, o) in enumerate(pairs):
        assert prefix[r] == len(i)
        assert tokens[r, : len(i) + len(o) - 1].tolist() == (i + o)[:-1]
        assert [t for t in labels[r].tolist() if t != IGNORE] == o  # loss on the targets only


def test_seq2seq_presets_match_published_parameter_counts() -> None:
    import transformers

    from triform.models.encoder_decoder import Seq2Seq

    shapes = {
        "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, vocab_size=32128, feed_forward_proj="relu"),
        "t5-v1_1-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, vocab_size=32128,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "byt5-small": dict(d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_decoder_layers=4, num_heads=6, vocab_size=384,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    }
    for name, kw in shapes.items():
        with torch.device("meta"):
            hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw))
            ours = Seq2Seq(SEQ2SEQ_PRESETS[name])
        # Every tensor of the HF layout once: the embedding aliases of shared are dropped, and lm_head
        # counts as its own matrix when untied (transformers 5 ties it in memory either way).
        tied = kw.get("tie_word_embeddings", True)
        skip = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} | ({"lm_head.weight"} if tied else set())
        want = sum(t.numel() for k, t in hf.state_dict().items() if k not in skip)
        assert ours.num_parameters() == want, name
    byt5 = SEQ2SEQ_PRESETS["byt5-small"]
    assert byt5.encoder.n_layers == 3 * byt5.decoder.n_layers and byt5.encoder.ffn == "geglu" and not byt5.tie_embeddings


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(1500, seed=5))
    return path


def _held_out(n: int) -> list[tuple[str, str]]:
    rng = random.Random(99)
    return [(w, rng.choice(WORDS[6:])) for w in (rng.choice(WORDS[:6]) for _ in range(n))]


def _unigram_bits(text: str) -> float:
    counts = Counter(text.encode())
    n = sum(counts.values())
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def test_ul2_seq2seq_learns_to_continue(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    cfg = DenoiseConfig(objective="ul2", data=str(corpus), context=64, batch_size=32, max_steps=1000, lr=3e-3,
                        warmup_steps=30, progress=False, seed=1)
    r = pretrain_denoiser(cfg, preset="byt5-tiny", out_dir=tmp_path / "run")
    assert r.family == "seq2seq" and r.steps == 1000
    # held-out targets of the whole mixture, far below what byte frequencies alone give
    assert r.val_bits_per_byte < 0.4 * _unigram_bits(corpus.read_text()), r.val_bits_per_byte
    model, tok, meta = load_checkpoint(tmp_path / "run", kind="seq2seq")
    assert meta["objective"] == "ul2"
    # [S2S]: after "KING:\nThe" the decoder must rank the subject named in the header first among
    # the grammar's six (chance: 2 of 12). The encoder is the only way to see the header.
    subjects, ranked_first = WORDS[:6], 0
    for subj, _ in _held_out(12):
        src = torch.tensor([[tok.special_id("[S2S]"), *f"{subj.upper()}:\nThe".encode(), tok.eos_id]])
        scores = {}
        for word in subjects:
            tgt = list(f" {word} will".encode())
            with torch.no_grad():
                logp = model(src, torch.tensor([[model.cfg.decoder_start_id, *tgt[:-1]]])).log_softmax(-1)[0]
            scores[word] = float(logp[torch.arange(len(tgt)), torch.tensor(tgt)].sum())
        ranked_first += max(scores, key=scores.__getitem__) == subj
    assert ranked_first >= 10, ranked_first


def test_prefix_lm_decoder_learns_to_continue(tmp_path: Path) -> None:
    cfg = DenoiseConfig(objective="prefix-lm", data=str(_corpus(tmp_path)), context=64, batch_size=32, max_steps=300,
                        lr=3e-3, warmup_steps=20, progress=False, seed=2)
    r = pretrain_denoiser(cfg, preset="shakespeare-tiny", out_dir=tmp_path / "run")
    from triform.checkpoint import load_checkpoint

    model, tok, meta = load_checkpoint(tmp_path / "run")
    assert r.family == "decoder" and meta["objective"] == "prefix-lm"
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    cases = _held_out(12)
    got = generate(model, tok, [[*f"{s.upper()}:\nThe".encode(), tok.eos_id] for s, _ in cases], params, prefix_lm=True)
    hits = sum(c.text.startswith(f" {s} will") for (s, _), c in zip(cases, got))
    assert hits >= 10, [c.text for c in got]


def test_denoising_bad_settings() -> None:
    with pytest.raises(ConfigError, match="objective"):
        DenoiseConfig(objective="mlm")
    with pytest.raises(ConfigError, match="mixture_weights"):
        DenoiseConfig(mixture_weights=(0, 0, 0, 0, 0, 0, 0))
    with pytest.raises(ConfigError, match="mixture_weights"):
        DenoiseConfig(mixture_weights=(1, 1))
    with pytest.raises(ConfigError, match="noise_density"):
        DenoiseConfig(noise_density=1.5)
    with pytest.raises(ConfigError, match="causal trains decoder"):
        pretrain_denoiser(DenoiseConfig(objective="causal", progress=False), preset="byt5-tiny")
    with pytest.raises(ConfigError, match="unknown preset"):
        pretrain_denoiser(DenoiseConfig(progress=False), preset="t6-small")
    torch.manual_seed(0)
    from triform.models.encoder_decoder import Seq2Seq

    model = Seq2Seq(SEQ2SEQ_PRESETS["byt5-tiny"].replace(max_seq_len=32))
    with pytest.raises(GenerationError, match="decoder's limit"):
        seq2seq_generate(model, torch.tensor([[5, 6, 7]]), params=SamplingParams(temperature=0.0, max_new_tokens=33))
    with pytest.raises(GenerationError, match="encoder takes at most 32"):
        seq2seq_generate(model, torch.ones(1, 40, dtype=torch.long), params=SamplingParams(temperature=0.0, max_new_tokens=4))
