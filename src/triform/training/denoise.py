"""Pretraining with span corruption, prefix-LM or UL2's mixture of denoisers, for either family:
an encoder-decoder (``Seq2Seq``, T5 / ByT5 presets) or a decoder (``DecoderLM`` presets, trained as
a prefix-LM: bidirectional over the inputs, causal over the targets). ``causal`` trains a decoder as
a plain language model with the same loop, so objectives can be compared at equal budgets.

Byte-level throughout (``denoising_tokenizer``: bytes, specials, UL2's mode tokens, 250 sentinels).
The objective lives in ``triform.objectives.denoise``; the run is the one loop's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from triform.checkpoint import load_checkpoint
from triform.config import PRESETS, SEQ2SEQ_PRESETS, get_preset, get_seq2seq_preset
from triform.data.corpus import Corpus, load_corpus
from triform.errors import ConfigError
from triform.models.decoder import DecoderLM
from triform.models.encoder_decoder import Seq2Seq
from triform.objectives.denoise import OBJECTIVES, ByteWindows, Denoising, DenoisingTask, task_for
from triform.tokenizers.byte import ByteTokenizer, denoising_tokenizer
from triform.training.distributed import print_main
from triform.training.args import TrainArgs, check_positive_int, with_shared_docs
from triform.training.loop import FitResult, check_run_dir, claim_run_dir, fit

@dataclass
class DenoiseResult(FitResult):
    """A denoising run's result: the loop's, plus the model family and its size."""

    family: str = "seq2seq"
    parameters: int = 0

    @property
    def target_tokens(self) -> int:
        """Tokens that carried loss during training."""
        return self.tokens

    @property
    def val_bits_per_byte(self) -> float:
        return self.final["bpb"]


def family_of(preset: str) -> str:
    """"seq2seq" or "decoder" for a preset name, or a ConfigError listing both kinds."""
    if preset in SEQ2SEQ_PRESETS:
        return "seq2seq"
    if preset in PRESETS:
        return "decoder"
    raise ConfigError(
        f"unknown preset {preset!r}; encoder-decoder presets: {', '.join(SEQ2SEQ_PRESETS)}; "
        f"decoder presets: {', '.join(sorted(PRESETS))}."
    )


@with_shared_docs
@dataclass(frozen=True, kw_only=True)
class DenoiseConfig(TrainArgs):
    """One denoising pretraining run: the shared training arguments (see ``TrainArgs``) and these.

    Args:
        objective: span (T5 span corruption), prefix-lm, ul2 (mixture of denoisers), or causal
            (plain language modelling; decoder presets only).
        data: Text file, folder or glob; default: Shakespeare's works with four plays held out.
        context: Bytes of text per example, before corruption.
        noise_density: Share of bytes hidden by span corruption.
        mean_span: Mean span length of span corruption (ByT5: 20 bytes).
        mixture_weights: UL2 weights of R(3), R(8), X(3,.5), X(8,.5), X(64,.15), X(64,.5), S.
        eval_batches: Held-out batches scored at each evaluation.
    """

    objective: str = "ul2"
    data: str | None = None
    context: int = 512
    batch_size: int = 16
    max_steps: int | None = 2000
    lr: float = 2e-3
    warmup_steps: int | None = 50
    noise_density: float = 0.15
    mean_span: float = 20.0
    mixture_weights: tuple[float, ...] | None = None
    eval_batches: int = 4
    eval_interval: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.")
        check_positive_int("eval_batches", self.eval_batches)
        check_positive_int("context", self.context, minimum=8)
        if not 0.0 < self.noise_density < 1.0 or not self.mean_span > 0:
            raise ConfigError(f"noise_density must be in (0, 1) and mean_span positive, got {self.noise_density} and {self.mean_span}.")
        if self.mixture_weights is not None:
            w = list(self.mixture_weights)
            if len(w) != 7 or any(x < 0 for x in w) or not sum(w) > 0:
                raise ConfigError("mixture_weights must be 7 non-negative numbers (R3, R8, X3, X8, X64, X64', S) summing to a positive number.")


def build_model(family: str, preset: str, tok: ByteTokenizer, task: DenoisingTask, context: int,
                overrides: dict[str, Any] | None = None) -> nn.Module:
    """The preset, re-shaped for the byte vocabulary and long enough for the task's examples."""
    vocab = -(-tok.vocab_size // 8) * 8
    longest = task.max_length(context)
    if family == "seq2seq":
        cfg = get_seq2seq_preset(preset).replace(
            vocab_size=vocab, pad_id=tok.pad_id, eos_id=tok.eos_id, decoder_start_id=tok.pad_id, **(overrides or {}))
        if longest > cfg.encoder.max_seq_len:
            cfg = cfg.replace(max_seq_len=longest)
        return Seq2Seq(cfg)
    if task.objective != "causal" and get_preset(preset).stack.sliding_window is not None:
        raise ConfigError(f"preset {preset} has a sliding window; prefix-LM training needs full attention.")
    total = context + 1 if task.objective == "causal" else 2 * longest
    dcfg = get_preset(preset).replace(vocab_size=vocab, **(overrides or {}))
    if total > dcfg.stack.max_seq_len:
        dcfg = dcfg.replace(max_seq_len=total)
    return DecoderLM(dcfg)


def pretrain_denoiser(
    cfg: DenoiseConfig, *, preset: str = "byt5-tiny", out_dir: Path | str = "runs/ul2", overrides: dict[str, Any] | None = None,
    resume: bool = False, stop_after: int | None = None, log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> DenoiseResult:
    """Pretrain an encoder-decoder or a decoder with ``cfg.objective`` through the one loop; saves
    ``out_dir/checkpoint``."""
    from triform.data.shakespeare import shakespeare_corpus

    say = log or print_main
    if not resume:
        family_of(preset)  # an unknown preset is refused before the folder is claimed
        if family_of(preset) == "seq2seq" and cfg.objective == "causal":
            raise ConfigError("objective causal trains decoder presets; an encoder-decoder needs span, prefix-lm or ul2.")
    out = Path(out_dir)
    check_run_dir(out, command="pretrain", resume=resume, overwrite=overwrite)
    if resume:
        model, tok, meta = load_checkpoint(out, kind=("seq2seq", "decoder"))
        saved = dict(meta.get("train", {}))
        preset = meta.get("preset", preset)
        cfg = DenoiseConfig.from_saved(saved, **cfg.launch_settings())  # type: ignore[assignment]
    family = family_of(preset)
    if family == "seq2seq" and cfg.objective == "causal":
        raise ConfigError("objective causal trains decoder presets; an encoder-decoder needs span, prefix-lm or ul2.")
    torch.manual_seed(cfg.seed)
    if not resume:
        tok = denoising_tokenizer()
    try:
        task = task_for(tok, cfg.objective, noise_density=cfg.noise_density, mean_span=cfg.mean_span,
                        mixture_weights=cfg.mixture_weights)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    length = cfg.context + 1 if cfg.objective == "causal" else cfg.context
    corpus: Corpus = shakespeare_corpus() if cfg.data is None else load_corpus(cfg.data)
    train_windows = ByteWindows([d.text for d in corpus.train], length)
    val_windows = ByteWindows([d.text for d in corpus.val], length)
    if not resume:
        model = build_model(family, preset, tok, task, cfg.context, overrides)
    if cfg.objective != "causal" and task.max_spans(cfg.context) > len(task.sentinels):
        raise ConfigError(f"a context of {cfg.context} bytes needs up to {task.max_spans(cfg.context)} sentinels; "
                          f"the tokenizer has {len(task.sentinels)}. Use a shorter context.")
    objective = Denoising(task, train_windows, val_windows, family=family, pad_id=tok.pad_id,
                          batch_size=cfg.micro_batch_size, eval_batches=cfg.eval_batches)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{cfg.objective} on a {n_params / 1e6:.2f}M-parameter {family} ({preset})")
    meta = {"objective": cfg.objective, "preset": preset,
            "train": {**cfg.saved_fields(), "mixture_weights": list(cfg.mixture_weights) if cfg.mixture_weights else None}}
    claim_run_dir(out, command="pretrain", resume=resume, overwrite=overwrite)
    result = fit(model, objective, cfg, out_dir=out, tokenizer=tok, meta=meta, resume=resume, stop_after=stop_after,
                 title=f"{cfg.objective} ({family}) on {corpus.name}", log=say)
    return DenoiseResult(**vars(result), family=family, parameters=n_params)
