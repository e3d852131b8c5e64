"""``triform generate`` and ``triform chat``: argument handling over the inference library."""

from __future__ import annotations

import sys

from triform.cli.common import inference_weights, prompt_bytes, unescape, write_text
from triform.errors import ConfigError


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
        seed: Random seed, for reproducible sampling (completion j of a prompt uses a seed derived
            from it; see triform.inference.decode).
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
    from triform.checkpoint import trained_as_prefix_lm
    from triform.data.readers import read_prompts
    from triform.device import resolve_device
    from triform.inference.generate import generate as run_generation
    from triform.inference.sampling import SamplingParams
    from triform.inference.seq2seq import mode_token_id, source_ids
    from triform.interop import load_pretrained
    from triform.models.encoder_decoder import Seq2Seq

    if (prompt is None) == (prompts is None):
        raise ConfigError("give exactly one of a prompt or --prompts FILE.")
    stops = tuple(unescape(s) for s in stop or ())
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, stop=stops, seed=seed, n=n,
    )
    if prompt is not None and n != 1:
        raise ConfigError("--n needs --prompts FILE (the engine); a single prompt streams one completion.")
    engine_config = None
    if prompts is not None:
        from triform.inference.engine import EngineConfig

        engine_config = EngineConfig(
            block_size=block_size, kv_cache_memory=int(kv_cache_gib * 2**30), max_num_seqs=max_num_seqs,
            prefix_caching=not no_prefix_caching,
        )
    batch = [prompt_bytes(prompt)] if prompt is not None else read_prompts(prompts)  # type: ignore[arg-type]
    lm, tokenizer, meta = load_pretrained(checkpoint, trust_pickle=trust_pickle, device=resolve_device(device), allow_seq2seq=True)
    mode_id = mode_token_id(tokenizer, mode)
    if isinstance(lm, Seq2Seq):
        _generate_seq2seq(lm, tokenizer, batch, params, mode_id, num_beams=num_beams, length_penalty=length_penalty,
                          early_stopping=early_stopping)
        return
    if num_beams != 1:
        raise ConfigError("--num-beams applies to encoder-decoder models; decoders sample or decode greedily.")
    prefix_lm = trained_as_prefix_lm(meta)
    if (prefix_lm or mode_id is not None) and prompts is not None:
        raise ConfigError("the engine runs causal decoders; give a prefix-LM (UL2) decoder one prompt at a time.")
    if prompts is None or weights != "float32":  # the engine batches many rows: plain float32 layers suit it
        lm = inference_weights(lm, weights)
    if prompt is not None:
        data = batch[0]
        source = source_ids(tokenizer, data, mode_id, tokenizer.eos_id) if prefix_lm or mode_id is not None else data
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        run_generation(lm, tokenizer, [source], params, use_cache=not no_cache, truncate=truncate,
                       on_text=lambda _, t: write_text(t), prefix_lm=prefix_lm)
        print()
        return
    from triform.inference.engine import Engine
    from triform.inference.generate import encode_prompts

    ids = encode_prompts(tokenizer, batch, lm.cfg.stack.max_seq_len, truncate=truncate)
    engine = Engine(lm, tokenizer, engine_config)
    results = engine.generate(ids, params, progress=True)
    for i, (p, r) in enumerate(zip(batch, results)):
        for j, c in enumerate(r.completions):
            label = f"prompt {i + 1}" + (f", completion {j + 1}" if len(r.completions) > 1 else "")
            print(f"=== {label} ({c.finish_reason}) ===")
            print(p.decode("utf-8", errors="replace") + c.text)


def _generate_seq2seq(model, tokenizer, prompts: list[bytes], params, mode_id: int | None, *, num_beams: int,
                      length_penalty: float, early_stopping: bool) -> None:
    """Each prompt through the encoder once, then the decoder; prints source and output (sentinels by name)."""
    import torch

    from triform.inference.seq2seq import render_target, seq2seq_beam_search, seq2seq_complete, source_ids

    dev = model.shared.weight.device
    for i, p in enumerate(prompts):
        src = torch.tensor([source_ids(tokenizer, p, mode_id, model.cfg.eos_id, index=i)], device=dev)
        if num_beams != 1:
            out = seq2seq_beam_search(model, src, num_beams=num_beams, max_new_tokens=params.max_new_tokens,
                                      length_penalty=length_penalty, early_stopping=early_stopping)[0]
        else:
            out = seq2seq_complete(model, tokenizer, src, params=params)[0].token_ids
        if len(prompts) > 1:
            print(f"=== prompt {i + 1} ===")
        print(f"source: {p.decode('utf-8', errors='replace')}")
        print(f"output: {render_target(tokenizer, out)}")


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
    from triform.device import resolve_device
    from triform.inference.chat import ChatSession, Seq2SeqChatSession
    from triform.inference.sampling import SamplingParams
    from triform.inference.seq2seq import mode_token_id
    from triform.interop import load_pretrained
    from triform.models.encoder_decoder import Seq2Seq

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)
    model, tokenizer, _ = load_pretrained(checkpoint, device=resolve_device(device), allow_seq2seq=True)
    session: ChatSession | Seq2SeqChatSession
    if isinstance(model, Seq2Seq):
        session = Seq2SeqChatSession(model, tokenizer, params, system=system, mode_id=mode_token_id(tokenizer, mode))
    else:
        if mode is not None:
            raise ConfigError("--mode applies to encoder-decoder chat.")
        session = ChatSession(inference_weights(model, weights), tokenizer, params, system=system)
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
        session.reply(line.rstrip("\r\n"), on_text=write_text)
        print()
        if stats and session.last is not None:
            s = session.last
            print(f"[prompt {s.prompt_tokens} tokens: {s.reused_tokens} from cache, {s.new_tokens} computed; "
                  f"{s.generated_tokens} generated]", file=sys.stderr)
