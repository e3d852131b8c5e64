"""Reading GGUF, llama.cpp's single-file format, into HF-named float32 tensors and a tokenizer.

A GGUF holds metadata (hyperparameters under ``llama.*``, the vocabulary under ``tokenizer.ggml.*``)
and tensors under ggml names (``blk.N.attn_q.weight``), possibly block-quantized. We dequantize with
the ``gguf`` package, rename to HF's Llama names, undo the per-head row permutation llama.cpp's
converter applies to q and k, and rebuild a ``tokenizer.json`` from the vocabulary and merges.
Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triform.errors import CheckpointError, ConfigError
from triform.tokenizers.bpe import _UNICODE_TO_BYTE
from triform.tokenizers.hf import HFTokenizer

_BYTE_TO_UNICODE = {b: c for c, b in _UNICODE_TO_BYTE.items()}
_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# ggml leaf name -> HF name inside ``model.layers.{i}``
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}

# Pre-tokenizer regexes of llama.cpp's byte-level BPE flavours (llama-vocab.cpp), keyed by tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")}
_SPLITS["tekken"] = _TEKKEN_SPLIT
_GPT2_FLAVOURS = ("gpt2", "smollm")  # GPT-2's regex; smollm first isolates every digit


@dataclass
class GGUFModel:
    """What a GGUF file holds, in HF terms: a Llama config dict, float32 tensors under HF names, the
    tokenizer rebuilt from metadata, and a few raw metadata fields."""

    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: HFTokenizer
    metadata: dict[str, Any]


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: its converter interleaves each head's two rotary halves
    (``reshape(n_heads, 2, r, cols).swapaxes(1, 2)``) for its RoPE kernel; HF keeps them as halves."""
    rows = w.shape[0]
    # (n_heads, rows/n_heads/2, 2, ...) -> (n_heads, 2, rows/n_heads/2, ...) -> (rows, ...)
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a Llama-architecture GGUF file: config, dequantized float32 tensors under HF names (q/k
    unpermuted), and its tokenizer. Unsupported architectures or tensor types raise ConfigError;
    missing, truncated or malformed files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist.")
    reader = _open(path)
    fields = _Fields(reader, path)
    arch = fields.require("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path} holds a {arch!r} model; only the 'llama' GGUF architecture is supported.")
    if "rope_freqs.weight" in {t.name for t in reader.tensors} or fields.get("llama.rope.scaling.type", "none") != "none":
        raise ConfigError(f"{path} uses RoPE frequency scaling, which triform's GGUF reader does not support.")

    tokenizer = _tokenizer(fields, path)  # before the slow part, so a bad vocabulary fails fast
    heads = int(fields.require("llama.attention.head_count"))
    kv_heads = int(fields.get("llama.attention.head_count_kv", heads))
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name, path)
        w = _dequantize(t, path)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, kv_heads)
        tensors[name] = w

    hidden = int(fields.require("llama.embedding_length"))
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError(f"{path} has no token_embd.weight tensor.")
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(fields.require("llama.feed_forward_length")),
        "num_hidden_layers": int(fields.require("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(fields.get("llama.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(fields.get("llama.context_length", 2048)),
        "rms_norm_eps": _f32(fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(fields.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(fields.get("llama.vocab_size", embed.shape[0])),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
    }
    metadata = {
        "architecture": arch, "name": fields.get("general.name"), "file_type": fields.get("general.file_type"),
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "tokenizer_pre": fields.get("tokenizer.ggml.pre"),
    }
    return GGUFModel(hf_config=hf_config, tensors=tensors, tokenizer=tokenizer, metadata=metadata)


def _open(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` whose every tensor lies inside the file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception:  # the reader raises ValueError, KeyError, IndexError... on bad bytes
        raise CheckpointError(f"{path} is truncated or not a GGUF file.") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{path} is truncated or not a GGUF file (tensor {t.name} ends past the file).")
    return reader


class _Fields:
    """Typed access to a GGUF's metadata key/values."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._fields, self._path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception:
            raise CheckpointError(f"{self._path} is truncated or not a GGUF file (bad metadata {key!r}).") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self._path} lacks the metadata field {key!r}.")
        return value


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _hf_name(name: str, path: Path) -> str:
    """HF Llama name of a ggml tensor name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ConfigError(f"{path} holds tensor {name!r}, which a llama model in triform has no place for.")


def _dequantize(t: Any, path: Path) -> torch.Tensor:
    """One tensor as float32 in HF (row-major, numpy) order."""
    from gguf.quants import dequantize

    kind = t.tensor_type.name
    if kind not in _SUPPORTED_TYPES:
        raise ConfigError(
            f"{path} stores {t.name} as {kind}, which is not supported (supported: {', '.join(_SUPPORTED_TYPES)})."
        )
    # ggml lists dims fastest-first; numpy order is the reverse. Quantized data comes as uint8
    # (rows, bytes per row) and dequantize turns the last axis back into elements.
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    if np.may_share_memory(w, t.data):  # F32 comes back as a view of the read-only memory map
        w = w.copy()
    if w.shape != shape:
        raise CheckpointError(f"{path} is truncated or not a GGUF file ({t.name} has shape {w.shape}, not {shape}).")
    return torch.from_numpy(w)


def _tokenizer(fields: _Fields, path: Path) -> HFTokenizer:
    """An HFTokenizer rebuilt from ``tokenizer.ggml.*`` metadata (byte-level BPE vocabularies only)."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"{path} has a {model!r} tokenizer; only byte-level BPE ('gpt2') GGUF tokenizers are supported.")
    tokens: list[str] = fields.require("tokenizer.ggml.tokens")
    merges: list[str] = fields.get("tokenizer.ggml.merges") or []
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if len(types) != len(tokens):
        raise CheckpointError(f"{path} lists {len(tokens)} tokens but {len(types)} token types.")

    def token(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    try:
        tokenizer_json = _byte_level_json(tokens, merges, types, pre)
    except Exception as exc:  # the tokenizers library raises plain Exceptions on a bad vocabulary or merge
        raise CheckpointError(f"{path} holds a malformed vocabulary ({exc}).") from None
    try:
        return HFTokenizer(
            tokenizer_json, bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"),
            chat_template=fields.get("tokenizer.chat_template"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path} describes an unusable tokenizer: {exc}") from None


def _byte_level_json(tokens: list[str], merges: list[str], types: list[int], pre: str) -> str:
    """A ``tokenizer.json`` for a byte-level BPE vocabulary as llama.cpp stores it: tokens in id order,
    merges as "a b" strings, token types (3 = control, 4 = user-defined)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        # A normal token spelled outside the byte alphabet is raw text; respell it in the alphabet.
        # Control (3) and user-defined (4) tokens stay as written: they become added tokens below.
        if kind not in (3, 4) and not all(c in _UNICODE_TO_BYTE for c in text):
            text = "".join(_BYTE_TO_UNICODE[b] for b in text.encode("utf-8"))
        vocab.setdefault(text, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in _GPT2_FLAVOURS:
            print(f"warning: unknown GGUF pre-tokenizer {pre!r}; splitting text with GPT-2's rule.", file=sys.stderr)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == 4])
    return tok.to_str()
