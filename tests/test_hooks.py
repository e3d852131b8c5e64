"""Hook points: activations equal TransformerLens's for a GPT-2-shaped model, attention patterns
equal transformers' ``output_attentions`` for BERT and T5, edits through run_with_hooks do what
they say, and a run with hooks installed computes what the model computes without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from triform.config import get_encoder_preset, get_preset, get_seq2seq_preset
from triform.errors import ConfigError
from triform.inspect.hooks import (
    estimate_cache_bytes,
    hook_names,
    patch_from,
    run_with_cache,
    run_with_hooks,
    zero_ablate_head,
)
from triform.interop.hf import config_from_hf, model_from_hf
from triform.interop.hf_encoders import encoder_config_from_hf, encoder_from_hf
from triform.interop.hf_t5 import t5_config_from_hf, t5_from_hf
from triform.models.decoder import DecoderLM
from triform.models.encoder import EncoderForPreTraining
from triform.models.encoder_decoder import Seq2Seq


def _gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _tokens(seed: int = 1, shape: tuple[int, int] = (2, 11), high: int = 300) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _triform_gpt2(hf: transformers.GPT2LMHeadModel) -> DecoderLM:
    return model_from_hf(config_from_hf(hf.config.to_dict()), hf.state_dict()).eval()


@pytest.fixture(scope="module")
def lens_cache(tmp_path_factory: pytest.TempPathFactory):
    """TransformerLens's cache of the same GPT-2 (its TransformerBridge over the HF model, offline)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformer_lens.model_bridge import TransformerBridge

    hf = _gpt2()
    ours = _triform_gpt2(hf)  # before the bridge wraps the HF modules in place
    folder = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["to be or not to be"] * 4, vocab_size=300, min_frequency=1)
    bpe.save_model(str(folder))
    transformers.GPT2TokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")).save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, device="cpu")
    logits, cache = bridge.run_with_cache(_tokens())
    return ours, logits.detach(), {k: v.detach() for k, v in cache.items()}


SHARED = ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"] + [
    f"blocks.{i}.{n}" for i in range(2) for n in (
        "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
        "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
        "hook_mlp_out", "hook_resid_post")]


def test_activations_equal_transformer_lens_hook_by_hook(lens_cache) -> None:
    ours, lens_logits, lens = lens_cache
    logits, cache = run_with_cache(ours, _tokens())
    torch.testing.assert_close(logits, lens_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["hook_unembed"], lens["hook_unembed"], atol=1e-5, rtol=0)
    for name in SHARED:
        assert name in lens, name
        torch.testing.assert_close(cache[name], lens[name], atol=1e-5, rtol=0, msg=name)
    for i in range(2):  # scores agree wherever attention is allowed (both mask the future)
        a, b = cache[f"blocks.{i}.attn.hook_attn_scores"], lens[f"blocks.{i}.attn.hook_attn_scores"]
        allowed = torch.ones(a.shape[-2:], dtype=torch.bool).tril()
        torch.testing.assert_close(a[..., allowed], b[..., allowed], atol=1e-5, rtol=0)
        assert torch.isinf(a[..., ~allowed]).all()


def test_hooks_leave_the_computation_unchanged() -> None:
    hf = _gpt2()
    ours = _triform_gpt2(hf)
    x = _tokens()
    with torch.no_grad():
        plain = ours(x)
    out, cache = run_with_cache(ours, x, names=["blocks.1.hook_resid_post"])
    assert list(cache) == ["blocks.1.hook_resid_post"]  # only what was asked for is stored
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.equal(ours(x), plain)  # hooks removed afterwards
    assert ours.blocks[0]._hook_scope is None


def test_memory_estimate_and_limit() -> None:
    ours = _triform_gpt2(_gpt2())
    x = _tokens()
    pattern_bytes = estimate_cache_bytes(ours, x, names="blocks.*.attn.hook_pattern")
    assert pattern_bytes == 2 * (2 * 4 * 11 * 11) * 4  # 2 layers of (B, H, T, T) float32
    everything = estimate_cache_bytes(ours, x)
    _, cache = run_with_cache(ours, x)
    assert cache.nbytes == everything
    with pytest.raises(ConfigError, match="ask for fewer names"):
        run_with_cache(ours, x, max_bytes=everything - 1)


