"""`d2d report`: one self-contained HTML page of what the platform has done, drawn from the log.

gather (the services' public gRPC APIs) -> figures (plotly figures, pure) -> page (one HTML file with
plotly.js inline, so it opens with no network).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from d2d.report import figures, page
from d2d.report.gather import ReportData, gather


async def write_report(
    path: Path, addrs: Mapping[str, str], *, decision: str | None = None, reward: dict[str, Any] | None = None,
    max_events: int = 100_000,
) -> tuple[Path, ReportData, list[figures.Section]]:  # fmt: skip
    """Gather, draw and write the page to `path`; also returns what was drawn."""
    data = await gather(addrs, decision=decision, reward=reward, max_events=max_events)
    sections = figures.sections(data)
    return page.write(path, data, sections), data, sections
