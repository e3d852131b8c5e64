"""The functions behind each ``triform`` subcommand. Their signatures and docstrings are the CLI's
flags and help text; user errors surface as :class:`~triform.errors.TriformError`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triform.errors import DataError, TriformError

if TYPE_CHECKING:
    from triform.training.trainer import TrainConfig


def _prompt_bytes(text: str) -> bytes:
    """The exact bytes the user typed: invalid UTF-8 in argv arrives as surrogate escapes."""
    return os.fsencode(text)


def train(
    preset: str = "shakespeare", out: str = "runs/shakespeare", resume: bool = False,
    stop_after: int | None = None, sample_prompt: str = "\n", sample_tokens: int = 300,
    *, cfg: TrainConfig | None = None, model: dict[str, Any] | None = None,
) -> None:
    """Train a decoder-only language model and save checkpoint, loss plot and metrics.

    Args:
        preset: Model preset by exact name (see `triform presets`).
        out: Run folder: checkpoint/, loss.png and metrics.jsonl are written here.
        resume: Continue the run in `out` from its last checkpoint, bit-exactly.
        stop_after: Pause after this many steps without changing the schedule (resume later).
        sample_prompt: Prompt for the sample printed after training.
        sample_tokens: Length of that sample in tokens (0 skips it).
    """
    from triform.config import get_preset
    from triform.inference.generate import generate as run_generation
    from triform.inference.sampling import SamplingParams
    from triform.training.trainer import TrainConfig
    from triform.training.trainer import train as run_training

    get_preset(preset)  # fail fast on an unknown name, before any data is fetched
    result = run_training(cfg or TrainConfig(), preset=preset, model_overrides=model, out_dir=out, resume=resume, stop_after=stop_after)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f}s ({result.tokens_per_second:,.0f} tokens/s); "
        f"validation loss {result.val_loss:.4f} nats/token, {result.val_bpb:.4f} bits/byte"
    )
    print(f"checkpoint: {Path(out) / 'checkpoint'}   loss plot: {Path(out) / 'loss.png'}")
    if sample_tokens > 0:
        from triform.training.checkpoint import load_checkpoint

        lm, tokenizer, _ = load_checkpoint(out)
        params = SamplingParams(temperature=0.8, top_k=None, max_new_tokens=sample_tokens, seed=0)
        print("--- sample ---")
        sys.stdout.write(sample_prompt)
        run_generation(lm, tokenizer, [_prompt_bytes(sample_prompt)], params, on_text=lambda _, t: _write(t))
        print("\n--------------")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _unescape(text: str) -> str:
    """Interpret backslash escapes (\\n, \\t, \\\\) typed on a command line."""
    return text.encode("utf-8", errors="surrogateescape").decode("unicode_escape").encode("latin-1").decode(
        "utf-8", errors="surrogateescape"
    )


def _read_prompts(path: str) -> list[bytes]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"prompts file {path} does not exist.") from None
    except OSError as exc:
        raise DataError(f"prompts file {path} could not be read ({exc.strerror}).") from None
    lines = [line for line in data.split(b"\n") if line.strip()]
    if not lines:
        raise DataError(f"prompts file {path} has no prompts (one per line).")
    return [line.replace(b"\\n", b"\n") for line in lines]


def generate(
    checkpoint: str, prompt: str | None = None, prompts: str | None = None, max_new_tokens: int = 256,
    temperature: float = 0.8, top_k: int | None = None, top_p: float = 1.0, seed: int | None = None,
    stop: list[str] | None = None, truncate: bool = False, no_cache: bool = False, device: str = "auto",
) -> None:
    """Continue a prompt with a trained model, streaming text as it is generated.

    Args:
        checkpoint: A checkpoint folder or a run folder (its checkpoint/ is used).
        prompt: The text to continue.
        prompts: A file with one prompt per line (write \\n for a newline inside a prompt),
            generated together as one left-padded batch.
        max_new_tokens: Upper bound on generated tokens per prompt.
        temperature: Softmax temperature; 0 means greedy decoding.
        top_k: Sample only from the k most likely tokens.
        top_p: Sample only from the smallest set of tokens whose probability reaches p.
        seed: Random seed, for reproducible sampling.
        stop: Stop when this string is generated; repeat the flag for several. Escapes such as
            \\n and \\t are understood, so --stop "\\n\\n" stops at a blank line.
        truncate: Keep the end of a prompt that is longer than the context window instead of failing.
        no_cache: Recompute the whole sequence each step instead of using the KV cache.
        device: "auto", "cpu" or "cuda".
    """
    from triform.inference.generate import generate as run_generation
    from triform.inference.sampling import SamplingParams
    from triform.training.checkpoint import load_checkpoint
    from triform.training.trainer import resolve_device

    if (prompt is None) == (prompts is None):
        raise TriformError("give exactly one of a prompt or --prompts FILE.")
    stops = tuple(_unescape(s) for s in stop or ())
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, stop=stops, seed=seed,
    )
    lm, tokenizer, _ = load_checkpoint(checkpoint, device=resolve_device(device))
    if prompt is not None:
        data = _prompt_bytes(prompt)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        run_generation(lm, tokenizer, [data], params, use_cache=not no_cache, truncate=truncate, on_text=lambda _, t: _write(t))
        print()
        return
    batch = _read_prompts(prompts)  # type: ignore[arg-type]
    results = run_generation(lm, tokenizer, batch, params, use_cache=not no_cache, truncate=truncate)
    for i, (p, r) in enumerate(zip(batch, results)):
        print(f"=== prompt {i + 1} ({r.finish_reason}) ===")
        print(p.decode("utf-8", errors="replace") + r.text)


def evaluate(
    checkpoint: str, data: str | None = None, tokens: int | None = None, batch_size: int = 16, device: str = "auto",
) -> None:
    """Print loss (nats/token), bits per byte and perplexity of a checkpoint on a corpus.

    Args:
        checkpoint: A checkpoint folder or a run folder.
        data: Text file, folder or glob to score in full. Default: the validation split of the
            corpus the checkpoint was trained on.
        tokens: Score at most about this many tokens (evenly spaced windows).
        batch_size: Windows per forward pass.
        device: "auto", "cpu" or "cuda".
    """
    import torch

    from triform.data.batching import eval_windows, tokenize_documents
    from triform.data.corpus import load_corpus
    from triform.training.checkpoint import load_checkpoint
    from triform.training.trainer import evaluate as run_eval
    from triform.training.trainer import resolve_device

    lm, tokenizer, meta = load_checkpoint(checkpoint, device=resolve_device(device))
    context = int(meta.get("train", {}).get("context") or lm.cfg.stack.max_seq_len)
    if data is not None:
        corpus = load_corpus(data)
        docs, where = corpus.train + corpus.val, data
    else:
        source = meta.get("train", {}).get("data")
        docs, where = load_corpus(source).val, f"validation split of {source or 'the default corpus'}"
    ids = tokenize_documents(tokenizer, docs)
    if ids.numel() < 2:
        raise DataError(f"{where} holds fewer than two tokens; nothing to evaluate.")
    context = min(context, ids.numel() - 1)
    windows = eval_windows(ids, context, tokens)
    token_bytes = torch.tensor([len(b) for b in tokenizer.token_bytes()] + [0] * (lm.cfg.vocab_size - tokenizer.vocab_size))
    m = run_eval(lm, windows, token_bytes, batch_size=batch_size)
    print(f"data: {where} ({windows.shape[0] * context:,} tokens scored, context {context})")
    print(f"loss {m['loss']:.4f} nats/token   {m['bpb']:.4f} bits/byte   perplexity {m['ppl']:.3f}")


def presets() -> None:
    """List the model presets with their shapes and parameter counts."""
    from triform.config import PRESETS, count_parameters

    header = f"{'preset':<20} {'family':<8} {'layers':>6} {'d_model':>7} {'heads':>7} {'ffn':<9} {'position':<10} {'window':>6} {'context':>7} {'params':>10}"
    print(header)
    print("-" * len(header))
    for name, cfg in PRESETS.items():
        s = cfg.stack
        n = count_parameters(cfg)
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
        print(
            f"{name:<20} {cfg.family:<8} {s.n_layers:>6} {s.d_model:>7} {f'{s.n_heads}/{s.n_kv_heads}':>7} {s.ffn:<9} "
            f"{s.position:<10} {str(s.sliding_window or '-'):>6} {s.max_seq_len:>7} {size:>10}"
        )
