"""Tokenizers: lossless byte round-trip (property-based), BPE exact byte accounting, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import synthetic_text
from hypothesis import given, settings
from hypothesis import strategies as st

from triform.errors import CheckpointError, ConfigError
from triform.tokenizers import BPETokenizer, ByteTokenizer, StreamDecoder, load_tokenizer


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.binary(max_size=512))
def test_byte_round_trip_any_bytes(data: bytes) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert len(ids) == len(data) and all(0 <= i < 256 for i in ids)
    assert tok.decode_bytes(ids) == data
    assert tok.encode_array(data).tolist() == ids


def test_invalid_utf8_survives_and_decodes_with_replacement() -> None:
    tok = ByteTokenizer()
    data = b"ok \xff\xfe \xc3\x28 end"
    assert tok.decode_bytes(tok.encode(data)) == data
    assert tok.decode(tok.encode(data)) == data.decode("utf-8", errors="replace")


def test_specials_follow_the_bytes_and_are_extendable() -> None:
    tok = ByteTokenizer(extra_specials=("<extra_id_0>", "<S2S>"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (256, 257, 258, 259)
    assert tok.special_id("<S2S>") == 261 and tok.vocab_size == 262
    assert tok.decode_bytes([72, tok.eos_id, 105]) == b"Hi"
    with pytest.raises(ConfigError):
        tok.special_id("<nope>")
    with pytest.raises(ConfigError):
        ByteTokenizer(extra_specials=("<pad>",))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    texts = [synthetic_text(400, seed=s).encode() + "naïve café — ünïcödé\n".encode() for s in range(3)]
    return BPETokenizer.train(texts, vocab_size=400)


def test_bpe_compresses_and_round_trips(bpe: BPETokenizer) -> None:
    text = "KING:\nThe king will speak of love.\nnaïve café\n"
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode()) / 2
    assert bpe.decode(ids) == text
    assert 260 < bpe.vocab_size <= 400  # merges stop early when the corpus runs out of pairs


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.text(max_size=200))
def test_bpe_token_bytes_account_for_every_byte(text: str) -> None:
    tok = _BPE_CACHE.setdefault("t", BPETokenizer.train([synthetic_text(200, seed=9).encode()], vocab_size=300))
    ids = tok.encode(text)
    table = tok.token_bytes()
    assert b"".join(table[i] for i in ids) == text.encode("utf-8", errors="replace")


_BPE_CACHE: dict[str, BPETokenizer] = {}


def test_bpe_never_parses_special_tokens_from_text(bpe: BPETokenizer) -> None:
    ids = bpe.encode("say <mask> and <eos>")
    assert bpe.special_id("<mask>") not in ids and bpe.eos_id not in ids
    assert bpe.decode(ids) == "say <mask> and <eos>"


def test_bpe_encode_array_matches_encode(bpe: BPETokenizer) -> None:
    data = synthetic_text(50, seed=4).encode()
    assert bpe.encode_array(data).tolist() == bpe.encode(data)


def test_bpe_vocab_too_small() -> None:
    with pytest.raises(ConfigError, match="bpe_vocab_size"):
        BPETokenizer.train([b"abc"], vocab_size=100)


def test_save_and_load(tmp_path: Path, bpe: BPETokenizer) -> None:
    for tok in (ByteTokenizer(extra_specials=("<X>",)), bpe):
        folder = tmp_path / tok.kind
        folder.mkdir()
        tok.save(folder)
        again = load_tokenizer(folder)
        assert again.vocab_size == tok.vocab_size
        assert again.encode("The queen.") == tok.encode("The queen.")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "bpe"}')
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_tokenizer(tmp_path)


def test_stream_decoder_holds_partial_utf8() -> None:
    tok = ByteTokenizer()
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode("é!")]
    assert pieces == ["", "é", "!"]
    assert dec.flush() == ""
