"""Linear probes: is a property of the text linearly readable from the residual stream, and where?

The residual stream is cached at every layer -- the embedding stream entering the first block
(``blocks.0.hook_resid_pre``) and the stream leaving each block (``blocks.{i}.hook_resid_post``) --
and at each layer a logistic regression (features standardised; lbfgs) is fitted on per-token
labels, its L2 strength C chosen from ``STRENGTHS`` by accuracy on a seeded quarter of the
training blocks (without that choice a wide stream fitted on a few thousand tokens overfits, and
even the control falls below chance). An encoder-decoder is probed on its encoder stack
(``encoder.blocks.*``), the part that reads the text; its decoder only ever sees targets.

Three numbers say whether a probe found something (Hewitt & Liang 2019, "Designing and
Interpreting Probes with Control Tasks", make the case for controls):

* test accuracy per layer, on tokens the probe was not fitted on;
* chance: the majority class's share of the test tokens (what predicting one class scores);
* control: the same probe on labels shuffled by a seeded permutation (within the training tokens
  and within the test tokens, so each side keeps its class balance and chance is the same), which
  cuts any link to the activations -- it must sit at chance. A control far above chance means the
  probe sees something it should not; a probe at the control's level found nothing.

The train/test split is by contiguous blocks of ``block`` tokens of the token stream, not by single
tokens: a seeded permutation of the blocks sends a ``test_fraction`` of them to the test set. Tokens
next to each other (the letters of one name, the bytes of one word) share most of their context, so
a token-level split would test the probe on near-copies of its training tokens; only the tokens at
the few block edges have a neighbour on the other side.

Built-in features come from the text and its tokenization (``token_features``). A byte-level
vocabulary gets ``speaker name`` (the bytes of a speaker's name on its own line: ``ROMEO:`` in the
tiny-Shakespeare layout, or ``Rom.`` / ``First Citizen.`` between a blank line and the speech in the
Project Gutenberg layout), ``position in word`` (a letter's index in its run of letters: 0, 1, 2,
3 or more; other bytes unlabelled) and ``vowel`` (a, e, i, o, u in either case). Any other vocabulary
gets ``speaker name`` (a token whose first letter lies in a name), ``starts a word`` (a token whose
first letter follows a non-letter, e.g. BPE's leading space) and ``capitalised`` (its first letter
is upper case); tokens without a letter are unlabelled for the last two. Label -1 means unlabelled:
such tokens are left out of that feature's fit and test. ``probe`` takes any labels of one's own.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from triform.errors import ConfigError
from triform.inspect.hooks import run_with_cache
from triform.inspect.plotting import pyplot, save_figure

FEATURES = {  # name -> what its label 1 (or its classes) means
    "speaker name": "inside a speaker's name on a line of its own, ROMEO: or Rom.",
    "position in word": "a letter's index in its word, 0, 1, 2 or 3+; letters only",
    "vowel": "a, e, i, o or u in either case",
    "starts a word": "the token's first letter begins a word; tokens with a letter only",
    "capitalised": "the token's first letter is upper case; tokens with a letter only",
}
BYTE_FEATURES = ("speaker name", "position in word", "vowel")
WORD_FEATURES = ("speaker name", "starts a word", "capitalised")

_COLON_NAME = re.compile(rb"([A-Z][A-Z' -]*[A-Z]|[A-Z]):[ \t]*")  # ROMEO:  FIRST CITIZEN:
_PERIOD_NAME = re.compile(rb"((?:[0-9]+|[A-Z][A-Za-z']*)(?: +[A-Z][A-Za-z']*){0,3})\.[ \t]*")  # Ham.  1 Clown.


# ---- features from the text ------------------------------------------------------------------


def speaker_spans(text: bytes) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the speakers' names in ``text``: a line that is a name in capitals
    and a colon (``ROMEO:``), or a line of one to four capitalised words (or a number and words) and a
    full stop between a blank line and a non-blank one (``Ham.``, ``1 Clown.``). The colon or full
    stop is not part of the name."""
    lines: list[tuple[int, bytes]] = []
    at = 0
    for raw in text.split(b"\n"):
        lines.append((at, raw.rstrip(b"\r")))
        at += len(raw) + 1
    spans = []
    for k, (start, line) in enumerate(lines):
        m = _COLON_NAME.fullmatch(line)
        if m is None:
            m = _PERIOD_NAME.fullmatch(line)
            after_blank = k == 0 or not lines[k - 1][1].strip()
            before_speech = k + 1 < len(lines) and bool(lines[k + 1][1].strip())
            if m is None or not (after_blank and before_speech):
                continue
        spans.append((start, start + m.end(1)))
    return spans


