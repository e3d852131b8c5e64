"""The one training loop, for every objective: k micro-batches give one k-times-larger batch's
gradients, a stopped run resumes bit-exactly, bf16 autocast tracks float32, budgets are used."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import synthetic_text

from triform.checkpoint import load_checkpoint
from triform.config import get_encoder_preset, get_preset, get_seq2seq_preset
from triform.data.batching import tokenize_documents
from triform.data.corpus import Document
from triform.errors import ConfigError
from triform.models.decoder import DecoderLM
from triform.models.encoder import (
    EncoderForPreTraining,
    EncoderForQuestionAnswering,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
    student_from_teacher,
)
from triform.models.encoder_decoder import Seq2Seq
from triform.objectives.base import BatchRng, split_batch
from triform.objectives.causal_lm import CausalLM
from triform.objectives.denoise import ByteWindows, Denoising, task_for
from triform.objectives.finetune import Classification, SpanExtraction, Tagging
from triform.objectives.masked_lm import ByteEncoderInputs, Distillation, MaskedLM
from triform.tokenizers.byte import ByteTokenizer, denoising_tokenizer
from triform.training.args import TrainArgs
from triform.training.loop import SKIP_STEPS, _Budget, accumulate_gradients, fit

BYTES = ByteTokenizer()
DENOISE = denoising_tokenizer()
TEXT = synthetic_text(400, seed=7).encode()
DOCS = [TEXT[: len(TEXT) // 2], TEXT[len(TEXT) // 2 :]]
VOCAB = -(-BYTES.vocab_size // 8) * 8


def _encoder_cfg(**kw):
    return get_encoder_preset("bert-base-tiny").replace(vocab_size=VOCAB, pad_id=BYTES.pad_id, dropout=0.0, **kw)


def _seq2seq() -> Seq2Seq:
    cfg = get_seq2seq_preset("t5-tiny").replace(vocab_size=-(-DENOISE.vocab_size // 8) * 8, pad_id=DENOISE.pad_id,
                                                eos_id=DENOISE.eos_id, decoder_start_id=DENOISE.pad_id)
    return Seq2Seq(cfg)


def _teacher() -> EncoderForPreTraining:
    torch.manual_seed(5)
    return EncoderForPreTraining(_encoder_cfg(), pair_head=False).eval()


def _classification(n: int) -> Classification:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (n, 20), generator=g)
    lengths = torch.randint(5, 21, (n,), generator=g)
    mask = (torch.arange(20)[None] < lengths[:, None]).long()
    return Classification(ids * mask, mask, torch.zeros_like(ids), torch.randint(0, 3, (n,), generator=g), batch_size=n)


def _tagging(n: int) -> Tagging:
    rng = random.Random(4)
    rows = []
    for _ in range(24):
        length = rng.randrange(6, 18)
        rows.append(([rng.randrange(256) for _ in range(length)], [rng.choice([-100, 0, 1, 2]) for _ in range(length)]))
    return Tagging(rows, pad_id=BYTES.pad_id, batch_size=n)


def _qa(n: int) -> SpanExtraction:
    rng = random.Random(5)
    rows = []
    for _ in range(24):
        length = rng.randrange(8, 20)
        start = rng.randrange(1, length - 2)
        rows.append(([rng.randrange(256) for _ in range(length)], start, rng.randrange(start, length - 1)))
    return SpanExtraction(rows, pad_id=BYTES.pad_id, batch_size=n)


def _byte_inputs(context: int) -> tuple[ByteEncoderInputs, ByteEncoderInputs]:
    return ByteEncoderInputs(DOCS, context, BYTES), ByteEncoderInputs(DOCS[::-1], context, BYTES)


def _denoising(objective: str, family: str, n: int) -> Denoising:
    task = task_for(DENOISE, objective, noise_density=0.15, mean_span=3.0)
    length = 33 if objective == "causal" else 32
    return Denoising(task, ByteWindows(DOCS, length), ByteWindows(DOCS, length), family=family, pad_id=DENOISE.pad_id,
                     batch_size=n, eval_batches=2)


def _causal(n: int) -> CausalLM:
    ids = tokenize_documents(BYTES, [Document("a", DOCS[0]), Document("b", DOCS[1])])
    token_bytes = torch.tensor([len(b) for b in BYTES.token_bytes()] + [0] * (VOCAB - BYTES.vocab_size))
    return CausalLM(ids, ids, context=24, batch_size=n, token_bytes=token_bytes, eval_tokens=96, final_eval_tokens=192)


# name -> (model factory, objective factory given a micro-batch size, tokenizer)
CASES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], object], object]] = {
    "causal": (lambda: DecoderLM(get_preset("gpt2-tiny").replace(vocab_size=VOCAB, dropout=0.0)), _causal, BYTES),
    "mlm": (lambda: EncoderForPreTraining(_encoder_cfg(), pair_head=False),
            lambda n: MaskedLM(*_byte_inputs(32), batch_size=n, seed=1, eval_batches=2), BYTES),
    "mlm-static": (lambda: EncoderForPreTraining(_encoder_cfg(), pair_head=False),
                   lambda n: MaskedLM(*_byte_inputs(32), batch_size=n, static_masks=True, seed=1, eval_batches=2), BYTES),
    "mlm+nsp": (lambda: EncoderForPreTraining(_encoder_cfg(), pair_head=True),
                lambda n: MaskedLM(*_byte_inputs(48), objective="mlm+nsp", batch_size=n, seed=1, eval_batches=2), BYTES),
    "mlm+sop": (lambda: EncoderForPreTraining(_encoder_cfg(pooler=True), pair_head=True),
                lambda n: MaskedLM(*_byte_inputs(48), objective="mlm+sop", batch_size=n, seed=1, eval_batches=2), BYTES),
    "distill": (lambda: student_from_teacher(_teacher()),
                lambda n: Distillation(*_byte_inputs(32), teacher=_teacher(), batch_size=n, seed=1, eval_batches=2), BYTES),
    "span-seq2seq": (_seq2seq, lambda n: _denoising("span", "seq2seq", n), DENOISE),
    "ul2-seq2seq": (_seq2seq, lambda n: _denoising("ul2", "seq2seq", n), DENOISE),
    "prefix-lm-decoder": (lambda: DecoderLM(get_preset("gpt2-tiny").replace(vocab_size=520, dropout=0.0, max_seq_len=160)),
                          lambda n: _denoising("prefix-lm", "decoder", n), DENOISE),
    "ul2-decoder": (lambda: DecoderLM(get_preset("gpt2-tiny").replace(vocab_size=520, dropout=0.0, max_seq_len=160)),
                    lambda n: _denoising("ul2", "decoder", n), DENOISE),
    "causal-denoise": (lambda: DecoderLM(get_preset("gpt2-tiny").replace(vocab_size=520, dropout=0.0)),
                       lambda n: _denoising("causal", "decoder", n), DENOISE),
    "classify": (lambda: EncoderForSequenceClassification(_encoder_cfg(), 3), _classification, BYTES),
    "tag": (lambda: EncoderForTokenClassification(_encoder_cfg(), 3), _tagging, BYTES),
    "qa": (lambda: EncoderForQuestionAnswering(_encoder_cfg()), _qa, BYTES),
}


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("k", [2, 4])
def test_micro_batches_equal_one_large_batch(name: str, k: int) -> None:
    """k micro-batches of an 8-row batch give that batch's gradients: every loss part is divided by
    its count over the whole step. float32; tolerance rtol 1e-4 / atol 1e-6, the rounding of
    summing per-micro-batch gradients in another order (padding widths are kept, so no shape changes)."""
    make_model, make_objective, _ = CASES[name]
    torch.manual_seed(0)
    model = make_model().train()
    objective = make_objective(8)
    batch = objective.batch(BatchRng(11))
    accumulate_gradients(model, objective, [batch])
    whole = _grads(model)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, objective, split_batch(objective, batch, k))
    for a, b in zip(whole, _grads(model)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in whole)


def _args(**kw) -> TrainArgs:
    base = dict(batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, max_steps=6, eval_interval=3, checkpoint_interval=100,
                seed=5, device="cpu", precision="float32", progress=False)
    return TrainArgs(**{**base, **kw})


@pytest.mark.parametrize("name", list(CASES))
def test_every_objective_resumes_bit_exactly(name: str, tmp_path: Path) -> None:
    make_model, make_objective, tok = CASES[name]
    args = _args()
    torch.manual_seed(0)
    full = fit(make_model(), make_objective(2), args, out_dir=tmp_path / "a", tokenizer=tok, log=lambda _: None)
    torch.manual_seed(0)
    fit(make_model(), make_objective(2), args, out_dir=tmp_path / "b", tokenizer=tok, stop_after=3, log=lambda _: None)
    model, _, _ = load_checkpoint(tmp_path / "b", kind=None)
    resumed = fit(model, make_objective(2), args, out_dir=tmp_path / "b", tokenizer=tok, resume=True, log=lambda _: None)
    assert len(full.train_losses) == 6
    assert resumed.train_losses == full.train_losses  # exact float equality, step by step
    a, _, _ = load_checkpoint(tmp_path / "a", kind=None)
    b, _, _ = load_checkpoint(tmp_path / "b", kind=None)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    if full.final:
        assert resumed.final == full.final


def test_bf16_autocast_tracks_float32(tmp_path: Path) -> None:
    """50 steps of a tiny decoder under CPU bf16 autocast stay within 0.05 nats of float32 at every
    step and end within 2%: bf16 keeps 8 significant bits in the matmuls only, while weights,
    optimizer state, norms and the loss stay float32."""
    make_model, make_objective, tok = CASES["causal"]
    curves = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        args = _args(max_steps=50, lr=3e-3, warmup_steps=5, eval_interval=1000, precision=precision, grad_accum=1)
        r = fit(make_model(), make_objective(4), args, tokenizer=tok, log=lambda _: None)
        assert r.precision == precision
        curves[precision] = r.train_losses
    a, b = curves["float32"], curves["bfloat16"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05
    assert abs(sum(a[-5:]) - sum(b[-5:])) / sum(a[-5:]) < 0.02
    assert sum(a[-5:]) < 0.8 * sum(a[:5])  # and both really trained


def test_budget_refits_the_step_count_as_the_pace_changes() -> None:
    """The step count is fitted after the start-up steps and refitted each tenth of the budget, with
    evaluation time (per step, from its interval) and the final evaluation's reserve counted."""
    b = _Budget(100.0, None, eval_interval=50)
    b.record_eval(2.0, batches=4, final_batches=8)  # 0.5 s a batch: reserve (8 + 2) * 0.5 = 5 s
    t, total = 2.0, None
    for step in range(1, 11):
        t += 1.0 if step <= SKIP_STEPS else 0.1  # start-up steps are slow and not counted
        b.record_step(step, 1.0 if step <= SKIP_STEPS else 0.1)
        total = b.refit(step, t, total)
    # after 8 timed steps at 0.1 s (+ 2 s / 50 steps of evaluation): (100 - 4.8 - 5) / 0.14 more steps
    assert total == 10 + int((100 - 4.8 - 5.0) / 0.14)
    assert b.refit(11, t + 0.1, total) == total  # not yet a tenth of the budget later
    for step in range(11, 40):
        b.record_step(step, 0.3)  # the pace drops (say, another process takes a core)
    refitted = b.refit(40, 40.0, total)
    pace = (8 * 0.1 + 29 * 0.3) / 37 + 2.0 / 50
    assert refitted == 40 + int((100 - 40 - 5.0) / pace) and refitted < total
    assert not b.out_of_time(40.0) and b.out_of_time(95.0)


@pytest.mark.parametrize("kw, option", [
    ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr"), ({"grad_accum": 3}, "grad_accum"),
    ({"max_steps": -1}, "max_steps"), ({"beta2": 1.0}, "beta2"), ({"precision": "fp8"}, "precision"),
    ({"warmup_steps": -2}, "warmup_steps"), ({"grad_clip": float("nan")}, "grad_clip"),
    ({"max_steps": None}, "max_steps or time_budget"),
])
def test_shared_arguments_are_validated_in_one_place(kw: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        TrainArgs(**kw)
