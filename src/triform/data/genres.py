"""Genre classification of Shakespeare passages: comedy, history or tragedy, by play.

Labels come from the First Folio grouping of the plays (``PLAY_GENRES``); the poems carry no genre
and are left out. Whole plays are held out for testing (by default the corpus's validation plays:
hamlet, twelfth_night, richard_ii, winters_tale — one or more of each genre), so a classifier must
recognise a genre's language in plays it has never seen, not memorise characters' names.
"""

from __future__ import annotations

import random

from triform.data.shakespeare import PLAY_GENRES, VAL_PLAYS, fetch_shakespeare
from triform.data.passages import split_passages

GENRES = ("comedy", "history", "tragedy")


def genre_passages(
    *, max_chars: int = 300, held_out: tuple[str, ...] = VAL_PLAYS, per_play: int | None = None, seed: int = 0,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) lists of (passage, genre): passages of up to ``max_chars`` characters, at most
    ``per_play`` from each play (a seeded random sample), test passages from the ``held_out`` plays."""
    directory = fetch_shakespeare(quiet=True)
    rng = random.Random(seed)
    train: list[tuple[str, str]] = []
    test: list[tuple[str, str]] = []
    for play, genre in sorted(PLAY_GENRES.items()):
        if genre not in GENRES:
            continue
        text = (directory / f"{play}.txt").read_text(encoding="utf-8", errors="replace")
        passages = split_passages(text, max_chars=max_chars, min_chars=80)
        if per_play is not None and len(passages) > per_play:
            passages = rng.sample(passages, per_play)
        (test if play in held_out else train).extend((p, genre) for p in passages)
    rng.shuffle(train)
    return train, test
