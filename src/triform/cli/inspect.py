"""``triform inspect ANALYSIS [CHECKPOINT]``: look inside a model. Each analysis prints a table and
writes its pictures into ``--out``."""

from __future__ import annotations

from pathlib import Path

from triform.errors import ConfigError

ANALYSES = ("anatomy", "neighbours", "lens", "attention", "heads", "patch")
DEFAULT_TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def _out_dir(out: str, overwrite: bool) -> Path:
    from triform.output_dir import claim_output_dir

    return claim_output_dir(Path(out), command="inspect", overwrite=overwrite)


def _model(checkpoint: str | None, preset: str | None, trust_pickle: bool):
    from triform.inspect.load import load_model, preset_model

    if checkpoint is None and preset is None:
        raise ConfigError("give a CHECKPOINT (triform checkpoint, HF folder or GGUF file) or --preset NAME.")
    if checkpoint is not None and preset is not None:
        raise ConfigError("give a CHECKPOINT or --preset, not both.")
    if preset is not None:
        return preset_model(preset), None, preset
    model, tokenizer, _ = load_model(checkpoint, trust_pickle=trust_pickle)
    return model, tokenizer, str(checkpoint)


def _anatomy(model, name: str, out: Path, vocab_sizes: list[int]) -> None:
    from triform.inspect.anatomy import anatomy, expected

    a = anatomy(model)
    s = a.shape
    print(f"{name}: d={s['d_model']}, {s['n_layers']} layers, {s['n_heads']} heads ({s['n_kv_heads']} key/value) of "
          f"{s['head_dim']}, FFN {s['d_ff']}, vocabulary {s['vocab_size']:,}")
    print()
    print(a.table())
    print()
    cats = a.by_category()
    checks = expected(model)
    bad = {k: (cats.get(k, 0), v) for k, v in checks.items() if cats.get(k, 0) != v}
    if bad:
        raise ConfigError(f"the anatomy disagrees with the formulas for {', '.join(bad)}: {bad}.")
    print("formulas (d, h heads, g key/value heads of d_h, FFN f, L stored layers): E = V·e, W_Q = L·d·h·d_h, "
          "W_K = W_V = L·d·g·d_h, W_O = L·h·d_h·d, FFN = L·(k+1)·d·f (+ biases) — all equal to the tensors.")
    per_head = a.per_head()
    print("one head: " + ", ".join(f"{k} {v:,}" for k, v in per_head.items()) + " weights")
    stacks = ", ".join(f"{n} {stack or 'blocks'}" for stack, n in a.stacks.items())
    print(f"stored layers: {stacks}")
    e_now = cats.get("token embedding (E)", 0)
    width = e_now // max(s["vocab_size"], 1)
    untied = cats.get("unembedding", 0)
    rest = a.total - e_now - untied
    rows = []
    for v in vocab_sizes:
        e = v * width
        total = rest + e * (2 if untied else 1)
        rows.append(f"V={v:,}: {100 * e / total:.1f}%")
    print("E's share at other vocabulary sizes (the same shape, E resized): " + "; ".join(rows))
    path = a.plot(out / "anatomy.png", title=f"{name}: {a.total:,} parameters")
    print(f"picture: {path}")


def _neighbours(model, tokenizer, name: str, out: Path, tokens: list[str], k: int) -> None:
    from triform.inspect.geometry import neighbours, pca_map, untied_agreement

    if tokenizer is None:
        raise ConfigError("neighbours needs a checkpoint (a preset has no trained embeddings).")
    for t in tokens:
        found = neighbours(model, tokenizer, t, k)
        print(f"nearest to [{t}] by cosine: " + ", ".join(f"[{n.label}] {n.cosine:.3f}" for n in found))
    agreement = untied_agreement(model)
    if agreement is not None:
        print(f"E vs the untied unembedding U: mean cosine of a token's two rows {agreement['mean_cosine']:.3f}; "
              f"their 10 nearest neighbours overlap {100 * agreement['neighbour_overlap']:.0f}%")
    path = pca_map(model, tokenizer, out / "embeddings.png", title=f"{name}: token embeddings, first two components")
    print(f"picture: {path}")


