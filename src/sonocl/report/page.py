"""The HTML of the `sonocl report` page: `Section` (an anchor, a heading, its body and its subsections), figures as
inline PNGs, tables, the style, and `render_page`, which writes the whole page with its table of contents."""

from __future__ import annotations

import base64
import html
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Section:
    """One part of the page: an anchor, a heading and its HTML body."""

    anchor: str
    title: str
    body: list[str] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.body.append(f"<p>{html.escape(text)}</p>")

    def note(self, text: str) -> None:
        self.body.append(f'<p class="note">{html.escape(text)}</p>')

    def figure(self, png: bytes, caption: str, alt: str | None = None) -> None:
        self.body.append(figure_html(png, caption, alt))

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> None:
        self.body.append(table_html(header, rows, caption))

    def render(self, level: int = 2) -> str:
        inner = "\n".join(self.body + [child.render(level + 1) for child in self.children])
        return f'<section id="{self.anchor}">\n<h{level}>{html.escape(self.title)}</h{level}>\n{inner}\n</section>'


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG image")
    return struct.unpack(">II", png[16:24])


def figure_html(png: bytes, caption: str, alt: str | None = None) -> str:
    """An ``<img>`` with the PNG inline and its intrinsic size (CSS scales it down, keeping the aspect ratio)."""
    width, height = png_size(png)
    data = base64.b64encode(png).decode("ascii")
    alt_text = html.escape(alt or caption, quote=True)
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="{alt_text}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table_html(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


GENERATOR = '<meta name="generator" content="sonocl report">'
"""The page's mark: `is_report` recognises a page sonocl wrote, which a rerun may replace."""

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 24px 48px; color: #1a1a1a; line-height: 1.45; }
h1 { margin-top: 24px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 40px; }
h3 { margin-top: 28px; } nav li { margin: 2px 0; } .meta, .note, figcaption { color: #555; font-size: 0.92em; }
.note { background: #f6f6f0; border-left: 3px solid #E69F00; padding: 6px 10px; }
figure { margin: 16px 0; } img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; } td { white-space: nowrap; } th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; } caption { text-align: left; color: #555; padding: 4px 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; } .gallery figure { margin: 0; max-width: 280px; }
"""


def render_page(title: str, intro: list[str], sections: list[Section]) -> str:
    toc = "".join(
        f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a>'
        + (
            "<ul>" + "".join(f'<li><a href="#{c.anchor}">{html.escape(c.title)}</a></li>' for c in s.children) + "</ul>"
            if s.children
            else ""
        )
        + "</li>"
        for s in sections
    )
    body = "\n".join(section.render() for section in sections)
    paragraphs = "".join(f'<p class="meta">{html.escape(line)}</p>' for line in intro)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"{GENERATOR}\n<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{paragraphs}\n<nav><ul>{toc}</ul></nav>\n{body}\n</body>\n</html>\n"
    )


def anchor(kind: str, path: Path) -> str:
    """The page anchor of the ``kind`` section of ``path``: its name, and a hash of its full path that keeps two
    folders of one name apart."""
    safe = "".join(c if c.isalnum() else "-" for c in path.name)
    return f"{kind}-{safe}-{zlib.crc32(str(path.resolve()).encode()) % 10_000:04d}"
