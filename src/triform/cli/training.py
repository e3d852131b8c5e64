"""``triform train``, ``triform pretrain`` and ``triform finetune``: each receives its config
dataclass from the flags (validated there, in one place) and hands it to the library."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from triform.cli.common import prompt_bytes, write_text
from triform.errors import ConfigError, DataError
from triform.training.denoise import DenoiseConfig
from triform.training.encoder_trainer import PretrainConfig
from triform.training.finetune import FinetuneConfig
from triform.training.trainer import TrainConfig


def _union_flags() -> type:
    """One dataclass with every field of the encoder and the denoising pretraining configs, each
    defaulting to None: "the objective family's own default"."""
    fields, seen = [], set()
    for cls in (PretrainConfig, DenoiseConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen or f.name == "objective":
                continue
            seen.add(f.name)
            fields.append((f.name, hints[f.name] | None, dataclasses.field(default=None)))
    flags = dataclasses.make_dataclass("PretrainFlags", [("objective", str, dataclasses.field(default="mlm")), *fields],
                                       kw_only=True)
    from triform.training.args import _arg_entries

    entries: dict[str, str] = {}
    for cls in (PretrainConfig, DenoiseConfig):
        for name, text in _arg_entries(cls.__doc__ or "").items():
            entries.setdefault(name, text)
    entries["objective"] = ("objective: Encoders: mlm, mlm+nsp, mlm+sop or distill. Encoder-decoders and decoders: "
                            "span, prefix-lm or ul2 (decoders also causal).")
    entries = {k: v.replace(f"{k}: ", f"{k}: (unset: the objective family's default) ", 1) if k not in ("objective",)
               else v for k, v in entries.items()}
    flags.__doc__ = ("Pretraining flags; each left unset takes the default of the objective's family (see "
                     "PretrainConfig and DenoiseConfig).\n\n    Args:" + "".join(f"\n        {t}" for t in entries.values()))
    return flags


PretrainFlags = _union_flags()


def train(
    preset: str = "shakespeare", out: str = "runs/shakespeare", resume: bool = False, overwrite: bool = False,
    stop_after: int | None = None, sample_prompt: str = "\n", sample_tokens: int = 300,
    *, cfg: TrainConfig | None = None, model: dict[str, Any] | None = None,
) -> None:
    """Train a decoder-only language model and save checkpoint, loss plot and metrics.

    Args:
        preset: Model preset by exact name (see `triform presets`).
        out: Run folder: checkpoint/, loss.png and metrics.jsonl are written here.
        resume: Continue the run in `out` from its last checkpoint, bit-exactly.
        overwrite: Start again in `out` even though it holds a run (its checkpoint, metrics and plot are replaced).
        stop_after: Pause after this many steps without changing the schedule (resume later).
        sample_prompt: Prompt for the sample printed after training.
        sample_tokens: Length of that sample in tokens (0 skips it).
    """
    from triform.checkpoint import load_checkpoint
    from triform.config import get_preset
    from triform.inference.generate import generate as run_generation
    from triform.inference.sampling import SamplingParams
    from triform.training.trainer import train as run_training

    get_preset(preset)  # fail fast on an unknown name, before any data is fetched
    result = run_training(cfg or TrainConfig(), preset=preset, model_overrides=model, out_dir=out, resume=resume,
                          stop_after=stop_after, overwrite=overwrite)
    budget = result.extra.get("budget")
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s" + (f" of a {budget:.0f}s budget" if budget else "")
        + f" ({result.train_seconds:.0f}s training at {result.tokens_per_second:,.0f} tokens/s, "
        f"{result.eval_seconds:.0f}s evaluation, {result.precision}); "
        f"validation loss {result.val_loss:.4f} nats/token, {result.val_bpb:.4f} bits/byte"
    )
    print(f"checkpoint: {Path(out) / 'checkpoint'}   loss plot: {Path(out) / 'loss.png'}")
    if sample_tokens > 0:
        lm, tokenizer, _ = load_checkpoint(out)
        params = SamplingParams(temperature=0.8, top_k=None, max_new_tokens=sample_tokens, seed=0)
        print("--- sample ---")
        sys.stdout.write(sample_prompt)
        run_generation(lm, tokenizer, [prompt_bytes(sample_prompt)], params, on_text=lambda _, t: write_text(t))
        print("\n--------------")


def pretrain_config(flags: dict[str, Any]) -> PretrainConfig | DenoiseConfig:
    """The config of the objective's family from the pretrain flags: the flags given, the family's
    defaults for the rest; a flag of the other family is an error naming it."""
    from triform.objectives.denoise import OBJECTIVES

    objective = flags.get("objective") or "mlm"
    cls = DenoiseConfig if objective in OBJECTIVES else PretrainConfig
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in flags.items() if v is not None}
    foreign = sorted(k for k in given if k not in names)
    if foreign:
        family = "span, prefix-lm, ul2 and causal" if cls is PretrainConfig else "mlm, mlm+nsp, mlm+sop and distill"
        raise ConfigError(f"--{foreign[0].replace('_', '-')} applies to the {family} objectives, not {objective}.")
    if "mixture_weights" in given:
        given["mixture_weights"] = tuple(given["mixture_weights"])
    return cls(**given)


def pretrain(
    preset: str | None = None, out: str = "runs/pretrain", resume: bool = False, overwrite: bool = False,
    *, cfg: dict[str, Any] | None = None,
) -> None:
    """Pretrain a byte-level model. Encoders: masked-LM (RoBERTa), + next-sentence (BERT) or
    sentence-order (ALBERT) prediction, or DistilBERT distillation. Encoder-decoders (T5 / ByT5
    presets) or decoders (decoder presets, as prefix-LMs): T5 span corruption, prefix-LM or UL2's
    mixture of denoisers.

    Args:
        preset: Model shape (see `triform presets`); its kind picks the family. Default: bert-base-tiny
            for encoder objectives, byt5-tiny for span, prefix-lm and ul2. With distill the student's
            shape comes from the teacher (half its layers).
        out: Run folder; the checkpoint goes to OUT/checkpoint.
        resume: Continue the run in `out` from its last checkpoint, bit-exactly.
        overwrite: Start again in `out` even though it holds a run.
    """
    c = pretrain_config(cfg or {})
    if isinstance(c, DenoiseConfig):
        from triform.training.denoise import pretrain_denoiser

        d = pretrain_denoiser(c, preset=preset or "byt5-tiny", out_dir=out, resume=resume, overwrite=overwrite)
        print(f"pretrained a {d.parameters / 1e6:.2f}M-parameter {d.family} with {c.objective}: {d.steps} steps in "
              f"{d.seconds:.0f} s ({d.precision}), train loss {d.train_loss:.4f}, held-out loss {d.val_loss:.4f} "
              f"nats/target token ({d.val_bits_per_byte:.4f} bits/target byte)")
        print(f"checkpoint: {d.checkpoint}")
        return
    from triform.training.encoder_trainer import pretrain as run

    r = run(c, preset=preset or "bert-base-tiny", out_dir=out, resume=resume, overwrite=overwrite)
    pair = "" if "pair_accuracy" not in r.final else f", held-out pair accuracy {r.final['pair_accuracy']:.3f}"
    print(f"pretrained {r.steps} steps in {r.seconds:.0f} s ({r.precision}): train loss {r.train_loss:.4f}, "
          f"held-out masked-LM loss {r.final['mlm']:.4f}{pair}")
    print(f"checkpoint: {r.checkpoint}")


def finetune(
    task: str = "classify", train: str | None = None, test: str | None = None, out: str | None = None,
    overwrite: bool = False, *, cfg: FinetuneConfig | None = None,
) -> None:
    """Fine-tune an encoder: sequence classification, token tagging or extractive question answering.

    Args:
        task: classify (text -> label), tag (a tag per token) or qa (answer span in a context).
        train: Training data: for classify JSONL lines {"text", "label"} or a CSV file with text and
            label columns; for tag a CoNLL-style file (token and tag per line, blank line between
            sentences); for qa a SQuAD-style JSON file.
        test: Held-out data in the same format; its labels or tags must occur in the training data.
        out: Run folder for the fine-tuned checkpoint.
        overwrite: Start again in `out` even though it holds a run.
    """
    from triform.data.readers import read_conll, read_labelled, read_squad
    from triform.training.loop import check_run_dir, claim_run_dir

    cfg = cfg or FinetuneConfig()
    if task not in ("classify", "tag", "qa"):
        raise ConfigError(f"--task must be classify, tag or qa, got {task!r}.")
    if train is None:
        raise ConfigError("give the training data with --train FILE.")
    if out is not None:
        check_run_dir(out, command="finetune", overwrite=overwrite)
    read = {"classify": read_labelled, "tag": read_conll, "qa": read_squad}[task]
    rows = read(train)
    held = read(test) if test is not None else None
    if out is not None:
        claim_run_dir(out, command="finetune", overwrite=overwrite)
    if task == "classify":
        _classify(cfg, rows, held, train, test, out)
    elif task == "tag":
        _tag(cfg, rows, held, train, test, out)
    else:
        from triform.training.finetune_tasks import SpanQA

        qa = SpanQA(cfg).fit(rows, out_dir=out)
        m = qa.evaluate(rows)
        print(f"fine-tuned on {len(rows)} questions: train exact match {m['exact_match']:.4f}, F1 {m['f1']:.4f}")
        if held is not None:
            m = qa.evaluate(held)
            print(f"test exact match {m['exact_match']:.4f}, F1 {m['f1']:.4f} on {len(held)} questions")
    if out is not None:
        print(f"checkpoint: {Path(out) / 'checkpoint'}")


def _classify(cfg: FinetuneConfig, rows, held, train: str, test: str | None, out: str | None) -> None:
    from triform.training.finetune import finetune_classifier

    if held is not None:
        unknown = sorted({y for _, y in held} - {y for _, y in rows})
        if unknown:
            raise DataError(f"{test} has label {unknown[0]!r}, which does not occur in {train}.")
    clf = finetune_classifier(cfg, rows, out_dir=out)
    print(f"fine-tuned on {len(rows)} examples, labels: {', '.join(clf.labels)}")
    print(f"train accuracy {clf.accuracy(rows):.4f}")
    if held is not None:
        print(f"test accuracy {clf.accuracy(held):.4f} on {len(held)} examples")


def _tag(cfg: FinetuneConfig, sentences, held, train: str, test: str | None, out: str | None) -> None:
    from triform.training.finetune_tasks import Tagger

    tagger = Tagger(cfg, sorted({t for _, tags in sentences for t in tags}))
    if held is not None:
        unknown = sorted({t for _, g in held for t in g} - set(tagger.tags))
        if unknown:
            raise DataError(f"{test} has tag {unknown[0]!r}, which does not occur in {train}.")
    tagger.fit(sentences, out_dir=out)
    print(f"fine-tuned on {len(sentences)} sentences, tags: {', '.join(tagger.tags)}")
    print(f"train token accuracy {tagger.accuracy(sentences):.4f}")
    if held is not None:
        print(f"test token accuracy {tagger.accuracy(held):.4f} on {len(held)} sentences")
