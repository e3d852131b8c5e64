"""Parity with Hugging Face transformers: tiny random HF models loaded into triform give the same
logits (with and without the KV cache), and triform's export loads back into transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from triform.errors import CheckpointError, ConfigError
from triform.interop.hf import config_from_hf, load_hf, model_from_hf, save_hf

VOCAB = 320


def _hf_model(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=96, vocab_size=VOCAB,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                                       num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB,
                                       rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB,
                                         sliding_window=12, rms_norm_eps=1e-6, **extra)
        model = transformers.MistralForCausalLM(cfg)
    # Random non-trivial norms so a mis-mapped norm weight cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def _ours(hf_model) -> torch.nn.Module:
    cfg = config_from_hf(hf_model.config.to_dict())
    return model_from_hf(cfg, hf_model.state_dict())


KINDS = ["gpt2", "llama", "mistral"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(kind: str) -> None:
    hf = _hf_model(kind)
    ours = _ours(hf)
    x = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        cache = ours.new_cache(3, 40)
        steps = [ours(x[:, :17], cache=cache)] + [ours(x[:, i : i + 1], cache=cache) for i in range(17, 40)]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_mistral_window_is_shorter_than_the_sequence() -> None:
    hf = _hf_model("mistral")
    assert hf.config.sliding_window == 12 and _ours(hf).cfg.stack.sliding_window == 12


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_back_into_transformers(kind: str, tmp_path: Path) -> None:
    hf = _hf_model(kind)
    ours = _ours(hf)
    save_hf(ours, tmp_path / "export", max_shard_bytes=60_000 if kind == "llama" else None)
    if kind == "llama":
        assert (tmp_path / "export" / "model.safetensors.index.json").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    reloaded = load_hf(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), ours(x), atol=0, rtol=0)


def test_pickle_weights_are_refused_without_trust(tmp_path: Path) -> None:
    hf = _hf_model("gpt2")
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="arbitrary code.*--trust-pickle"):
        load_hf(tmp_path)
    model = load_hf(tmp_path, trust_pickle=True)
    x = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_bad_folders(tmp_path: Path) -> None:
    hf = _hf_model("llama")
    good = save_hf(_ours(hf), tmp_path / "good", max_shard_bytes=60_000)
    cfg = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**cfg, "model_type": "bloom"}))
    with pytest.raises(ConfigError, match="config.json.*'bloom' is not supported"):
        load_hf(good)
    (good / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match="shape"):
        load_hf(good)
    (good / "config.json").write_text(json.dumps(cfg))
    shard = sorted(good.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name}.*missing"):
        load_hf(good)
