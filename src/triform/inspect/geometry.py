"""Embedding geometry: the token embedding matrix E (V x d) as a space of token vectors.

``neighbours`` ranks tokens by cosine similarity to one token's row of E; ``pca_map`` projects E
onto its first two principal components and draws every token there (byte-level models coloured by
the byte's class: lower- and upper-case letter, digit, punctuation, whitespace, other bytes and
special tokens; BPE vocabularies with the commonest word-like tokens labelled); ``untied_agreement``
compares E with the unembedding U when the model keeps them separate (cosine of each token's two
rows, and how often their nearest neighbours agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from triform.errors import ConfigError
from triform.inspect.plotting import pyplot, save_figure

BYTE_CLASSES = ("lower-case letter", "upper-case letter", "digit", "punctuation", "whitespace", "other byte", "special")
CLASS_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#999999")


def embedding_matrix(model: nn.Module) -> Tensor:
    """E, the token embedding matrix (V x e) of a decoder, an encoder or an encoder-decoder."""
    for path in ("tok_emb", "shared", "encoder.embeddings.word", "embeddings.word"):
        m = model
        for attr in path.split("."):
            m = getattr(m, attr, None)
            if m is None:
                break
        if isinstance(m, nn.Embedding):
            return m.weight.detach().float()
    raise ConfigError(f"{type(model).__name__} has no token embedding matrix to inspect.")


def unembedding_matrix(model: nn.Module) -> Tensor | None:
    """U (V x d), the output projection, when it is not tied to E; None when tied or absent."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        return None
    if head.weight.data_ptr() == embedding_matrix(model).data_ptr() or head.weight is getattr(
            getattr(model, "tok_emb", None), "weight", None):
        return None
    return head.weight.detach().float()


def vocabulary_size(tokenizer) -> int:
    """How many token ids the tokenizer names (its byte table, or its pieces for WordPiece)."""
    if hasattr(tokenizer, "token_bytes"):
        return len(tokenizer.token_bytes())
    if hasattr(tokenizer, "pieces"):
        return tokenizer.vocab_size
    raise ConfigError(f"the {type(tokenizer).__name__} lists neither its tokens' bytes nor its pieces.")


def token_labels(tokenizer) -> list[str]:
    """``token_label`` of every id, at once."""
    if hasattr(tokenizer, "token_bytes"):
        return [_bytes_label(raw, i) for i, raw in enumerate(tokenizer.token_bytes())]
    vocabulary_size(tokenizer)  # the one sentence for a tokenizer that names neither
    return tokenizer.pieces()


def token_label(tokenizer, i: int) -> str:
    """A printable form of token ``i``: its bytes as text where they decode, else escaped; a
    WordPiece token as its piece (``##ing``, ``[CLS]``)."""
    if i >= vocabulary_size(tokenizer):
        return f"<{i}>"
    if not hasattr(tokenizer, "token_bytes"):
        return tokenizer.tokens([i])[0]
    return _bytes_label(tokenizer.token_bytes()[i], i)


def _bytes_label(raw: bytes, i: int) -> str:
    if not raw:
        return f"<special {i}>"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def byte_class(raw: bytes) -> int:
    """Index into BYTE_CLASSES for a byte-level token's bytes."""
    if len(raw) != 1:
        return BYTE_CLASSES.index("special")
    c = chr(raw[0])
    if raw[0] >= 128:
        return BYTE_CLASSES.index("other byte")
    if c.islower():
        return 0
    if c.isupper():
        return 1
    if c.isdigit():
        return 2
    if c.isspace():
        return 4
    if c.isprintable():
        return 3
    return BYTE_CLASSES.index("other byte")


@dataclass
class Neighbour:
    token: int
    label: str
    cosine: float


def find_token(tokenizer, text: str) -> int:
    """The id of ``text`` as one token (a byte, a BPE piece, a word piece); a ConfigError if it is
    several. Special tokens a tokenizer adds around every text ([CLS], [SEP]) do not count."""
    special = getattr(tokenizer, "special_ids", set()) if hasattr(tokenizer, "pieces") else set()
    ids = [i for i in tokenizer.encode(text) if i not in special]
    if len(ids) != 1:
        raise ConfigError(f"{text!r} is {len(ids)} tokens for this tokenizer; give one token "
                          f"(e.g. {token_label(tokenizer, ids[0])!r})." if ids else f"{text!r} encodes to no token.")
    return ids[0]


