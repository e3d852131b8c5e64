"""Hugging Face T5 checkpoints (1.0: ReLU FFN, tied; 1.1 / ByT5: gated GELU, untied): config and
tensor-name maps in both directions. HF's separate q/k/v become triform's fused ``qkv`` (k/v become
``kv`` in cross-attention) and ``wi_0``/``wi_1`` the fused gated ``up``; the rest is renaming."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from triform.config import Seq2SeqConfig, t5_config
from triform.errors import CheckpointError, ConfigError
from triform.models.encoder_decoder import Seq2Seq


def t5_config_from_hf(hf: dict[str, Any]) -> Seq2SeqConfig:
    """A Seq2SeqConfig from an HF T5 ``config.json``."""
    if hf.get("model_type") not in ("t5", "mt5"):
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not T5.")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ConfigError(f"feed_forward_proj {proj!r} is not supported (relu or gated-gelu).")
    try:
        cfg = t5_config(
            hf["d_model"], hf["num_layers"], hf["num_heads"], hf["d_kv"], hf["d_ff"], hf["vocab_size"],
            gated=proj == "gated-gelu", decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            tie=hf.get("tie_word_embeddings", True),
        )
    except KeyError as exc:
        raise ConfigError(f"the HF config lacks {exc.args[0]!r}.") from None
    eps = hf.get("layer_norm_epsilon", 1e-6)
    # HF writes tie_word_embeddings=False for T5 1.1 and reads it as "do not scale the decoder output";
    # transformers 5 keeps the tensors tied in memory and records the scaling as scale_decoder_outputs.
    tie = hf.get("tie_word_embeddings", True)
    scale = hf.get("scale_decoder_outputs", tie)
    return cfg.__class__(
        encoder=cfg.encoder.__class__(**{**cfg.encoder.__dict__, "norm_eps": eps}),
        decoder=cfg.decoder.__class__(**{**cfg.decoder.__dict__, "norm_eps": eps}),
        vocab_size=cfg.vocab_size, tie_embeddings=tie, scale_output=scale,
        num_buckets=hf.get("relative_attention_num_buckets", 32), max_distance=hf.get("relative_attention_max_distance", 128),
        pad_id=hf.get("pad_token_id", 0), eos_id=hf.get("eos_token_id", 1), decoder_start_id=hf.get("decoder_start_token_id", 0),
    )


def t5_config_to_hf(cfg: Seq2SeqConfig) -> dict[str, Any]:
    e, d = cfg.encoder, cfg.decoder
    gated = e.ffn == "geglu"
    if e.ffn not in ("relu", "geglu") or e.norm != "rmsnorm" or e.bias or e.scale_attention:
        raise ConfigError("this encoder-decoder's shape has no Hugging Face T5 equivalent.")
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": e.d_model, "d_kv": e.head_dim,
        "d_ff": e.d_ff, "num_layers": e.n_layers, "num_decoder_layers": d.n_layers, "num_heads": e.n_heads,
        "vocab_size": cfg.vocab_size, "relative_attention_num_buckets": cfg.num_buckets,
        "relative_attention_max_distance": cfg.max_distance, "feed_forward_proj": "gated-gelu" if gated else "relu",
        # HF's convention: this flag also decides whether the decoder output is scaled.
        "tie_word_embeddings": bool(cfg.scale_output), "layer_norm_epsilon": e.norm_eps, "dropout_rate": e.dropout,
        "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.decoder_start_id,
        "is_encoder_decoder": True,
    }


def _names(cfg: Seq2SeqConfig) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    """(triform, HF) renames and (triform fused, [HF parts]) groups."""
    gated = cfg.encoder.ffn == "geglu"
    simple = [("shared.weight", "shared.weight"), ("encoder_norm.weight", "encoder.final_layer_norm.weight"),
              ("decoder_norm.weight", "decoder.final_layer_norm.weight"),
              ("encoder_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
              ("decoder_bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")]
    if not cfg.tie_embeddings:
        simple.append(("lm_head.weight", "lm_head.weight"))
    fused: list[tuple[str, list[str]]] = []

    def ffn(ours: str, theirs: str) -> None:
        simple.append((f"{ours}.ffn.down.weight", f"{theirs}.DenseReluDense.wo.weight"))
        simple.append((f"{ours}.ffn_norm.weight", f"{theirs}.layer_norm.weight"))
        if gated:
            fused.append((f"{ours}.ffn.up.weight", [f"{theirs}.DenseReluDense.wi_0.weight", f"{theirs}.DenseReluDense.wi_1.weight"]))
        else:
            simple.append((f"{ours}.ffn.up.weight", f"{theirs}.DenseReluDense.wi.weight"))

    for side, n in (("encoder", cfg.encoder.n_layers), ("decoder", cfg.decoder.n_layers)):
        for i in range(n):
            ours, theirs = f"{side}_blocks.{i}", f"{side}.block.{i}.layer"
            sa = f"{theirs}.0.SelfAttention"
            fused.append((f"{ours}.attn.qkv.weight", [f"{sa}.q.weight", f"{sa}.k.weight", f"{sa}.v.weight"]))
            simple += [(f"{ours}.attn.o.weight", f"{sa}.o.weight"), (f"{ours}.attn_norm.weight", f"{theirs}.0.layer_norm.weight")]
            if side == "decoder":
                ca = f"{theirs}.1.EncDecAttention"
                simple += [(f"{ours}.cross_attn.q.weight", f"{ca}.q.weight"), (f"{ours}.cross_attn.o.weight", f"{ca}.o.weight"),
                           (f"{ours}.cross_norm.weight", f"{theirs}.1.layer_norm.weight")]
                fused.append((f"{ours}.cross_attn.kv.weight", [f"{ca}.k.weight", f"{ca}.v.weight"]))
                ffn(ours, f"{theirs}.2")
            else:
                ffn(ours, f"{theirs}.1")
    return simple, fused


def t5_state_from_hf(cfg: Seq2SeqConfig, hf: dict[str, Tensor], source: str = "the checkpoint") -> dict[str, Tensor]:
    simple, fused = _names(cfg)

    def take(name: str) -> Tensor:
        if name not in hf:
            raise CheckpointError(f"{source} lacks the tensor {name!r} a T5 model needs.")
        return hf[name]

    out = {ours: take(theirs) for ours, theirs in simple}
    out.update({ours: torch.cat([take(p) for p in parts], dim=0) for ours, parts in fused})
    return out


def t5_state_to_hf(model: Seq2Seq) -> dict[str, Tensor]:
    simple, fused = _names(model.cfg)
    state = model.state_dict()
    out = {theirs: state[ours] for ours, theirs in simple}
    for ours, parts in fused:
        for name, piece in zip(parts, state[ours].chunk(len(parts), dim=0)):
            out[name] = piece
    out.setdefault("lm_head.weight", state["shared.weight"])  # written out, so readers that untie find it
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def t5_from_hf(cfg: Seq2SeqConfig, hf: dict[str, Tensor], source: str = "the checkpoint") -> Seq2Seq:
    model = Seq2Seq(cfg)
    state = t5_state_from_hf(cfg, hf, source)
    own = model.state_dict()
    for key, t in state.items():
        if own[key].shape != t.shape:
            raise CheckpointError(f"{source}: tensor for {key} has shape {tuple(t.shape)}, the config implies {tuple(own[key].shape)}.")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not cfg.tie_embeddings)
    return model.eval()


def save_hf_t5(model: Seq2Seq, folder: Path | str) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``T5ForConditionalGeneration.from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(t5_config_to_hf(model.cfg), indent=2))
    save_file(t5_state_to_hf(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