def _labels(tokenizer) -> list[str]:
    from triform.inspect.geometry import token_label

    return [token_label(tokenizer, i) for i in range(len(tokenizer.token_bytes()))]


def _encoded(model, tokenizer, text: str):
    import torch

    ids = tokenizer.encode(text)
    limit = model.cfg.stack.max_seq_len if hasattr(model.cfg, "stack") else model.cfg.max_tokens
    if not ids:
        raise ConfigError("--text is empty.")
    if len(ids) > limit:
        raise ConfigError(f"--text is {len(ids)} tokens, more than the model's {limit}.")
    return torch.tensor([ids])


def _lens(model, tokenizer, name: str, out: Path, text: str) -> None:
    from triform.inspect.lens import logit_lens, plot_lens

    labels = _labels(tokenizer)
    lens = logit_lens(model, _encoded(model, tokenizer, text))
    top = lens.top(1)[:, -1, 0]
    print(f"logit lens of {name} on {len(lens.tokens)} tokens (row i: the stream after block i, decoded by the final "
          "norm and output projection; the last row is the model's logits)")
    print("| layer | loss (nats/token) | top prediction after the text |")
    print("|---|---:|---|")
    for i, (loss, t) in enumerate(zip(lens.loss.tolist(), top.tolist())):
        print(f"| {'embed' if i == 0 else f'after block {i - 1}'} | {loss:.3f} | [{labels[t] if t < len(labels) else t}] |")
    print(f"picture: {plot_lens(lens, labels, out / 'lens.png', title=f'{name}: logit lens')}")


def _attention(model, tokenizer, name: str, out: Path, text: str) -> None:
    from triform.inspect.heads import patterns, plot_attention

    x = _encoded(model, tokenizer, text)
    p = patterns(model, x)[:, 0]  # (L, H, T, T)
    labels = [_labels(tokenizer)[i] for i in x[0].tolist()]
    print(f"attention of {name}: {p.shape[0]} layers x {p.shape[1]} heads over {p.shape[-1]} tokens")
    for li in range(p.shape[0]):
        ent = -(p[li] * p[li].clamp_min(1e-12).log()).sum(-1).mean(-1)
        print(f"layer {li}: mean entropy per head " + ", ".join(f"{float(e):.2f}" for e in ent) + " nats")
    print(f"picture: {plot_attention(p, labels, out / 'attention.png', title=f'{name}: attention patterns')}")


