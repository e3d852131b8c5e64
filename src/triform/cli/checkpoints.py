"""``triform eval``, ``triform presets`` and ``triform convert``: argument handling over the
checkpoint, evaluation and interop parts of the library."""

from __future__ import annotations

from triform.errors import DataError


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
    from triform.training.loop import evaluate_objective

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
    _vision_presets()


def _vision_presets() -> None:
    """The ViT and CLIP tables of ``presets``."""
    from triform.config import CLIP_PRESETS, VISION_PRESETS, count_clip_parameters, count_vision_parameters

    print()
    header = (f"{'vision preset':<20} {'family':<6} {'layers':>6} {'d_model':>7} {'heads':>5} {'ffn':<10} {'image':>5} "
              f"{'patch':>5} {'channels':>8} {'pool':<4} {'params':>10}")
    print(header)
    print("-" * len(header))
    for name, v in VISION_PRESETS.items():
        s = v.stack
        print(f"{name:<20} {v.family:<6} {s.n_layers:>6} {s.d_model:>7} {s.n_heads:>5} {s.ffn:<10} {v.image_size:>5} "
              f"{v.patch_size:>5} {v.channels:>8} {v.pool:<4} {_size(count_vision_parameters(v)):>10}")
    print()
    header = (f"{'CLIP preset':<20} {'image tower':<22} {'text tower':<16} {'context':>7} {'vocab':>6} {'proj':>5} "
              f"{'params':>10}")
    print(header)
    print("-" * len(header))
    for name, c in CLIP_PRESETS.items():
        v, t = c.vision, c.text
        image = f"{v.stack.n_layers}x{v.stack.d_model} {v.image_size}px/{v.patch_size} c{v.channels}"
        text = f"{t.n_layers}x{t.d_model}, {t.n_heads} heads"
        print(f"{name:<20} {image:<22} {text:<16} {c.max_tokens:>7} {c.vocab_size:>6} {c.projection_dim:>5} "
              f"{_size(count_clip_parameters(c)):>10}")


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
    from triform.interop.convert import convert_checkpoint

    target, model = convert_checkpoint(src, dst, to=to, trust_pickle=trust_pickle, max_shard_size=max_shard_size,
                                       overwrite=overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {target} checkpoint {dst} ({n / 1e6:.1f}M parameters, {model.cfg.family})")
