"""Skew check: what the online path answers against the offline recomputation from the log at the
same (entities, time, watermark). By construction they are equal; this proves it for a sample. The
features service runs it (`CheckFeatureSkew`) against its own in-memory state and its log pool."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from d2d.eventlog import EventLog
from d2d.features.definitions import FeatureView
from d2d.features.offline import FrameRow, training_frame


@dataclass
class SkewReport:
    checked_rows: int = 0
    checked_values: int = 0
    watermark: int = 0
    mismatches: list[tuple[dict[str, str], str, Any, Any]] = field(
        default_factory=list
    )  # keys, feature, online, offline


def _same(a: Any, b: Any) -> bool:
    a = None if isinstance(a, float) and math.isnan(a) else a
    b = None if isinstance(b, float) and math.isnan(b) else b
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


class OnlineSide(Protocol):
    """What the online path answers for `rows` (each at its own `as_of`): one `{view}.{feature}` ->
    value dict per row (a view may be left out of a row), and the log position they all reflect."""

    async def __call__(
        self, views: Sequence[FeatureView], rows: Sequence[FrameRow]
    ) -> tuple[int, list[dict[str, Any]]]: ...


async def verify(
    log: EventLog, online: OnlineSide, views: Sequence[FeatureView], rows: Sequence[FrameRow]
) -> SkewReport:
    """Ask the online side for `views` at `rows`, recompute each answer offline at the watermark it
    reported, and list every value that differs."""
    report = SkewReport(checked_rows=len(rows))
    watermark, answers = await online(views, rows)
    report.watermark = watermark
    frame = await training_frame(log, views, [FrameRow(r.keys, r.as_of, watermark) for r in rows])
    for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        for name, value in answer.items():
            report.checked_values += 1
            offline_value = frame.at[i, name]
            if not _same(value, offline_value):
                report.mismatches.append((row.keys, name, value, offline_value))
    return report
