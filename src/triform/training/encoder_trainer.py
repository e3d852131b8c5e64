"""Pretraining byte-level encoders: masked-LM (RoBERTa-style dynamic masks, or BERT's static ones),
plus next-sentence or sentence-order prediction, or DistilBERT distillation from a teacher checkpoint.

Inputs are ``[CLS] segment [SEP]`` (or ``[CLS] A [SEP] B [SEP]`` with segment ids 0/1 for the
pair objectives); the byte tokenizer's <bos>, <eos>, <mask> and <pad> serve as [CLS], [SEP],
[MASK] and [PAD]. The objectives live in ``triform.objectives.masked_lm``; the run is the one loop's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from triform.checkpoint import load_checkpoint
from triform.config import get_encoder_preset
from triform.data.corpus import Corpus, load_corpus
from triform.errors import ConfigError
from triform.models.encoder import EncoderForPreTraining, student_from_teacher
from triform.objectives.masked_lm import ByteEncoderInputs, Distillation, MaskedLM
from triform.tokenizers.byte import ByteTokenizer
from triform.training.distributed import print_main
from triform.training.args import TrainArgs, check_positive_int, with_shared_docs
from triform.training.loop import FitResult, check_run_dir, claim_run_dir, fit

Objective = Literal["mlm", "mlm+nsp", "mlm+sop", "distill"]


@with_shared_docs
@dataclass(frozen=True, kw_only=True)
class PretrainConfig(TrainArgs):
    """One encoder pretraining run: the shared training arguments (see ``TrainArgs``) and these.

    Args:
        objective: mlm (RoBERTa: masked-LM only), mlm+nsp (BERT), mlm+sop (ALBERT) or distill
            (DistilBERT: a half-depth student of ``teacher``).
        data: Text file, folder or glob; default: Shakespeare's works with four plays held out.
        context: Tokens per input, [CLS] and [SEP] included.
        static_masks: BERT's masks fixed per sequence instead of RoBERTa's fresh masks each time.
        teacher: With objective=distill, the teacher's checkpoint folder.
        temperature: Distillation softmax temperature.
        eval_batches: Held-out batches scored at each evaluation.
    """

    objective: Objective = "mlm"
    data: str | None = None
    context: int = 128
    batch_size: int = 32
    max_steps: int | None = 2000
    lr: float = 1e-3
    min_lr: float | None = 1e-4
    warmup_steps: int | None = 100
    weight_decay: float = 0.01
    beta2: float = 0.999
    static_masks: bool = False
    teacher: str | None = None
    temperature: float = 2.0
    eval_batches: int = 8
    eval_interval: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in ("mlm", "mlm+nsp", "mlm+sop", "distill"):
            raise ConfigError(
                f"objective must be mlm, mlm+nsp, mlm+sop or distill (encoders), or span, prefix-lm, ul2 or causal "
                f"(encoder-decoders and decoders), got {self.objective!r}."
            )
        if self.objective == "distill" and not self.teacher:
            raise ConfigError("objective distill needs --teacher CHECKPOINT (a pretrained encoder).")
        check_positive_int("context", self.context, minimum=8)
        check_positive_int("eval_batches", self.eval_batches)
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature!r}.")


def pretrain(
    cfg: PretrainConfig, *, preset: str = "bert-base-tiny", out_dir: Path | str = "runs/encoder",
    overrides: dict[str, Any] | None = None, resume: bool = False, stop_after: int | None = None,
    log: Callable[[str], None] | None = None, overwrite: bool = False,
) -> FitResult:
    """Pretrain a byte-level encoder with the one loop; saves ``out_dir/checkpoint``. ``resume``
    continues a run in ``out_dir`` bit-exactly with its saved configuration."""
    from triform.data.shakespeare import shakespeare_corpus

    say = log or print_main
    out = Path(out_dir)
    check_run_dir(out, command="pretrain", resume=resume, overwrite=overwrite)
    if resume:
        model, tok, meta = load_checkpoint(out, kind="encoder")
        saved = dict(meta.get("train", {}))
        preset = saved.pop("preset", preset)
        cfg = PretrainConfig.from_saved(saved, **cfg.launch_settings())  # type: ignore[assignment]
    torch.manual_seed(cfg.seed)
    corpus: Corpus = shakespeare_corpus() if cfg.data is None else load_corpus(cfg.data)
    if not resume:
        tok = ByteTokenizer()
    train_data = ByteEncoderInputs([d.text for d in corpus.train], cfg.context, tok)
    val_data = ByteEncoderInputs([d.text for d in corpus.val], cfg.context, tok)
    micro = cfg.micro_batch_size
    if cfg.objective == "distill":
        teacher, _, _ = load_checkpoint(cfg.teacher, kind="encoder")  # type: ignore[arg-type]
        if not isinstance(teacher, EncoderForPreTraining):
            raise ConfigError("the teacher must be a pretrained encoder (masked-LM head), not a fine-tuned one.")
        if not resume:
            model = student_from_teacher(teacher)
        objective: MaskedLM = Distillation(train_data, val_data, teacher=teacher, temperature=cfg.temperature,
                                           batch_size=micro, seed=cfg.seed, eval_batches=cfg.eval_batches)
    else:
        if not resume:
            vocab = -(-tok.vocab_size // 8) * 8
            mcfg = get_encoder_preset(preset).replace(vocab_size=vocab, pad_id=tok.pad_id, **(overrides or {}))
            if cfg.context > mcfg.max_tokens:
                mcfg = mcfg.replace(max_seq_len=cfg.context + mcfg.position_offset)
            if cfg.objective == "mlm+sop" and not mcfg.pooler:
                mcfg = mcfg.replace(pooler=True)
            model = EncoderForPreTraining(mcfg, pair_head=cfg.objective in ("mlm+nsp", "mlm+sop"))
        objective = MaskedLM(train_data, val_data, objective=cfg.objective, batch_size=micro,
                             static_masks=cfg.static_masks, seed=cfg.seed, eval_batches=cfg.eval_batches)
    meta = {"objective": cfg.objective, "train": {**cfg.saved_fields(), "preset": preset}}
    claim_run_dir(out, command="pretrain", resume=resume, overwrite=overwrite)
    return fit(model, objective, cfg, out_dir=out, tokenizer=tok, meta=meta, resume=resume, stop_after=stop_after,
               title=f"{cfg.objective} on {corpus.name}", log=say)
