"""Freshness of the features service: how far its watermark trails the log, in events and in
seconds (how long the oldest event it has not folded has been in the log). A breach appends one
`quality.alert` (kind `feature_freshness`) with its numbers; the next comes only after the service
has been fresh again. Unlike the monitor's checks this one is about the running platform, so it
runs on the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from d2d.client import FeatureClient
from d2d.eventlog import EventLog, quality_alert

log = logging.getLogger(__name__)
FRESHNESS_NAMESPACE = uuid.UUID("0b8e4a40-3d51-4bde-9d1f-0d2d0d2d0f7e")


@dataclass
class FreshnessCheck:
    max_lag_seconds: float = 60.0
    stale: bool = False  # in a breach already alerted

    def observe(self, now: datetime, watermark: int, head: int, oldest_unfolded_at: datetime | None) -> dict | None:
        """The alert payload when the features service has just become stale, else None."""
        lag = (now - oldest_unfolded_at).total_seconds() if watermark < head and oldest_unfolded_at else 0.0
        if lag <= self.max_lag_seconds:
            self.stale = False
            return None
        if self.stale:
            return None
        self.stale = True
        return {
            "kind": "feature_freshness", "source": "features", "watermark": watermark, "head": head,
            "lag_events": head - watermark, "lag_seconds": round(lag, 3), "max_lag_seconds": self.max_lag_seconds,
        }  # fmt: skip


async def watch(
    event_log: EventLog, features_addr: str, stop: asyncio.Event, *, every: float = 10.0, max_lag_seconds: float = 60.0
) -> None:
    """Check the features service's watermark every `every` seconds until `stop`."""
    check = FreshnessCheck(max_lag_seconds)
    async with FeatureClient(features_addr) as features:
        while not stop.is_set():
            try:
                alert = await _check(event_log, features, check)
                if alert is not None:
                    event_id = uuid.uuid5(FRESHNESS_NAMESPACE, f"{alert['watermark']}/{alert['head']}")
                    await event_log.append([quality_alert(event_id, "quality", "features", alert, "feedback")])
                    log.warning("feedback: the features service is %.0f s behind the log", alert["lag_seconds"])
            except Exception as exc:  # the features service or Postgres away: check again later
                log.info("feedback: freshness not checked (%r)", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)


async def _check(event_log: EventLog, features: FeatureClient, check: FreshnessCheck) -> dict[str, Any] | None:
    views = await features.list_views()
    if not views:
        return None
    view = views[0]
    answer = await features.get_online([f"{view.name.removeprefix('featureViews/')}.*"], [{view.entity: "-"}])
    head = await event_log.head()
    oldest = await event_log.read(answer.watermark, 1) if answer.watermark < head else []
    return check.observe(datetime.now(UTC), answer.watermark, head, oldest[0].recorded_at if oldest else None)
