"""Typed configs for the shared block stack and the model families, plus named presets.

A config is a frozen, keyword-only dataclass. Derived fields are filled in and every value is
checked in ``__post_init__``; a bad value raises :class:`~triform.errors.ConfigError` naming the
field. Configs round-trip through plain JSON-compatible dicts (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from triform.errors import ConfigError

FFNKind = Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu", "geglu", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]
PositionKind = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
AttentionBackend = Literal["reference", "sdpa"]


def _check_literal(owner: str, name: str, value: Any, kind: Any) -> None:
    allowed = get_args(kind)
    if value not in allowed:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}.")


def _check_positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{owner}.{name} must be a positive integer, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class StackConfig:
    """The shared transformer stack: width, depth, attention heads, FFN, norm and positions.

    ``n_kv_heads`` below ``n_heads`` gives grouped-query attention (1 gives multi-query);
    ``scale_attention=False`` leaves scores unscaled (T5);
    ``head_dim`` defaults to ``d_model // n_heads`` and ``d_ff`` to 4·d (GELU/ReLU) or the
    Llama rule 8/3·d rounded up to a multiple of 256 (gated FFNs).
    ``ffn="none"`` makes the stack attention-only: its blocks have no FFN sublayer and no FFN norm
    (the small models in which induction heads are studied); ``d_ff`` is then 0.
    """

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn: FFNKind = "gelu"
    d_ff: int | None = None
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    norm_placement: NormPlacement = "pre"
    position: PositionKind = "learned"
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    sliding_window: int | None = None
    dropout: float = 0.0
    bias: bool = True
    attention: AttentionBackend = "sdpa"
    scale_attention: bool = True  # divide scores by sqrt(head_dim); T5 folds that into its initialisation

    def __post_init__(self) -> None:
        owner = "model"
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_positive(owner, name, getattr(self, name))
        n_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        _check_positive(owner, "n_kv_heads", n_kv)
        if self.n_heads % n_kv:
            raise ConfigError(f"{owner}.n_kv_heads ({n_kv}) must divide n_heads ({self.n_heads}).")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"{owner}.n_heads ({self.n_heads}) must divide d_model ({self.d_model}).")
        head_dim = self.d_model // self.n_heads if self.head_dim is None else self.head_dim
        _check_positive(owner, "head_dim", head_dim)
        _check_literal(owner, "ffn", self.ffn, FFNKind)
        _check_literal(owner, "norm", self.norm, NormKind)
        _check_literal(owner, "norm_placement", self.norm_placement, NormPlacement)
        _check_literal(owner, "position", self.position, PositionKind)
        _check_literal(owner, "attention", self.attention, AttentionBackend)
        if self.position == "rope" and head_dim % 2:
            raise ConfigError(f"{owner}.head_dim must be even for RoPE, got {head_dim}.")
        if self.ffn == "none":
            if self.d_ff not in (None, 0):
                raise ConfigError(f"{owner}.d_ff must be unset or 0 for an attention-only stack (ffn='none'), "
                                  f"got {self.d_ff!r}.")
            d_ff = 0
        else:
            if self.d_ff is not None:
                d_ff = self.d_ff
            elif self.ffn in ("swiglu", "geglu"):
                d_ff = 256 * math.ceil(int(8 * self.d_model / 3) / 256)
            else:
                d_ff = 4 * self.d_model
            _check_positive(owner, "d_ff", d_ff)
        if self.sliding_window is not None:
            _check_positive(owner, "sliding_window", self.sliding_window)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{owner}.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.norm_eps > 0:
            raise ConfigError(f"{owner}.norm_eps must be positive, got {self.norm_eps!r}.")
        if not self.rope_theta > 0:
            raise ConfigError(f"{owner}.rope_theta must be positive, got {self.rope_theta!r}.")
        object.__setattr__(self, "n_kv_heads", n_kv)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "d_ff", d_ff)


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """A decoder-only language model: the shared stack plus vocabulary and output tying."""

    stack: StackConfig
    vocab_size: int
    tie_embeddings: bool = True
    family: str = "decoder"

    def __post_init__(self) -> None:
        if isinstance(self.stack, dict):
            object.__setattr__(self, "stack", StackConfig(**self.stack))
        _check_positive("model", "vocab_size", self.vocab_size)

    def replace(self, **changes: Any) -> DecoderConfig:
        """A copy with top-level fields and/or stack fields (by name) replaced."""
        return _replace_family(self, changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict that :meth:`from_dict` turns back into an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Build a config from :meth:`to_dict` output, with a clear error on unknown or bad fields."""
        return _from_stack_dict(cls, data)


