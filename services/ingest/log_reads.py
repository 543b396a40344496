"""Read-only views of the log for `ListEvents` and `GetEventLog`: browsing, not the hot path.

The filtered, newest-first listing composes its WHERE clause here; each filter combination has an
index to walk backwards (`events_type_seq`, `events_entity_seq`, or the primary key).
"""

from __future__ import annotations

import asyncpg

from d2d.eventlog import StoredEvent

_COLUMNS = "seq, event_id, type, schema_version, entity_type, entity_id, occurred_at, recorded_at, payload, metadata"


async def newest_events(
    pool: asyncpg.Pool,
    *,
    below: int | None,
    limit: int,
    event_type: str = "",
    entity_type: str = "",
    entity_id: str = "",
) -> list[StoredEvent]:
    """At most `limit` events with seq < `below` (all when None) that match every filter given, newest first."""
    conditions: list[str] = []
    args: list[object] = []
    for column, value in (("type", event_type), ("entity_type", entity_type), ("entity_id", entity_id)):
        if value:
            args.append(value)
            conditions.append(f"{column} = ${len(args)}")
    if below is not None:
        args.append(below)
        conditions.append(f"seq < ${len(args)}")
    args.append(limit)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    async with pool.acquire() as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM events{where} ORDER BY seq DESC LIMIT ${len(args)}", *args)
    return [StoredEvent(*r.values()) for r in rows]
