"""Configs: validation with clear errors, JSON round-trip, presets and their parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

from triform.config import PRESETS, DecoderConfig, StackConfig, count_parameters, get_preset
from triform.errors import ConfigError
from triform.models.decoder import DecoderLM


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'.*gpt2"):
        get_preset("gpt3")


def test_preset_lookup_is_exact() -> None:
    with pytest.raises(ConfigError):
        get_preset("GPT2")
    assert get_preset("gpt2").stack.d_model == 768


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d_model": 100, "n_layers": 2, "n_heads": 3}, "n_heads"),
        ({"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"d_model": 64, "n_layers": 0, "n_heads": 4}, "n_layers"),
        ({"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn": "mish"}, "ffn"),
        ({"d_model": 64, "n_layers": 2, "n_heads": 4, "dropout": 1.5}, "dropout"),
        ({"d_model": 64, "n_layers": 2, "n_heads": 4, "sliding_window": 0}, "sliding_window"),
        ({"d_model": 60, "n_layers": 2, "n_heads": 4, "position": "rope"}, "head_dim"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        StackConfig(**kwargs)


def test_derived_fields() -> None:
    s = StackConfig(d_model=4096, n_layers=1, n_heads=32, ffn="swiglu")
    assert (s.head_dim, s.n_kv_heads, s.d_ff) == (128, 32, 11008)  # Llama-2 7B's FFN width
    assert StackConfig(d_model=64, n_layers=1, n_heads=4).d_ff == 256


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name: str) -> None:
    cfg = PRESETS[name]
    again = DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_rejects_unknown_field() -> None:
    data = get_preset("gpt2-tiny").to_dict()
    data["stack"]["n_experts"] = 8
    with pytest.raises(ConfigError, match="unknown or missing field"):
        DecoderConfig.from_dict(data)


def test_replace_rederives_dependent_fields() -> None:
    cfg = get_preset("gpt2").replace(d_model=128, n_heads=4)
    assert cfg.stack.head_dim == 32 and cfg.stack.d_ff == 512


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_matches_model(name: str) -> None:
    with torch.device("meta"):  # shapes only: even the 8B presets cost no memory
        model = DecoderLM(PRESETS[name])
    assert model.num_parameters() == count_parameters(PRESETS[name])


def test_known_parameter_counts() -> None:
    # Published sizes: GPT-2 small 124M (tied), SmolLM2-135M.
    assert round(count_parameters(get_preset("gpt2")) / 1e6) == 124
    assert round(count_parameters(get_preset("smollm2-135m")) / 1e6) == 135
    assert round(count_parameters(get_preset("llama2-7b")) / 1e9, 2) == 6.74


def test_family_shapes() -> None:
    gpt2, llama, mistral = get_preset("gpt2"), get_preset("llama3-8b"), get_preset("mistral-7b")
    assert (gpt2.stack.position, gpt2.stack.norm, gpt2.stack.ffn, gpt2.tie_embeddings) == ("learned", "layernorm", "gelu_tanh", True)
    assert (llama.stack.position, llama.stack.norm, llama.stack.ffn, llama.tie_embeddings) == ("rope", "rmsnorm", "swiglu", False)
    assert llama.stack.n_kv_heads == 8 and mistral.stack.sliding_window == 4096
