"""`triform convert --to hf` of decoders, encoders and encoder-decoders, and GGUF -> HF: transformers
loads each folder with equal float32 logits, and AutoTokenizer encodes text to triform's ids. Also:
convert never deletes what a user keeps in the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import cli_error, synthetic_text

from triform.checkpoint import load_checkpoint, save_checkpoint
from triform.cli.main import main
from triform.output_dir import MARKER

TEXTS = [
    "The king will speak of love.",
    "  spaces\tand\nnewlines\n\n",
    "naïve café — “quotes” 🙂 日本語",
    "digits 2024 and 7; ß ẞ Ünïcödé",
]
TOL = dict(atol=1e-5, rtol=1e-5)
# A short CLI run per family: a few steps move the weights off their initialisation.
TRAIN = ["--max-steps", "3", "--batch-size", "4", "--context", "32"]


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every weight off its initialisation (zero biases, unit norms) so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _to_hf(src: Path, dst: Path, *extra: str) -> Path:
    assert main(["convert", str(src), str(dst), "--to", "hf", *extra]) == 0
    return dst


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("decoder")
    args = ["train", "--preset", "gpt2-tiny", "--data", str(corpus_file), "--out", str(out), *TRAIN, "--eval-interval", "100",
            "--eval-tokens", "256", "--final-eval-tokens", "256", "--sample-tokens", "0", "--progress", "false"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def encoder_runs(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> dict[str, Path]:
    """A BERT pretrained by the CLI (masked-LM head only) and an ALBERT checkpoint with both pretraining
    heads (masked-LM + sentence order), its weights perturbed instead of trained to save time."""
    from triform.config import get_encoder_preset
    from triform.models.encoder import EncoderForPreTraining
    from triform.tokenizers import ByteTokenizer

    runs = {"bert": tmp_path_factory.mktemp("bert"), "albert": tmp_path_factory.mktemp("albert")}
    assert main(["pretrain", "--preset", "bert-base-tiny", "--data", str(corpus_file), "--out", str(runs["bert"]), *TRAIN]) == 0
    albert = _perturb(EncoderForPreTraining(get_encoder_preset("albert-base-tiny")), seed=5)
    save_checkpoint(runs["albert"], albert, ByteTokenizer())
    return runs


def test_byte_decoder_exports_model_and_tokenizer(decoder_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours, tok, _ = load_checkpoint(decoder_run)
    assert tok.kind == "byte" and ours.cfg.family == "gpt2"
    folder = _to_hf(decoder_run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text  # a decoder's prompt: the bytes, nothing added
        assert hf_tok.decode(tok.encode(text)) == text
    x = torch.tensor([hf_tok(t)["input_ids"][:20] for t in TEXTS])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours(x), **TOL)
    assert (hf.config.eos_token_id, hf.config.pad_token_id) == (tok.eos_id, tok.pad_id)
    # triform reads the exported folder back with its own byte tokenizer, and generates from it
    capsys.readouterr()
    assert main(["generate", str(folder), "KING:", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("KING:")


def test_bpe_decoder_exports_its_tokenizer(tmp_path: Path) -> None:
    from triform.config import get_preset
    from triform.models.decoder import DecoderLM
    from triform.tokenizers import BPETokenizer

    tok = BPETokenizer.train([synthetic_text(300, seed=2).encode()], vocab_size=300)
    model = _perturb(DecoderLM(get_preset("shakespeare-tiny").replace(vocab_size=304)), seed=1).eval()
    save_checkpoint(tmp_path / "ours", model, tok)
    folder = _to_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
    x = torch.tensor([tok.encode(TEXTS[0] + TEXTS[2])])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), **TOL)


@pytest.mark.parametrize("name, hf_class", [("bert", "BertForMaskedLM"), ("albert", "AlbertForPreTraining")])
def test_byte_encoder_exports_model_and_tokenizer(
    encoder_runs: dict[str, Path], name: str, hf_class: str, tmp_path: Path,
) -> None:
    ours, tok, _ = load_checkpoint(encoder_runs[name], kind="encoder")
    folder = _to_hf(encoder_runs[name], tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["architectures"] == [hf_class]
    hf = getattr(transformers, hf_class).from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:  # an encoder reads <bos> text <eos>, as in pretraining and `triform fill`
        assert hf_tok(text)["input_ids"] == [tok.bos_id, *tok.encode(text), tok.eos_id], text
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    pair = hf_tok("KING:", "The king")  # pair layout of the sentence-pair objectives, segment ids 0 then 1
    assert pair["input_ids"] == [tok.bos_id, *b"KING:", tok.eos_id, *b"The king", tok.eos_id]
    assert pair["token_type_ids"] == [0] * 7 + [1] * 9
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"][1, -1] == tok.pad_id
    with torch.no_grad():
        theirs = hf(**batch)
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    want = theirs.logits if name == "bert" else theirs.prediction_logits
    torch.testing.assert_close(want[real], got.mlm_logits[real], **TOL)
    if name == "albert":
        torch.testing.assert_close(theirs.sop_logits, got.pair_logits, **TOL)


def test_wordpiece_tagger_exports_model_tokenizer_and_labels(tmp_path: Path) -> None:
    from conftest import minilm_folder

    from triform.config import get_encoder_preset
    from triform.models.encoder import EncoderForTokenClassification
    from triform.tokenizers.wordpiece import WordPieceTokenizer

    tok = WordPieceTokenizer(minilm_folder() / "tokenizer.json")  # all-MiniLM-L6-v2's uncased WordPiece vocabulary
    cfg = get_encoder_preset("bert-base-tiny").replace(vocab_size=tok.vocab_size)
    model = _perturb(EncoderForTokenClassification(cfg, 3), seed=2).eval()
    labels = ["NOUN", "O", "VERB"]
    save_checkpoint(tmp_path / "ours", model, tok, extra={"labels": labels})
    folder = _to_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.BertForTokenClassification.from_pretrained(folder).eval()
    assert hf.config.id2label == dict(enumerate(labels))
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text  # [CLS] ... [SEP], lower-cased, accents stripped
    assert hf_tok("Is it?", "Yes.")["input_ids"] == tok.encode("Is it?", "Yes.")
    batch = tok.batch(TEXTS, max_length=64)
    with torch.no_grad():
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids).logits
        got = model(batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(theirs[real], got[real], **TOL)


@pytest.mark.parametrize("preset", ["t5-tiny", "byt5-tiny"])
def test_seq2seq_exports_model_and_byte_tokenizer(preset: str, tmp_path: Path) -> None:
    """The export keeps triform's byte ids (byte b is id b, specials from 256) in a tokenizer.json
    AutoTokenizer loads, and appends </s> to inputs as T5 does; it is not HF's ByT5Tokenizer, whose
    fixed offset of 3 (pad, eos, unk first) would feed this model the wrong embedding rows."""
    from triform.config import get_seq2seq_preset
    from triform.models.encoder_decoder import Seq2Seq
    from triform.tokenizers.byte import denoising_tokenizer, encode_with_specials

    tok = denoising_tokenizer()
    cfg = get_seq2seq_preset(preset).replace(pad_id=tok.pad_id, eos_id=tok.eos_id, decoder_start_id=tok.pad_id)
    model = _perturb(Seq2Seq(cfg), seed=3).eval()
    save_checkpoint(tmp_path / "ours", model, tok)
    folder = _to_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert type(hf_tok).__name__ != "ByT5Tokenizer"
    for text in [*TEXTS, "KING:\nThe <extra_id_0> will <extra_id_1>."]:  # sentinels by name, as `triform generate` reads them
        data = text.encode()
        assert hf_tok(text)["input_ids"] == [*encode_with_specials(tok, data), tok.eos_id], text
    assert hf_tok.convert_tokens_to_ids(["<pad>", "<eos>", "<extra_id_0>", "[S2S]"]) == [
        tok.pad_id, tok.eos_id, tok.special_id("<extra_id_0>"), tok.special_id("[S2S]")]
    assert transformers.ByT5Tokenizer()("hi", add_special_tokens=False)["input_ids"] == [ord("h") + 3, ord("i") + 3]
    src = hf_tok(TEXTS[:3], padding=True, return_tensors="pt")
    tgt = torch.tensor([[tok.pad_id, *b"The king"]] * 3)
    with torch.no_grad():
        theirs = hf(input_ids=src["input_ids"], attention_mask=src["attention_mask"], decoder_input_ids=tgt).logits
        torch.testing.assert_close(theirs, model(src["input_ids"], tgt, source_mask=src["attention_mask"]), **TOL)


def test_gguf_to_hf(tmp_path: Path) -> None:
    """A tiny Llama written as llama.cpp writes GGUF files converts straight to an HF folder: the model
    and the tokenizer (specials, non-ASCII, chat template) come out as transformers reads them."""
    from test_gguf import HEADS, KV_HEADS, SPECIALS, write_gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from triform.interop import load_pretrained

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(synthetic_text(300, seed=5).splitlines(), trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        vocab_size=bpe.get_vocab_size(), max_position_embeddings=64, tie_word_embeddings=False)).eval()
    _perturb(llama, seed=4)
    gguf = write_gguf(tmp_path / "tiny.gguf", llama, bpe)
    folder = _to_hf(gguf, tmp_path / "hf")
    ours, tok, _ = load_pretrained(gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in [*TEXTS, "<|im_start|>user\nthe lady<|im_end|>\n"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
    messages = [{"role": "user", "content": "Speak, lady — ¿qué?"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(messages)
    x = torch.tensor([tok.encode(TEXTS[0] + TEXTS[2])])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours(x), **TOL)
        torch.testing.assert_close(hf(input_ids=x).logits, llama(input_ids=x).logits, **TOL)  # F32 file: the original model


def test_convert_never_deletes_a_users_files(decoder_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    notes = dst / "notes.txt"
    notes.write_bytes(b"my notes \xe2\x80\x94 keep\n")
    for to in ("hf", "triform"):
        err = cli_error(capsys, ["convert", str(decoder_run), str(dst), "--to", to])
        assert str(dst) in err and "--overwrite" in err
        assert [p.name for p in dst.iterdir()] == ["notes.txt"] and notes.read_bytes() == b"my notes \xe2\x80\x94 keep\n"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in cli_error(capsys, ["convert", str(decoder_run), str(afile)])
    assert afile.read_text() == "x"
    assert "overlaps the source" in cli_error(capsys, ["convert", str(decoder_run), str(decoder_run / "checkpoint" / "x")])
    # --overwrite: the folder is the command's to replace
    assert main(["convert", str(decoder_run), str(dst), "--overwrite"]) == 0
    assert not notes.exists() and (dst / "config.json").is_file() and (dst / MARKER).is_file()
    # re-converting into the same folder needs no flag and leaves no stale files (the shards of a sharded export)
    assert main(["convert", str(decoder_run), str(dst), "--max-shard-size", "100KB"]) == 0
    assert (dst / "model.safetensors.index.json").is_file()
    assert main(["convert", str(decoder_run), str(dst)]) == 0
    files = [MARKER, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in dst.iterdir()) == files
    assert not list(tmp_path.glob(".dst.*"))  # no staging folder left behind
    transformers.AutoModelForCausalLM.from_pretrained(dst)
    # HF -> triform into a folder convert wrote before markers existed (a triform checkpoint layout)
    legacy = tmp_path / "legacy"
    assert main(["convert", str(dst), str(legacy)]) == 0
    (legacy / MARKER).unlink()
    assert main(["convert", str(dst), str(legacy)]) == 0
    model, _, meta = load_checkpoint(legacy)
    assert meta["converted_from"] == str(dst)
    capsys.readouterr()
