"""A byte-level BPE tokenizer trained with the Hugging Face ``tokenizers`` library.

Byte-level BPE (GPT-2's scheme) maps every byte to a printable character before merging, so each
token stands for an exact byte string; ``token_bytes`` undoes that mapping, which keeps bits-per-byte
exact and comparable with the byte tokenizer. Input text is UTF-8; invalid bytes become U+FFFD.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from triform.errors import CheckpointError, ConfigError
from triform.tokenizers.base import TokenTableDecoding
from triform.tokenizers.byte import DEFAULT_SPECIALS


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


class BPETokenizer(TokenTableDecoding):
    """Wraps a ``tokenizers.Tokenizer`` with byte-level pre-tokenisation and triform's specials."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        # Text that happens to read "<mask>" is text: specials are control ids, never parsed from input.
        self._tok.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (self.special_id(s) for s in DEFAULT_SPECIALS[:3])
        self._token_bytes: list[bytes] | None = None

    @classmethod
    def train(cls, texts: Iterable[bytes], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE of ``vocab_size`` ids (specials included) on ``texts``."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        min_size = 256 + len(DEFAULT_SPECIALS)
        if vocab_size < min_size:
            raise ConfigError(f"bpe_vocab_size must be at least {min_size} (256 bytes + specials), got {vocab_size}.")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(DEFAULT_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator((t.decode("utf-8", errors="replace") for t in texts), trainer=trainer)
        return cls(tok)

    def special_id(self, name: str) -> int:
        i = self._tok.token_to_id(name)
        if i is None:
            raise ConfigError(f"the BPE tokenizer has no special token {name!r}.")
        return i

    def encode(self, data: bytes | str) -> list[int]:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, data: bytes) -> np.ndarray:
        # Encode line-aligned chunks in parallel; ByteLevel pre-tokenisation never merges across "\n".
        lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 256]) for i in range(0, len(lines), 256)]
        ids: list[int] = []
        for enc in self._tok.encode_batch(chunks, add_special_tokens=False):
            ids.extend(enc.ids)
        return np.asarray(ids, dtype=np.int32)

    def token_bytes(self) -> list[bytes]:
        if self._token_bytes is None:
            table = [b""] * self.vocab_size
            specials = set(DEFAULT_SPECIALS)
            for token, i in self._tok.get_vocab().items():
                if token not in specials:
                    table[i] = bytes(_UNICODE_TO_BYTE[c] for c in token)
            self._token_bytes = table
        return self._token_bytes



    def save(self, directory: Path) -> None:
        self._tok.save(str(Path(directory) / "tokenizer.json"))
        # The HF fields make the folder loadable by transformers' AutoTokenizer as well.
        meta = {
            "kind": self.kind, "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": DEFAULT_SPECIALS[0], "bos_token": DEFAULT_SPECIALS[1], "eos_token": DEFAULT_SPECIALS[2],
        }
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        path = Path(directory) / "tokenizer.json"
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise CheckpointError(f"{path} could not be read as a tokenizer ({exc}).") from None