def _from_stack_dict(cls: type, data: Any) -> Any:
    """A family config (one composing a StackConfig under ``stack``) from its ``to_dict`` output, with a
    clear error on unknown or bad fields."""
    if not isinstance(data, dict) or "stack" not in data:
        raise ConfigError("model config must be a JSON object with a 'stack' entry.")
    try:
        return cls(stack=StackConfig(**data["stack"]), **{k: v for k, v in data.items() if k != "stack"})
    except TypeError as exc:
        raise ConfigError(f"model config has an unknown or missing field ({exc}).") from None


def _replace_family(cfg: Any, changes: dict[str, Any]) -> Any:
    """``cfg`` (a family config composing a StackConfig) with top-level and stack fields replaced."""
    stack_fields = {f.name for f in dataclasses.fields(StackConfig)}
    stack_changes = {k: v for k, v in changes.items() if k in stack_fields}
    top = {k: v for k, v in changes.items() if k not in stack_fields}
    unknown = set(top) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise ConfigError(f"unknown model config field(s): {', '.join(sorted(unknown))}.")
    stack = dataclasses.replace(cfg.stack, **_raw_stack(cfg.stack, stack_changes))
    return dataclasses.replace(cfg, stack=stack, **top)


def _raw_stack(stack: StackConfig, changes: dict[str, Any]) -> dict[str, Any]:
    """Stack field changes, re-deriving head_dim/d_ff when their inputs change and they were derived."""
    out = dict(changes)
    if "head_dim" not in out and ("d_model" in out or "n_heads" in out):
        if stack.head_dim == stack.d_model // stack.n_heads:
            out["head_dim"] = None
    if "n_kv_heads" not in out and "n_heads" in out and stack.n_kv_heads == stack.n_heads:
        out["n_kv_heads"] = None
    if "d_ff" not in out and ("d_model" in out or "ffn" in out):
        out["d_ff"] = None
    return out


def _gpt2(d: int, layers: int, heads: int, ctx: int, vocab: int = 50257) -> DecoderConfig:
    stack = StackConfig(
        d_model=d, n_layers=layers, n_heads=heads, ffn="gelu_tanh", norm="layernorm",
        position="learned", max_seq_len=ctx, bias=True,
    )
    return DecoderConfig(stack=stack, vocab_size=vocab, tie_embeddings=True, family="gpt2")


def _llama(
    d: int, layers: int, heads: int, kv: int, ff: int, ctx: int, vocab: int, *,
    theta: float = 10000.0, window: int | None = None, tie: bool = False, eps: float = 1e-5,
    family: str = "llama",
) -> DecoderConfig:
    stack = StackConfig(
        d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn="swiglu", d_ff=ff,
        norm="rmsnorm", norm_eps=eps, position="rope", rope_theta=theta, max_seq_len=ctx,
        sliding_window=window, bias=False,
    )
    return DecoderConfig(stack=stack, vocab_size=vocab, tie_embeddings=tie, family=family)


BYTE_VOCAB = 256 + 8  # 256 byte values + named specials (see triform.tokenizers.byte), rounded to 8


def _shakespeare() -> DecoderConfig:
    # Tuned for CPU-minute budgets: at 79 s on 2 cores (benchmarks/shakespeare.py) a 2-layer, d=128
    # Llama-style model beat wider and deeper ones, which take too few steps in that time.
    stack = StackConfig(
        d_model=128, n_layers=2, n_heads=4, ffn="swiglu", norm="rmsnorm",
        position="rope", max_seq_len=128, bias=False,
    )
    return DecoderConfig(stack=stack, vocab_size=BYTE_VOCAB, tie_embeddings=True, family="llama")


