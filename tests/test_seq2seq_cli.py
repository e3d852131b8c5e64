"""`triform pretrain --objective span|prefix-lm|ul2` for both families, `triform generate` and
`triform chat` on their checkpoints (mode tokens, beam search, sentinels), and their bad input."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_error

from triform.cli.main import main
from triform.inference.chat import ChatSession, Seq2SeqChatSession, render_chat
from triform.inference.sampling import SamplingParams
from triform.inference.seq2seq import seq2seq_beam_search, seq2seq_generate
from triform.tokenizers.byte import render_with_specials
from triform.checkpoint import load_checkpoint

SHORT = ["--context", "48", "--batch-size", "8", "--max-steps", "12"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> dict[str, Path]:
    out = {}
    for name, args in {
        "s2s-ul2": ["--objective", "ul2", "--preset", "byt5-tiny"],
        "s2s-span": ["--objective", "span", "--preset", "t5-tiny", "--mean-span", "3"],
        "dec-ul2": ["--objective", "ul2", "--preset", "shakespeare-tiny"],
    }.items():
        folder = tmp_path_factory.mktemp(name)
        assert main(["pretrain", *args, "--data", str(corpus_file), "--out", str(folder), *SHORT]) == 0
        out[name] = folder
    return out


def test_pretrain_writes_each_family(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, _, meta = load_checkpoint(runs["s2s-ul2"], kind="seq2seq")
    assert meta["kind"] == "seq2seq" and meta["objective"] == "ul2" and model.cfg.family == "byt5"
    model, _, meta = load_checkpoint(runs["s2s-span"], kind="seq2seq")
    assert meta["objective"] == "span" and meta["train"]["mean_span"] == 3 and model.cfg.scale_output
    lm, _, meta = load_checkpoint(runs["dec-ul2"])
    assert meta["kind"] == "decoder" and meta["objective"] == "ul2" and lm.cfg.stack.max_seq_len >= 48


def test_generate_on_seq2seq_matches_the_library(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = runs["s2s-ul2"]
    model, tok, _ = load_checkpoint(run, kind="seq2seq")
    capsys.readouterr()
    assert main(["generate", str(run), "KING:\nThe <extra_id_0> will", "--mode", "R", "--temperature", "0", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    src = [tok.special_id("[NLU]"), *b"KING:\nThe ", tok.special_id("<extra_id_0>"), *b" will", tok.eos_id]
    want = seq2seq_generate(model, torch.tensor([src]), params=SamplingParams(temperature=0.0, max_new_tokens=10))[0]
    assert out == f"source: KING:\nThe <extra_id_0> will\noutput: {render_with_specials(tok, want)}\n"
    assert main(["generate", str(run), "KING:", "--mode", "S", "--num-beams", "3", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    beams = seq2seq_beam_search(model, torch.tensor([[tok.special_id("[S2S]"), *b"KING:", tok.eos_id]]), num_beams=3, max_new_tokens=6)[0]
    assert out.endswith(f"output: {render_with_specials(tok, beams)}\n")


def test_generate_on_prefix_lm_decoder(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from triform.inference.generate import generate

    run = runs["dec-ul2"]
    lm, tok, _ = load_checkpoint(run)
    capsys.readouterr()
    assert main(["generate", str(run), "KING:", "--mode", "S", "--temperature", "0", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    want = generate(lm, tok, [[tok.special_id("[S2S]"), *b"KING:", tok.eos_id]], SamplingParams(temperature=0.0, max_new_tokens=10), prefix_lm=True)[0]
    assert out == "KING:" + want.text + "\n"


def test_seq2seq_chat_re_encodes_the_transcript(runs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, _ = load_checkpoint(runs["s2s-ul2"], kind="seq2seq")
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    chat = Seq2SeqChatSession(model, tok, params, mode_id=tok.special_id("[S2S]"))
    computed = []
    for turn in ("hello there", "what news", "and then"):
        answer = chat.reply(turn)
        s = chat.last
        assert s is not None and s.reused_tokens == 0
        computed.append(s.new_tokens)
        # the source is the whole transcript so far (mode token, text, </s>)
        prompt, _ = render_chat(tok, chat.messages[:-1])
        assert s.prompt_tokens == len(tok.encode(prompt)) + 2
        src = [tok.special_id("[S2S]"), *tok.encode(prompt), tok.eos_id]
        want = seq2seq_generate(model, torch.tensor([src]), params=params)[0]
        assert answer == tok.decode(want)
    assert computed[0] < computed[1] < computed[2]
    # the CLI prints the same per-turn statistics
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nwhat news\n"))
    assert main(["chat", str(runs["s2s-ul2"]), "--stats", "--mode", "S", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    err = capsys.readouterr().err
    assert err.count("0 from cache") == 2


def test_decoder_chat_reuses_its_cache(trained_run: Path) -> None:
    lm, tok, _ = load_checkpoint(trained_run)
    chat = ChatSession(lm, tok, SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True, stop=("zzz",)))
    chat.reply("hi")
    chat.reply("ok")
    assert chat.last is not None and chat.last.reused_tokens > 0 and chat.last.new_tokens < chat.last.prompt_tokens


def test_seq2seq_bad_input(runs: dict[str, Path], capsys: pytest.CaptureFixture[str], trained_run: Path, corpus_file: Path) -> None:
    run = str(runs["s2s-ul2"])
    assert "unknown UL2 mode" in cli_error(capsys, ["generate", run, "x", "--mode", "Q"])
    assert "beam width must be at least 1" in cli_error(capsys, ["generate", run, "x", "--num-beams", "0"])
    assert "decoder's limit" in cli_error(capsys, ["generate", run, "x", "--max-new-tokens", "100000"])
    assert "empty" in cli_error(capsys, ["generate", run, ""])
    assert "no [S2S] token" in cli_error(capsys, ["generate", str(trained_run), "x", "--mode", "S"])
    assert "encoder-decoder" in cli_error(capsys, ["eval", run])
    assert "mixture_weights" in cli_error(capsys, ["pretrain", "--objective", "ul2", "--mixture-weights", "[0,0,0,0,0,0,0]"])
    assert "causal trains decoder" in cli_error(capsys, ["pretrain", "--objective", "causal", "--data", str(corpus_file)])
    assert "unknown preset" in cli_error(capsys, ["pretrain", "--objective", "span", "--preset", "t6", "--data", str(corpus_file)])
    assert "--num-beams applies to encoder-decoder" in cli_error(capsys, ["generate", str(runs["dec-ul2"]), "x", "--num-beams", "2"])


def test_convert_seq2seq_to_transformers_and_back(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    from triform.interop.hf_t5 import t5_config_from_hf

    for name in ("s2s-ul2", "s2s-span"):  # T5 1.1 / ByT5 layout (gated, untied) and T5 1.0 (ReLU, tied, scaled)
        ours, _, _ = load_checkpoint(runs[name], kind="seq2seq")
        hf_dir = tmp_path / f"{name}-hf"
        assert main(["convert", str(runs[name]), str(hf_dir)]) == 0
        hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
        g = torch.Generator().manual_seed(4)
        src, tgt = torch.randint(0, 256, (2, 20), generator=g), torch.randint(0, 256, (2, 9), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ours(src, tgt), hf(input_ids=src, decoder_input_ids=tgt).logits, atol=1e-5, rtol=1e-5)
        assert t5_config_from_hf(hf.config.to_dict()).encoder.n_layers == ours.cfg.encoder.n_layers
        # and back: the exported folder (which carries triform's byte tokenizer) converts to a
        # triform encoder-decoder checkpoint with the same weights
        back = tmp_path / f"{name}-back"
        assert main(["convert", str(hf_dir), str(back)]) == 0
        again, tok, meta = load_checkpoint(back, kind="seq2seq")
        assert meta["kind"] == "seq2seq" and tok.vocab_size == 514
        for key, value in ours.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key
    capsys.readouterr()
