"""Passages: texts split at blank lines into pieces of a bounded length, for search and classification."""

from __future__ import annotations


def split_passages(text: str, *, max_chars: int = 600, min_chars: int = 40) -> list[str]:
    """Paragraphs (blank-line separated) merged until a passage would exceed ``max_chars``; a single
    longer paragraph is cut at line breaks. Passages shorter than ``min_chars`` are dropped."""
    out: list[str] = []
    current = ""
    for para in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not para:
            continue
        pieces = [para]
        if len(para) > max_chars:  # cut at line breaks into pieces that fit
            pieces, piece = [], ""
            for line in para.split("\n"):
                if piece and len(piece) + len(line) + 1 > max_chars:
                    pieces.append(piece)
                    piece = ""
                piece = f"{piece}\n{line}" if piece else line
            pieces.append(piece)
        for piece in pieces:
            if current and len(current) + len(piece) + 2 > max_chars:
                out.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        out.append(current)
    return [p for p in out if len(p) >= min_chars]