PRESETS: dict[str, DecoderConfig] = {
    "shakespeare": _shakespeare(),
    "gpt2": _gpt2(768, 12, 12, 1024),
    "gpt2-medium": _gpt2(1024, 24, 16, 1024),
    "llama2-7b": _llama(4096, 32, 32, 32, 11008, 4096, 32000, eps=1e-5),
    "llama3-8b": _llama(4096, 32, 32, 8, 14336, 8192, 128256, theta=500000.0),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, 32768, 32000, window=4096, theta=1e6, family="mistral"),
    "smollm2-135m": _llama(576, 30, 9, 3, 1536, 8192, 49152, theta=100000.0, tie=True),
}
PRESETS.update({
    "shakespeare-tiny": PRESETS["shakespeare"].replace(d_model=64, n_layers=2, n_heads=4, max_seq_len=64),
    "gpt2-tiny": _gpt2(64, 2, 4, 128, vocab=BYTE_VOCAB),
    "gpt2-medium-tiny": _gpt2(64, 3, 4, 128, vocab=BYTE_VOCAB),
    "llama2-7b-tiny": _llama(64, 2, 4, 4, 176, 128, BYTE_VOCAB),
    "llama3-8b-tiny": _llama(64, 2, 4, 2, 176, 128, BYTE_VOCAB, theta=500000.0),
    "mistral-7b-tiny": _llama(64, 2, 4, 2, 176, 128, BYTE_VOCAB, window=16, family="mistral"),
    "smollm2-135m-tiny": _llama(48, 2, 3, 1, 128, 128, BYTE_VOCAB, theta=100000.0, tie=True),
})


def get_preset(name: str) -> DecoderConfig:
    """The preset called exactly ``name``; an unknown name raises ConfigError listing the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}.") from None


def _norm_parameters(s: StackConfig) -> int:
    return s.d_model * (2 if s.norm == "layernorm" and s.bias else 1)  # LayerNorm's bias follows the stack's


def _stack_parameters(s: StackConfig) -> int:
    """Parameters of the stack's blocks (attention, FFN and their norms), without embeddings or final norm."""
    assert s.n_kv_heads is not None and s.head_dim is not None and s.d_ff is not None
    d, hd = s.d_model, s.head_dim
    b = 1 if s.bias else 0
    q_out, kv_out = s.n_heads * hd, 2 * s.n_kv_heads * hd
    attn = d * (q_out + kv_out) + b * (q_out + kv_out) + q_out * d + b * d
    norm = _norm_parameters(s)
    if s.ffn == "none":
        ffn = 0  # attention-only: neither an FFN nor its norm
    elif s.ffn in ("swiglu", "geglu"):
        ffn = 3 * d * s.d_ff + b * (2 * s.d_ff + d) + norm
    else:
        ffn = 2 * d * s.d_ff + b * (s.d_ff + d) + norm
    return s.n_layers * (attn + norm + ffn)


def count_parameters(cfg: DecoderConfig) -> int:
    """Number of trainable parameters of a ``DecoderLM`` built from ``cfg``, computed analytically."""
    s = cfg.stack
    d = s.d_model
    total = _stack_parameters(s) + cfg.vocab_size * d
    if s.norm_placement == "pre":
        total += _norm_parameters(s)  # final norm
    if s.position == "learned":
        total += s.max_seq_len * d
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * d
    return total




