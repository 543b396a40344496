"""One self-contained HTML page: plotly.js inline once, then each section's figure or its reason.

Nothing on the page is fetched: no script, style or font comes from the network, so it opens from a
file on a machine that has none. Each plot sits in `<div data-plot="KEY">`, a name that stays the same
from one report to the next (what the browser test looks for).
"""

from __future__ import annotations

import html
from pathlib import Path

import plotly.io as pio
from plotly.offline import get_plotlyjs

from d2d.report.figures import Section
from d2d.report.gather import ReportData

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
section { margin: 2.5rem 0; } .about { color: #444; max-width: 80ch; }
.missing { padding: 1rem; background: #f6f6f6; border-left: 4px solid #bbb; color: #555; }
nav a { margin-right: 1rem; }
"""


def _section_html(section: Section) -> str:
    title = html.escape(section.title)
    about = html.escape(section.about)
    if section.figure is None:
        body = f'<p class="missing" data-missing="{section.key}">no data yet: {html.escape(section.missing or "")}</p>'
    else:
        plot = pio.to_html(
            section.figure, include_plotlyjs=False, full_html=False, div_id=f"plot-{section.key}",
            config={"displaylogo": False, "responsive": True},
        )  # fmt: skip
        body = f'<div data-plot="{section.key}">{plot}</div>'
    return f'<section id="{section.key}"><h2>{title}</h2><p class="about">{about}</p>{body}</section>'


def render(data: ReportData, sections: list[Section]) -> str:
    """The whole page as one string."""
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    meta = (
        f"Generated {data.generated_at:%Y-%m-%d %H:%M:%S} UTC from the log up to seq {data.head_seq:,} "
        f"({sum(data.event_counts.values()):,} events)."
    )
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>Data2Data report</title>", f"<style>{STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head><body>",
        "<h1>Data2Data report</h1>", f'<p class="meta">{html.escape(meta)}</p>', f"<nav>{nav}</nav>",
        *(_section_html(s) for s in sections), "</body></html>",
    ])  # fmt: skip


def write(path: Path, data: ReportData, sections: list[Section]) -> Path:
    path.write_text(render(data, sections), encoding="utf-8")
    return path
