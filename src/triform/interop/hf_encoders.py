"""Hugging Face checkpoints of the encoder families (BERT, RoBERTa, ALBERT, DistilBERT): config and
tensor-name maps, in both directions. Names only: HF's separate query/key/value become triform's
fused ``qkv`` (concatenated in that order); everything else is a rename.

Backbone names are relative to triform's ``Encoder`` and to HF's base model (``BertModel`` and
friends, whose checkpoints have no ``bert.`` prefix); heads are named at the top of the task model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from triform.config import EncoderConfig, StackConfig
from triform.errors import CheckpointError, ConfigError
from triform.models.encoder import (
    Encoder,
    EncoderForPreTraining,
    EncoderForQuestionAnswering,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
)

Head = Literal["none", "pretraining", "mlm", "sequence", "token", "qa"]

_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_BASE = {"bert": "bert", "roberta": "roberta", "albert": "albert", "distilbert": "distilbert"}


def encoder_config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    """An EncoderConfig from an HF ``config.json`` of a BERT, RoBERTa, ALBERT or DistilBERT model."""
    kind = hf.get("model_type")
    if kind not in _BASE:
        raise ConfigError(f"model_type {kind!r} is not an encoder family triform reads (bert, roberta, albert, distilbert).")
    try:
        if kind == "distilbert":
            act = hf.get("activation", "gelu")
            d, layers, heads, ff = hf["dim"], hf["n_layers"], hf["n_heads"], hf["hidden_dim"]
            eps, drop = 1e-12, hf.get("dropout", 0.1)
        else:
            act = hf.get("hidden_act", "gelu")
            d, layers, heads, ff = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"]
            eps, drop = hf.get("layer_norm_eps", 1e-12), hf.get("hidden_dropout_prob", 0.1)
        if act not in _ACTS:
            raise ConfigError(f"activation {act!r} is not supported (choose from {', '.join(_ACTS)}).")
        if kind == "albert" and (hf.get("num_hidden_groups", 1) != 1 or hf.get("inner_group_num", 1) != 1):
            raise ConfigError("only ALBERT checkpoints with one shared layer (num_hidden_groups = inner_group_num = 1) are supported.")
        pad = hf.get("pad_token_id", 1 if kind == "roberta" else 0)
        stack = StackConfig(
            d_model=d, n_layers=layers, n_heads=heads, ffn=_ACTS[act], d_ff=ff, norm="layernorm", norm_eps=eps,  # type: ignore[arg-type]
            norm_placement="post", position="learned", max_seq_len=hf["max_position_embeddings"], dropout=0.0, bias=True,
        )
        del drop  # inference configs carry no dropout; training sets its own
        return EncoderConfig(
            stack=stack, vocab_size=hf["vocab_size"], family=kind,
            type_vocab_size=0 if kind == "distilbert" else hf.get("type_vocab_size", 2),
            embedding_dim=hf.get("embedding_size") if kind == "albert" else None,
            share_layers=kind == "albert", position_offset=pad + 1 if kind == "roberta" else 0, pad_id=pad,
            pooler=kind in ("bert", "albert"),
        )
    except KeyError as exc:
        raise ConfigError(f"the HF config lacks {exc.args[0]!r}.") from None


def encoder_config_to_hf(cfg: EncoderConfig) -> dict[str, Any]:
    """An HF ``config.json`` dict that ``transformers`` turns into the equivalent model."""
    s = cfg.stack
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}.get(s.ffn)
    if act is None or s.norm_placement != "post" or s.norm != "layernorm" or not s.bias or s.n_kv_heads != s.n_heads:
        raise ConfigError("this encoder's shape has no Hugging Face equivalent (post-norm LayerNorm, biases, MHA, GELU/ReLU).")
    if cfg.family == "distilbert":
        return {
            "architectures": ["DistilBertForMaskedLM"], "model_type": "distilbert", "dim": s.d_model, "n_layers": s.n_layers,
            "n_heads": s.n_heads, "hidden_dim": s.d_ff, "activation": act, "max_position_embeddings": s.max_seq_len,
            "vocab_size": cfg.vocab_size, "pad_token_id": cfg.pad_id, "dropout": s.dropout, "attention_dropout": s.dropout,
            "sinusoidal_pos_embds": False, "tie_weights_": True,
        }
    out = {
        "architectures": [{"bert": "BertForPreTraining", "roberta": "RobertaForMaskedLM", "albert": "AlbertForPreTraining"}[cfg.family]],
        "model_type": cfg.family, "hidden_size": s.d_model, "num_hidden_layers": s.n_layers,
        "num_attention_heads": s.n_heads, "intermediate_size": s.d_ff, "hidden_act": act,
        "max_position_embeddings": s.max_seq_len, "type_vocab_size": cfg.type_vocab_size, "vocab_size": cfg.vocab_size,
        "layer_norm_eps": s.norm_eps, "pad_token_id": cfg.pad_id, "hidden_dropout_prob": s.dropout,
        "attention_probs_dropout_prob": s.dropout,
    }
    if cfg.family == "albert":
        out.update(embedding_size=cfg.embedding_dim, num_hidden_groups=1, inner_group_num=1)
    return out


def _backbone_names(cfg: EncoderConfig) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    """(triform name, HF name) renames and (triform fused name, [HF q, k, v]) groups, for the backbone."""
    simple = [
        ("embeddings.word.weight", "embeddings.word_embeddings.weight"),
        ("embeddings.position.weight", "embeddings.position_embeddings.weight"),
        ("embeddings.norm.weight", "embeddings.LayerNorm.weight"),
        ("embeddings.norm.bias", "embeddings.LayerNorm.bias"),
    ]
    if cfg.type_vocab_size:
        simple.append(("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"))
    if cfg.family == "albert":
        layer = "encoder.albert_layer_groups.0.albert_layers.0."
        names = {"o": "attention.dense", "attn_norm": "attention.LayerNorm", "up": "ffn", "down": "ffn_output",
                 "ffn_norm": "full_layer_layer_norm", "q": "attention.query", "k": "attention.key", "v": "attention.value"}
        layers = [layer]
        if cfg.embedding_dim != cfg.stack.d_model:
            simple += [(f"embeddings.proj.{p}", f"encoder.embedding_hidden_mapping_in.{p}") for p in ("weight", "bias")]
    elif cfg.family == "distilbert":
        names = {"o": "attention.out_lin", "attn_norm": "sa_layer_norm", "up": "ffn.lin1", "down": "ffn.lin2",
                 "ffn_norm": "output_layer_norm", "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin"}
        layers = [f"transformer.layer.{i}." for i in range(cfg.stack.n_layers)]
    else:
        names = {"o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm", "up": "intermediate.dense",
                 "down": "output.dense", "ffn_norm": "output.LayerNorm", "q": "attention.self.query",
                 "k": "attention.self.key", "v": "attention.self.value"}
        layers = [f"encoder.layer.{i}." for i in range(cfg.stack.n_layers)]
    ours = {"o": "attn.o", "attn_norm": "attn_norm", "up": "ffn.up", "down": "ffn.down", "ffn_norm": "ffn_norm"}
    fused = []
    for i, prefix in enumerate(layers):
        for p in ("weight", "bias"):
            simple += [(f"blocks.{i}.{ours[k]}.{p}", f"{prefix}{names[k]}.{p}") for k in ours]
            fused.append((f"blocks.{i}.attn.qkv.{p}", [f"{prefix}{names[k]}.{p}" for k in ("q", "k", "v")]))
    if cfg.pooler:
        pooler = "pooler" if cfg.family == "albert" else "pooler.dense"
        simple += [(f"pooler.{p}", f"{pooler}.{p}") for p in ("weight", "bias")]
    return simple, fused


def _head_names(cfg: EncoderConfig, head: Head) -> list[tuple[str, str]]:
    """(triform name, HF top-level name) for a task model's head."""
    both = ("weight", "bias")
    if head in ("pretraining", "mlm"):
        dense, norm, bias = {
            "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"),
            "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
            "albert": ("predictions.dense", "predictions.LayerNorm", "predictions.bias"),
            "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"),
        }[cfg.family]
        out = [(f"mlm.dense.{p}", f"{dense}.{p}") for p in both] + [(f"mlm.norm.{p}", f"{norm}.{p}") for p in both]
        out.append(("mlm.bias", bias))
        if head == "pretraining":
            pair = {"bert": "cls.seq_relationship", "albert": "sop_classifier.classifier"}.get(cfg.family)
            if pair is None:
                raise ConfigError(f"{cfg.family} has no sentence-pair pretraining head; use head='mlm'.")
            out += [(f"pair.{p}", f"{pair}.{p}") for p in both]
        return out
    if head == "token" or (head == "sequence" and cfg.family in ("bert", "albert")):
        return [(f"head.{p}", f"classifier.{p}") for p in both]
    if head == "qa":
        return [(f"head.{p}", f"qa_outputs.{p}") for p in both]
    if head == "sequence":
        raise ConfigError(f"importing a {cfg.family} sequence-classification head is not supported; load the backbone.")
    return []


