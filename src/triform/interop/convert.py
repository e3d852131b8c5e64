"""Converting checkpoints between triform's format and Hugging Face's (and from GGUF): decoders
(GPT-2, Llama, Mistral layouts), encoders (BERT, RoBERTa, ALBERT, DistilBERT) and encoder-decoders
(T5 / ByT5), each with a tokenizer ``transformers.AutoTokenizer`` loads; vision models (ViT, CLIP)
with their image processor (and a CLIP model's triform tokenizer). The output folder is
claimed first, so a folder holding a user's files is never replaced without ``overwrite``; the new
folder is built beside it and swapped in whole.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from triform.errors import ConfigError
from triform.interop import detect_format
from triform.output_dir import check_output_dir, claim_output_dir, write_output_dir


def convert_checkpoint(
    src: str | Path, dst: str | Path, *, to: str = "auto", trust_pickle: bool = False, max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> tuple[str, Any]:
    """Write ``src`` to ``dst`` as a triform checkpoint ("triform") or an HF folder ("hf"); "auto"
    turns HF/GGUF into triform and triform into HF. Returns (target format, model)."""
    if to not in ("auto", "triform", "hf"):
        raise ConfigError(f"--to must be triform, hf or auto, got {to!r}.")
    src_path, dst_path = Path(src), Path(dst)
    kind = detect_format(src_path)
    target = {"auto": "hf" if kind == "triform" else "triform"}.get(to, to)
    shard_bytes = parse_size(max_shard_size)
    _check_apart(src_path, dst_path)
    check_output_dir(dst_path, command="convert", overwrite=overwrite)  # refuse before the slow load
    model, tokenizer, model_kind, meta = _load_any(src_path, kind, trust_pickle)
    out = claim_output_dir(dst_path, command="convert", overwrite=overwrite)
    if target == "hf":
        def write(folder: Path) -> None:
            _write_hf(model, tokenizer, model_kind, meta, folder, shard_bytes)
    else:
        from triform.checkpoint import save_checkpoint

        extra = {"converted_from": str(src), **({"labels": meta["labels"]} if "labels" in meta else {})}

        def write(folder: Path) -> None:
            save_checkpoint(folder, model, tokenizer, extra=extra)
    write_output_dir(out, write, command="convert")  # built beside dst, then swapped in: no stale files remain
    return target, model


def parse_size(text: str) -> int:
    """Bytes in a size such as ``500MB`` or ``2GB`` (decimal units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not m or not float(m.group(1)) > 0:
        raise ConfigError(f"max_shard_size must look like 500MB or 2GB, got {text!r}.")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def _check_apart(src: Path, dst: Path) -> None:
    """Refuse an output folder that is the source or lies inside or around it: replacing it would lose the source."""
    a, b = src.resolve(), dst.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ConfigError(f"the output folder {dst} overlaps the source {src}; choose a folder outside it.")


def _load_any(src: Path, kind: str, trust_pickle: bool):
    """(model, tokenizer, model kind, metadata) from any checkpoint convert reads; triform checkpoints
    of every registered kind, HF decoder, T5, ViT and CLIP folders, GGUF files."""
    if kind == "triform":
        from triform.checkpoint import checkpoint_kind, load_checkpoint

        model_kind = checkpoint_kind(src)
        model, tokenizer, meta = load_checkpoint(src, kind=None)
        return model, tokenizer, model_kind, meta
    from triform.interop import _hf_model_type, load_pretrained
    from triform.models.encoder_decoder import Seq2Seq

    if kind == "hf" and _hf_model_type(src) in ("vit", "clip"):
        from triform.interop.hf_vision import hf_vision_checkpoint

        return hf_vision_checkpoint(src, trust_pickle=trust_pickle)  # (model, processor, "vision" | "clip", meta)

    model, tokenizer, meta = load_pretrained(src, trust_pickle=trust_pickle, allow_seq2seq=True)
    return model, tokenizer, "seq2seq" if isinstance(model, Seq2Seq) else "decoder", meta


def _write_hf(model, tokenizer, model_kind: str, meta: dict[str, Any], folder: Path, shard_bytes: int) -> None:
    """An HF folder for a decoder, encoder, encoder-decoder or vision model, tokenizer (or processor) included."""
    import json

    from triform.interop.hf_tokenizer import save_hf_tokenizer

    if model_kind == "decoder":
        from triform.interop.hf import save_hf

        save_hf(model, folder, max_shard_bytes=shard_bytes, save_tokenizer=lambda f: save_hf_tokenizer(tokenizer, f))
        config = json.loads((folder / "config.json").read_text())  # the tokenizer's ids, so HF's generate stops at eos
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    elif model_kind == "encoder":
        from triform.interop.hf_encoders import encoder_head, save_hf_encoder

        save_hf_encoder(model, model.cfg, folder, encoder_head(model), labels=meta.get("labels"))
        save_hf_tokenizer(tokenizer, folder, model_kind="encoder", token_types=model.cfg.type_vocab_size > 0)
    elif model_kind == "seq2seq":
        from triform.interop.hf_t5 import save_hf_t5

        save_hf_t5(model, folder)
        save_hf_tokenizer(tokenizer, folder, model_kind="seq2seq")  # triform reads its own kind back from it too
    elif model_kind in ("vision", "clip"):
        from triform.interop.hf_vision import save_hf_vision

        save_hf_vision(model, folder, processor=tokenizer, labels=meta.get("labels"))  # tokenizer: its processor
    else:
        raise ConfigError(f"a {model_kind!r} checkpoint has no Hugging Face export.")