def _heads(model, tokenizer, name: str, out: Path, seed: int) -> None:
    from triform.inspect.heads import KINDS, classify_heads

    vocab = len(tokenizer.token_bytes()) if tokenizer is not None else model.cfg.vocab_size
    n = max(4, min(24, (model.cfg.stack.max_seq_len if hasattr(model.cfg, "stack") else model.cfg.max_tokens) // 2))
    report = classify_heads(model, vocab=vocab, n=n, seed=seed)
    print(f"heads of {name} on repeated random sequences of {n} tokens (seed {seed}); a head is named by every "
          f"template it scores above {report.threshold}")
    print(report.table())
    for kind in KINDS:
        found = report.heads(kind)
        print(f"{kind} heads: " + (", ".join(f"L{a}H{b}" for a, b in found) or "none"))
    print(f"picture: {report.plot(out / 'heads.png', title=name)}")


def _patch(model, tokenizer, name: str, out: Path, clean: str, corrupt: str | None, answer: str | None,
           wrong: str | None) -> None:
    from triform.inspect.geometry import find_token
    from triform.inspect.patching import patch_sweep

    if corrupt is None or answer is None or wrong is None:
        raise ConfigError("patch needs --text (the clean input), --corrupt, --answer and --wrong.")
    x, y = _encoded(model, tokenizer, clean), _encoded(model, tokenizer, corrupt)
    r = patch_sweep(model, x, y, find_token(tokenizer, answer), find_token(tokenizer, wrong))
    print(f"logit difference [{answer}] - [{wrong}] at the last position: clean {r.clean:.3f}, corrupted {r.corrupted:.3f}")
    best = divmod(int(r.by_position.abs().argmax()), r.by_position.shape[1])
    head = divmod(int(r.by_head.abs().argmax()), r.by_head.shape[1])
    print(f"strongest residual-stream patch: block {best[0]} input at position {best[1]} "
          f"({float(r.by_position[best]):+.2f} of the difference)")
    print(f"strongest head patch: L{head[0]}H{head[1]} ({float(r.by_head[head]):+.2f})")
    labels = [_labels(tokenizer)[i] for i in x[0].tolist()]
    print(f"picture: {r.plot(out / 'patch.png', labels, title=f'{name}: activation patching')}")


def inspect(
    analysis: str, checkpoint: str | None = None, preset: str | None = None, token: list[str] | None = None,
    k: int = 10, vocab_sizes: list[int] | None = None, text: str = DEFAULT_TEXT, seed: int = 0,
    corrupt: str | None = None, answer: str | None = None, wrong: str | None = None,
    out: str = "inspect", overwrite: bool = False, trust_pickle: bool = False,
) -> None:
    """Look inside a model: where its parameters are, what its embeddings encode, what its heads attend to.

    Args:
        analysis: anatomy (parameter counts and shares by category, layer and head, checked against
            the formulas), neighbours (nearest tokens by cosine in E, a PCA map of E), lens (the
            logit lens of a decoder on --text), attention (every head's pattern on --text) or heads
            (previous-token, duplicate-token, induction and first-token scores of every head) or
            patch (activation patching of --text against --corrupt, by layer and position and by head).
        checkpoint: A triform checkpoint or run folder, a Hugging Face folder or a GGUF file.
        preset: Instead of a checkpoint, a preset by name (anatomy only; shapes, no weights).
        token: Tokens whose neighbours to list (repeatable; default: a few common ones).
        k: How many neighbours.
        vocab_sizes: Vocabulary sizes at which anatomy reports E's share (default 260, 8192, 50257).
        text: The text lens and attention read.
        seed: Seed of the random sequences heads uses.
        corrupt: patch: the corrupted input (as many tokens as --text, the clean one).
        answer: patch: the token the clean input should predict next.
        wrong: patch: the token the corrupted input favours instead.
        out: Folder for the pictures.
        overwrite: Write into `out` even though it holds other files.
        trust_pickle: Allow loading pickled (.bin) weights from a HF folder.
    """
    if analysis not in ANALYSES:
        raise ConfigError(f"analysis must be one of {', '.join(ANALYSES)}, got {analysis!r}.")
    if k < 1:
        raise ConfigError(f"--k must be a positive integer, got {k}.")
    model, tokenizer, name = _model(checkpoint, preset, trust_pickle)
    folder = _out_dir(out, overwrite)
    if analysis == "anatomy":
        _anatomy(model, name, folder, vocab_sizes or [260, 8192, 50257])
    elif analysis in ("lens", "attention", "heads", "patch") and tokenizer is None:
        raise ConfigError(f"{analysis} needs a checkpoint (a preset has no trained weights).")
    elif analysis == "lens":
        _lens(model, tokenizer, name, folder, text)
    elif analysis == "attention":
        _attention(model, tokenizer, name, folder, text)
    elif analysis == "heads":
        _heads(model, tokenizer, name, folder, seed)
    elif analysis == "patch":
        _patch(model, tokenizer, name, folder, text, corrupt, answer, wrong)
    else:
        if not token and tokenizer is not None:  # a few common tokens this vocabulary has as one token
            token = [t for t in (" the", "e", "A", "1", " ", ",") if len(tokenizer.encode(t)) == 1][:4]
        _neighbours(model, tokenizer, name, folder, token or [], k)