EncoderFamily = Literal["bert", "roberta", "albert", "distilbert"]


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """An encoder-only model: the shared stack (bidirectional) plus its embedding front-end.

    ``type_vocab_size`` 0 means no segment embeddings (DistilBERT); ``embedding_dim`` below
    ``d_model`` is ALBERT's factorized embedding (projected up to the stack's width);
    ``share_layers`` is ALBERT's cross-layer sharing (one block applied ``n_layers`` times);
    ``position_offset`` shifts learned position ids (RoBERTa counts from ``pad_id + 1``);
    ``pooler`` adds BERT's tanh layer over the first token.
    """

    stack: StackConfig
    vocab_size: int
    type_vocab_size: int = 2
    embedding_dim: int | None = None
    share_layers: bool = False
    position_offset: int = 0
    pad_id: int = 0
    pooler: bool = True
    family: EncoderFamily = "bert"

    def __post_init__(self) -> None:
        if isinstance(self.stack, dict):
            object.__setattr__(self, "stack", StackConfig(**self.stack))
        _check_positive("model", "vocab_size", self.vocab_size)
        _check_literal("model", "family", self.family, EncoderFamily)
        if isinstance(self.type_vocab_size, bool) or not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ConfigError(f"model.type_vocab_size must be a non-negative integer, got {self.type_vocab_size!r}.")
        emb = self.stack.d_model if self.embedding_dim is None else self.embedding_dim
        _check_positive("model", "embedding_dim", emb)
        object.__setattr__(self, "embedding_dim", emb)
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"model.pad_id must lie in [0, vocab_size), got {self.pad_id!r}.")
        if self.stack.position != "learned":
            raise ConfigError("encoder models here use learned absolute positions (model.position='learned').")
        if self.stack.ffn == "none":
            raise ConfigError("model.ffn cannot be 'none' for an encoder: its masked-LM head uses the FFN's "
                              "activation.")
        if self.position_offset < 0 or self.position_offset >= self.stack.max_seq_len:
            raise ConfigError(f"model.position_offset must lie in [0, max_seq_len), got {self.position_offset!r}.")

    @property
    def max_tokens(self) -> int:
        """The longest input the position table allows."""
        return self.stack.max_seq_len - self.position_offset

    def replace(self, **changes: Any) -> EncoderConfig:
        """A copy with top-level fields and/or stack fields (by name) replaced; an embedding width that
        followed d_model keeps following it."""
        if "d_model" in changes and "embedding_dim" not in changes and self.embedding_dim == self.stack.d_model:
            changes = {**changes, "embedding_dim": None}
        return _replace_family(self, changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        return _from_stack_dict(cls, data)


def _bert(
    d: int, layers: int, heads: int, ff: int, vocab: int, *, ctx: int = 512, family: EncoderFamily = "bert",
    act: FFNKind = "gelu", **kw: Any,
) -> EncoderConfig:
    stack = StackConfig(
        d_model=d, n_layers=layers, n_heads=heads, ffn=act, d_ff=ff, norm="layernorm", norm_eps=1e-12,
        norm_placement="post", position="learned", max_seq_len=ctx, bias=True,
    )
    return EncoderConfig(stack=stack, vocab_size=vocab, family=family, **kw)


ENCODER_PRESETS: dict[str, EncoderConfig] = {
    "bert-base": _bert(768, 12, 12, 3072, 30522),
    "roberta-base": _bert(768, 12, 12, 3072, 50265, ctx=514, family="roberta", type_vocab_size=1,
                          position_offset=2, pad_id=1, pooler=False),
    "albert-base": _bert(768, 12, 12, 3072, 30000, family="albert", act="gelu_tanh", embedding_dim=128,
                         share_layers=True),
    "distilbert-base": _bert(768, 6, 12, 3072, 30522, family="distilbert", type_vocab_size=0, pooler=False),
    "minilm-l6": _bert(384, 6, 12, 1536, 30522),  # all-MiniLM-L6-v2's shape
}
ENCODER_PRESETS.update({
    "bert-base-tiny": _bert(64, 2, 4, 128, BYTE_VOCAB, ctx=128),
    "roberta-base-tiny": _bert(64, 2, 4, 128, BYTE_VOCAB, ctx=130, family="roberta", type_vocab_size=1,
                               position_offset=2, pad_id=1, pooler=False),
    "albert-base-tiny": _bert(64, 3, 4, 128, BYTE_VOCAB, ctx=128, family="albert", act="gelu_tanh",
                              embedding_dim=32, share_layers=True),
    "distilbert-base-tiny": _bert(64, 2, 4, 128, BYTE_VOCAB, ctx=128, family="distilbert", type_vocab_size=0,
                                  pooler=False),
    "minilm-l6-tiny": _bert(48, 2, 4, 96, BYTE_VOCAB, ctx=128),
    # A byte-level BERT sized for CPU-minute budgets (benchmarks/encoders.py).
    "bert-mini": _bert(128, 4, 4, 512, BYTE_VOCAB, ctx=512),
})


def get_encoder_preset(name: str) -> EncoderConfig:
    """The encoder preset called exactly ``name``; an unknown name raises ConfigError listing the choices."""
    try:
        return ENCODER_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown encoder preset {name!r}; choose one of: {', '.join(sorted(ENCODER_PRESETS))}."
        ) from None


