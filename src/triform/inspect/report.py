"""One offline HTML page of everything ``triform inspect`` found about a model.

The page is a single self-contained file: pictures are embedded as base64 ``data:`` URIs, the style
sheet is inline, there is no script at all and no external address anywhere (a Content-Security-
Policy in the page forbids loading anything but its own inline style and data images), so it opens
the same from a laptop, an e-mail attachment or an archive years later. Every piece of text that
goes in -- an analysis's printed lines, the model's name, the input text -- is HTML-escaped.

An analysis contributes a ``Section``: its printed output (lines of text and the markdown tables the
analyses print, which become HTML tables), its pictures, or the reason it did not run.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from triform.errors import ConfigError

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 72rem; margin: 2rem auto;
       padding: 0 1.5rem; color: #1d232a; background: #fcfcfd; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; border-bottom: 1px solid #d5dae0; padding-bottom: 0.2rem; margin-top: 2.4rem; }
.meta { color: #4a5560; margin: 0.1rem 0; }
pre.input { background: #f1f3f5; border: 1px solid #d5dae0; padding: 0.6rem 0.8rem; white-space: pre-wrap;
            overflow-wrap: anywhere; }
nav ol { columns: 2; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.88rem; }
th, td { border: 1px solid #d5dae0; padding: 0.2rem 0.55rem; }
th { background: #eef1f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
p.line { margin: 0.25rem 0; overflow-wrap: anywhere; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ea; }
figcaption { color: #4a5560; font-size: 0.85rem; }
.skipped { color: #7a4a00; background: #fff6e5; border-left: 4px solid #e0a030; padding: 0.4rem 0.8rem; }
"""

POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Section:
    """One analysis in the report: its anchor ``key``, heading, printed output (lines and markdown
    tables), pictures, and ``skipped``: why it did not run (None when it ran)."""

    key: str
    title: str
    text: str = ""
    images: list[Path] = field(default_factory=list)
    skipped: str | None = None


def _inline(text: str) -> str:
    """Escape ``text``; ``**bold**`` (as the analyses' tables print totals) becomes <strong>."""
    parts = re.split(r"\*\*(.+?)\*\*", text)
    return "".join(f"<strong>{html.escape(p)}</strong>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(rows: list[str]) -> str:
    header = _cells(rows[0])
    body = rows[1:]
    numeric = [False] * len(header)
    if body and all(re.fullmatch(r":?-{3,}:?", c) for c in _cells(body[0])):
        numeric = [c.endswith(":") for c in _cells(body[0])] + [False] * len(header)
        body = body[1:]

    def cls(i: int) -> str:
        return ' class="num"' if i < len(numeric) and numeric[i] else ""

    out = ["<table>", "<thead><tr>" + "".join(f"<th{cls(i)}>{_inline(c)}</th>" for i, c in enumerate(header))
           + "</tr></thead>", "<tbody>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td{cls(i)}>{_inline(c)}</td>" for i, c in enumerate(_cells(row))) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def text_to_html(text: str) -> str:
    """The printed output of an analysis as HTML: runs of ``|``-lines are markdown tables, every
    other non-empty line a paragraph; ``picture: PATH`` lines are dropped (the pictures are
    embedded as figures)."""
    out: list[str] = []
    table: list[str] = []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        if table:
            out.append(_table(table))
            table = []
        if line.strip() and not line.startswith("picture: "):
            out.append(f'<p class="line">{_inline(line)}</p>')
    return "\n".join(out)


def _figure(path: Path) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"the picture {path} could not be read for the report ({exc.strerror}).") from None
    if not data.startswith(b"\x89PNG"):
        raise ConfigError(f"the picture {path} is not a PNG file.")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    name = html.escape(Path(path).name)
    return f'<figure><img src="{uri}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def render_report(title: str, model: str, text: str, sections: Iterable[Section], *,
                  details: Iterable[str] = ()) -> str:
    """The whole page as a string: ``title``, the ``model``'s name, ``details`` (more lines under
    it), the input ``text``, a table of contents, then one section per analysis (a skipped one shows
    why)."""
    sections = list(sections)
    ran = [s for s in sections if s.skipped is None]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">model: <code>{html.escape(model)}</code></p>',
        *(f'<p class="meta">{html.escape(d)}</p>' for d in details),
        "<p>the text that lens, attention and patching read:</p>",
        f'<pre class="input">{html.escape(text)}</pre>',
        '<nav><h2 id="contents">Contents</h2><ol>',
    ]
    for s in sections:
        note = "" if s.skipped is None else " (did not run)"
        out.append(f'<li><a href="#{html.escape(s.key)}">{html.escape(s.title)}</a>{note}</li>')
    out.append("</ol>")
    skipped = [s for s in sections if s.skipped is not None]
    if skipped:
        out.append(f"<p>{len(ran)} of {len(sections)} analyses ran; the others:</p><ul>")
        out += [f"<li>{html.escape(s.title)}: {html.escape(s.skipped or '')}</li>" for s in skipped]
        out.append("</ul>")
    out.append("</nav>")
    for s in sections:
        out.append(f'<section id="{html.escape(s.key)}">')
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.skipped is not None:
            out.append(f'<p class="skipped">did not run: {html.escape(s.skipped)}</p>')
        if s.text.strip():
            out.append(text_to_html(s.text))
        out += [_figure(p) for p in s.images]
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_report(path: Path | str, title: str, model: str, text: str, sections: Iterable[Section], *,
                 details: Iterable[str] = ()) -> Path:
    """Write ``render_report(...)`` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    page = render_report(title, model, text, sections, details=details)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"the report {path} could not be written ({exc.strerror or type(exc).__name__}).") from None
    return path


__all__ = ["Section", "render_report", "text_to_html", "write_report"]
