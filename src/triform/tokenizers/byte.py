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


NUM_SENTINELS = 250  # twice ByT5's 125 extra ids: UL2's X-denoiser (μ=3, r=0.5) needs one per 6 bytes
MODE_SPECIALS = ("[NLU]", "[NLG]", "[S2S]")  # UL2's mode tokens (R, X and S denoisers)


def sentinel_name(i: int) -> str:
    return f"<extra_id_{i}>"


def denoising_tokenizer(num_sentinels: int = NUM_SENTINELS) -> ByteTokenizer:
    """The byte vocabulary of the encoder-decoder and denoising models (ByT5-style): bytes, pad, bos,
    eos, mask, unk, UL2's three mode tokens and ``num_sentinels`` sentinels (514 ids by default)."""
    return ByteTokenizer(extra_specials=("<unk>", *MODE_SPECIALS, *(sentinel_name(i) for i in range(num_sentinels))))


def sentinel_ids(tok: ByteTokenizer) -> list[int]:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in order (empty when the tokenizer has none)."""
    out = []
    while sentinel_name(len(out)) in tok.specials:
        out.append(tok.special_id(sentinel_name(len(out))))
    return out


def encode_with_specials(tok: ByteTokenizer, data: bytes) -> list[int]:
    """Byte ids of ``data`` with every special token name written in it (``<extra_id_0>``, ``[S2S]``,
    ...) turned into that token's id, so a prompt can mark spans to fill."""
    import re

    names = sorted((s for s in tok.specials if s not in DEFAULT_SPECIALS), key=len, reverse=True)
    if not names:
        return list(data)
    pattern = re.compile(b"|".join(re.escape(n.encode()) for n in names))
    out: list[int] = []
    at = 0
    for m in pattern.finditer(data):
        out += list(data[at : m.start()])
        out.append(tok.special_id(m.group().decode()))
        at = m.end()
    return out + list(data[at:])


def render_with_specials(tok: ByteTokenizer, ids: list[int]) -> str:
    """Text of ``ids`` with sentinel and mode tokens shown by name (pad/bos/eos/mask omitted)."""
    out, run = [], bytearray()
    for i in ids:
        if 0 <= i < 256:
            run.append(i)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        name = tok.specials[i - 256] if 256 <= i < tok.vocab_size else ""
        if name not in DEFAULT_SPECIALS:
            out.append(name)
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)
