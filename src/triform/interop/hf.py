"""Hugging Face checkpoints in and out for the decoder families (GPT-2, Llama, Mistral).

Each family is a key map: a translation of HF config fields to triform's config, and of tensor
names, with only reshapes/transposes/concatenations on the way. No model logic lives here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from triform.config import DecoderConfig, StackConfig
from triform.errors import CheckpointError, ConfigError
from triform.models.decoder import DecoderLM

SUPPORTED = ("gpt2", "llama", "mistral")
_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported yet.")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    """triform's config for an HF ``config.json`` dict of a supported decoder family."""
    kind = hf.get("model_type")
    try:
        if kind == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in _GPT2_ACTS:
                raise ConfigError(f"GPT-2 activation {act!r} is not supported.")
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise ConfigError("GPT-2 variants with layer-scaled attention are not supported.")
            d = hf["n_embd"]
            stack = StackConfig(
                d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"], ffn=_GPT2_ACTS[act],
                d_ff=hf.get("n_inner") or 4 * d, norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                position="learned", max_seq_len=hf["n_positions"], bias=True,
            )
            return DecoderConfig(stack=stack, vocab_size=hf["vocab_size"], tie_embeddings=hf.get("tie_word_embeddings", True), family="gpt2")
        if kind in ("llama", "mistral"):
            if hf.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"{kind} activation {hf['hidden_act']!r} is not supported.")
            if hf.get("attention_bias") != hf.get("mlp_bias", False) and hf.get("attention_bias") is not None:
                raise ConfigError("attention and MLP biases must be both on or both off.")
            window = hf.get("sliding_window") if kind == "mistral" or hf.get("use_sliding_window") else None
            stack = StackConfig(
                d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
                ffn="swiglu", d_ff=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                position="rope", rope_theta=_rope_theta(hf), max_seq_len=hf.get("max_position_embeddings", 2048),
                sliding_window=window, bias=bool(hf.get("attention_bias", False)),
            )
            return DecoderConfig(stack=stack, vocab_size=hf["vocab_size"], tie_embeddings=hf.get("tie_word_embeddings", False), family=kind)
    except KeyError as exc:
        raise ConfigError(f"the {kind} config lacks the field {exc.args[0]!r}.") from None
    raise ConfigError(f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)}).")


def config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    """An HF ``config.json`` dict that ``transformers`` turns into the equivalent model."""
    s = cfg.stack
    if cfg.family == "gpt2":
        act = {v: k for k, v in _GPT2_ACTS.items() if k != "gelu_pytorch_tanh"}[s.ffn]
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": s.d_model, "n_layer": s.n_layers,
            "n_head": s.n_heads, "n_inner": s.d_ff, "n_positions": s.max_seq_len, "vocab_size": cfg.vocab_size,
            "activation_function": act, "layer_norm_epsilon": s.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "torch_dtype": "float32",
        }
    if cfg.family in ("llama", "mistral"):
        arch = "MistralForCausalLM" if cfg.family == "mistral" else "LlamaForCausalLM"
        out = {
            "architectures": [arch], "model_type": cfg.family, "hidden_size": s.d_model, "intermediate_size": s.d_ff,
            "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads,
            "head_dim": s.head_dim, "max_position_embeddings": s.max_seq_len, "rms_norm_eps": s.norm_eps,
            "rope_theta": s.rope_theta, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu", "attention_bias": s.bias, "mlp_bias": s.bias, "torch_dtype": "float32",
        }
        if cfg.family == "mistral":
            out["sliding_window"] = s.sliding_window
        return out
    raise ConfigError(f"a {cfg.family!r} model has no Hugging Face export (supported: {', '.join(SUPPORTED)}).")


def _check_exportable(cfg: DecoderConfig) -> None:
    s = cfg.stack
    ok = {
        "gpt2": s.position == "learned" and s.norm == "layernorm" and s.norm_placement == "pre" and s.bias
        and s.ffn in ("gelu_tanh", "gelu", "relu") and s.sliding_window is None,
        "llama": s.position == "rope" and s.norm == "rmsnorm" and s.ffn == "swiglu" and s.sliding_window is None
        and s.norm_placement == "pre",
        "mistral": s.position == "rope" and s.norm == "rmsnorm" and s.ffn == "swiglu" and s.norm_placement == "pre",
    }
    if not ok.get(cfg.family, False):
        raise ConfigError(f"this model's shape does not match the HF {cfg.family!r} architecture, so it cannot be exported.")


