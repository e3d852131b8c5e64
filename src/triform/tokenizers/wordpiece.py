"""WordPiece (BERT-style) tokenizers from a ``tokenizer.json``, for encoder checkpoints.

The ``tokenizers`` library does the work: normalisation (lower-casing, accent stripping), word
splitting, WordPiece, and the post-processor that wraps a text as ``[CLS] text [SEP]`` (or a pair as
``[CLS] a [SEP] b [SEP]`` with segment ids 0/1). ``batch`` pads to the longest row and returns the
tensors an encoder takes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from triform.errors import CheckpointError, DataError


@dataclass
class EncodedBatch:
    """Padded ids (B, T), attention mask (B, T) and segment ids (B, T)."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor


class WordPieceTokenizer:
    """A BERT-family tokenizer: ``encode(text, pair=None)`` -> ids with its special tokens."""

    kind = "wordpiece"

    def __init__(self, path: Path | str) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise CheckpointError(f"{path} could not be read as a tokenizer ({exc}).") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        def find(*names: str) -> int:
            for n in names:
                i = self._tok.token_to_id(n)
                if i is not None:
                    return i
            raise CheckpointError(f"{path} has none of the special tokens {', '.join(names)}.")

        self.pad_id = find("[PAD]", "<pad>")
        self.cls_id = find("[CLS]", "<s>")
        self.sep_id = find("[SEP]", "</s>")
        self.mask_id = find("[MASK]", "<mask>")
        self.unk_id = find("[UNK]", "<unk>")
        self.special_ids = {self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id}

    def encode(self, text: str, pair: str | None = None, *, max_length: int | None = None) -> list[int]:
        """Ids of ``text`` (and ``pair``) with [CLS]/[SEP]; longer than ``max_length`` is an error."""
        ids = self._tok.encode(text, pair).ids
        if max_length is not None and len(ids) > max_length:
            raise DataError(f"the text is {len(ids)} tokens, more than the model's {max_length}; pass truncate=True to cut it.")
        return ids

    def batch(
        self, texts: list[str], pairs: list[str] | None = None, *, max_length: int, truncate: bool = True, warn: bool = True,
    ) -> EncodedBatch:
        """Pad a batch; rows longer than ``max_length`` are cut (keeping the closing [SEP]) when
        ``truncate``, with a warning when ``warn``, else refused."""
        if any(not t for t in texts):
            raise DataError("empty text: every input needs at least one character.")
        enc = self._tok.encode_batch(list(zip(texts, pairs)) if pairs is not None else list(texts))
        too_long = [i for i, e in enumerate(enc) if len(e.ids) > max_length]
        if too_long and not truncate:
            raise DataError(
                f"text {too_long[0] + 1} is {len(enc[too_long[0]].ids)} tokens, more than the model's {max_length}."
            )
        if too_long:
            if warn:
                warnings.warn(f"{len(too_long)} text(s) longer than {max_length} tokens were truncated.", stacklevel=2)
            self._tok.enable_truncation(max_length=max_length)
            try:
                enc = self._tok.encode_batch(list(zip(texts, pairs)) if pairs is not None else list(texts))
            finally:
                self._tok.no_truncation()
        width = max(len(e.ids) for e in enc)
        ids = torch.full((len(enc), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        types = torch.zeros((len(enc), width), dtype=torch.long)
        for r, e in enumerate(enc):
            n = len(e.ids)
            ids[r, :n] = torch.tensor(e.ids)
            mask[r, :n] = 1
            types[r, :n] = torch.tensor(e.type_ids)
        return EncodedBatch(ids, mask, types)

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming this kind (for checkpoints)."""
        import json

        self._tok.save(str(Path(directory) / "tokenizer.json"))
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"kind": self.kind}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> WordPieceTokenizer:
        return cls(Path(directory) / "tokenizer.json")

    def pieces(self) -> list[str]:
        """Every id's piece, in id order (``[CLS]``, ``the``, ``##ing`` ...)."""
        return self.tokens(list(range(self.vocab_size)))

    def tokens(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens, word pieces joined."""
        return self._tok.decode([i for i in ids if i not in self.special_ids])
