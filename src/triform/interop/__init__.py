"""Checkpoints from elsewhere: Hugging Face folders and GGUF files, loaded into triform models.

``load_pretrained(path)`` accepts a triform checkpoint or run folder, an HF model folder, or a
``.gguf`` file, and returns (model, tokenizer, metadata) the same way for each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from triform.errors import CheckpointError
from triform.tokenizers.base import Tokenizer, load_tokenizer


def detect_format(path: Path) -> str:
    """"triform", "hf" or "gguf" for a path, or a CheckpointError saying why it is none of them."""
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise CheckpointError(f"{path} is a file but not a .gguf; give a checkpoint folder or a GGUF file.")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    for candidate in (path / "config.json", path / "checkpoint" / "config.json"):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text())
            except json.JSONDecodeError:
                raise CheckpointError(f"{candidate} is corrupt (not valid JSON).") from None
            if isinstance(meta, dict) and meta.get("format") == "triform":
                return "triform"
            if isinstance(meta, dict) and "model_type" in meta and candidate.parent == path:
                return "hf"
    return "triform"  # let the triform loader explain what is missing


def _hf_model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def load_pretrained(
    path: Path | str, *, trust_pickle: bool = False, device: str | torch.device = "cpu", allow_seq2seq: bool = False,
) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and metadata from any supported checkpoint format: a ``DecoderLM``,
    or with ``allow_seq2seq`` also a ``Seq2Seq`` (triform encoder-decoder checkpoints, HF T5 folders)."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "triform":
        from triform.checkpoint import checkpoint_kind, load_checkpoint

        model_kind = checkpoint_kind(path)
        if model_kind == "encoder":
            raise CheckpointError(f"{path} holds an encoder (masked-LM or classifier); use triform fill, embed or finetune with it.")
        if model_kind == "seq2seq" and not allow_seq2seq:
            raise CheckpointError(f"{path} holds an encoder-decoder model; this command needs a decoder (triform generate and chat run both).")
        return load_checkpoint(path, device=device, kind=("decoder", "seq2seq") if allow_seq2seq else "decoder")
    if kind == "gguf":
        from triform.interop.gguf import read_gguf
        from triform.interop.hf import config_from_hf, model_from_hf

        g = read_gguf(path)
        model = model_from_hf(config_from_hf(g.hf_config), g.tensors, source=str(path))
        return model.to(device), g.tokenizer, {"source": str(path), "format": "gguf", **g.metadata}
    from triform.interop.hf import load_hf, read_hf_config, read_hf_tensors
    from triform.tokenizers.hf import HFTokenizer

    vision = {"vit": "ViT", "clip": "CLIP"}.get(str(_hf_model_type(path)))
    if vision:
        raise CheckpointError(f"{path} holds a Hugging Face {vision} model, not a decoder; load it with "
                              f"triform.interop.hf_vision.load_hf_vision, or triform convert it.")
    if _hf_model_type(path) in ("t5", "mt5"):
        if not allow_seq2seq:
            raise CheckpointError(f"{path} holds an encoder-decoder (T5) model; this command needs a decoder.")
        from triform.interop.hf_t5 import t5_config_from_hf, t5_from_hf

        model = t5_from_hf(t5_config_from_hf(read_hf_config(path)), read_hf_tensors(path, trust_pickle=trust_pickle), str(path))
    else:
        model = load_hf(path, trust_pickle=trust_pickle)
    try:
        own_kind = json.loads((path / "tokenizer_config.json").read_text()).get("kind")
    except (OSError, json.JSONDecodeError, AttributeError):
        own_kind = None
    if not own_kind and not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer.json, so its text cannot be encoded.")
    tokenizer = load_tokenizer(path) if own_kind else HFTokenizer.from_folder(path)  # exported by triform
    return model.to(device), tokenizer, {"source": str(path), "format": "hf"}


def load_encoder(path: Path | str, *, trust_pickle: bool = False) -> tuple[Any, Tokenizer]:
    """The bare encoder stack (no task head) and tokenizer of a triform encoder checkpoint or a
    Hugging Face BERT-family folder (config.json + weights + tokenizer.json, WordPiece), as a base
    to fine-tune."""
    path = Path(path)
    if detect_format(path) == "hf":
        from triform.interop.hf_encoders import load_hf_encoder
        from triform.tokenizers.wordpiece import WordPieceTokenizer

        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path} has no tokenizer.json, so its text cannot be encoded.")
        encoder, _ = load_hf_encoder(path, "none", trust_pickle=trust_pickle)
        return encoder, WordPieceTokenizer(path)
    from triform.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(path, kind="encoder")
    return model.encoder, tokenizer


__all__ = ["load_pretrained", "load_encoder", "detect_format"]