def test_zero_ablating_a_head_equals_removing_its_slice_of_w_o() -> None:
    torch.manual_seed(3)
    model = DecoderLM(get_preset("llama3-8b-tiny")).eval()  # RoPE, GQA, SwiGLU
    x = _tokens(high=200)
    layer, head = 1, 2
    with torch.no_grad():
        intact = model(x)
    ablated = run_with_hooks(model, x, hooks=[(f"blocks.{layer}.attn.hook_z", zero_ablate_head(head))])
    assert (ablated - intact).abs().max() > 1e-3  # the head mattered
    dh = model.cfg.stack.head_dim
    with torch.no_grad():
        model.blocks[layer].attn.o.weight[:, head * dh : (head + 1) * dh] = 0
        removed = model(x)
    torch.testing.assert_close(ablated, removed, atol=1e-5, rtol=0)


def test_patching_every_position_of_the_residual_stream_restores_the_clean_run() -> None:
    ours = _triform_gpt2(_gpt2())
    clean, corrupt = _tokens(1), _tokens(2)
    clean_logits, cache = run_with_cache(ours, clean, names="blocks.*.hook_resid_pre")
    patched = run_with_hooks(ours, corrupt, hooks=[("blocks.1.hook_resid_pre", patch_from(cache))])
    # blocks.1's input carries everything; positional embeddings come from positions, not tokens
    torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=0)
    partial = run_with_hooks(ours, corrupt, hooks=[("blocks.1.hook_resid_pre", patch_from(cache, positions=[3]))])
    assert not torch.allclose(partial, clean_logits, atol=1e-3)
    with pytest.raises(ConfigError, match="no hook point matches"):
        run_with_hooks(ours, corrupt, hooks=[("blocks.9.hook_resid_pre", patch_from(cache))])


def test_bert_patterns_equal_transformers_output_attentions() -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    cfg._attn_implementation = "eager"  # the implementation that returns attention probabilities
    hf = transformers.BertForPreTraining(cfg).eval()
    ours = encoder_from_hf(encoder_config_from_hf(cfg.to_dict()), hf.state_dict(), head="pretraining").eval()
    ids = _tokens(4, (2, 13), high=99)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    _, cache = run_with_cache(ours, ids, attention_mask=mask, names="blocks.*.attn.hook_pattern")
    assert len(want) == 2
    for i, w in enumerate(want):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], w, atol=1e-5, rtol=0)


def test_t5_patterns_equal_transformers_output_attentions() -> None:
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"  # the implementation that returns attention probabilities
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    ours = t5_from_hf(t5_config_from_hf(cfg.to_dict()), hf.state_dict()).eval()
    src, tgt = _tokens(5, (2, 12), high=120), _tokens(6, (2, 7), high=120)
    with torch.no_grad():
        out = hf(input_ids=src, decoder_input_ids=tgt, output_attentions=True)
    _, cache = run_with_cache(ours, src, tgt, names="*hook_pattern")
    assert len(out.encoder_attentions) == len(out.cross_attentions) == 2
    for i in range(2):
        torch.testing.assert_close(cache[f"encoder.blocks.{i}.attn.hook_pattern"], out.encoder_attentions[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"decoder.blocks.{i}.attn.hook_pattern"], out.decoder_attentions[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"decoder.blocks.{i}.cross_attn.hook_pattern"], out.cross_attentions[i], atol=1e-5, rtol=0)


def test_albert_reports_each_application_of_its_shared_block() -> None:
    torch.manual_seed(0)
    model = EncoderForPreTraining(get_encoder_preset("albert-base-tiny")).eval()
    names = hook_names(model, _tokens(high=200))
    layers = model.cfg.stack.n_layers
    assert len(model.encoder.blocks) == 1 and layers > 1
    assert all(f"blocks.{i}.hook_resid_post" in names for i in range(layers))
    _, cache = run_with_cache(model, _tokens(high=200), names="blocks.*.hook_resid_*")
    for i in range(layers - 1):  # one application's output is the next one's input
        assert torch.equal(cache[f"blocks.{i}.hook_resid_post"], cache[f"blocks.{i + 1}.hook_resid_pre"])