def token_pieces(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """Each token's bytes (empty for special tokens): from ``token_bytes()`` where the tokenizer has
    it; a WordPiece tokenizer's pieces are rebuilt from its token strings (a leading space for a
    word's first piece, ``##`` dropped)."""
    if hasattr(tokenizer, "token_bytes"):
        table = tokenizer.token_bytes()
        return [table[i] if 0 <= i < len(table) else b"" for i in ids]
    if hasattr(tokenizer, "tokens"):
        special = getattr(tokenizer, "special_ids", set())
        out = []
        for i, t in zip(ids, tokenizer.tokens(list(ids))):
            out.append(b"" if i in special else t[2:].encode() if t.startswith("##") else b" " + t.encode())
        return out
    raise ConfigError(f"the {type(tokenizer).__name__} tokenizer gives no token bytes to compute probe features from.")


def _is_letter(b: int) -> bool:
    return 65 <= b <= 90 or 97 <= b <= 122


def token_features(tokenizer, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """The built-in per-token labels (see the module docstring) of the token sequence ``ids``: name
    -> int array (N,), -1 where a token has no label. Byte-level vocabularies get ``BYTE_FEATURES``,
    others ``WORD_FEATURES``."""
    pieces = token_pieces(tokenizer, ids)
    text = b"".join(pieces)
    starts = np.cumsum([0] + [len(p) for p in pieces])[:-1]
    in_name = np.zeros(len(text) + 1, dtype=bool)
    for a, b in speaker_spans(text):
        in_name[a:b] = True
    n = len(pieces)
    if getattr(tokenizer, "kind", None) == "byte":
        speaker = np.full(n, -1)
        vowel = np.full(n, -1)
        position = np.full(n, -1)
        run = 0
        for k, (piece, s) in enumerate(zip(pieces, starts)):
            if len(piece) != 1:  # a special token
                run = 0
                continue
            b = piece[0]
            speaker[k] = int(in_name[s])
            vowel[k] = int(b in b"aeiouAEIOU")
            if _is_letter(b):
                position[k] = min(run, 3)
                run += 1
            else:
                run = 0
        return {"speaker name": speaker, "position in word": position, "vowel": vowel}
    speaker = np.full(n, -1)
    word_start = np.full(n, -1)
    capital = np.full(n, -1)
    for k, (piece, s) in enumerate(zip(pieces, starts)):
        if not piece:
            continue
        j = next((j for j, b in enumerate(piece) if _is_letter(b)), None)
        if j is None:
            speaker[k] = 0
            continue
        at = s + j
        speaker[k] = int(in_name[at])
        word_start[k] = int(at == 0 or not (_is_letter(text[at - 1]) or text[at - 1] == ord("'")))
        capital[k] = int(65 <= piece[j] <= 90)
    return {"speaker name": speaker, "starts a word": word_start, "capitalised": capital}


# ---- the residual stream ---------------------------------------------------------------------


class _EncoderOnly(nn.Module):
    """An encoder-decoder's encoder as a module of its own, so a probe never runs the decoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, source: Tensor) -> Tensor:
        return self.model.encode(source)


def _stack(model: nn.Module) -> tuple[nn.Module, str, int]:
    """(module to run on (B, T) tokens, hook-name prefix of the probed stack, longest input)."""
    from triform.models.decoder import DecoderLM
    from triform.models.encoder_decoder import Seq2Seq

    if isinstance(model, Seq2Seq):
        return _EncoderOnly(model), "encoder.", model.cfg.encoder.max_seq_len
    if isinstance(model, DecoderLM):
        return model, "", model.cfg.stack.max_seq_len
    limit = getattr(getattr(model, "cfg", None), "max_tokens", None)
    if isinstance(limit, int):  # an encoder, bare or with a head
        return model, "", limit
    name = type(model).__name__
    article = "an" if name[:1] in "AEIOU" else "a"
    raise ConfigError(f"probes read decoders, encoders and encoder-decoders, not {article} {name}.")


def max_window(model: nn.Module) -> int:
    """The longest window ``residual_stream`` runs on ``model`` (its longest input); raises
    ConfigError for a model that is not a decoder, an encoder or an encoder-decoder."""
    return _stack(model)[2]


def layer_names(n_blocks: int) -> list[str]:
    """Row labels of the probed layers: the embedding stream, then after each block."""
    return ["embed"] + [f"after block {i}" for i in range(n_blocks)]


def residual_stream(model: nn.Module, tokens: Sequence[int] | Tensor, *, window: int | None = None,
                    batch: int = 16) -> Tensor:
    """The residual stream at every layer for a token stream (N,): (L + 1, N, d) in float32 on the
    CPU, row 0 the embedding stream. The stream is cut into consecutive windows of ``window`` tokens
    (default and at most the model's longest input), each run as its own sequence."""
    module, prefix, limit = _stack(model)
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ConfigError("there are no tokens to probe.")
    window = limit if window is None else window
    if not 1 <= window <= limit:
        raise ConfigError(f"the probe window must lie in [1, {limit}] (the model's longest input), got {window}.")
    device = next(model.parameters()).device
    names = [f"{prefix}blocks.0.hook_resid_pre", f"{prefix}blocks.*.hook_resid_post"]
    full = ids.numel() // window
    chunks = [ids[: full * window].view(full, window)[i : i + batch] for i in range(0, full, batch)]
    if ids.numel() % window:
        chunks.append(ids[full * window :][None])
    was_training = model.training
    model.eval()
    parts = []
    try:
        for x in chunks:
            _, cache = run_with_cache(module, x.to(device), names=names)
            stream = torch.cat([cache[names[0]][None], cache.stack("hook_resid_post", prefix)])  # (L+1, B, T, d)
            parts.append(stream.flatten(1, 2).float().cpu())  # (L+1, B·T, d)
    finally:
        model.train(was_training)
    return torch.cat(parts, dim=1)


# ---- fitting -----------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Test accuracy per feature and layer, the chance rate and the shuffled-label control."""

    layers: list[str]
    accuracy: dict[str, list[float]] = field(default_factory=dict)  # feature -> accuracy per layer on the test tokens
    control: dict[str, list[float]] = field(default_factory=dict)  # feature -> the same with shuffled labels
    chance: dict[str, float] = field(default_factory=dict)  # feature -> majority class's share of the test tokens
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # feature -> (train, test) labelled tokens
    classes: dict[str, int] = field(default_factory=dict)  # feature -> number of classes
    strength: dict[str, list[float]] = field(default_factory=dict)  # feature -> the C chosen per layer
    skipped: dict[str, str] = field(default_factory=dict)  # feature -> why it was not probed
    seed: int = 0

    def best(self, feature: str) -> tuple[str, float]:
        """(layer, accuracy) of the layer where ``feature`` is read best."""
        acc = self.accuracy[feature]
        i = int(np.argmax(acc))
        return self.layers[i], acc[i]

    def table(self) -> str:
        """Markdown: one row per layer, one column per feature, then the chance and control rows."""
        names = list(self.accuracy)
        lines = ["| layer | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for i, layer in enumerate(self.layers):
            lines.append(f"| {layer} | " + " | ".join(f"{self.accuracy[f][i]:.3f}" for f in names) + " |")
        lines.append("| chance (majority class) | " + " | ".join(f"{self.chance[f]:.3f}" for f in names) + " |")
        lines.append("| control: shuffled labels, mean over layers | "
                     + " | ".join(f"{float(np.mean(self.control[f])):.3f}" for f in names) + " |")
        return "\n".join(lines)

    def plot(self, path: Path | str, title: str = "") -> Path:
        """Accuracy per layer for each feature (one panel each), with the chance line and the
        shuffled-label control."""
        plt = pyplot()

        names = list(self.accuracy)
        if not names:
            raise ConfigError("no feature could be probed, so there is nothing to plot.")
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), dpi=110, squeeze=False)
        x = np.arange(len(self.layers))
        for ax, name in zip(axes[0], names):
            ax.plot(x, self.accuracy[name], "o-", color="tab:blue", label="probe")
            ax.plot(x, self.control[name], "s:", color="tab:orange", label="control (shuffled labels)")
            ax.axhline(self.chance[name], color="grey", linestyle="--", label="chance (majority class)")
            low = min(self.chance[name], min(self.control[name]), min(self.accuracy[name]))
            ax.set_ylim(max(0.0, low - 0.05), 1.005)
            ax.set_xticks(x)
            ax.set_xticklabels(self.layers, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel("test accuracy")
            train, test = self.counts[name]
            ax.set_title(f"{name}\n({train} train / {test} test tokens)", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7, loc="lower right")
        fig.suptitle(title or "linear probes per layer")
        fig.tight_layout()
        return save_figure(fig, path)


def split_blocks(n: int, block: int, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask (n,): contiguous blocks of ``block`` tokens, a seeded ``test_fraction`` of
    them (at least one, and at least one left to train on) held out."""
    if block < 1:
        raise ConfigError(f"the probe block must be a positive number of tokens, got {block}.")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"the probe test fraction must lie strictly between 0 and 1, got {test_fraction}.")
    n_blocks = -(-n // block)
    if n_blocks < 2:
        raise ConfigError(f"probing needs at least two blocks of {block} tokens to split into train and test, "
                          f"got {n} tokens.")
    order = np.random.default_rng(seed).permutation(n_blocks)
    held = order[: min(n_blocks - 1, max(1, round(test_fraction * n_blocks)))]
    return np.isin(np.arange(n) // block, held)


STRENGTHS = (0.01, 0.1, 1.0)  # inverse L2 strengths C tried per probe, the strongest regularisation first


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    clf = make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", C=c, max_iter=max_iter))
    # one thread: a problem this small is all threading overhead otherwise (100x slower on 2 busy cores)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe stopped early is still a probe
        return clf.fit(x, y)


def _accuracy(clf, x: np.ndarray, y: np.ndarray) -> float:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return float(clf.score(x, y))


def _probe_one(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray,
               max_iter: int) -> tuple[float, float]:
    """(test accuracy, chosen C) of one probe: C chosen on the validation tokens (a part of the
    training tokens) by a fit on the rest, then refitted on all training tokens."""
    fit = train & ~val
    c = STRENGTHS[-1]
    if val.any() and len(np.unique(y[fit])) >= 2:
        scores = [_accuracy(_fit(x[fit], y[fit], s, max_iter), x[val], y[val]) for s in STRENGTHS]
        c = STRENGTHS[int(np.argmax(scores))]  # ties go to the stronger regularisation
    return _accuracy(_fit(x[train], y[train], c, max_iter), x[test], y[test]), c


def probe_stream(stream: Tensor, labels: Mapping[str, Sequence[int] | np.ndarray], *, block: int = 64,
                 test_fraction: float = 0.25, seed: int = 0, max_iter: int = 300) -> ProbeResult:
    """Fit a probe per layer of ``stream`` (L + 1, N, d) for each feature of ``labels`` (name -> (N,)
    ints, -1 = unlabelled), on the block split of ``split_blocks``, with the shuffled-label control.
    Each probe's L2 strength is chosen from ``STRENGTHS`` on a seeded quarter of the training blocks.
    A feature with fewer than two classes among its training or test tokens is skipped (with the
    reason in ``skipped``)."""
    n_layers, n, _ = stream.shape
    test = split_blocks(n, block, test_fraction, seed)
    blocks = np.arange(n) // block
    train_blocks = np.unique(blocks[~test])
    picked = np.random.default_rng(seed + 2).permutation(train_blocks)[: max(1, round(len(train_blocks) / 4))]
    val = np.isin(blocks, picked) if len(train_blocks) >= 2 else np.zeros(n, dtype=bool)
    x = stream.numpy()
    result = ProbeResult(layers=layer_names(n_layers - 1), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, raw in labels.items():
        y = np.asarray(raw, dtype=np.int64).reshape(-1)
        if y.shape[0] != n:
            raise ConfigError(f"the labels of {name!r} cover {y.shape[0]} tokens, not the {n} probed.")
        labelled = y >= 0
        tr, te = labelled & ~test, labelled & test
        if len(np.unique(y[tr])) < 2 or len(np.unique(y[te])) < 2:
            result.skipped[name] = "fewer than two classes among its labelled train or test tokens"
            continue
        shuffled = y.copy()
        for part in (tr, te):  # within each side: both keep their class balance, so chance stays the same
            shuffled[part] = rng.permutation(y[part])
        _, counts = np.unique(y[te], return_counts=True)
        result.chance[name] = float(counts.max() / counts.sum())
        fits = [_probe_one(x[i], y, tr, val & tr, te, max_iter) for i in range(n_layers)]
        result.accuracy[name] = [a for a, _ in fits]
        result.strength[name] = [c for _, c in fits]
        result.control[name] = [_probe_one(x[i], shuffled, tr, val & tr, te, max_iter)[0] for i in range(n_layers)]
        result.counts[name] = (int(tr.sum()), int(te.sum()))
        result.classes[name] = int(len(np.unique(y[labelled])))
    return result


def probe(model: nn.Module, tokens: Sequence[int] | Tensor, labels: Mapping[str, Sequence[int] | np.ndarray], *,
          window: int | None = None, block: int = 64, test_fraction: float = 0.25, seed: int = 0,
          max_iter: int = 300) -> ProbeResult:
    """Linear probes of ``model`` (decoder, encoder, or an encoder-decoder's encoder) for per-token
    ``labels`` (name -> (N,) ints, -1 = unlabelled) of a token stream ``tokens`` (N,): the residual
    stream of every layer (``residual_stream``, in windows of ``window`` tokens), then a seeded
    block-split logistic regression per layer and feature (``probe_stream``)."""
    stream = residual_stream(model, tokens, window=window)
    return probe_stream(stream, labels, block=block, test_fraction=test_fraction, seed=seed, max_iter=max_iter)


def encode_prefix(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of ``text`` (only a prefix of a long text is encoded)."""
    chars = max_tokens * 8
    while True:
        ids = list(tokenizer.encode(text[:chars]))
        if len(ids) >= max_tokens or chars >= len(text):
            return ids[:max_tokens]
        chars *= 4


__all__ = ["BYTE_FEATURES", "FEATURES", "STRENGTHS", "WORD_FEATURES", "ProbeResult", "encode_prefix", "layer_names",
           "max_window", "probe", "probe_stream", "residual_stream", "speaker_spans", "split_blocks",
           "token_features", "token_pieces"]
