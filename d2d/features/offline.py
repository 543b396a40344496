"""Point-in-time training frames, computed from the log by the same fold as the online service.

A row asks for features of some entities as of an event time `as_of` and a log position
`watermark`: the values use exactly the events with seq <= watermark and occurred_at <= as_of
(windows end at as_of). That is what the online service answers when its state reflects
`watermark`, so a frame row and an online answer at the same (entities, as_of, watermark) are
equal by construction. A row without a watermark gets the position of the newest event that had
occurred by `as_of`: max{seq : occurred_at <= as_of}, so no value can use an event after the row's
timestamp. One pass over the log answers all rows, in watermark order.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from d2d.contracts.upcasting import upcast_event
from d2d.eventlog import EventLog, StoredEvent
from d2d.features.definitions import FeatureView
from d2d.features.fold import FoldEvent, StaleQueryError, ViewState, fold_event

PAGE = 10_000


@dataclass(frozen=True, slots=True)
class FrameRow:
    keys: dict[str, str]  # entity type -> id
    as_of: datetime
    watermark: int | None = None
    row_id: str | None = None  # e.g. the event the row was made from


async def watermarks_at(log: EventLog, times: Sequence[float]) -> list[int]:
    """max{seq : occurred_at <= t} for each POSIX time t (0 where no event had occurred yet)."""
    async with log.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM occurred_at)::float8, max(seq) OVER (ORDER BY occurred_at, seq)"
            " FROM events ORDER BY occurred_at, seq"
        )
    event_times = [r[0] for r in rows]
    running_max = [r[1] for r in rows]
    found = []
    for t in times:
        i = bisect.bisect_right(event_times, t)
        found.append(running_max[i - 1] if i else 0)
    return found


async def source_events(log: EventLog, types: Sequence[str], to_seq: int | None = None) -> AsyncIterator[StoredEvent]:
    """The log's events of `types` (with seq <= to_seq, when given), as stored, in seq order, page by page."""
    if not types:
        return
    after = 0
    while to_seq is None or after < to_seq:
        page = await log.read(after, PAGE, types=list(types))
        for event in page:
            if to_seq is not None and event.seq > to_seq:
                return
            yield event
        if len(page) < PAGE:
            return
        after = page[-1].seq


# What the fold needs of an event, and nothing else (no ids, metadata or datetimes to build): the
# event time as exact integer microseconds, divided once in Python as `datetime.timestamp()` does.
_FOLD_SELECT = (
    "SELECT seq, type, schema_version, (extract(epoch FROM occurred_at) * 1000000)::int8, payload"
    " FROM events WHERE seq > $1 AND type = ANY($3) ORDER BY seq LIMIT $2"
)


async def fold_pages(
    log: EventLog, types: Sequence[str], to_seq: int | None = None, *, after: int = 0
) -> AsyncIterator[list[FoldEvent]]:
    """The log's events of `types` with seq > after (and <= to_seq, when given) as the fold takes
    them (`fold_event`), in seq order, a page at a time: the same FoldEvents as `source_events`
    gives through `fold_event`, read with less work (for a fold that needs no event ids)."""
    if not types:
        return
    while to_seq is None or after < to_seq:
        async with log.pool.acquire() as conn:
            rows = await conn.fetch(_FOLD_SELECT, after, PAGE, list(types))
        page = [
            fold_event(seq, type_, version, micros / 1_000_000, payload)
            for seq, type_, version, micros, payload in rows
            if to_seq is None or seq <= to_seq
        ]
        if page:
            yield page
        if len(rows) < PAGE or len(page) < len(rows):
            return
        after = rows[-1][0]