def encoder_state_from_hf(cfg: EncoderConfig, hf: dict[str, Tensor], head: Head = "none", source: str = "the checkpoint") -> dict[str, Tensor]:
    """A triform state dict (for ``Encoder`` when ``head="none"``, else for the task model) from HF tensors."""
    base = _BASE[cfg.family] + "."
    stripped = {k[len(base):] if k.startswith(base) else k: v for k, v in hf.items()}
    simple, fused = _backbone_names(cfg)
    prefix = "" if head == "none" else "encoder."

    def take(name: str) -> Tensor:
        if name not in stripped:
            raise CheckpointError(f"{source} lacks the tensor {name!r} a {cfg.family} model needs.")
        return stripped[name]

    out = {prefix + ours: take(theirs) for ours, theirs in simple}
    out.update({prefix + ours: torch.cat([take(t) for t in parts], dim=0) for ours, parts in fused})
    out.update({ours: take(theirs) for ours, theirs in _head_names(cfg, head)})
    return out


def encoder_state_to_hf(cfg: EncoderConfig, state: dict[str, Tensor], head: Head = "none") -> dict[str, Tensor]:
    """HF tensors (with the base model prefix when there is a head) from a triform state dict."""
    simple, fused = _backbone_names(cfg)
    prefix = "" if head == "none" else "encoder."
    base = "" if head == "none" else _BASE[cfg.family] + "."
    out = {base + theirs: state[prefix + ours] for ours, theirs in simple}
    for ours, parts in fused:
        for name, piece in zip(parts, state[prefix + ours].chunk(3, dim=0)):
            out[base + name] = piece
    out.update({theirs: state[ours] for ours, theirs in _head_names(cfg, head)})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


