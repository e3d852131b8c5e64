"""Hugging Face ViT and CLIP checkpoints, in both directions: config maps and tensor-name maps only.

ViT (``ViTModel``, ``ViTForImageClassification``) and CLIP (``CLIPModel``) become triform's
``VisionEncoder`` / ``VisionClassifier`` / ``CLIP`` and back. HF's separate query/key/value become
triform's fused ``qkv`` (concatenated in that order); the patch embedding's Conv2d weight
(d, C, p, p) is triform's linear patch projection (d, C·p·p) viewed differently; ViT's class token
(1, 1, d) and position table (1, 1 + N, d) lose their leading ones. Everything else is a rename.

Two things line up without any tensor work: CLIP's vision tower applies ``post_layernorm`` to the
pooled class token only, triform applies its final ``norm`` to every token and then pools the class
token (the pooled vector is the same; the other tokens' hidden states are normalised in triform and
not in HF). HF's text tower pools at the first ``eos_token_id`` of each row, except that a config
whose ``eos_token_id`` is 2 (written before transformers PR #24773) pools at the largest token id
of the row; see :func:`clip_config_from_hf` for how that is mapped.

Names are the ones checkpoints are stored under (``encoder.layer.{i}.attention.attention.query``
for ViT, which is what ``save_pretrained`` writes and every transformers version loads); the module
names of transformers >= 5 (``layers.{i}.attention.q_proj``, ...) are read too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from triform.config import CLIPConfig, StackConfig, VisionConfig
from triform.errors import CheckpointError, ConfigError
from triform.models.clip import CLIP
from triform.models.vision import VisionClassifier, VisionEncoder

# HF activation name -> triform FFN kind, and back (the export picks HF's exact tanh GELU).
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
         "relu": "relu"}
_ACTS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}

# transformers' defaults for fields a config.json may leave out (ViTConfig, CLIPTextConfig, CLIPVisionConfig).
_VIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "qkv_bias": True, "pooler_act": "tanh", "pooler_output_size": None,
}
_CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407,
}
_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_CLIP_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "logit_scale_init_value": 2.6592}
LEGACY_CLIP_EOS = 2  # an HF CLIP text config with this eos_token_id pools at argmax(input_ids)


# ---------------------------------------------------------------------------------------------- configs


def _act(value: Any, where: str) -> str:
    if value not in _ACTS:
        raise ConfigError(f"{where} activation {value!r} is not supported (choose from {', '.join(_ACTS)}).")
    return _ACTS[value]


def _side(value: Any, name: str) -> int:
    """An image or patch size given as an int or as a square [h, w] pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{name} {list(value)} is not square; triform's vision models take square images and "
                              f"patches.")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    return value


def _stack(hf: dict[str, Any], where: str, *, max_seq_len: int = 1024) -> StackConfig:
    """The pre-norm, learned-position, biased LayerNorm stack both ViT and CLIP towers use."""
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads if heads else None):
        raise ConfigError(f"{where} head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads, "
                          f"which triform's import does not support.")
    return StackConfig(
        d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        ffn=_act(hf.get("hidden_act"), where), d_ff=hf["intermediate_size"],  # type: ignore[arg-type]
        norm="layernorm", norm_eps=float(hf["layer_norm_eps"]), norm_placement="pre",
        position="learned", max_seq_len=max_seq_len, dropout=0.0, bias=True,
    )


def vit_config_from_hf(hf: dict[str, Any], *, pooler: bool = False) -> VisionConfig:
    """A VisionConfig from an HF ``config.json`` dict of a ViT (model_type "vit"). Whether the model
    has ``ViTModel``'s tanh pooler is not in the config: the caller says (``pooler``), from the weights."""
    if hf.get("model_type") != "vit":
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not a ViT (expected 'vit').")
    v = {**_VIT_DEFAULTS, **{k: val for k, val in hf.items() if val is not None or k not in _VIT_DEFAULTS}}
    if not v["qkv_bias"]:
        raise ConfigError("ViT checkpoints without query/key/value biases (qkv_bias=false) are not supported.")
    if pooler:
        if v["pooler_act"] != "tanh":
            raise ConfigError(f"the ViT pooler's activation {v['pooler_act']!r} is not supported (only tanh).")
        if v["pooler_output_size"] not in (None, v["hidden_size"]):
            raise ConfigError("a ViT pooler whose pooler_output_size differs from hidden_size is not supported.")
    try:
        return VisionConfig(
            stack=_stack(v, "ViT"), image_size=_side(v["image_size"], "image_size"),
            patch_size=_side(v["patch_size"], "patch_size"), channels=v["num_channels"], pool="cls", patch_bias=True,
            pre_norm=False, pooler=pooler, family="vit",
        )
    except KeyError as exc:
        raise ConfigError(f"the ViT config lacks {exc.args[0]!r}.") from None