def neighbours(model: nn.Module, tokenizer, token: int | str, k: int = 10, *, matrix: Tensor | None = None) -> list[Neighbour]:
    """The ``k`` tokens whose rows of E (or ``matrix``) are most cosine-similar to ``token``'s."""
    E = embedding_matrix(model) if matrix is None else matrix
    V = min(E.shape[0], vocabulary_size(tokenizer))
    idx = find_token(tokenizer, token) if isinstance(token, str) else int(token)
    if not 0 <= idx < V:
        raise ConfigError(f"token id {idx} is outside the vocabulary of {V}.")
    unit = torch.nn.functional.normalize(E[:V], dim=-1)
    sims = unit @ unit[idx]
    sims[idx] = -2.0
    top = torch.topk(sims, min(k, V - 1))
    return [Neighbour(int(i), token_label(tokenizer, int(i)), float(s)) for s, i in zip(top.values, top.indices)]


def pca(E: Tensor, components: int = 2) -> tuple[Tensor, Tensor]:
    """(coordinates V x components, explained variance ratios) of E's rows, centred."""
    X = E - E.mean(0, keepdim=True)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    var = S**2
    return X @ Vh[:components].T, var[:components] / var.sum()


def pca_map(model: nn.Module, tokenizer, path: Path | str, *, title: str = "", labels: int = 40) -> Path:
    """Save a 2-D PCA map of E to ``path``. Byte-level vocabularies: every byte, coloured by class
    and drawn as its character. Larger vocabularies: every token as a point, with ``labels`` of the
    commonest word-like tokens (the lowest ids of a BPE merge order) written out."""
    plt = pyplot()

    names = token_labels(tokenizer)
    E = embedding_matrix(model)[: len(names)]
    xy, ratio = pca(E)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    byte_level = len(names) <= 512 and hasattr(tokenizer, "token_bytes")
    if byte_level:
        table = tokenizer.token_bytes()
        classes = [byte_class(b) for b in table]
        for c, (name, colour) in enumerate(zip(BYTE_CLASSES, CLASS_COLOURS)):
            pts = [i for i, k in enumerate(classes) if k == c]
            if pts:
                ax.scatter(xy[pts, 0], xy[pts, 1], s=14, color=colour, label=name, alpha=0.8)
        for i, raw in enumerate(table):
            if len(raw) == 1 and 33 <= raw[0] < 127:
                ax.annotate(chr(raw[0]), (float(xy[i, 0]), float(xy[i, 1])), fontsize=7, ha="center", va="bottom")
        ax.legend(fontsize=8)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.3, color="#4c72b0")
        shown = 0
        for i, name in enumerate(names):
            text = name.strip()
            if len(text) >= 3 and text.isalpha() and shown < labels:
                ax.annotate(text, (float(xy[i, 0]), float(xy[i, 1])), fontsize=7)
                shown += 1
    ax.set_xlabel(f"PC1 ({100 * float(ratio[0]):.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * float(ratio[1]):.1f}% of variance)")
    ax.set_title(title or f"token embeddings E ({E.shape[0]} x {E.shape[1]})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def untied_agreement(model: nn.Module, k: int = 10) -> dict[str, float] | None:
    """For an untied model: the mean cosine between each token's E and U rows, and the mean
    overlap of their k nearest neighbours (1.0 = the same neighbours); None when tied."""
    U = unembedding_matrix(model)
    if U is None:
        return None
    E = embedding_matrix(model)
    V = min(E.shape[0], U.shape[0])
    if E.shape[1] != U.shape[1]:
        return None
    e, u = torch.nn.functional.normalize(E[:V], dim=-1), torch.nn.functional.normalize(U[:V], dim=-1)
    cos = (e * u).sum(-1)
    sample = torch.arange(0, V, max(1, V // 512))
    se, su = e[sample] @ e.T, u[sample] @ u.T
    se[torch.arange(len(sample)), sample] = -2
    su[torch.arange(len(sample)), sample] = -2
    ne, nu = se.topk(k).indices, su.topk(k).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ne, nu)])
    return {"mean_cosine": float(cos.mean()), "neighbour_overlap": float(overlap.mean())}


__all__ = ["embedding_matrix", "unembedding_matrix", "neighbours", "pca", "pca_map", "untied_agreement",
           "find_token", "token_label", "token_labels", "vocabulary_size", "byte_class", "BYTE_CLASSES", "Neighbour"]