# Per-family tensor name maps: (triform pattern, HF pattern); "{i}" is the layer index.
_GPT2_NAMES = [
    ("tok_emb.weight", "transformer.wte.weight"), ("abs_pos.weight", "transformer.wpe.weight"),
    ("norm.weight", "transformer.ln_f.weight"), ("norm.bias", "transformer.ln_f.bias"),
    ("blocks.{i}.attn_norm.weight", "transformer.h.{i}.ln_1.weight"), ("blocks.{i}.attn_norm.bias", "transformer.h.{i}.ln_1.bias"),
    ("blocks.{i}.ffn_norm.weight", "transformer.h.{i}.ln_2.weight"), ("blocks.{i}.ffn_norm.bias", "transformer.h.{i}.ln_2.bias"),
    ("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight"), ("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias"),
    ("blocks.{i}.attn.o.weight", "transformer.h.{i}.attn.c_proj.weight"), ("blocks.{i}.attn.o.bias", "transformer.h.{i}.attn.c_proj.bias"),
    ("blocks.{i}.ffn.up.weight", "transformer.h.{i}.mlp.c_fc.weight"), ("blocks.{i}.ffn.up.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    ("blocks.{i}.ffn.down.weight", "transformer.h.{i}.mlp.c_proj.weight"), ("blocks.{i}.ffn.down.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    ("lm_head.weight", "lm_head.weight"),
]
_LLAMA_NAMES = [
    ("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"), ("lm_head.weight", "lm_head.weight"),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.attn.o.weight", "model.layers.{i}.self_attn.o_proj.weight"), ("blocks.{i}.attn.o.bias", "model.layers.{i}.self_attn.o_proj.bias"),
    ("blocks.{i}.ffn.down.weight", "model.layers.{i}.mlp.down_proj.weight"), ("blocks.{i}.ffn.down.bias", "model.layers.{i}.mlp.down_proj.bias"),
]
# Fused triform tensors that HF stores as several: (triform name, [HF parts in concatenation order]).
_LLAMA_FUSED = [
    ("blocks.{i}.attn.qkv.{p}", ["model.layers.{i}.self_attn.q_proj.{p}", "model.layers.{i}.self_attn.k_proj.{p}", "model.layers.{i}.self_attn.v_proj.{p}"]),
    ("blocks.{i}.ffn.up.{p}", ["model.layers.{i}.mlp.gate_proj.{p}", "model.layers.{i}.mlp.up_proj.{p}"]),
]
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")  # GPT-2 stores these as (in, out)


def state_from_hf(cfg: DecoderConfig, hf: dict[str, Tensor], source: str = "the checkpoint") -> dict[str, Tensor]:
    """triform state dict from HF tensors (names per family), checking every expected tensor exists."""
    model_keys = _expected_keys(cfg)
    out: dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        if name not in hf:
            raise CheckpointError(f"{source} lacks the tensor {name!r} that its config calls for.")
        t = hf[name]
        return t.t() if cfg.family == "gpt2" and _CONV1D.search(name) else t

    for ours, theirs in (_GPT2_NAMES if cfg.family == "gpt2" else _LLAMA_NAMES):
        for i in range(cfg.stack.n_layers if "{i}" in ours else 1):
            key = ours.format(i=i)
            if key in model_keys:
                out[key] = take(theirs.format(i=i))
    if cfg.family != "gpt2":
        for ours, parts in _LLAMA_FUSED:
            for i in range(cfg.stack.n_layers):
                for p in ("weight", "bias"):
                    key = ours.format(i=i, p=p)
                    if key in model_keys:
                        out[key] = torch.cat([take(part.format(i=i, p=p)) for part in parts], dim=0)
    return out


def state_to_hf(model: DecoderLM) -> dict[str, Tensor]:
    """HF-named tensors for ``model`` (tied output weights stored once, as HF does)."""
    cfg = model.cfg
    _check_exportable(cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    for ours, theirs in (_GPT2_NAMES if cfg.family == "gpt2" else _LLAMA_NAMES):
        for i in range(cfg.stack.n_layers if "{i}" in ours else 1):
            key, name = ours.format(i=i), theirs.format(i=i)
            if key in state and not (key == "lm_head.weight" and cfg.tie_embeddings):
                t = state[key]
                out[name] = (t.t() if cfg.family == "gpt2" and _CONV1D.search(name) else t).contiguous()
    if cfg.family != "gpt2":
        s = cfg.stack
        sizes = {"qkv": [s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim], "up": [s.d_ff, s.d_ff]}
        for ours, parts in _LLAMA_FUSED:
            for i in range(s.n_layers):
                for p in ("weight", "bias"):
                    key = ours.format(i=i, p=p)
                    if key in state:
                        pieces = state[key].split(sizes["qkv" if ".qkv." in key else "up"], dim=0)
                        out.update({part.format(i=i, p=p): t.contiguous() for part, t in zip(parts, pieces)})
    return out


def _expected_keys(cfg: DecoderConfig) -> set[str]:
    with torch.device("meta"):
        model = DecoderLM(cfg)
    keys = set(model.state_dict())
    if cfg.tie_embeddings:
        keys.discard("lm_head.weight")
    return keys


def model_from_hf(cfg: DecoderConfig, hf: dict[str, Tensor], source: str = "the checkpoint") -> DecoderLM:
    """A DecoderLM holding the HF tensors, with a clear error for any shape that disagrees."""
    state = state_from_hf(cfg, hf, source)
    model = DecoderLM(cfg)
    own = model.state_dict()
    for key, t in state.items():
        if own[key].shape != t.shape:
            raise CheckpointError(f"{source}: tensor for {key} has shape {tuple(t.shape)}, the config implies {tuple(own[key].shape)}.")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.eval()


def read_hf_tensors(folder: Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """All tensors of an HF model folder: ``model.safetensors``, a sharded index, or (only with
    ``trust_pickle``) PyTorch pickle files."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    files: list[Path]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is corrupt (no weight_map).") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} lists the shard {f.name}, which is missing from {folder}.")
    elif single.is_file():
        files = [single]
    else:
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        if not pickles:
            raise CheckpointError(f"{folder} has no model.safetensors (or sharded index) to load.")
        if not trust_pickle:
            raise CheckpointError(
                f"{folder} holds only PyTorch pickle weights ({pickles[0].name}); unpickling can run arbitrary code, "
                f"so it is refused unless you pass --trust-pickle for a file you trust."
            )
        tensors: dict[str, Tensor] = {}
        for f in pickles:
            tensors.update(torch.load(f, map_location="cpu", weights_only=False))
        return tensors
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f} is corrupt or truncated ({exc}).") from None
    return tensors


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model folder."""
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json.") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is not valid JSON.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object.")
    return data


def load_hf(folder: Path | str, *, trust_pickle: bool = False) -> DecoderLM:
    """A DecoderLM from an HF model folder (GPT-2, Llama or Mistral)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    try:
        cfg = config_from_hf(hf)
    except ConfigError as exc:
        raise ConfigError(f"{folder / 'config.json'}: {exc}") from None
    return model_from_hf(cfg, read_hf_tensors(folder, trust_pickle=trust_pickle), source=str(folder))


def save_hf(
    model: DecoderLM, folder: Path | str, *, max_shard_bytes: int | None = None,
    save_tokenizer: Callable[[Path], None] | None = None,
) -> Path:
    """Write an HF model folder (``config.json`` + safetensors, sharded with an index when larger than
    ``max_shard_bytes``) that ``transformers`` loads with ``from_pretrained``."""
    folder = Path(folder)
    tensors = state_to_hf(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2))
    meta = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
    else:
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for n, shard in enumerate(shards, start=1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if save_tokenizer is not None:
        save_tokenizer(folder)
    return folder