def _check_tower(s: StackConfig, what: str) -> str:
    """The HF activation name for a stack HF's ViT/CLIP layers can hold, else a ConfigError."""
    if s.norm != "layernorm" or not s.bias or s.n_kv_heads != s.n_heads or s.head_dim * s.n_heads != s.d_model:
        raise ConfigError(f"this {what} has no Hugging Face equivalent (it needs LayerNorm, biases, multi-head "
                          f"attention with head_dim = d_model / n_heads).")
    return _ACTS_TO_HF[s.ffn]


def vit_config_to_hf(cfg: VisionConfig, *, labels: list[str] | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``ViTModel``, or with ``labels`` for ``ViTForImageClassification``
    (``id2label`` / ``label2id`` from their order). ``ViTModel`` always builds its pooler: a model
    without one loads with ``ViTModel.from_pretrained(folder, add_pooling_layer=False)``."""
    if cfg.pre_norm or not cfg.patch_bias or cfg.pool != "cls":
        raise ConfigError("only a ViT-shaped vision encoder (no pre-norm, a patch bias, class-token pooling) "
                          "exports as an HF ViT.")
    s = cfg.stack
    out: dict[str, Any] = {
        "architectures": ["ViTForImageClassification" if labels is not None else "ViTModel"], "model_type": "vit",
        "hidden_size": s.d_model, "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
        "intermediate_size": s.d_ff, "hidden_act": _check_tower(s, "ViT"), "layer_norm_eps": s.norm_eps,
        "hidden_dropout_prob": s.dropout, "attention_probs_dropout_prob": s.dropout, "initializer_range": 0.02,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.channels, "qkv_bias": True,
        "encoder_stride": cfg.patch_size, "pooler_output_size": s.d_model, "pooler_act": "tanh",
    }
    if labels is not None:
        names = [str(x) for x in labels]
        out.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    return out


def _tower_dict(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """A CLIP sub-config with transformers' defaults filled in (old configs keep it in ``*_config_dict``)."""
    given = {**(hf.get(key) or {}), **(hf.get(f"{key}_dict") or {})}
    return {**defaults, **{k: v for k, v in given.items() if v is not None or k not in defaults}}


def clip_config_from_hf(hf: dict[str, Any]) -> CLIPConfig:
    """A CLIPConfig from an HF ``config.json`` dict of a ``CLIPModel`` (model_type "clip").

    triform pools each caption at its first ``eos_id``. A text config with ``eos_token_id`` 2 is
    HF's legacy rule, pooling at argmax(input_ids); the original CLIP vocabulary puts its
    end-of-text token last (49407 of 49408) and every caption holds it, so for such rows the
    largest id is exactly the first end-of-text token: such configs import with
    ``eos_id = vocab_size - 1``, which matches HF on every row that contains that token (a row
    without it pools at its largest id in HF and at its last position in triform)."""
    if hf.get("model_type") != "clip":
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not a CLIP model (expected 'clip').")
    t = _tower_dict(hf, "text_config", _CLIP_TEXT_DEFAULTS)
    v = _tower_dict(hf, "vision_config", _CLIP_VISION_DEFAULTS)
    top = {**_CLIP_DEFAULTS, **{k: val for k, val in hf.items() if val is not None}}
    vocab = t["vocab_size"]
    eos = t["eos_token_id"]
    if isinstance(eos, bool) or not isinstance(eos, int):
        raise ConfigError(f"the CLIP text config's eos_token_id must be one integer, got {eos!r}.")
    if eos == LEGACY_CLIP_EOS:
        eos = vocab - 1  # HF's legacy argmax(input_ids) pooling: see the docstring
    if not 0 <= eos < vocab:
        raise ConfigError(f"the CLIP text config's eos_token_id {eos} lies outside its vocabulary of {vocab}.")
    pad = t["pad_token_id"]
    pad = pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab else 0
    scale = min(max(float(top["logit_scale_init_value"]), 0.0), math.log(100))  # only the initial value
    try:
        tower = VisionConfig(
            stack=_stack(v, "CLIP vision"), image_size=_side(v["image_size"], "image_size"),
            patch_size=_side(v["patch_size"], "patch_size"), channels=v["num_channels"], pool="cls", patch_bias=False,
            pre_norm=True, pooler=False, family="clip",
        )
        text = _stack(t, "CLIP text", max_seq_len=t["max_position_embeddings"])
        return CLIPConfig(text=text, vision=tower, vocab_size=vocab, projection_dim=top["projection_dim"], eos_id=eos,
                          pad_id=pad, logit_scale_init=scale)
    except KeyError as exc:
        raise ConfigError(f"the CLIP config lacks {exc.args[0]!r}.") from None


def clip_config_to_hf(cfg: CLIPConfig, *, bos_id: int | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``CLIPModel``: ``eos_token_id`` is the model's ``eos_id`` (where HF
    then pools, as triform does), ``pad_token_id`` its ``pad_id``, ``bos_token_id`` the tokenizer's
    ``bos_id`` when given (else unset). A model whose ``eos_id`` is 2 cannot be exported: HF reads
    eos_token_id 2 as its legacy rule (pool at the largest token id)."""
    if cfg.eos_id == LEGACY_CLIP_EOS:
        raise ConfigError("HF CLIP treats eos_token_id 2 as its legacy rule (pool at the largest token id), so a "
                          "CLIP model whose end-of-text id is 2 cannot be exported faithfully.")
    v, t = cfg.vision, cfg.text
    if not v.pre_norm or v.patch_bias or v.pool != "cls" or v.pooler:
        raise ConfigError("only a CLIP-shaped image tower (pre-norm, no patch bias, class-token pooling, no pooler) "
                          "exports as HF CLIP.")
    vs = v.stack
    text = {
        "model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": t.d_model,
        "intermediate_size": t.d_ff, "num_hidden_layers": t.n_layers, "num_attention_heads": t.n_heads,
        "max_position_embeddings": t.max_seq_len, "hidden_act": _check_tower(t, "CLIP text tower"),
        "layer_norm_eps": t.norm_eps, "attention_dropout": t.dropout, "projection_dim": cfg.projection_dim,
        "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id, "bos_token_id": bos_id,
    }
    vision = {
        "model_type": "clip_vision_model", "hidden_size": vs.d_model, "intermediate_size": vs.d_ff,
        "num_hidden_layers": vs.n_layers, "num_attention_heads": vs.n_heads, "num_channels": v.channels,
        "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": _check_tower(vs, "CLIP image tower"),
        "layer_norm_eps": vs.norm_eps, "attention_dropout": vs.dropout, "projection_dim": cfg.projection_dim,
    }
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.projection_dim,
            "logit_scale_init_value": cfg.logit_scale_init, "text_config": text, "vision_config": vision}


# ---------------------------------------------------------------------------------------------- names

Shape = tuple[int, ...]


@dataclass
class _Layout:
    """(triform name, HF name) renames, (triform fused name, [HF q, k, v]) groups, and for tensors
    stored in another shape, triform name -> (triform shape, HF shape)."""

    simple: list[tuple[str, str]] = field(default_factory=list)
    fused: list[tuple[str, list[str]]] = field(default_factory=list)
    shapes: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)

    def extend(self, other: _Layout, ours: str = "", theirs: str = "") -> _Layout:
        """Add ``other`` with ``ours`` / ``theirs`` prefixed to its triform / HF names."""
        self.simple += [(ours + a, theirs + b) for a, b in other.simple]
        self.fused += [(ours + a, [theirs + p for p in parts]) for a, parts in other.fused]
        self.shapes.update({ours + a: s for a, s in other.shapes.items()})
        return self


_VIT_LAYER = {"o": "attention.output.dense", "attn_norm": "layernorm_before", "up": "intermediate.dense",
              "down": "output.dense", "ffn_norm": "layernorm_after", "q": "attention.attention.query",
              "k": "attention.attention.key", "v": "attention.attention.value"}
_CLIP_LAYER = {"o": "self_attn.out_proj", "attn_norm": "layer_norm1", "up": "mlp.fc1", "down": "mlp.fc2",
               "ffn_norm": "layer_norm2", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}
_OURS = {"o": "attn.o", "attn_norm": "attn_norm", "up": "ffn.up", "down": "ffn.down", "ffn_norm": "ffn_norm"}


def _blocks(n_layers: int, layer: str, names: dict[str, str]) -> _Layout:
    """The blocks: ``layer`` is HF's per-layer prefix with ``{i}`` for the index."""
    out = _Layout()
    for i in range(n_layers):
        prefix = layer.format(i=i)
        for p in ("weight", "bias"):
            out.simple += [(f"blocks.{i}.{_OURS[k]}.{p}", f"{prefix}{names[k]}.{p}") for k in _OURS]
            out.fused.append((f"blocks.{i}.attn.qkv.{p}", [f"{prefix}{names[k]}.{p}" for k in ("q", "k", "v")]))
    return out


def _patch_shapes(cfg: VisionConfig) -> tuple[Shape, Shape]:
    d, c, p = cfg.stack.d_model, cfg.channels, cfg.patch_size
    return (d, c * p * p), (d, c, p, p)  # linear (d, C·p·p) <-> Conv2d (d, C, p, p)


def _vit_layout(cfg: VisionConfig, num_labels: int = 0) -> _Layout:
    """Names of a ViT relative to ``ViTModel`` (a classifier: its ``vit.`` backbone and ``classifier``)."""
    d, n = cfg.stack.d_model, cfg.n_patches + 1
    base = _Layout(simple=[
        ("cls", "embeddings.cls_token"), ("position", "embeddings.position_embeddings"),
        ("patch.proj.weight", "embeddings.patch_embeddings.projection.weight"),
        ("patch.proj.bias", "embeddings.patch_embeddings.projection.bias"),
        ("norm.weight", "layernorm.weight"), ("norm.bias", "layernorm.bias"),
    ], shapes={"cls": ((d,), (1, 1, d)), "position": ((n, d), (1, n, d)), "patch.proj.weight": _patch_shapes(cfg)})
    base.extend(_blocks(cfg.stack.n_layers, "encoder.layer.{i}.", _VIT_LAYER))
    if cfg.pooler:
        base.simple += [(f"pooler.{p}", f"pooler.dense.{p}") for p in ("weight", "bias")]
    if not num_labels:
        return base
    out = _Layout().extend(base, "encoder.", "vit.")
    out.simple += [(f"head.{p}", f"classifier.{p}") for p in ("weight", "bias")]
    return out


def _clip_vision_layout(cfg: VisionConfig) -> _Layout:
    out = _Layout(simple=[
        ("cls", "embeddings.class_embedding"), ("position", "embeddings.position_embedding.weight"),
        ("patch.proj.weight", "embeddings.patch_embedding.weight"),
        ("pre_norm.weight", "pre_layrnorm.weight"), ("pre_norm.bias", "pre_layrnorm.bias"),
        ("norm.weight", "post_layernorm.weight"), ("norm.bias", "post_layernorm.bias"),
    ], shapes={"patch.proj.weight": _patch_shapes(cfg)})
    return out.extend(_blocks(cfg.stack.n_layers, "encoder.layers.{i}.", _CLIP_LAYER))


def _clip_layout(cfg: CLIPConfig) -> _Layout:
    """Names of a CLIP model relative to ``CLIPModel``."""
    text = _Layout(simple=[
        ("tok_emb.weight", "embeddings.token_embedding.weight"),
        ("position.weight", "embeddings.position_embedding.weight"),
        ("norm.weight", "final_layer_norm.weight"), ("norm.bias", "final_layer_norm.bias"),
    ]).extend(_blocks(cfg.text.n_layers, "encoder.layers.{i}.", _CLIP_LAYER))
    out = _Layout(simple=[("text_proj.weight", "text_projection.weight"),
                          ("image_proj.weight", "visual_projection.weight"), ("logit_scale", "logit_scale")])
    return out.extend(text, "text.", "text_model.").extend(_clip_vision_layout(cfg.vision), "vision.", "vision_model.")


# transformers >= 5 module names inside a ViT layer -> the names ViT checkpoints are stored under
_VIT_V5_NAMES = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
                 ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."),
                 ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))
