"""Tokenizers written so that ``transformers.AutoTokenizer.from_pretrained(folder)`` gives the same
ids as triform's tokenizer, and triform still reads the folder back with its own.

Every kind is saved by its own ``save`` first (triform's ``tokenizer_config.json`` "kind" stays, so
``load_pretrained`` on the folder gets the original tokenizer back), then the Hugging Face fields
are merged into ``tokenizer_config.json``: ``tokenizer_class`` is ``PreTrainedTokenizerFast``, which
runs ``tokenizer.json`` exactly as written instead of an architecture's own tokenizer class.

The byte tokenizer has no ``tokenizer.json`` of its own, so one is built: a BPE without merges whose
256 base tokens are GPT-2's printable stand-ins for the bytes, so after byte-level pre-tokenisation
byte b gets id b, with triform's specials as added tokens from id 256 on. This is deliberately not
HF's ``ByT5Tokenizer``, which fixes pad/eos/unk at ids 0-2 and shifts every byte up by 3: a triform
ByT5-style model was trained on unshifted bytes, so the exported folder names
``PreTrainedTokenizerFast`` and keeps triform's ids. The post-processor wraps text the way triform
feeds each model kind: nothing for decoders, ``<bos> text <eos>`` for encoders (pairs
``<bos> a <eos> b <eos>``, segment ids 0/1), ``text <eos>`` for encoder-decoder inputs (T5's
convention). As in every HF tokenizer, text that spells a special token's name (``<extra_id_0>``,
``<eos>``) becomes that token; triform's byte ``encode`` keeps such text as bytes, while
``encode_with_specials`` (what ``triform generate`` uses for encoder-decoders) agrees with HF on
sentinel and mode tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from triform.tokenizers.base import Tokenizer

ModelKind = Literal["decoder", "encoder", "seq2seq"]
FAST_CLASS = "PreTrainedTokenizerFast"


def byte_tokenizer_json(tok: Any, model_kind: ModelKind = "decoder") -> str:
    """A ``tokenizer.json`` (for the ``tokenizers`` library) that maps text to the same ids as the byte
    tokenizer ``tok``: byte b is id b, special i is id 256 + i; wrapped for ``model_kind``."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    from triform.tokenizers.bpe import _byte_to_unicode

    stand_in = _byte_to_unicode()
    hf = RustTokenizer(models.BPE(vocab={stand_in[b]: b for b in range(256)}, merges=[]))
    # use_regex=False: no word splitting, so every byte maps to its stand-in character and nothing merges.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in tok.specials])
    for name in tok.specials:
        assert hf.token_to_id(name) == tok.special_id(name)  # added tokens take ids 256, 257, ... in order
    bos, eos = ("<bos>", tok.bos_id), ("<eos>", tok.eos_id)
    if model_kind == "encoder":
        hf.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", pair="<bos> $A:0 <eos>:0 $B:1 <eos>:1", special_tokens=[bos, eos],
        )
    elif model_kind == "seq2seq":
        hf.post_processor = processors.TemplateProcessing(
            single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[eos],
        )
    return hf.to_str()


def _hf_fields(tokenizer: Tokenizer, model_kind: ModelKind) -> dict[str, Any]:
    """The ``tokenizer_config.json`` fields transformers reads, for each triform tokenizer kind."""
    fields: dict[str, Any] = {"tokenizer_class": FAST_CLASS}
    if tokenizer.kind == "byte":
        specials = set(tokenizer.specials)  # type: ignore[attr-defined]
        fields.update(pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", mask_token="<mask>")
        if "<unk>" in specials:
            fields["unk_token"] = "<unk>"
        if model_kind == "encoder":
            fields.update(cls_token="<bos>", sep_token="<eos>")  # RoBERTa's convention: <s> a </s>
    elif tokenizer.kind == "wordpiece":
        t: Any = tokenizer  # a WordPieceTokenizer: its special ids named by their tokens
        fields.update(zip(("unk_token", "sep_token", "pad_token", "cls_token", "mask_token"),
                          t.tokens([t.unk_id, t.sep_id, t.pad_id, t.cls_id, t.mask_id])))
    elif tokenizer.kind == "hf":
        names = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token")}
        fields.update({k: v for k, v in names.items() if v is not None})
    return fields


def save_hf_tokenizer(
    tokenizer: Tokenizer, folder: Path | str, *, model_kind: ModelKind = "decoder", token_types: bool = False,
) -> Path:
    """Write ``tokenizer`` into ``folder`` for both readers: triform's own files, a ``tokenizer.json``
    (built for the byte tokenizer) and the Hugging Face fields of ``tokenizer_config.json``, so
    ``AutoTokenizer.from_pretrained(folder)`` encodes text to the same ids; with ``token_types`` (an
    encoder with segment embeddings) it also returns ``token_type_ids``."""
    folder = Path(folder)
    tokenizer.save(folder)
    if tokenizer.kind == "byte":
        (folder / "tokenizer.json").write_text(byte_tokenizer_json(tokenizer, model_kind), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    fields = _hf_fields(tokenizer, model_kind)
    if token_types:
        fields["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    for key, value in fields.items():
        config.setdefault(key, value)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder


__all__ = ["byte_tokenizer_json", "save_hf_tokenizer"]
