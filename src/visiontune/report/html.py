"""HTML building blocks of the report: the page, sections, tables, figures, thumbnails."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;
background:#f6f8fa}
main{max-width:1200px;margin:0 auto;padding:16px 24px 64px}
h1{font-size:1.6em;margin:.6em 0 .2em}h2{font-size:1.25em;margin:0 0 .6em}
h3{font-size:1.05em;margin:1em 0 .4em}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;
margin:16px 0}
nav a{margin-right:12px;font-size:.9em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fired td{background:#fff1f0}tr.na td{color:#6e7781}
.note{color:#57606a;font-style:italic}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:.8em;color:#fff}
.badge.fired{background:#cf222e}.badge.ok{background:#1a7f37}.badge.na{background:#8c959f}
.thumbs{display:flex;flex-wrap:wrap;gap:12px}
.thumbs figure{margin:0;width:140px;font-size:.8em;text-align:center}
.thumbs img{width:128px;height:128px;object-fit:cover;border:1px solid #d0d7de}
.fig{min-height:200px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A cell's text: numbers rounded, None and NaN as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.3g}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(1, digits - 2)}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v, digits)}" for k, v in value.items())
    return str(value)


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    row_classes: Sequence[str] | None = None,
    raw_columns: Sequence[int] = (),
) -> str:
    """An HTML table; numbers right-aligned. Columns in ``raw_columns`` hold trusted HTML."""
    out = ["<table>"]
    if headers:
        out += ["<thead><tr>", *(f"<th>{esc(h)}</th>" for h in headers), "</tr></thead>"]
    out.append("<tbody>")
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes and i < len(row_classes) else ""
        out.append(f'<tr class="{esc(cls)}">' if cls else "<tr>")
        for j, cell in enumerate(row):
            if j in raw_columns:
                out.append(f"<td>{cell}</td>")
            elif isinstance(cell, (int, float)) and not isinstance(cell, bool):
                out.append(f'<td class="num">{esc(fmt(cell))}</td>')
            else:
                out.append(f"<td>{esc(fmt(cell))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of names and values, with no header row."""
    return table((), [(k, v) for k, v in pairs])


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(sid: str, title: str, body: str) -> str:
    return (
        f'<section id="{esc(sid)}" data-section="{esc(sid)}"><h2>{esc(title)}</h2>{body}</section>'
    )


def figure_html(fig: Any, height: int = 380) -> str:
    """A plotly figure as a div and its script; plotly.js itself is inlined once by :func:`page`."""
    import plotly.io as pio

    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=50, b=50))
    return (
        '<div class="fig">'
        + pio.to_html(
            fig,
            include_plotlyjs=False,
            include_mathjax=False,
            full_html=False,
            config={"displaylogo": False, "responsive": True},
            default_height=f"{height}px",
        )
        + "</div>"
    )


def thumbnail_data_uri(path: str, size: int = 128) -> str | None:
    """A JPEG thumbnail of an image file as a ``data:`` URI, or ``None`` if it cannot be read."""
    import io

    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def page(title: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    """The whole document, with plotly.js inlined once in the head."""
    from plotly.offline import get_plotlyjs

    links = "".join(f'<a href="#{esc(sid)}">{esc(name)}</a>' for sid, name in nav)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        # No request may leave the page: forbid every remote source outright.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
        'img-src data: blob:; font-src data:">'
        f"<style>{CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script>'
        f"</head><body><main><h1>{esc(title)}</h1><nav>{links}</nav>{body}</main></body></html>"
    )