_VIT_V5_LAYER = re.compile(r"^(vit\.)?layers\.(\d+)\.(.*)$")


def _stored_vit_names(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """ViT tensors under their stored names (a transformers >= 5 ``state_dict()`` renamed), with a
    classifier's ``vit.`` backbone prefix kept."""
    out = {}
    for key, t in hf.items():
        m = _VIT_V5_LAYER.match(key)
        if m:
            rest = m.group(3)
            for new, old in _VIT_V5_NAMES:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            key = f"{m.group(1) or ''}encoder.layer.{m.group(2)}.{rest}"
        out[key] = t
    return out


def _from_hf(layout: _Layout, hf: dict[str, Tensor], source: str, what: str) -> dict[str, Tensor]:
    def take(name: str) -> Tensor:
        if name not in hf:
            raise CheckpointError(f"{source} lacks the tensor {name!r} that {what} needs.")
        return hf[name]

    out = {}
    for ours, theirs in layout.simple:
        t = take(theirs)
        if ours in layout.shapes:
            mine, stored = layout.shapes[ours]
            if tuple(t.shape) != stored:
                raise CheckpointError(f"{source}: tensor {theirs} has shape {tuple(t.shape)}, the config implies "
                                      f"{stored}.")
            t = t.reshape(mine)
        out[ours] = t
    out.update({ours: torch.cat([take(p) for p in parts], dim=0) for ours, parts in layout.fused})  # (3·d, ...)
    return out


def _to_hf(layout: _Layout, state: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    def take(name: str) -> Tensor:
        if name not in state:
            raise CheckpointError(f"the state dict lacks {name!r}, which {what} of this config has.")
        return state[name]

    out = {}
    for ours, theirs in layout.simple:
        t = take(ours)
        out[theirs] = t.reshape(layout.shapes[ours][1]) if ours in layout.shapes else t
    for ours, parts in layout.fused:
        out.update(zip(parts, take(ours).chunk(len(parts), dim=0)))  # (3·d, ...) -> q, k, v
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def vision_state_from_hf(
    state: dict[str, Tensor], cfg: VisionConfig, *, classifier: bool | None = None, source: str = "the checkpoint",
) -> dict[str, Tensor]:
    """A triform state dict for ``VisionEncoder`` (or with ``classifier``, ``VisionClassifier``) from the
    tensors of an HF ``ViTModel`` / ``ViTForImageClassification`` (stored or transformers >= 5 names).
    ``classifier`` None means: when the tensors hold a ``classifier`` head. A classifier checkpoint
    read without its head gives its backbone."""
    hf = _stored_vit_names(state)
    if classifier is None:
        classifier = "classifier.weight" in hf
    if not classifier:
        hf = {k.removeprefix("vit."): v for k, v in hf.items()}
    elif "classifier.weight" not in hf:
        raise CheckpointError(f"{source} has no classifier head (classifier.weight).")
    else:
        hf = {k if k.startswith(("vit.", "classifier.")) else "vit." + k: v for k, v in hf.items()}
    layout = _vit_layout(cfg, num_labels=int(hf["classifier.weight"].shape[0]) if classifier else 0)
    return _from_hf(layout, hf, source, "a ViT of this config")


def vision_state_to_hf(state: dict[str, Tensor], cfg: VisionConfig) -> dict[str, Tensor]:
    """HF ViT tensors (stored names) from a ``VisionEncoder`` state dict, or from a ``VisionClassifier``'s
    (it has ``head.weight``), which become ``ViTForImageClassification``'s ``vit.*`` and ``classifier.*``."""
    n = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    return _to_hf(_vit_layout(cfg, num_labels=n), state, "a ViT")


def clip_state_from_hf(
    state: dict[str, Tensor], cfg: CLIPConfig, *, source: str = "the checkpoint",
) -> dict[str, Tensor]:
    """A triform ``CLIP`` state dict from the tensors of an HF ``CLIPModel`` (extra tensors such as old
    checkpoints' ``position_ids`` buffers are ignored)."""
    return _from_hf(_clip_layout(cfg), state, source, "a CLIP model of this config")


def clip_state_to_hf(state: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    """HF ``CLIPModel`` tensors from a triform ``CLIP`` state dict."""
    return _to_hf(_clip_layout(cfg), state, "a CLIP model")


# ---------------------------------------------------------------------------------------------- models


def _filled(model: nn.Module, state: dict[str, Tensor], source: str) -> nn.Module:
    """``model`` (eval mode) holding ``state``, which must give every tensor in the model's shapes."""
    own = model.state_dict()
    for key, t in state.items():
        if own[key].shape != t.shape:
            raise CheckpointError(f"{source}: tensor for {key} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(own[key].shape)}.")
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{source} gives no value for {missing[0]}.")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def vision_from_hf(cfg: VisionConfig, hf: dict[str, Tensor], *, num_labels: int = 0,
                   source: str = "the checkpoint") -> VisionEncoder | VisionClassifier:
    """A ``VisionEncoder`` (``num_labels`` 0; with a pooler when ``cfg.pooler``) or a ``VisionClassifier``
    holding an HF ViT's tensors."""
    if num_labels == 1 or num_labels < 0:
        raise CheckpointError(f"{source}: an image classifier needs at least two labels, the checkpoint has "
                              f"{num_labels}.")
    model = VisionClassifier(cfg, num_labels) if num_labels else VisionEncoder(cfg)
    state = vision_state_from_hf(hf, cfg, classifier=bool(num_labels), source=source)
    return _filled(model, state, source)  # type: ignore[return-value]


def clip_from_hf(cfg: CLIPConfig, hf: dict[str, Tensor], *, source: str = "the checkpoint") -> CLIP:
    """A triform ``CLIP`` holding an HF ``CLIPModel``'s tensors."""
    return _filled(CLIP(cfg), clip_state_from_hf(hf, cfg, source=source), source)  # type: ignore[return-value]


def _labels(hf: dict[str, Any], n: int) -> list[str]:
    """Label names in id order from ``id2label`` (``LABEL_i`` where it does not name all ``n``)."""
    table = hf.get("id2label")
    try:
        names = {int(k): str(v) for k, v in table.items()} if isinstance(table, dict) else {}
    except ValueError:
        names = {}
    return [names[i] for i in range(n)] if set(names) == set(range(n)) else [f"LABEL_{i}" for i in range(n)]


def _image_processor(folder: Path, channels: int) -> Any:
    """The ``ImageProcessor`` of a folder's ``preprocessor_config.json``, or None without one."""
    from triform.data.processor import PREPROCESSOR_FILE, ImageProcessor
    from triform.errors import DataError

    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        for key in ("image_mean", "image_std"):
            if isinstance(data.get(key), (int, float)):
                data[key] = [data[key]]  # one value for every channel
        data["triform"] = {"channels": channels, **(data.get("triform") or {})}
        return ImageProcessor.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError, DataError):
        raise CheckpointError(f"{path} is not an image processor config triform reads.") from None


def load_hf_vision(path: Path | str, *, trust_pickle: bool = False) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, processor or None, metadata) from an HF folder (``config.json`` + weights)
    of a ``ViTModel`` (a ``VisionEncoder``, with the tanh pooler when the weights have one),
    ``ViTForImageClassification`` (a ``VisionClassifier``; ``meta["labels"]`` from ``id2label``) or
    ``CLIPModel`` (a ``CLIP``).

    The processor: for ViT an ``ImageProcessor`` from ``preprocessor_config.json`` (None without
    that file). For CLIP a ``CLIPProcessor`` only when the folder also holds a triform tokenizer
    (``tokenizer_config.json`` naming its "kind", as triform's export writes): triform has no
    tokenizer for HF CLIP's own BPE ``tokenizer.json``, so a folder from the Hub gives None and its
    captions must be tokenized elsewhere (then passed as ids)."""
    from triform.interop.hf import read_hf_config, read_hf_tensors

    folder = Path(path)
    hf = read_hf_config(folder)
    kind = hf.get("model_type")
    if kind not in ("vit", "clip"):
        raise ConfigError(f"{folder / 'config.json'}: model_type {kind!r} is not a ViT or CLIP model.")
    tensors = read_hf_tensors(folder, trust_pickle=trust_pickle)
    arch = (hf.get("architectures") or [None])[0]
    meta: dict[str, Any] = {"source": str(folder), "format": "hf", "architecture": arch}
    try:
        if kind == "vit":
            stored = _stored_vit_names(tensors)
            n = int(stored["classifier.weight"].shape[0]) if "classifier.weight" in stored else 0
            pooler = not n and any(k.removeprefix("vit.") == "pooler.dense.weight" for k in stored)
            cfg: Any = vit_config_from_hf(hf, pooler=pooler)
        else:
            cfg = clip_config_from_hf(hf)
    except ConfigError as exc:
        raise ConfigError(f"{folder / 'config.json'}: {exc}") from None
    if kind == "vit":
        model: nn.Module = vision_from_hf(cfg, tensors, num_labels=n, source=str(folder))
        if n:
            meta["labels"] = _labels(hf, n)
        return model, _image_processor(folder, cfg.channels), meta
    model = clip_from_hf(cfg, tensors, source=str(folder))
    image = _image_processor(folder, cfg.vision.channels)
    processor = None
    if image is not None and _has_triform_tokenizer(folder):
        from triform.data.processor import PREPROCESSOR_FILE, CLIPProcessor
        from triform.tokenizers.base import load_tokenizer

        context = (json.loads((folder / PREPROCESSOR_FILE).read_text()).get("triform") or {}).get("context")
        processor = CLIPProcessor(load_tokenizer(folder), image, int(context or cfg.max_tokens))
    return model, processor, meta


def _has_triform_tokenizer(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("kind"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def hf_vision_checkpoint(path: Path | str, *, trust_pickle: bool = False) -> tuple[nn.Module, Any, str, dict[str, Any]]:
    """(model, processor, triform checkpoint kind, metadata) from an HF ViT/CLIP folder, as ``triform
    convert`` writes them into a triform checkpoint, which always holds a processor: a ViT folder
    without ``preprocessor_config.json`` gets ``ViTImageProcessor``'s defaults (mean = std = 0.5);
    a CLIP folder without a triform tokenizer is a ConfigError."""
    from triform.data.processor import ImageProcessor

    model, processor, meta = load_hf_vision(path, trust_pickle=trust_pickle)
    if isinstance(model, CLIP):
        if processor is None:
            raise ConfigError(f"{path} has no triform tokenizer and image processor (HF CLIP's BPE tokenizer.json "
                              f"is not one triform reads), and a triform CLIP checkpoint needs both.")
        return model, processor, "clip", meta
    if processor is None:
        cfg = model.cfg
        processor = ImageProcessor(image_size=cfg.image_size, channels=cfg.channels)  # type: ignore[union-attr]
    return model, processor, "vision", meta


def save_hf_vision(model: nn.Module, folder: Path | str, *, processor: Any = None,
                   labels: list[str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads with ``from_pretrained``
    with no missing or unexpected keys: a ``VisionEncoder`` as ``ViTModel`` (one without a pooler
    needs ``add_pooling_layer=False``), a ``VisionClassifier`` as ``ViTForImageClassification``
    (``labels`` name its classes, else ``LABEL_i``), a ``CLIP`` as ``CLIPModel``. ``processor``
    (an ``ImageProcessor``, or a ``CLIPProcessor`` whose triform tokenizer is saved too) adds
    ``preprocessor_config.json``."""
    folder = Path(folder)
    state = model.state_dict()
    if isinstance(model, CLIP):
        tokenizer = getattr(processor, "tokenizer", None)
        config = clip_config_to_hf(model.cfg, bos_id=getattr(tokenizer, "bos_id", None))
        tensors = clip_state_to_hf(state, model.cfg)
    elif isinstance(model, (VisionEncoder, VisionClassifier)):
        cfg = model.cfg
        names = None
        if isinstance(model, VisionClassifier):
            if cfg.pooler:
                raise ConfigError("HF's ViTForImageClassification reads the class token without a pooler, so a "
                                  "classifier with one cannot be exported.")
            n = model.num_labels
            names = [f"LABEL_{i}" for i in range(n)] if labels is None else list(labels)
            if len(names) != n:
                raise ConfigError(f"{len(names)} labels were given for a classifier of {n} classes.")
        config = vit_config_to_hf(cfg, labels=names)
        tensors = vision_state_to_hf(state, cfg)
    else:
        raise ConfigError(f"{type(model).__name__} is not a ViT or CLIP model triform can export.")
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if processor is not None:
        processor.save(folder)  # preprocessor_config.json (+ a CLIPProcessor's tokenizer)
    return folder


__all__ = [
    "vit_config_from_hf", "vit_config_to_hf", "clip_config_from_hf", "clip_config_to_hf", "vision_state_from_hf",
    "vision_state_to_hf", "clip_state_from_hf", "clip_state_to_hf", "vision_from_hf", "clip_from_hf", "load_hf_vision",
    "hf_vision_checkpoint", "save_hf_vision",
]