_MODELS = {
    "none": lambda cfg, n: Encoder(cfg),
    "pretraining": lambda cfg, n: EncoderForPreTraining(cfg),
    "mlm": lambda cfg, n: EncoderForPreTraining(cfg, pair_head=False),
    "sequence": lambda cfg, n: EncoderForSequenceClassification(cfg, n),
    "token": lambda cfg, n: EncoderForTokenClassification(cfg, n),
    "qa": lambda cfg, n: EncoderForQuestionAnswering(cfg),
}


def encoder_from_hf(
    cfg: EncoderConfig, hf: dict[str, Tensor], head: Head = "none", *, num_labels: int = 2, source: str = "the checkpoint",
) -> nn.Module:
    """The triform model for ``head`` holding the HF tensors; a shape mismatch is a clear error."""
    if cfg.pooler and not any(k.endswith(("pooler.dense.weight", "pooler.weight")) for k in hf):
        cfg = cfg.replace(pooler=False)  # token-tagging and QA checkpoints are saved without the pooler
    model = _MODELS[head](cfg, num_labels)
    state = encoder_state_from_hf(cfg, hf, head, source)
    own = model.state_dict()
    for key, t in state.items():
        if own[key].shape != t.shape:
            raise CheckpointError(f"{source}: tensor for {key} has shape {tuple(t.shape)}, the config implies {tuple(own[key].shape)}.")
    missing = set(own) - set(state)
    if missing:
        raise CheckpointError(f"{source} gives no value for {sorted(missing)[0]}.")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def load_hf_encoder(folder: Path | str, head: Head = "none", *, trust_pickle: bool = False) -> tuple[nn.Module, EncoderConfig]:
    """An encoder (or task model) and its config from an HF model folder."""
    from triform.interop.hf import read_hf_config, read_hf_tensors

    folder = Path(folder)
    try:
        cfg = encoder_config_from_hf(read_hf_config(folder))
    except ConfigError as exc:
        raise ConfigError(f"{folder / 'config.json'}: {exc}") from None
    tensors = read_hf_tensors(folder, trust_pickle=trust_pickle)
    return encoder_from_hf(cfg, tensors, head, source=str(folder)), cfg


_HF_CLASS = {"bert": "Bert", "roberta": "Roberta", "albert": "Albert", "distilbert": "DistilBert"}
_HF_HEAD = {
    "none": "Model", "pretraining": "ForPreTraining", "mlm": "ForMaskedLM", "sequence": "ForSequenceClassification",
    "token": "ForTokenClassification", "qa": "ForQuestionAnswering",
}


def encoder_head(model: nn.Module) -> Head:
    """The export head of a triform encoder model: "pretraining" (masked-LM + sentence-pair head),
    "mlm", "sequence", "token", "qa", or "none" for a bare ``Encoder``."""
    if isinstance(model, EncoderForPreTraining):
        return "pretraining" if model.pair is not None else "mlm"
    if isinstance(model, EncoderForSequenceClassification):
        return "sequence"
    if isinstance(model, EncoderForTokenClassification):
        return "token"
    if isinstance(model, EncoderForQuestionAnswering):
        return "qa"
    if isinstance(model, Encoder):
        return "none"
    raise ConfigError(f"{type(model).__name__} is not an encoder model triform can export.")


def save_hf_encoder(
    model: nn.Module, cfg: EncoderConfig, folder: Path | str, head: Head = "none", *, labels: list[str] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads with ``from_pretrained``
    into the class for ``head`` (``BertForMaskedLM``, ``AlbertForPreTraining``, ...), which the config's
    ``architectures`` names; a classification head records its label count, and ``labels`` its names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_cfg = encoder_config_to_hf(cfg)
    hf_cfg["architectures"] = [_HF_CLASS[cfg.family] + _HF_HEAD[head]]
    if head in ("sequence", "token"):
        n = int(model.num_labels)  # type: ignore[arg-type]
        names = list(labels) if labels is not None and len(labels) == n else [f"LABEL_{i}" for i in range(n)]
        hf_cfg.update(num_labels=n, id2label=dict(enumerate(names)), label2id={s: i for i, s in enumerate(names)})
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    save_file(encoder_state_to_hf(cfg, model.state_dict(), head), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
