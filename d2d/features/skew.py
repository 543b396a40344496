"""Skew check: what the online service answers against the offline recomputation from the log at
the same (entities, time, watermark). By construction they are equal; this proves it for a sample."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from d2d.client import FeatureClient
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


async def verify(
    log: EventLog,
    online: FeatureClient,
    views: Sequence[FeatureView],
    rows: Sequence[dict[str, str]],
    as_of: datetime,
    *,
    batch: int = 500,
) -> SkewReport:
    """Ask the online service for every feature of `views` for `rows` as of `as_of`, recompute
    each answer offline at the watermark it reported, and list every value that differs."""
    report = SkewReport()
    features = [f"{v.name}.*" for v in views]
    for start in range(0, len(rows), batch):
        part = list(rows[start : start + batch])
        answer = await online.get_online(features, part, as_of=as_of)
        report.watermark = answer.watermark
        frame = await training_frame(log, views, [FrameRow(keys, as_of, answer.watermark) for keys in part])
        for i, keys in enumerate(part):
            for name, value in answer.rows[i].items():
                report.checked_values += 1
                offline_value = frame.at[i, name]
                if not _same(value, offline_value):
                    report.mismatches.append((keys, name, value, offline_value))
        report.checked_rows += len(part)
    return report
