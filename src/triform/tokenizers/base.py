"""The tokenizer interface shared by the byte-level and BPE tokenizers, and loading by kind."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from triform.errors import CheckpointError


class Tokenizer(Protocol):
    """Maps bytes to token ids and back. ``token_bytes()[i]`` is the exact byte string of token i
    (empty for special tokens), which is what bits-per-byte and streaming decode are built on."""

    kind: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, data: bytes | str) -> list[int]: ...

    def encode_array(self, data: bytes) -> np.ndarray: ...

    def decode_bytes(self, ids: list[int]) -> bytes: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self) -> list[bytes]: ...

    def special_id(self, name: str) -> int: ...

    def save(self, directory: Path) -> None: ...


class TokenTableDecoding:
    """``decode_bytes`` / ``decode`` for tokenizers that know each token's exact bytes."""

    def token_bytes(self) -> list[bytes]:
        raise NotImplementedError

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of ``ids``; special tokens contribute nothing."""
        table = self.token_bytes()
        return b"".join(table[i] for i in ids if 0 <= i < len(table))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, with invalid UTF-8 shown as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._bytes = tokenizer.token_bytes()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._bytes[token] if token < len(self._bytes) else b"")

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def load_tokenizer(directory: Path) -> Tokenizer:
    """Load the tokenizer saved in a checkpoint folder (``tokenizer_config.json`` names its kind)."""
    from triform.tokenizers.bpe import BPETokenizer
    from triform.tokenizers.byte import ByteTokenizer

    path = Path(directory) / "tokenizer_config.json"
    try:
        meta = json.loads(path.read_text())
        kind = meta["kind"]
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no tokenizer_config.json; it is not a complete triform checkpoint.") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path} is corrupt (not a JSON object with a 'kind').") from None
    if kind == "byte":
        return ByteTokenizer.load(Path(directory))
    if kind == "bpe":
        return BPETokenizer.load(Path(directory))
    if kind == "wordpiece":
        from triform.tokenizers.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer.load(Path(directory))  # type: ignore[return-value]
    if kind == "hf":
        from triform.tokenizers.hf import HFTokenizer

        return HFTokenizer.load(Path(directory))
    raise CheckpointError(f"{path} names an unknown tokenizer kind {kind!r}.")