def test_every_family_has_the_documented_points() -> None:
    torch.manual_seed(0)
    dec = hook_names(DecoderLM(get_preset("llama3-8b-tiny")).eval(), _tokens(high=200))
    for n in ("hook_embed", "blocks.0.attn.hook_rot_q", "blocks.0.mlp.hook_pre_linear", "ln_final.hook_normalized", "hook_unembed"):
        assert n in dec, n
    s2s = hook_names(Seq2Seq(get_seq2seq_preset("t5-tiny")).eval(), _tokens(high=200), _tokens(2, high=200))
    for n in ("encoder.hook_embed", "encoder.blocks.0.hook_resid_post", "decoder.blocks.0.cross_attn.hook_z",
              "decoder.blocks.0.hook_cross_attn_out", "decoder.blocks.0.hook_resid_cross", "decoder.hook_unembed"):
        assert n in s2s, n


def test_hooks_refuse_the_paged_engine() -> None:
    from triform.inference.engine import Engine

    engine = Engine.__new__(Engine)
    with pytest.raises(ConfigError, match="paged engine"):
        run_with_cache(engine, _tokens())


def test_logit_lens_last_layer_is_the_logits() -> None:
    from triform.inspect.lens import logit_lens

    ours = _triform_gpt2(_gpt2())
    x = _tokens(7, (1, 15))
    lens = logit_lens(ours, x)
    with torch.no_grad():
        logits = ours(x)[0]
    assert lens.logits.shape == (3, 15, 300)  # embeddings + 2 blocks
    torch.testing.assert_close(lens.logits[-1], logits, atol=1e-5, rtol=0)
    want = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:])
    assert float(lens.loss[-1]) == pytest.approx(float(want), abs=1e-5)


def test_head_scores_read_planted_templates() -> None:
    """Patterns built by hand: each head attends only to its template's position."""
    from triform.inspect.heads import HeadReport, head_scores

    n, T = 6, 12
    pattern = torch.zeros(1, 1, 4, T, T)
    for t in range(T):
        pattern[0, 0, 0, t, max(t - 1, 0)] = 1  # previous token
        pattern[0, 0, 1, t, t - n if t >= n else t] = 1  # duplicate (itself in the first copy)
        pattern[0, 0, 2, t, t - n + 1 if t >= n else t] = 1  # induction
        pattern[0, 0, 3, t, 0] = 1  # first token
    report = HeadReport(head_scores(pattern, n), 0.4)
    assert report.heads("previous-token") == [(0, 0)]
    assert report.heads("duplicate-token") == [(0, 1)]
    assert report.heads("induction") == [(0, 2)]
    assert report.heads("first-token") == [(0, 3)]


def test_patching_sweep_finds_the_one_position_that_differs() -> None:
    from triform.inspect.patching import patch_sweep

    ours = _triform_gpt2(_gpt2())
    clean = _tokens(8, (1, 10))
    corrupted = clean.clone()
    corrupted[0, 4] = (clean[0, 4] + 7) % 300
    with torch.no_grad():
        a, b = ours(clean)[0, -1], ours(corrupted)[0, -1]
    answer, wrong = int(a.argmax()), int((a - b).argmin())
    r = patch_sweep(ours, clean, corrupted, answer, wrong)
    assert r.by_position.shape == (2, 10) and r.by_head.shape == (2, 4)
    assert float(r.by_position[0, 4]) == pytest.approx(1.0, abs=1e-4)  # the block-0 input there is all that differs
    others = torch.cat([r.by_position[0, :4], r.by_position[0, 5:]])
    assert others.abs().max() < 1e-4
    assert r.by_position[:, :4].abs().max() < 1e-4  # before the change, causal streams are identical
    assert torch.isfinite(r.by_head).all() and r.by_head.abs().max() > 1e-3