async def training_frame(log: EventLog, views: Sequence[FeatureView], rows: Sequence[FrameRow]) -> Any:
    """A pandas DataFrame: the rows' keys, as_of, watermark, one column per `{view}.{feature}`,
    `unknown_entities` (entity types answered with defaults) and `stale` (as_of too far behind the
    view's newest event for an exact answer: values left empty)."""
    states = {v.name: ViewState(v) for v in views}
    by_source: dict[str, list[ViewState]] = {}
    for v in views:
        by_source.setdefault(v.source, []).append(states[v.name])
    times = [r.as_of.timestamp() for r in rows]
    missing = [i for i, r in enumerate(rows) if r.watermark is None]
    resolved = dict(zip(missing, await watermarks_at(log, [times[i] for i in missing]), strict=True)) if missing else {}
    watermarks = [r.watermark if r.watermark is not None else resolved[i] for i, r in enumerate(rows)]
    order = sorted(range(len(rows)), key=lambda i: watermarks[i])

    names = {v.name: v.feature_names() for v in views}
    values: list[list[Any]] = [[] for _ in rows]
    unknown: list[str] = [""] * len(rows)
    stale = [False] * len(rows)
    pages = fold_pages(log, list(by_source))
    page: list[FoldEvent] = await anext(pages, [])
    j = 0  # the next event of `page` to fold
    for i in order:
        watermark = watermarks[i]
        while page:
            while j < len(page) and page[j].seq <= watermark:
                event = page[j]
                for state in by_source[event.type]:
                    state.apply(event)
                j += 1
            if j < len(page):
                break
            page, j = await anext(pages, []), 0
        row_values: list[Any] = []
        unknown_here: list[str] = []
        for view in views:
            state = states[view.name]
            entity_id = rows[i].keys.get(view.entity)
            try:
                answer = state.values(entity_id, times[i]) if entity_id else None
            except StaleQueryError:
                stale[i] = True
                answer = dict.fromkeys(names[view.name])
            if answer is None:
                answer = state.defaults()
                if view.entity not in unknown_here:
                    unknown_here.append(view.entity)
            row_values.extend(answer[f] for f in names[view.name])
        values[i] = row_values
        unknown[i] = ",".join(unknown_here)
    return assemble_frame(views, rows, watermarks, values, unknown, stale)


def assemble_frame(
    views: Sequence[FeatureView],
    rows: Sequence[FrameRow],
    watermarks: Sequence[int],
    values: Sequence[Sequence[Any]],
    unknown: Sequence[str],
    stale: Sequence[bool],
) -> Any:
    """The DataFrame of `training_frame` from its answers, per row: the values (views' features in
    order), the unknown entity types (comma-separated) and whether it was stale. One place builds
    it, so a frame computed in partitions (`d2d.replay.partition`) is the same frame."""
    import pandas as pd

    columns = [f"{v.name}.{f}" for v in views for f in v.feature_names()]
    entities = list(dict.fromkeys(v.entity for v in views))
    frame = pd.DataFrame(list(values), columns=columns)
    for position, entity in enumerate(entities):
        frame.insert(position, entity, [r.keys.get(entity) for r in rows])
    frame.insert(len(entities), "as_of", pd.to_datetime([r.as_of for r in rows], utc=True))
    frame.insert(len(entities) + 1, "watermark", watermarks)
    if any(r.row_id for r in rows):
        frame.insert(0, "row_id", [r.row_id for r in rows])
    frame["unknown_entities"] = list(unknown)
    frame["stale"] = list(stale)
    return frame


async def rows_from_events(
    log: EventLog, event_type: str, views: Sequence[FeatureView], *, limit: int | None = None
) -> list[FrameRow]:
    """One row per event of `event_type`: its entities (by the views' keys), as of its event time,
    with the state just before it (watermark seq - 1): the features a decision on it could use."""
    keyed = [v for v in views if v.source == event_type]
    rows: list[FrameRow] = []
    after = 0
    while limit is None or len(rows) < limit:
        page = await log.read(after, PAGE, types=[event_type])
        for e in map(upcast_event, page):
            keys = {v.entity: str(e.payload[v.entity_key]) for v in keyed if v.entity_key in e.payload}
            rows.append(FrameRow(keys, e.occurred_at, e.seq - 1, str(e.event_id)))
        if len(page) < PAGE:
            break
        after = page[-1].seq
    return rows[:limit] if limit is not None else rows


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
