"""Encoder families against Hugging Face transformers: tiny random HF models, weights copied into
triform, logits compared in float32; and triform's export loads back into transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from triform.interop.hf_encoders import (
    encoder_config_from_hf,
    encoder_from_hf,
    save_hf_encoder,
)

VOCAB = 99


def _hf_config(kind: str, **extra) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if kind == "bert":
        return transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **common, **extra,
        )
    if kind == "roberta":
        return transformers.RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, pad_token_id=1,
            type_vocab_size=1, vocab_size=VOCAB, max_position_embeddings=66,
        )
    if kind == "albert":
        return transformers.AlbertConfig(
            embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
            hidden_act="gelu_new", **common,
        )
    return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **common)


def _inputs(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    mask[2, 5:] = 0
    pad = 1 if kind == "roberta" else 0
    ids = ids.masked_fill(mask == 0, pad)
    out = {"input_ids": ids, "attention_mask": mask}
    if kind in ("bert", "albert"):
        out["token_type_ids"] = (torch.arange(17) >= 8).long().expand(3, 17) * mask
    return out


def _ours(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    return model(inputs["input_ids"], attention_mask=inputs["attention_mask"], token_type_ids=inputs.get("token_type_ids"))


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


@pytest.mark.parametrize(
    "kind, hf_class, head",
    [
        ("bert", "BertForPreTraining", "pretraining"),
        ("roberta", "RobertaForMaskedLM", "mlm"),
        ("albert", "AlbertForPreTraining", "pretraining"),
        ("distilbert", "DistilBertForMaskedLM", "mlm"),
    ],
)
def test_pretraining_heads_match_transformers(kind: str, hf_class: str, head: str) -> None:
    torch.manual_seed(0)
    hf = getattr(transformers, hf_class)(_hf_config(kind)).eval()
    cfg = encoder_config_from_hf(hf.config.to_dict())
    ours = encoder_from_hf(cfg, hf.state_dict(), head)
    inputs = _inputs(kind)
    with torch.no_grad():
        theirs = hf(**inputs)
        got = _ours(ours, inputs)
    want_mlm = theirs.prediction_logits if head == "pretraining" else theirs.logits
    mask = inputs["attention_mask"]
    torch.testing.assert_close(_real(got.mlm_logits, mask), _real(want_mlm, mask), atol=1e-5, rtol=1e-5)
    if head == "pretraining":
        pair = theirs.seq_relationship_logits if kind == "bert" else theirs.sop_logits
        torch.testing.assert_close(got.pair_logits, pair, atol=1e-5, rtol=1e-5)


def test_token_classification_and_qa_match_transformers() -> None:
    torch.manual_seed(1)
    inputs = _inputs("bert", seed=2)
    mask = inputs["attention_mask"]
    tagger_hf = transformers.BertForTokenClassification(_hf_config("bert", num_labels=5)).eval()
    tagger = encoder_from_hf(encoder_config_from_hf(tagger_hf.config.to_dict()), tagger_hf.state_dict(), "token", num_labels=5)
    qa_hf = transformers.BertForQuestionAnswering(_hf_config("bert")).eval()
    qa = encoder_from_hf(encoder_config_from_hf(qa_hf.config.to_dict()), qa_hf.state_dict(), "qa")
    with torch.no_grad():
        torch.testing.assert_close(_real(_ours(tagger, inputs), mask), _real(tagger_hf(**inputs).logits, mask), atol=1e-5, rtol=1e-5)
        start, end = _ours(qa, inputs)
        theirs = qa_hf(**inputs)
        torch.testing.assert_close(_real(start, mask), _real(theirs.start_logits, mask), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_real(end, mask), _real(theirs.end_logits, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind, hf_class, head", [("bert", "BertForPreTraining", "pretraining"), ("albert", "AlbertForPreTraining", "pretraining"),
                             ("roberta", "RobertaForMaskedLM", "mlm"), ("distilbert", "DistilBertForMaskedLM", "mlm")],
)
def test_export_loads_back_into_transformers(kind: str, hf_class: str, head: str, tmp_path: Path) -> None:
    torch.manual_seed(3)
    hf = getattr(transformers, hf_class)(_hf_config(kind)).eval()
    cfg = encoder_config_from_hf(hf.config.to_dict())
    ours = encoder_from_hf(cfg, hf.state_dict(), head)
    with torch.no_grad():  # move away from HF's initialisation so a silent re-init would show
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = save_hf_encoder(ours, cfg, tmp_path / kind, head)
    back = getattr(transformers, hf_class).from_pretrained(folder).eval()
    inputs = _inputs(kind, seed=4)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        theirs = back(**inputs)
        got = _ours(ours, inputs)
    want = theirs.prediction_logits if head == "pretraining" else theirs.logits
    torch.testing.assert_close(_real(got.mlm_logits, mask), _real(want, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "preset, published",
    [  # parameter counts of the corresponding HF base models (BertModel etc., pooler included where they have one)
        ("bert-base", 109_482_240), ("albert-base", 11_683_584), ("distilbert-base", 66_362_880),
        ("minilm-l6", 22_713_216), ("roberta-base", 124_645_632 - 768 * 768 - 768),  # RoBERTa: no pooler here
    ],
)
def test_encoder_presets_have_published_sizes(preset: str, published: int) -> None:
    from triform.config import get_encoder_preset
    from triform.models.encoder import Encoder

    with torch.device("meta"):
        n = sum(p.numel() for p in Encoder(get_encoder_preset(preset)).parameters())
    assert n == published
