"""The event log: the only module that writes or reads events in Postgres.

Appends take one transaction-scoped advisory lock before inserting, so positions are assigned and
become visible in commit order: `seq` is dense and strictly increasing as any reader sees it, and
one integer is a complete watermark ("every event with seq <= N"). The lock admits one appending
transaction at a time, so callers batch: `GroupCommitter` folds concurrent appends into one
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from d2d.batching import Batcher
from d2d.contracts.platform import check_platform_event
from d2d.limits import check_event

log = logging.getLogger(__name__)

# Errors that mean Postgres could not be reached or went away mid-call: the transaction did not
# commit, so the caller may say UNAVAILABLE and a retry is safe.
LOG_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.ObjectNotInPrerequisiteStateError,  # the database refuses connections
    asyncpg.AdminShutdownError,
    asyncpg.InternalClientError,  # a connection left broken by a dropped server
)

# Key of the advisory lock every appending transaction takes ("d2d-log" as an int64).
APPEND_LOCK_KEY = 0x6432642D6C6F67
NOTIFY_CHANNEL = "d2d_events"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. `payload` is the JSON text of one object, as the producer sent it."""

    event_id: uuid.UUID
    type: str
    schema_version: int
    entity_type: str
    entity_id: str
    occurred_at: datetime
    payload: str
    metadata: dict[str, str] = field(default_factory=dict)


