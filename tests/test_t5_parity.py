"""T5 against Hugging Face transformers: tiny random T5ForConditionalGeneration (1.0 ReLU, tied; and
1.1 gated-GELU, untied), weights copied, logits compared with and without the decoder's KV cache;
triform's export loads back into transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from triform.interop.hf_t5 import save_hf_t5, t5_config_from_hf, t5_from_hf

VOCAB = 120


def _hf(gated: bool, eos: int = 1) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=eos,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB, (3, 30), generator=g)  # long enough for the log-spaced buckets
    mask = torch.ones_like(src)
    mask[1, 22:] = 0
    mask[2, 9:] = 0
    src = src.masked_fill(mask == 0, 0)
    tgt = torch.randint(2, VOCAB, (3, 26), generator=g)
    tgt[:, 0] = 0  # the decoder start token
    return src, mask, tgt


@pytest.mark.parametrize("gated", [False, True])
def test_t5_logits_match_transformers(gated: bool) -> None:
    hf = _hf(gated)
    ours = t5_from_hf(t5_config_from_hf(hf.config.to_dict()), hf.state_dict())
    src, mask, tgt = _batch()
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(src, tgt, source_mask=mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # incremental decoding with the self-attention cache gives the same logits
        memory = ours.encode(src, mask)
        cache = ours.new_cache(3, tgt.shape[1])
        steps = [ours.decode(tgt[:, :5], memory, mask, cache=cache)]
        steps += [ours.decode(tgt[:, i : i + 1], memory, mask, cache=cache) for i in range(5, tgt.shape[1])]
        torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_t5_export_loads_into_transformers(gated: bool, tmp_path: Path) -> None:
    hf = _hf(gated)
    ours = t5_from_hf(t5_config_from_hf(hf.config.to_dict()), hf.state_dict())
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    back = transformers.T5ForConditionalGeneration.from_pretrained(save_hf_t5(ours, tmp_path / "t5")).eval()
    src, mask, tgt = _batch(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(src, tgt, source_mask=mask), back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_greedy_generation_matches_transformers(gated: bool) -> None:
    from triform.inference.sampling import SamplingParams
    from triform.inference.seq2seq import seq2seq_generate

    hf = _hf(gated)
    ours = t5_from_hf(t5_config_from_hf(hf.config.to_dict()), hf.state_dict())
    src, mask, _ = _batch(seed=5)
    with torch.no_grad():
        want = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1)
    got = seq2seq_generate(ours, src, mask, params=SamplingParams(temperature=0.0, max_new_tokens=12))
    for row, ids in zip(want.tolist(), got):
        row = row[1:]  # HF includes the decoder start token
        expected = row[: row.index(1)] if 1 in row else row  # up to the end-of-sequence token
        assert ids == expected


def test_seq2seq_generation_rejects_empty_source() -> None:
    from triform.errors import GenerationError
    from triform.inference.seq2seq import seq2seq_generate

    ours = t5_from_hf(t5_config_from_hf(_hf(False).config.to_dict()), _hf(False).state_dict())
    with pytest.raises(GenerationError, match="empty source"):
        seq2seq_generate(ours, torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize(
    "gated, beams, penalty, early, eos",
    [(False, 3, 1.0, False, 1), (True, 4, 0.6, True, 1), (False, 2, 2.0, False, 1),
     # with token 2 as end-of-sequence, beams finish early (best lengths 1, 0 and 10 here)
     (True, 4, 0.6, True, 2), (True, 3, 1.0, False, 2), (True, 2, 2.0, False, 2)],
)
def test_beam_search_matches_transformers(gated: bool, beams: int, penalty: float, early: bool, eos: int) -> None:
    from triform.inference.seq2seq import seq2seq_beam_search

    hf = _hf(gated, eos)
    ours = t5_from_hf(t5_config_from_hf(hf.config.to_dict()), hf.state_dict())
    src, mask, _ = _batch(seed=6)
    with torch.no_grad():
        want = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=10, num_beams=beams, do_sample=False,
                           length_penalty=penalty, early_stopping=early)
    got = seq2seq_beam_search(ours, src, mask, num_beams=beams, max_new_tokens=10, length_penalty=penalty, early_stopping=early)
    for row, ids in zip(want.tolist(), got):
        row = row[1:]
        expected = row[: row.index(eos)] if eos in row else row
        assert ids == expected


def test_beam_width_must_be_positive() -> None:
    from triform.errors import GenerationError
    from triform.inference.seq2seq import seq2seq_beam_search

    ours = t5_from_hf(t5_config_from_hf(_hf(False).config.to_dict()), _hf(False).state_dict())
    with pytest.raises(GenerationError, match="beam width"):
        seq2seq_beam_search(ours, torch.ones(1, 3, dtype=torch.long), num_beams=0)


def test_t5_training_follows_transformers_step_for_step() -> None:
    """Twenty AdamW steps on the same batches: the losses of triform's Seq2Seq and of HF's T5 agree,
    so the loss, the backward pass and the parameter layout match, not just the forward."""
    hf = _hf(gated=True)
    ours = t5_from_hf(t5_config_from_hf(hf.config.to_dict()), hf.state_dict())
    losses = {}
    for name, model in (("hf", hf), ("ours", ours)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(3)
        losses[name] = []
        for _ in range(20):
            src = torch.randint(2, VOCAB, (8, 12), generator=g)
            tgt = torch.cat([torch.zeros(8, 1, dtype=torch.long), src[:, :-1]], dim=1)
            logits = hf(input_ids=src, decoder_input_ids=tgt).logits if name == "hf" else ours(src, tgt)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), src.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["hf"]), atol=1e-5, rtol=1e-5)
    assert losses["ours"][-1] < losses["ours"][0] - 0.1  # and it learned something
