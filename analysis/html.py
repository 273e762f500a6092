"""One document, two renderings: `report.md` (figures as files beside it) and a self-contained
`index.html` (figures embedded as base64 PNG data URIs, no external resource: opens offline)."""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rbm_study.analysis.figures import FigureFile


@dataclass
class Block:
    kind: str  # heading, text, note, table, figure
    text: str = ""
    level: int = 2
    table: pd.DataFrame | None = None
    figure: FigureFile | None = None
    label: str = ""


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Block("heading", text, level=level))

    def text(self, text: str) -> None:
        self.blocks.append(Block("text", text))

    def note(self, text: str, label: str = "Not shown") -> None:
        """Something the report cannot show (yet) and why, or (another label) a caveat."""
        self.blocks.append(Block("note", text, table=None, figure=None, level=0, label=label))

    def table(self, table: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(Block("table", caption, table=table))

    def figure(self, figure: FigureFile | None) -> None:
        if figure is not None:
            self.blocks.append(Block("figure", figure.caption, figure=figure))

    def figures(self) -> list[FigureFile]:
        return [b.figure for b in self.blocks if b.figure is not None]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.2f}"
    return "" if value is None else str(value)


# --- markdown ------------------------------------------------------------------------------------
def to_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if b.kind == "heading":
            lines += ["#" * b.level + " " + b.text, ""]
        elif b.kind == "text":
            lines += [b.text, ""]
        elif b.kind == "note":
            lines += [f"> **{b.label}:** {b.text}", ""]
        elif b.kind == "table" and b.table is not None:
            if b.text:
                lines += [f"*{b.text}*", ""]
            lines += [*_md_table(b.table), ""]
        elif b.kind == "figure" and b.figure is not None:
            lines += [f"![{b.figure.title}]({b.figure.name})", ""]
            if b.figure.caption:
                lines += [f"*{b.figure.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_table(table: pd.DataFrame) -> list[str]:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(esc(str(c)) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(esc(_cell(v)) for v in row) + " |" for row in table.itertuples(index=False)]
    return [header, rule, *body]


# --- html ----------------------------------------------------------------------------------------
STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; color: #1c1c1c; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 0.86em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: right; }
th { background: #eef2f6; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; }
.note { background: #fff6dd; border-left: 4px solid #e0a800; padding: .5em .8em; margin: 1em 0; }
.caption { font-style: italic; color: #444; }
"""


def _inline(text: str) -> str:
    """Escape, then the two bits of markdown the report's prose uses: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def to_html(doc: Document) -> str:
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(doc.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for b in doc.blocks:
        if b.kind == "heading":
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif b.kind == "text":
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "note":
            parts.append(f"<p class='note'><strong>{html.escape(b.label)}:</strong> {_inline(b.text)}</p>")
        elif b.kind == "table" and b.table is not None:
            if b.text:
                parts.append(f"<p class='caption'>{_inline(b.text)}</p>")
            table = b.table.map(_cell) if hasattr(b.table, "map") else b.table
            parts.append(table.to_html(index=False, escape=True, border=0))
        elif b.kind == "figure" and b.figure is not None:
            data = base64.b64encode(b.figure.path.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(b.figure.title, quote=True)}' "
                f"src='data:image/png;base64,{data}'>"
                + (f"<figcaption>{_inline(b.figure.caption)}</figcaption>" if b.figure.caption else "")
                + "</figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write(doc: Document, out: Path) -> tuple[Path, Path]:
    """report.md, index.html and figures.json (each figure's file, title and tile grids)."""
    md, index = out / "report.md", out / "index.html"
    md.write_text(to_markdown(doc), encoding="utf-8")
    index.write_text(to_html(doc), encoding="utf-8")
    manifest = [{"file": f.name, "title": f.title, "grids": [list(g) for g in f.grids],
                 "tile_shapes": [list(t) for t in f.tile_shapes]} for f in doc.figures()]
    (out / "figures.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return md, index