def quality_alert(
    event_id: uuid.UUID, entity_type: str, entity_id: str, found: dict[str, Any], producer: str
) -> NewEvent:
    """A `quality.alert` (v1) saying what a component `found`, now. Its id comes from the caller,
    derived from what was found, so the same finding recorded again is stored once."""
    return NewEvent(
        event_id, "quality.alert", 1, entity_type, entity_id, datetime.now(UTC), orjson.dumps(found).decode(),
        {"producer": producer},
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event_id: uuid.UUID
    type: str
    schema_version: int
    entity_type: str
    entity_id: str
    occurred_at: datetime
    recorded_at: datetime
    payload: dict[str, Any]
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class AppendResult:
    event_id: uuid.UUID
    seq: int
    duplicate: bool


def with_trace(events: Sequence[NewEvent]) -> Sequence[NewEvent]:
    """Events whose metadata lacks `traceparent` get the caller's current trace context, so a
    consumer of any event can link to the span that produced it."""
    from d2d import telemetry

    if all("traceparent" in e.metadata for e in events):
        return events
    traceparent = telemetry.current_traceparent()
    if traceparent is None:
        return events
    return [
        e
        if "traceparent" in e.metadata
        else dataclasses.replace(e, metadata={**e.metadata, "traceparent": traceparent})
        for e in events
    ]


# ---------------------------------------------------------------------------------------------
# Connections and migrations


async def _init_connection(conn: asyncpg.Connection, role: str | None) -> None:
    await conn.set_type_codec("jsonb", encoder=lambda v: v, decoder=orjson.loads, schema="pg_catalog")
    if role:
        await conn.execute(f'SET ROLE "{role}"')


async def create_pool(url: str, *, role: str | None = None, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool of connections as the URL's user: a service's own login (d2d.dbroles), whose
    privileges are its group's. `role`, for tests and tools on an owner's URL only, is SET on each
    connection to act as that role (a service's group, say); services never switch roles."""
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=lambda c: _init_connection(c, role),
        command_timeout=60,
    )


async def migrate(url: str) -> list[str]:
    """Bring the database to the newest Alembic revision (d2d/migrations/versions); returns the
    revisions applied.

    Runs as the connecting (owner) role, under an advisory lock, so services starting together
    on an empty database create the schema once.
    """
    from d2d import db  # SQLAlchemy and Alembic load only in the processes that migrate

    engine = db.async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execute(db.text("SELECT pg_advisory_lock(:key)"), {"key": APPEND_LOCK_KEY + 1})
            await conn.commit()  # the lock is the session's; each revision then commits on its own
            try:
                return await conn.run_sync(db.upgrade_to_head)
            except db.ProgrammingError as exc:
                if "permission denied" not in str(exc):
                    raise
                # A service's own login may read the schema, not change it (d2d.dbroles).
                raise RuntimeError(
                    "the database is not at the newest schema and this login may not change it:"
                    " run `d2d migrate` (or `d2d up`) as the database's owner first"
                ) from exc
    finally:
        await engine.dispose()  # closing the connection releases the lock


# ---------------------------------------------------------------------------------------------
# The log

# One round trip: migration 0007's function takes the append lock, skips stored event ids, numbers
# the rest max(seq)+1.. and inserts them; it answers (seq, duplicate) per event, in order.
_APPEND_SQL = (
    "SELECT appended_seq, duplicate FROM append_events("
    "$1, $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[], $7::timestamptz[], $8::text[], $9::text[])"
)

_SELECT_COLUMNS = (
    "seq, event_id, type, schema_version, entity_type, entity_id, occurred_at, recorded_at, payload, metadata"
)


def _stored(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(*row.values())


class EventLog:
    """Append to and read from the log. All SQL on `events` lives here."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def append(self, events: Sequence[NewEvent], *, conn: asyncpg.Connection | None = None) -> list[AppendResult]:
        """Append events in order; repeats of a stored event id store nothing and get the first seq.

        With `conn`: on that connection. Inside an open transaction there (which then holds the
        append lock until it ends) the caller can record other effects atomically with the events;
        outside one the append is its own transaction, as without `conn`.
        """
        if not events:
            return []
        for event in events:
            check_event(event)
            check_platform_event(event)
        events = with_trace(events)
        if conn is not None:
            return await self._append_locked(conn, events)
        async with self.pool.acquire() as own:  # autocommit: the function call is the transaction
            return await self._append_locked(own, events)

    @contextlib.asynccontextmanager
    async def recording(self) -> AsyncIterator[Recording]:
        """The one way to record a platform fact: a transaction holding the append lock, in which the
        caller checks what it must (reads on `tx.conn` see every committed event and row) and
        appends events whose projectors (`d2d.projections`) write the tables: all or nothing.

            async with log.recording() as tx:
                if await tx.conn.fetchval("SELECT 1 FROM models WHERE name = $1", name): ...
                [registered] = await tx.append(event)
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await self.lock_for_append(conn)
            yield Recording(self, conn)

    @staticmethod
    async def lock_for_append(conn: asyncpg.Connection) -> None:
        """Take the append lock in conn's transaction (held until it ends; re-entrant)."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)

    async def _append_locked(self, conn: asyncpg.Connection, events: Sequence[NewEvent]) -> list[AppendResult]:
        rows = await conn.fetch(
            _APPEND_SQL,
            APPEND_LOCK_KEY,
            [e.event_id for e in events],
            [e.type for e in events],
            [e.schema_version for e in events],
            [e.entity_type for e in events],
            [e.entity_id for e in events],
            [e.occurred_at for e in events],
            [e.payload for e in events],
            [orjson.dumps(e.metadata).decode() for e in events],
        )
        return [AppendResult(e.event_id, r[0], r[1]) for e, r in zip(events, rows, strict=True)]

    @staticmethod
    async def copy_in(conn: asyncpg.Connection, events: Sequence[StoredEvent]) -> None:
        """Insert stored events verbatim (their seq and recorded_at kept) on `conn`: only for rebuilding
        a log's projections into a fresh database (`d2d.projections.rebuild`), never for appending."""
        columns = [[getattr(e, f.name) for e in events] for f in dataclasses.fields(StoredEvent)]
        await conn.execute(
            f"INSERT INTO events ({_SELECT_COLUMNS}) SELECT s, i, t, v, et, ei, o, r, p::jsonb, m::jsonb"
            " FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[],"
            " $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[]) AS u(s, i, t, v, et, ei, o, r, p, m)",
            *columns[:8], *([orjson.dumps(x).decode() for x in c] for c in columns[8:]),
        )  # fmt: skip

    async def head(self) -> int:
        """The highest committed position (0 for an empty log)."""
        async with self.pool.acquire() as conn:
            return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")

    async def read(self, after: int = 0, limit: int = 1000, *, types: Sequence[str] | None = None) -> list[StoredEvent]:
        """Events with seq > after, in order, at most `limit`."""
        async with self.pool.acquire() as conn:
            if types:
                rows = await conn.fetch(
                    f"SELECT {_SELECT_COLUMNS} FROM events WHERE seq > $1 AND type = ANY($3) ORDER BY seq LIMIT $2",
                    after,
                    limit,
                    list(types),
                )
            else:
                rows = await conn.fetch(
                    f"SELECT {_SELECT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
                    after,
                    limit,
                )
        return [_stored(r) for r in rows]

    async def newest(
        self, *, below: int | None, limit: int, event_type: str = "", entity_type: str = "", entity_id: str = ""
    ) -> list[StoredEvent]:
        """At most `limit` events with seq < `below` (all when None) that match every filter given,
        newest first: browsing (`ListEvents`), not the hot path. Each filter combination has an index
        to walk backwards (`events_type_seq`, `events_entity_seq`, or the primary key)."""
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
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_SELECT_COLUMNS} FROM events{where} ORDER BY seq DESC LIMIT ${len(args)}", *args
            )
        return [_stored(r) for r in rows]

    async def count_by_type(self) -> list[tuple[str, int]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT type, count(*) FROM events GROUP BY type ORDER BY type")
        return [(r[0], r[1]) for r in rows]

    async def get(self, event_id: uuid.UUID, *, conn: asyncpg.Connection | None = None) -> StoredEvent | None:
        if conn is None:
            async with self.pool.acquire() as own:
                return await self.get(event_id, conn=own)
        row = await conn.fetchrow(f"SELECT {_SELECT_COLUMNS} FROM events WHERE event_id = $1", event_id)
        return _stored(row) if row else None

    async def entity_events(
        self, entity_type: str, entity_id: str, *, types: Sequence[str], conn: asyncpg.Connection | None = None
    ) -> list[StoredEvent]:
        """One entity's events of the given types, oldest first (the `events_entity_seq` index): what
        a check inside `recording()` reads on `tx.conn` to decide against the log itself."""
        if conn is None:
            async with self.pool.acquire() as own:
                return await self.entity_events(entity_type, entity_id, types=types, conn=own)
        rows = await conn.fetch(
            f"SELECT {_SELECT_COLUMNS} FROM events WHERE entity_type = $1 AND entity_id = $2 AND type = ANY($3)"
            " ORDER BY seq",
            entity_type,
            entity_id,
            list(types),
        )
        return [_stored(r) for r in rows]

    async def last_seq_by_type(self, at_most: int, *, conn: asyncpg.Connection | None = None) -> dict[str, int]:
        """For each event type in the log, the position of its last event at or below `at_most`.

        A loose scan of the (type, seq) index: one probe per distinct type, however long the log.
        """
        if conn is None:
            async with self.pool.acquire() as own:
                return await self.last_seq_by_type(at_most, conn=own)
        rows = await conn.fetch(
            "WITH RECURSIVE types AS ("
            " (SELECT type FROM events ORDER BY type LIMIT 1)"
            " UNION ALL"
            " SELECT (SELECT e.type FROM events e WHERE e.type > t.type ORDER BY e.type LIMIT 1)"
            " FROM types t WHERE t.type IS NOT NULL)"
            " SELECT t.type, (SELECT max(e.seq) FROM events e WHERE e.type = t.type AND e.seq <= $1)"
            " FROM types t WHERE t.type IS NOT NULL",
            at_most,
        )
        return {r[0]: r[1] for r in rows if r[1] is not None}

    async def read_envelopes(
        self, after: int, limit: int, *, conn: asyncpg.Connection | None = None
    ) -> list[tuple[int, uuid.UUID, str, bytes, str | None]]:
        """(seq, event_id, type, JSON envelope, traceparent) for seq > after, as published on the bus.

        Postgres builds the JSON, which keeps the relay's per-event Python work small. With `conn`,
        reads on that connection (the relay's own) instead of one from the pool.
        """
        if conn is None:
            async with self.pool.acquire() as own:
                return await self.read_envelopes(after, limit, conn=own)
        rows = await conn.fetch(
            "SELECT seq, event_id, type, json_build_object("
            " 'seq', seq, 'event_id', event_id, 'type', type, 'schema_version', schema_version,"
            " 'entity_type', entity_type, 'entity_id', entity_id, 'occurred_at', occurred_at,"
            " 'recorded_at', recorded_at, 'payload', payload, 'metadata', metadata)::text,"
            " metadata->>'traceparent'"
            " FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
            after,
            limit,
        )
        return [(r[0], r[1], r[2], r[3].encode(), r[4]) for r in rows]

    async def tail(
        self, after: int = 0, *, batch: int = 1000, poll_interval: float = 0.5
    ) -> AsyncIterator[StoredEvent]:
        """Every event after `after`, once and in order, waiting for new ones forever."""
        wake = asyncio.Event()

        def on_notify(*_: object) -> None:
            wake.set()

        listener = await self.pool.acquire()
        await listener.add_listener(NOTIFY_CHANNEL, on_notify)
        try:
            while True:
                wake.clear()
                events = await self.read(after, batch)
                for event in events:
                    yield event
                    after = event.seq
                if len(events) < batch:
                    try:
                        await asyncio.wait_for(wake.wait(), poll_interval)
                    except TimeoutError:
                        pass
        finally:
            await listener.remove_listener(NOTIFY_CHANNEL, on_notify)
            await self.pool.release(listener)

    # -- positions of publishers and consumers (the outbox relay, feedback) --------------------

    async def position(self, name: str, *, conn: asyncpg.Connection | None = None) -> int:
        if conn is None:
            async with self.pool.acquire() as own:
                return await self.position(name, conn=own)
        seq = await conn.fetchval("SELECT seq FROM log_positions WHERE name = $1", name)
        return seq or 0

    @staticmethod
    async def lock_position(name: str, conn: asyncpg.Connection) -> int:
        """Lock `name`'s position row until conn's transaction ends (creating it at 0) and return
        it: a consumer that moves its position in that transaction knows no other moved it meanwhile."""
        await conn.execute("INSERT INTO log_positions (name, seq) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING", name)
        return await conn.fetchval("SELECT seq FROM log_positions WHERE name = $1 FOR UPDATE", name)

    async def set_position(self, name: str, seq: int, *, conn: asyncpg.Connection | None = None) -> None:
        """Record how far `name` got; with `conn`, in that connection's transaction (a consumer's
        position commits with the effects of the events it applied)."""
        if conn is None:
            async with self.pool.acquire() as own:
                return await self.set_position(name, seq, conn=own)
        await conn.execute(
            "INSERT INTO log_positions (name, seq) VALUES ($1, $2)"
            " ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = now()",
            name,
            seq,
        )


class Recording:
    """An open `EventLog.recording()` transaction."""

    def __init__(self, log: EventLog, conn: asyncpg.Connection) -> None:
        self.log = log
        self.conn = conn

    async def append(self, *events: NewEvent) -> list[StoredEvent]:
        """Append events and run their projectors in this transaction (those a log consumer applies,
        `@projects(..., applied_by=...)`, are its to run); returns them as stored (a repeat of a
        stored event id is answered with the stored event, and projects nothing)."""
        from d2d import projections

        results = await self.log.append(events, conn=self.conn)
        rows = await self.conn.fetch(
            f"SELECT {_SELECT_COLUMNS} FROM events WHERE seq = ANY($1::bigint[]) ORDER BY seq",
            [r.seq for r in results],
        )
        stored = {row["seq"]: _stored(row) for row in rows}
        fresh = sorted({r.seq for r in results if not r.duplicate})
        await projections.apply(self.conn, [stored[seq] for seq in fresh])
        return [stored[r.seq] for r in results]


class CommitDeadlineExceeded(TimeoutError):
    """The events waited past their deadline before a transaction took them: none was stored."""


class GroupCommitter:
    """Folds concurrent appends into one transaction each, so the append lock costs little.

    `append()` returns once its events are committed. While one transaction runs, new requests
    queue up; the next transaction takes all of them (up to `max_events`): a `d2d.batching.Batcher`
    whose call is one transaction. The committer keeps one pooled connection for itself (acquiring
    one per commit costs asyncpg a second round trip, its reset query on release) and trades it for
    a fresh one after a connection error.

    One caller's events never fail another's: each event is checked (`limits.check_event`) before
    it joins the queue, and a transaction that still fails for its data is split and retried by
    halves until the failing caller's part fails alone. The queue is bounded (`max_queued_events`;
    beyond it `append` refuses with RESOURCE_EXHAUSTED), and a caller's `deadline` that passes
    while its events are queued drops them (`CommitDeadlineExceeded`): nothing is committed for a
    caller who has stopped waiting, unless a transaction had already taken its events.

    Each transaction is one `eventlog.group_commit` span linked to every caller's span, and each
    event's metadata keeps its caller's `traceparent` (unless it brings its own).
    """

    def __init__(self, log: EventLog, *, max_events: int = 20_000, max_queued_events: int = 200_000) -> None:
        self.log = log
        self.transactions = 0  # committed or failed, including the retries that isolate a failure
        self.batcher: Batcher[Sequence[NewEvent], list[AppendResult]] = Batcher(
            self._commit_isolating,
            name="the event log",
            max_weight=max_events,
            weight=len,
            max_waiting=max_queued_events,
            unit="events",
            expired=lambda: CommitDeadlineExceeded(
                "the deadline passed before the events reached the log; none was stored"
            ),
            span="eventlog.group_commit",
        )
        self._conn: asyncpg.Connection | None = None

    async def append(self, events: Sequence[NewEvent], *, deadline: float | None = None) -> list[AppendResult]:
        """Commit `events` in one transaction shared with other callers'.

        `deadline` is a `time.monotonic()` value: if it passes before a transaction takes the events,
        none is stored and CommitDeadlineExceeded is raised. Raises Refusal for an event that
        cannot be stored (naming the field) or when the queue is full (RESOURCE_EXHAUSTED).
        """
        if not events:
            return []
        for event in events:
            check_event(event)
            check_platform_event(event)
        events = with_trace(events)  # here, in the caller's context, not in the committing task
        return await self.batcher.submit(events, deadline=deadline)

    async def _commit(self, events: Sequence[NewEvent]) -> list[AppendResult]:
        """One transaction. A broken connection is replaced and the append tried once more: the
        append is idempotent by event id, so a retry after a lost reply cannot store twice."""
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = await self.log.pool.acquire()
            self.transactions += 1
            try:
                # checked in append(); autocommit: the call is one transaction
                return await self.log._append_locked(self._conn, events)
            except LOG_UNREACHABLE:
                await self._drop_connection()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(self.log.pool.release(conn), 5)
            except Exception:  # broken beyond a reset: close it so the pool opens a new one
                with contextlib.suppress(Exception):
                    conn.terminate()

    async def _commit_isolating(self, calls: list[Sequence[NewEvent]]) -> list[list[AppendResult] | BaseException]:
        """Commit the callers' events together; if their data fails the transaction, by halves."""
        try:
            results = await self._commit([e for events in calls for e in events])
        except LOG_UNREACHABLE as exc:  # nothing committed: every caller may retry
            return [exc] * len(calls)
        except Exception as exc:
            if len(calls) == 1:
                return [exc]
            log.warning("group commit of %d callers failed (%s); retrying them apart", len(calls), exc)
            half = len(calls) // 2
            return [*await self._commit_isolating(calls[:half]), *await self._commit_isolating(calls[half:])]
        parts: list[list[AppendResult] | BaseException] = []
        offset = 0
        for events in calls:
            parts.append(results[offset : offset + len(events)])
            offset += len(events)
        return parts

    async def close(self) -> None:
        self.batcher.close(ConnectionError("the group committer closed; none was stored"))
        await self.batcher.wait_closed()
        await self._drop_connection()