@dataclass(frozen=True, kw_only=True)
class Seq2SeqConfig:
    """An encoder-decoder model (T5 / ByT5): two stacks of the shared blocks, one vocabulary.

    Positions are T5's bucketed relative bias (``num_buckets``, ``max_distance``), one table per stack
    shared by all its layers. ``scale_output`` multiplies the decoder output by d_model^-0.5 before
    the output layer (T5 1.0, whose embeddings are tied; T5 1.1 and ByT5 do not scale).
    """

    encoder: StackConfig
    decoder: StackConfig
    vocab_size: int
    tie_embeddings: bool = True
    num_buckets: int = 32
    max_distance: int = 128
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0
    scale_output: bool | None = None  # multiply decoder output by d^-0.5 (T5 1.0); default: when tied
    family: str = "t5"

    def __post_init__(self) -> None:
        if self.scale_output is None:
            object.__setattr__(self, "scale_output", self.tie_embeddings)
        for name in ("encoder", "decoder"):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, StackConfig(**getattr(self, name)))
        _check_positive("model", "vocab_size", self.vocab_size)
        _check_positive("model", "num_buckets", self.num_buckets)
        _check_positive("model", "max_distance", self.max_distance)
        e, d = self.encoder, self.decoder
        if (e.d_model, e.n_heads) != (d.d_model, d.n_heads):
            raise ConfigError("model.encoder and model.decoder must share d_model and n_heads.")
        for name, value in (("pad_id", self.pad_id), ("eos_id", self.eos_id), ("decoder_start_id", self.decoder_start_id)):
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{name} must lie in [0, vocab_size), got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Seq2SeqConfig:
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"model config has an unknown or missing field ({exc}).") from None

    def replace(self, **changes: Any) -> Seq2SeqConfig:
        """A copy with top-level fields changed; ``max_seq_len`` applies to both stacks."""
        data = self.to_dict()
        if "max_seq_len" in changes:
            n = changes.pop("max_seq_len")
            data["encoder"]["max_seq_len"] = data["decoder"]["max_seq_len"] = n
        unknown = set(changes) - set(data)
        if unknown:
            raise ConfigError(f"unknown encoder-decoder field(s): {', '.join(sorted(unknown))}.")
        data.update(changes)
        return Seq2SeqConfig.from_dict(data)


def _t5_stack(d: int, layers: int, heads: int, d_kv: int, ff: int, ffn: FFNKind) -> StackConfig:
    return StackConfig(
        d_model=d, n_layers=layers, n_heads=heads, head_dim=d_kv, ffn=ffn, d_ff=ff, norm="rmsnorm", norm_eps=1e-6,
        norm_placement="pre", position="none", max_seq_len=1024, bias=False, scale_attention=False,
    )


def t5_config(
    d: int, layers: int, heads: int, d_kv: int, ff: int, vocab: int, *, gated: bool, decoder_layers: int | None = None,
    tie: bool | None = None,
) -> Seq2SeqConfig:
    """T5 1.0 (ReLU FFN, tied embeddings) or T5 1.1 / ByT5 (gated GELU, untied) shapes."""
    ffn: FFNKind = "geglu" if gated else "relu"
    return Seq2SeqConfig(
        encoder=_t5_stack(d, layers, heads, d_kv, ff, ffn), decoder=_t5_stack(d, decoder_layers or layers, heads, d_kv, ff, ffn),
        vocab_size=vocab, tie_embeddings=(not gated) if tie is None else tie,
    )


SEQ2SEQ_VOCAB = 520  # triform.tokenizers.byte.denoising_tokenizer(): 514 ids rounded up to a multiple of 8


