"""Training: schedule, optimizer groups, learning, bit-exact resume, checkpoints and their failures."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from triform.config import get_preset
from triform.errors import CheckpointError, ConfigError
from triform.models.decoder import DecoderLM
from triform.tokenizers import ByteTokenizer
from triform import checkpoint as ckpt
from triform.checkpoint import load_checkpoint, save_checkpoint
from triform.training.optim import build_optimizer, lr_at
from triform.training.args import parse_duration
from triform.training.trainer import TrainConfig, train


def test_lr_schedule_shape() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_norms_biases_embeddings() -> None:
    model = DecoderLM(get_preset("gpt2-tiny"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert opt.param_groups[1]["weight_decay"] == 0.0
    decayed = sorted(names[i] for i in decay)
    assert decayed and all(n.endswith("weight") and ("qkv" in n or ".o." in n or "ffn" in n) for n in decayed)
    assert id(model.tok_emb.weight) not in decay and id(model.abs_pos.weight) not in decay
    n_total = sum(len(g["params"]) for g in opt.param_groups)
    assert n_total == len(list(model.parameters()))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("1.5h", 5400), ("42", 42)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_train_config_values() -> None:
    with pytest.raises(ConfigError, match="time_budget"):
        TrainConfig(time_budget="five minutes")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1.0)


def _unigram_entropy_nats(path: Path) -> float:
    counts = Counter(path.read_bytes())
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_tiny_preset_learns_far_below_unigram_entropy(trained_run: Path, corpus_file: Path) -> None:
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if m["kind"] == "final_eval"][-1]
    unigram = _unigram_entropy_nats(corpus_file)
    assert metrics[0]["loss"] > unigram  # the untrained model starts above it ...
    assert final["loss"] < 0.6 * unigram  # ... and ends far below it after 150 steps
    assert final["bpb"] == pytest.approx(final["loss"] / math.log(2), rel=1e-9)  # byte tokens: 1 byte each
    assert (trained_run / "loss.png").stat().st_size > 10_000


def test_checkpoint_round_trip_identical_logits(trained_run: Path) -> None:
    model, tok, meta = load_checkpoint(trained_run)
    x = torch.tensor([tok.encode("KING:\nThe king will")])
    with torch.no_grad():
        a = model(x)
    again, _, _ = load_checkpoint(trained_run / "checkpoint")
    with torch.no_grad():
        assert torch.equal(again(x), a)
    assert meta["train"]["preset"] == "shakespeare-tiny"


def _small_cfg(corpus: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), max_steps=8, batch_size=4, context=32, warmup_steps=2, eval_interval=4,
                eval_tokens=512, final_eval_tokens=512, checkpoint_interval=100, progress=False, seed=11)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path: Path, corpus_file: Path, dropout: float) -> None:
    cfg = _small_cfg(corpus_file)
    over = {"dropout": dropout}
    full = train(cfg, preset="gpt2-tiny", model_overrides=over, out_dir=tmp_path / "a", log=lambda _: None)
    train(cfg, preset="gpt2-tiny", model_overrides=over, out_dir=tmp_path / "b", stop_after=3, log=lambda _: None)
    # A bare resume (default config, default preset) continues with the run's saved settings.
    resumed = train(TrainConfig(progress=False), out_dir=tmp_path / "b", resume=True, log=lambda _: None)
    assert len(full.train_losses) == 8
    assert resumed.train_losses == full.train_losses  # exact float equality, step by step
    a, _, _ = load_checkpoint(tmp_path / "a")
    b, _, _ = load_checkpoint(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_needs_a_checkpoint(tmp_path: Path, corpus_file: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        train(_small_cfg(corpus_file), preset="gpt2-tiny", out_dir=tmp_path / "none", resume=True, log=lambda _: None)


def test_time_budget_fits_steps(tmp_path: Path, corpus_file: Path) -> None:
    cfg = _small_cfg(corpus_file, max_steps=100000, time_budget="3s", eval_interval=1000)
    result = train(cfg, preset="gpt2-tiny", out_dir=tmp_path / "t", log=lambda _: None)
    assert 10 < result.steps < 100000  # fitted to the budget, not the step bound
    state = torch.load(tmp_path / "t" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["total_steps"] == result.steps


def test_bpe_run_reports_bits_per_byte(tmp_path: Path, corpus_file: Path) -> None:
    cfg = _small_cfg(corpus_file, tokenizer="bpe", bpe_vocab_size=300, max_steps=4)
    result = train(cfg, preset="gpt2-tiny", out_dir=tmp_path / "bpe", log=lambda _: None)
    final = result.evals[-1]
    # BPE tokens cover several bytes each, so bits/byte is well below bits/token.
    assert final["bpb"] < 0.8 * final["loss"] / math.log(2)
    model, tok, _ = load_checkpoint(tmp_path / "bpe")
    assert tok.kind == "bpe" and model.cfg.vocab_size >= tok.vocab_size


def _saved(tmp_path: Path) -> tuple[Path, DecoderLM]:
    torch.manual_seed(0)
    model = DecoderLM(get_preset("llama3-8b-tiny"))
    return save_checkpoint(tmp_path / "ck", model, ByteTokenizer()), model


def test_corrupt_and_truncated_checkpoints(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_weights_must_match_config(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["stack"]["n_layers"] = 3
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(path)


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, model = _saved(tmp_path)
    before = (path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model, ByteTokenizer())
    assert (path / "model.safetensors").read_bytes() == before
    load_checkpoint(path)


def test_interrupted_swap_falls_back_to_previous(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    shutil.move(path, path.with_name(".ck.old"))  # crash between the two renames
    loaded, _, _ = load_checkpoint(path)
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
