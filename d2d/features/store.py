"""Feature views and snapshots in Postgres: registration (as `feature_view.registered` events) and
the features service's saved state with the watermark it reflects."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import orjson

from d2d.contracts.upcasting import upcaster_names
from d2d.errors import Refusal
from d2d.eventlog import EventLog, NewEvent
from d2d.features.definitions import FeatureView


def fields_read(view: FeatureView) -> list[tuple[str, str]]:
    """(where in the definition, dotted payload path) of every payload field the view's fold reads."""
    read = [("entity_key", view.entity_key)]
    for a in view.aggregates:
        if a.field is not None:
            read.append((f"aggregates.{a.name}.field", a.field))
        if a.where is not None:
            read.append((f"aggregates.{a.name}.where.field", a.where.field))
    return read


def check_reads_no_personal_data(view: FeatureView, personal_pointers: Sequence[str]) -> None:
    """Refuse a view that reads a field its source's contract marks personal (or one holding or
    inside it): the fold would see only ciphertext (d2d.personal), and a feature folded from a
    clear value would keep the subject in every snapshot and frame after `d2d forget`."""
    for where, path in fields_read(view):
        pointer = "/" + path.replace(".", "/")
        for personal in personal_pointers:
            if pointer == personal or pointer.startswith(personal + "/") or personal.startswith(pointer + "/"):
                raise Refusal(
                    "FAILED_PRECONDITION",
                    f"view {view.name}: {where} reads {path!r}, which contract {view.source} marks as personal"
                    f" data ({personal}); features may not fold personal fields",
                    f"views.{view.name}.{where}",
                )


async def register_views(log: EventLog, views: Sequence[FeatureView]) -> dict[str, int]:
    """Record each view version not yet registered (a `feature_view.registered` event, projected into
    `feature_views`); returns {view name: seq of its registration}. A view reading a field any
    version of its source's contract marks personal is refused (`check_reads_no_personal_data`)."""
    registered: dict[str, int] = {}
    async with log.recording() as tx:
        for view in views:
            personal = await tx.conn.fetchval(
                "SELECT coalesce(array_agg(DISTINCT p), '{}') FROM contracts, unnest(pii_fields) AS p"
                " WHERE event_type = $1",
                view.source,
            )
            check_reads_no_personal_data(view, personal)
            seq = await tx.conn.fetchval(
                "SELECT registered_seq FROM feature_views WHERE name = $1 AND version = $2", view.name, view.version
            )
            if seq is None:
                payload = {"name": view.name, "version": view.version, "definition": view.to_dict()}
                [event] = await tx.append(
                    NewEvent(uuid.uuid4(), "feature_view.registered", 1, "feature_view", view.name,
                             datetime.now(UTC), orjson.dumps(payload).decode())
                )  # fmt: skip
                seq = event.seq
            registered[view.name] = seq
    return registered


async def registered_views(pool: asyncpg.Pool) -> list[FeatureView]:
    """Every registered view version, newest registration last."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT definition FROM feature_views ORDER BY registered_seq")
    return [FeatureView.from_dict(r["definition"]) for r in rows]


def fold_key(views: Sequence[FeatureView]) -> dict[str, str]:
    """What a view's folded state depends on besides the log, per view: its version and, where its
    source type has upcasters, their names (a new upcaster changes what old events fold to). A
    snapshot is usable only by a state with the same key."""
    key = {}
    for view in views:
        names = upcaster_names(view.source)
        key[view.name] = f"{view.version} upcast by {', '.join(names)}" if names else view.version
    return key


@dataclass(frozen=True)
class Snapshot:
    consumer: str
    watermark: int
    stream_seq: int
    views: dict[str, str]  # fold_key of the views folded
    state: bytes
    created_at: datetime | None = None


async def load_snapshot(pool: asyncpg.Pool, consumer: str) -> Snapshot | None:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT consumer, watermark, stream_seq, views, state, created_at FROM feature_snapshots"
            " WHERE consumer = $1",
            consumer,
        )
    return Snapshot(*row.values()) if row else None


async def save_snapshot(pool: asyncpg.Pool, snapshot: Snapshot) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO feature_snapshots (consumer, watermark, stream_seq, views, state)"
            " VALUES ($1, $2, $3, $4::jsonb, $5) ON CONFLICT (consumer) DO UPDATE SET"
            " watermark = excluded.watermark, stream_seq = excluded.stream_seq, views = excluded.views,"
            " state = excluded.state, created_at = now()",
            snapshot.consumer,
            snapshot.watermark,
            snapshot.stream_seq,
            orjson.dumps(snapshot.views).decode(),
            snapshot.state,
        )