def byt5_config(d: int, encoder_layers: int, heads: int, d_kv: int, ff: int, *, vocab: int = SEQ2SEQ_VOCAB, ctx: int = 1024) -> Seq2SeqConfig:
    """ByT5's shape (arXiv 2105.13626): T5 1.1 parts on bytes, an encoder three times as deep as the decoder."""
    cfg = t5_config(d, encoder_layers, heads, d_kv, ff, vocab, gated=True, decoder_layers=max(1, encoder_layers // 3))
    return cfg.replace(max_seq_len=ctx, family="byt5")


SEQ2SEQ_PRESETS: dict[str, Seq2SeqConfig] = {
    # Published shapes (Hugging Face configs of t5-small, google/t5-v1_1-small, google/byt5-small).
    "t5-small": t5_config(512, 6, 8, 64, 2048, 32128, gated=False),
    "t5-v1_1-small": t5_config(512, 8, 6, 64, 1024, 32128, gated=True),
    "byt5-small": byt5_config(1472, 12, 6, 64, 3584, vocab=384),
    # CPU-sized twins over the byte vocabulary with sentinels and UL2 mode tokens.
    "t5-tiny": t5_config(64, 2, 4, 16, 128, SEQ2SEQ_VOCAB, gated=False),
    "byt5-tiny": byt5_config(64, 3, 4, 16, 128),
    "byt5-mini": byt5_config(192, 3, 4, 48, 512),
}


def get_seq2seq_preset(name: str) -> Seq2SeqConfig:
    """The encoder-decoder preset called exactly ``name``; an unknown name lists the choices."""
    try:
        return SEQ2SEQ_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder-decoder preset {name!r}; choose one of: {', '.join(sorted(SEQ2SEQ_PRESETS))}.") from None


Pooling = Literal["cls", "mean"]
VisionFamily = Literal["vit", "clip"]


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """A Vision Transformer (arXiv 2010.11929): p×p patches embedded linearly, a class token, learned
    positions, then the shared pre-norm stack (bidirectional) and a final LayerNorm.

    ``pool`` reads the class token ("cls") or the mean of the patch tokens ("mean"); ``patch_bias``
    is the patch projection's bias (CLIP's has none); ``pre_norm`` adds CLIP's LayerNorm between
    the embeddings and the blocks; ``pooler`` adds HF ``ViTModel``'s tanh layer over the class token.
    The stack's ``max_seq_len`` always equals the patch count + 1 (it follows the image and patch size).
    """

    stack: StackConfig
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    pool: Pooling = "cls"
    patch_bias: bool = True
    pre_norm: bool = False
    pooler: bool = False
    family: VisionFamily = "vit"

    def __post_init__(self) -> None:
        if isinstance(self.stack, dict):
            object.__setattr__(self, "stack", StackConfig(**self.stack))
        for name in ("image_size", "patch_size", "channels"):
            _check_positive("model", name, getattr(self, name))
        _check_literal("model", "pool", self.pool, Pooling)
        _check_literal("model", "family", self.family, VisionFamily)
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.patch_size ({self.patch_size}) must divide image_size ({self.image_size}).")
        s = self.stack
        if s.position != "learned" or s.norm_placement != "pre" or s.ffn in ("swiglu", "geglu", "none"):
            raise ConfigError("a vision encoder uses learned positions, pre-norm blocks and a plain (GELU-style) FFN.")
        if s.max_seq_len != self.n_patches + 1:
            object.__setattr__(self, "stack", dataclasses.replace(s, max_seq_len=self.n_patches + 1))

    @property
    def grid(self) -> int:
        """Patches along each side at the training size."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    def replace(self, **changes: Any) -> VisionConfig:
        """A copy with top-level fields and/or stack fields (by name) replaced."""
        return _replace_family(self, changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        return _from_stack_dict(cls, data)


@dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """CLIP (arXiv 2103.00020): a causal text tower pooled at the end-of-text token and a ViT image
    tower, each projected (without bias) to ``projection_dim``, with a learned temperature.

    ``text`` is the text tower's stack (pre-norm, learned positions, ``max_seq_len`` = its context);
    ``eos_id`` is the end-of-text token the text tower pools at; ``logit_scale_init`` is the initial
    log inverse temperature, log(1/0.07), clamped to [0, log 100] as open_clip does.
    """

    text: StackConfig
    vision: VisionConfig
    vocab_size: int
    projection_dim: int = 512
    eos_id: int = 2
    pad_id: int = 0
    logit_scale_init: float = math.log(1 / 0.07)
    family: str = "clip"

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", StackConfig(**self.text))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig.from_dict(self.vision))
        _check_positive("model", "vocab_size", self.vocab_size)
        _check_positive("model", "projection_dim", self.projection_dim)
        t = self.text
        if t.position != "learned" or t.norm_placement != "pre" or t.ffn in ("swiglu", "geglu", "none"):
            raise ConfigError("CLIP's text tower uses learned positions, pre-norm blocks and a plain (GELU-style) FFN.")
        for name, value in (("eos_id", self.eos_id), ("pad_id", self.pad_id)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{name} must lie in [0, vocab_size), got {value!r}.")
        if not isinstance(self.logit_scale_init, (int, float)) or not 0 <= self.logit_scale_init <= math.log(100):
            raise ConfigError(f"model.logit_scale_init must lie in [0, log 100], got {self.logit_scale_init!r}.")

    @property
    def max_tokens(self) -> int:
        """The longest caption the text tower's position table allows."""
        return self.text.max_seq_len

    def replace(self, **changes: Any) -> CLIPConfig:
        """A copy with top-level fields changed; ``text=`` / ``vision=`` take dicts of their own fields."""
        data = self.to_dict()
        for tower in ("text", "vision"):
            if isinstance(changes.get(tower), dict):
                sub = changes.pop(tower)
                data[tower] = (_replace_family(self.vision, sub).to_dict() if tower == "vision"
                               else dataclasses.asdict(dataclasses.replace(self.text, **_raw_stack(self.text, sub))))
        unknown = set(changes) - set(data)
        if unknown:
            raise ConfigError(f"unknown CLIP config field(s): {', '.join(sorted(unknown))}.")
        data.update(changes)
        return CLIPConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        if not isinstance(data, dict) or "text" not in data or "vision" not in data:
            raise ConfigError("CLIP config must be a JSON object with 'text' and 'vision' entries.")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"model config has an unknown or missing field ({exc}).") from None


def _vit_stack(d: int, layers: int, heads: int, ff: int, *, act: FFNKind = "gelu", eps: float = 1e-12) -> StackConfig:
    return StackConfig(d_model=d, n_layers=layers, n_heads=heads, ffn=act, d_ff=ff, norm="layernorm", norm_eps=eps,
                       norm_placement="pre", position="learned", bias=True)


def vit_config(d: int, layers: int, heads: int, ff: int, *, image: int, patch: int, channels: int = 3,
               pool: Pooling = "cls") -> VisionConfig:
    """A ViT of HF ``ViTModel``'s shape: GELU, LayerNorm eps 1e-12, biases everywhere."""
    return VisionConfig(stack=_vit_stack(d, layers, heads, ff), image_size=image, patch_size=patch, channels=channels,
                        pool=pool)


def clip_config(
    *, vision: tuple[int, int, int, int], text: tuple[int, int, int, int], image: int, patch: int, context: int,
    vocab: int, projection: int, eos_id: int, pad_id: int = 0,
) -> CLIPConfig:
    """CLIP's shape: (d, layers, heads, d_ff) per tower, QuickGELU, LayerNorm eps 1e-5, CLIP's pre-norm
    on the image tower and no bias on the patch projection."""
    vd, vl, vh, vf = vision
    td, tl, th, tf = text
    tower = VisionConfig(stack=_vit_stack(vd, vl, vh, vf, act="quick_gelu", eps=1e-5), image_size=image,
                         patch_size=patch, pre_norm=True, patch_bias=False, family="clip")
    text_stack = dataclasses.replace(_vit_stack(td, tl, th, tf, act="quick_gelu", eps=1e-5), max_seq_len=context)
    return CLIPConfig(text=text_stack, vision=tower, vocab_size=vocab, projection_dim=projection, eos_id=eos_id,
                      pad_id=pad_id)


BYTE_EOS, BYTE_PAD = 258, 256  # the byte tokenizer's <eos> (where byte-level CLIP pools) and <pad>

VISION_PRESETS: dict[str, VisionConfig] = {
    # Published shapes: ViT-B/16 and ViT-L/16 (arXiv 2010.11929, Table 1; HF google/vit-base-patch16-224).
    "vit-base": vit_config(768, 12, 12, 3072, image=224, patch=16),
    "vit-large": vit_config(1024, 24, 16, 4096, image=224, patch=16),
    # CPU-sized twins: 32×32 RGB, and 8×8 greyscale for scikit-learn's digits. The digits ViT uses
    # 4×4 patches (a 2×2 grid): on one CPU thread it reaches ~97% test accuracy in ~15 s, while 2×2
    # patches overfit to ~95% in twice the time.
    "vit-base-tiny": vit_config(64, 2, 4, 128, image=32, patch=8),
    "vit-digits": vit_config(64, 3, 4, 128, image=8, patch=4, channels=1),
}

CLIP_PRESETS: dict[str, CLIPConfig] = {
    # openai/clip-vit-base-patch32: ViT-B/32 image tower, 12-layer 512-wide text tower, 77 tokens.
    "clip-vit-b-32": clip_config(vision=(768, 12, 12, 3072), text=(512, 12, 8, 2048), image=224, patch=32, context=77,
                                 vocab=49408, projection=512, eos_id=49407),
    # CPU-sized twins over bytes: 32×32 RGB images, or 8×8 greyscale digits.
    "clip-vit-b-32-tiny": clip_config(vision=(64, 2, 4, 128), text=(64, 2, 4, 128), image=32, patch=8, context=64,
                                      vocab=BYTE_VOCAB, projection=64, eos_id=BYTE_EOS, pad_id=BYTE_PAD),
    # 4×4 patches here too: zero-shot accuracy on held-out digit templates rises from ~89% to ~94% and a
    # step takes about two thirds of the time.
    "clip-digits": clip_config(vision=(64, 3, 4, 128), text=(64, 2, 4, 128), image=8, patch=4, context=64,
                               vocab=BYTE_VOCAB, projection=64, eos_id=BYTE_EOS, pad_id=BYTE_PAD).replace(
                                   vision={"channels": 1}),
}


def get_vision_preset(name: str) -> VisionConfig | CLIPConfig:
    """The ViT or CLIP preset called exactly ``name``; an unknown name lists the choices."""
    found = VISION_PRESETS.get(name) or CLIP_PRESETS.get(name)
    if found is None:
        choices = sorted([*VISION_PRESETS, *CLIP_PRESETS])
        raise ConfigError(f"unknown vision preset {name!r}; choose one of: {', '.join(choices)}.")
    return found


def count_vision_parameters(cfg: VisionConfig, num_labels: int = 0) -> int:
    """Parameters of a ``VisionEncoder`` (``num_labels`` > 0: a ``VisionClassifier``), analytically."""
    s, d = cfg.stack, cfg.stack.d_model
    patch = cfg.channels * cfg.patch_size ** 2 * d + (d if cfg.patch_bias else 0)
    total = patch + d + (cfg.n_patches + 1) * d + _stack_parameters(s) + _norm_parameters(s)  # + cls, positions, final norm
    if cfg.pre_norm:
        total += _norm_parameters(s)
    if cfg.pooler:
        total += d * d + d
    if num_labels:
        total += d * num_labels + num_labels
    return total


def count_clip_parameters(cfg: CLIPConfig) -> int:
    """Parameters of a ``CLIP`` model: both towers, both projections and the temperature."""
    t = cfg.text
    text = cfg.vocab_size * t.d_model + t.max_seq_len * t.d_model + _stack_parameters(t) + _norm_parameters(t)
    vision = count_vision_parameters(cfg.vision)
    return text + vision + (t.d_model + cfg.vision.stack.d_model) * cfg.projection_dim + 1


__all__ = [
    "StackConfig", "DecoderConfig", "PRESETS", "get_preset", "count_parameters", "BYTE_VOCAB",
    "EncoderConfig", "ENCODER_PRESETS", "get_encoder_preset", "Seq2SeqConfig", "SEQ2SEQ_PRESETS",
    "get_seq2seq_preset", "t5_config", "byt5_config", "VisionConfig", "CLIPConfig", "VISION_PRESETS", "CLIP_PRESETS",
    "get_vision_preset", "vit_config", "clip_config", "count_vision_parameters", "count_clip_parameters",
]
