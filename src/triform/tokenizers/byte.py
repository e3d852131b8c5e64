"""A token-free byte-level tokenizer: ids 0..255 are the bytes themselves, specials follow.

Lossless on any byte string, including invalid UTF-8 (ByT5, arXiv 2105.13626, makes the case for
byte-level models). The first specials are fixed (pad, bos, eos, mask); more can be appended for
sentinel or mode tokens, and ``vocab_size`` grows with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from triform.errors import CheckpointError, ConfigError

DEFAULT_SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>")


class ByteTokenizer:
    """256 byte ids followed by named special tokens."""

    kind = "byte"

    def __init__(self, extra_specials: tuple[str, ...] = ()) -> None:
        specials = DEFAULT_SPECIALS + tuple(extra_specials)
        if len(set(specials)) != len(specials):
            raise ConfigError("byte tokenizer special token names must be unique.")
        self.specials = specials
        self._special_ids = {name: 256 + i for i, name in enumerate(specials)}
        self.vocab_size = 256 + len(specials)
        self.pad_id = self._special_ids["<pad>"]
        self.bos_id = self._special_ids["<bos>"]
        self.eos_id = self._special_ids["<eos>"]
        self.mask_id = self._special_ids["<mask>"]

    def special_id(self, name: str) -> int:
        """The id of special token ``name``."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise ConfigError(f"the byte tokenizer has no special token {name!r}.") from None

    def encode(self, data: bytes | str) -> list[int]:
        """Byte ids of ``data`` (a str is encoded as UTF-8 first)."""
        return list(data.encode("utf-8") if isinstance(data, str) else bytes(data))

    def encode_array(self, data: bytes) -> np.ndarray:
        """Byte ids of a whole corpus as a uint16 array, without a Python-level loop."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of ``ids``; special tokens contribute nothing."""
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, with invalid UTF-8 shown as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b""] * len(self.specials)

    def save(self, directory: Path) -> None:
        (Path(directory) / "tokenizer_config.json").write_text(
            json.dumps({"kind": self.kind, "specials": list(self.specials)}, indent=2)
        )

    @classmethod
    def load(cls, directory: Path) -> ByteTokenizer:
        meta = json.loads((Path(directory) / "tokenizer_config.json").read_text())
        specials = tuple(meta.get("specials", DEFAULT_SPECIALS))
        if specials[: len(DEFAULT_SPECIALS)] != DEFAULT_SPECIALS:
            raise CheckpointError(f"{directory}/tokenizer_config.json has unexpected special tokens.")
        return cls(extra_specials=specials[len(DEFAULT_SPECIALS) :])
