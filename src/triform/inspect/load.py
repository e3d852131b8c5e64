"""Any model triform can read, for inspection: triform checkpoints of every kind, Hugging Face
folders (GPT-2 / Llama / Mistral, T5, BERT-family encoders, ViT, CLIP) and GGUF files; or a preset by name,
built on the meta device (shapes only) for the parameter anatomy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from triform.errors import CheckpointError, ConfigError

ENCODER_TYPES = ("bert", "roberta", "albert", "distilbert")


def load_model(path: Path | str, *, trust_pickle: bool = False) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, metadata) from a checkpoint of any kind and format."""
    from triform.interop import _hf_model_type, detect_format, load_encoder, load_pretrained

    path = Path(path)
    fmt = detect_format(path)
    if fmt == "triform":
        from triform.checkpoint import load_checkpoint

        return load_checkpoint(path, kind=None)
    if fmt == "hf" and _hf_model_type(path) in ("vit", "clip"):
        from triform.data.processor import PREPROCESSOR_FILE, ImageProcessor
        from triform.interop.hf_vision import load_hf_vision

        model, processor, meta = load_hf_vision(path, trust_pickle=trust_pickle)
        if processor is None and (path / PREPROCESSOR_FILE).is_file():
            processor = ImageProcessor.load(path)  # what rollout needs of a CLIP folder without triform's tokenizer
        return model, processor, meta
    if fmt == "hf" and _hf_model_type(path) in ENCODER_TYPES:
        encoder, tokenizer = load_encoder(path, trust_pickle=trust_pickle)
        return encoder.eval(), tokenizer, {"source": str(path), "format": "hf"}
    return load_pretrained(path, trust_pickle=trust_pickle, allow_seq2seq=True)


def preset_model(name: str, vocab_size: int | None = None) -> nn.Module:
    """The model of preset ``name`` (decoder, encoder or encoder-decoder) on the meta device."""
    from triform.config import ENCODER_PRESETS, PRESETS, SEQ2SEQ_PRESETS, get_encoder_preset, get_preset, get_seq2seq_preset
    from triform.inspect.anatomy import meta_model

    changes = {} if vocab_size is None else {"vocab_size": vocab_size}
    if name in PRESETS:
        from triform.models.decoder import DecoderLM

        return meta_model(lambda: DecoderLM(get_preset(name).replace(**changes)))
    if name in ENCODER_PRESETS:
        from triform.models.encoder import EncoderForPreTraining

        return meta_model(lambda: EncoderForPreTraining(get_encoder_preset(name).replace(**changes)))
    if name in SEQ2SEQ_PRESETS:
        from triform.models.encoder_decoder import Seq2Seq

        return meta_model(lambda: Seq2Seq(get_seq2seq_preset(name).replace(**changes)))
    raise ConfigError(f"unknown preset {name!r} (see triform presets).")


__all__ = ["load_model", "preset_model", "CheckpointError"]
