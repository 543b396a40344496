"""Projections: every table but `events` and `dead_letters` holds rows computed from events.

A projector is a function of one stored event that writes the rows the event implies, registered
for its event type with `@projects("type")`. The same projectors run in two places:

- live, in the transaction that appends the event (`EventLog.recording()`), so a table can never
  hold a fact the log lacks: code that records a fact appends an event, and the projector writes
  the row;
- offline, over the whole log from seq 0 into a fresh database (`rebuild`), so any projection can
  be recomputed and compared with the live one (`compare`), row for row.

A projector registered with `applied_by="<consumer>"` is not run in the appending transaction:
that consumer applies it, tailing the log, in one transaction with its position (`log_positions`).
The decision/outcome join is such a projection (`applied_by="feedback"`): decisions are appended
by serving's group committer at thousands a second, and the join is the feedback service's to
keep, so its rows follow the log a little behind it, never ahead. `rebuild` runs every projector.

Rows take their times from the event (`recorded_at`), never from the clock, so a rebuild is equal
to the live table. Adding a projection is one projector here and one entry in `TABLES`.

Not projections, and why: `artifacts` is a content-addressed blob store (a `model.registered`
event names the sha256 of its artifact; a rebuild copies the blobs and checks every hash);
`log_positions` and `feature_snapshots` are checkpoints of consumers (how far the relay
published, the features service's folded state at its watermark): both are recomputed by their
consumer from the log when missing. `personal_keys` holds the keys of personal data (d2d.personal):
kept out of the log on purpose, since forgetting a subject destroys its key, which no append-only
log could do.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from d2d.eventlog import StoredEvent

Projector = Callable[[asyncpg.Connection, StoredEvent], Awaitable[None]]
PROJECTORS: dict[str, Projector] = {}
RunProjector = Callable[[asyncpg.Connection, Sequence[StoredEvent]], Awaitable[None]]
RUN_PROJECTORS: dict[str, RunProjector] = {}  # optional: a run of one type's events in one statement
# Who applies each type's projector: APPENDER (the transaction that appends the event) or the
# name of the log consumer that does.
APPENDER = "appender"
APPLIED_BY: dict[str, str] = {}

# Each projection table and the columns that identify a row, in the order rows are compared.
TABLES: dict[str, tuple[str, ...]] = {
    "contracts": ("event_type", "version"),
    "feature_views": ("name", "version"),
    "models": ("name",),
    "model_versions": ("model", "version"),
    "model_aliases": ("model", "alias"),
    "decision_outcomes": ("decision_id",),
    "outcome_rules": ("name",),
}


# What migration 0006 gave a model registered before its model.registered event carried a policy
# (every event has carried one since): a rebuild of such a log equals the table it produced.
POLICY_BEFORE_EVENTS_CARRIED_IT = {
    "canary_share": 0.0, "epsilon": 0.0, "threshold": 0.5, "actions": ["approve", "decline"]
}  # fmt: skip


def projects(event_type: str, *, applied_by: str = APPENDER) -> Callable[[Projector], Projector]:
    """Register `fn` as the projector of `event_type` (one per type), applied by `applied_by`: the
    appending transaction (APPENDER), or the named log consumer."""

    def register(fn: Projector) -> Projector:
        if event_type in PROJECTORS:
            raise ValueError(f"{event_type} already has a projector: {PROJECTORS[event_type].__name__}")
        PROJECTORS[event_type] = fn
        APPLIED_BY[event_type] = applied_by
        return fn

    return register


def types_applied_by(applier: str) -> tuple[str, ...]:
    """The event types whose projectors `applier` runs."""
    return tuple(sorted(t for t, by in APPLIED_BY.items() if by == applier))


def projects_run(event_type: str) -> Callable[[RunProjector], RunProjector]:
    """Register `fn` as the projector of a run of consecutive `event_type` events in one statement.
    It must leave the rows exactly as the type's one-event projector applied to each in order would:
    `apply` uses it for every run of two or more (a consumer applies thousands of decisions and
    outcomes a batch, and one round trip per event would be most of its time)."""

    def register(fn: RunProjector) -> RunProjector:
        if event_type not in PROJECTORS:
            raise ValueError(f"{event_type} has no one-event projector")
        RUN_PROJECTORS[event_type] = fn
        return fn

    return register


async def apply(conn: asyncpg.Connection, events: Sequence[StoredEvent], *, applied_by: str | None = APPENDER) -> None:
    """Run, in order on `conn`, the projector of each event whose type has one applied by
    `applied_by` (None: every projector, as a rebuild does); a run of consecutive events of a type
    with a run projector goes to it in one call."""
    i = 0
    while i < len(events):
        event = events[i]
        projector = PROJECTORS.get(event.type)
        if projector is None or (applied_by is not None and APPLIED_BY[event.type] != applied_by):
            i += 1
            continue
        end = i + 1
        while end < len(events) and events[end].type == event.type:
            end += 1
        run_projector = RUN_PROJECTORS.get(event.type)
        if run_projector is not None and end - i > 1:
            await run_projector(conn, events[i:end])
        else:
            for e in events[i:end]:
                await projector(conn, e)
        i = end


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# ---------------------------------------------------------------------------------------------
# The projectors


@projects("contract.registered")
async def _contract_registered(conn: asyncpg.Connection, e: StoredEvent) -> None:
    p = e.payload
    defaults = {"description": "", "allowed_lateness_seconds": 0, "null_rate_limits": {}}
    p = {**defaults, **p}
    await conn.execute(
        "INSERT INTO contracts (event_type, version, owner, json_schema, description, pii_fields, compatibility,"
        " allowed_lateness_seconds, null_rate_limits, created_at, registered_seq, max_future_skew_seconds,"
        " max_age_seconds)"
        " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9::jsonb, $10, $11, coalesce($12, 3600),"
        " coalesce($13, 315532800))",
        p["event_type"], p["version"], p["owner"], _json(p["json_schema"]), p["description"], p["pii_fields"],
        p["compatibility"], p["allowed_lateness_seconds"], _json(p["null_rate_limits"]), e.recorded_at, e.seq,
        p.get("max_future_skew_seconds"), p.get("max_age_seconds"),
    )  # fmt: skip


@projects("feature_view.registered")
async def _feature_view_registered(conn: asyncpg.Connection, e: StoredEvent) -> None:
    p = e.payload
    await conn.execute(
        "INSERT INTO feature_views (name, version, definition, registered_seq, created_at)"
        " VALUES ($1, $2, $3::jsonb, $4, $5)",
        p["name"], p["version"], _json(p["definition"]), e.seq, e.recorded_at,
    )  # fmt: skip


@projects("model.registered")
async def _model_registered(conn: asyncpg.Connection, e: StoredEvent) -> None:
    """A model (payload without `version`) or one of its versions."""
    p = e.payload
    if "version" not in p:
        await conn.execute(
            "INSERT INTO models (name, description, deployment_policy, registered_seq, created_at)"
            " VALUES ($1, $2, $3::jsonb, $4, $5)",
            p["model"], p.get("description", ""), _json(p.get("policy", POLICY_BEFORE_EVENTS_CARRIED_IT)), e.seq,
            e.recorded_at,
        )  # fmt: skip
        return
    await conn.execute(
        "INSERT INTO model_versions (model, version, sha256, spec, evaluation, lineage, feature_names,"
        " registered_seq, created_at) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::jsonb, $7, $8, $9)",
        p["model"], p["version"], p["sha256"], _json(p["spec"]), _json(p.get("evaluation", {})),
        _json(p.get("lineage", {})), p.get("feature_names", []), e.seq, e.recorded_at,
    )  # fmt: skip


@projects("model.updated")
async def _model_updated(conn: asyncpg.Connection, e: StoredEvent) -> None:
    p = e.payload
    await conn.execute("UPDATE models SET description = $2 WHERE name = $1", p["model"], p["description"])


@projects("model.policy_set")
async def _model_policy_set(conn: asyncpg.Connection, e: StoredEvent) -> None:
    p = e.payload
    await conn.execute(
        "UPDATE models SET deployment_policy = $2::jsonb WHERE name = $1", p["model"], _json(p["policy"])
    )


@projects("model.promotion_policy_set")
async def _model_promotion_policy_set(conn: asyncpg.Connection, e: StoredEvent) -> None:
    p = e.payload
    await conn.execute("UPDATE models SET promotion_policy = $2::jsonb WHERE name = $1", p["model"], _json(p["policy"]))


@projects("model.alias_set")
async def _model_alias_set(conn: asyncpg.Connection, e: StoredEvent) -> None:
    p = e.payload
    if p["version"] is None:
        await conn.execute("DELETE FROM model_aliases WHERE model = $1 AND alias = $2", p["model"], p["alias"])
        return
    await conn.execute(
        "INSERT INTO model_aliases (model, alias, version, set_seq) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, set_seq = excluded.set_seq",
        p["model"], p["alias"], p["version"], e.seq,
    )  # fmt: skip


@projects("outcome_rule.registered")
async def _outcome_rule_registered(conn: asyncpg.Connection, e: StoredEvent) -> None:
    p = e.payload
    await conn.execute(
        "INSERT INTO outcome_rules (name, event_type, terms, registered_seq, created_at)"
        " VALUES ($1, $2, $3::jsonb, $4, $5)",
        p["name"], p["event_type"], _json(p), e.seq, e.recorded_at,
    )  # fmt: skip


FEEDBACK = "feedback"  # the feedback service's log consumer


def _version_number(model_version: str) -> int:
    """`models/{model}/versions/{n}` -> n."""
    return int(model_version.rsplit("/", 1)[1])


def decided_at(e: StoredEvent) -> datetime:
    """A decision's event time: its request's `as_of`, else the event's occurred_at."""
    as_of = e.payload.get("as_of")
    if not as_of:
        return e.occurred_at
    at = datetime.fromisoformat(as_of)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@projects("decision.made", applied_by=FEEDBACK)
async def _decision_made(conn: asyncpg.Connection, e: StoredEvent) -> None:
    p = e.payload
    await conn.execute(
        "INSERT INTO decision_outcomes (decision_id, model, model_version, arm, score, action, propensity, explored,"
        " unit_id, decided_at, decision_seq) VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        p["decision_id"], p["model"], _version_number(p["model_version"]), p["arm"], float(p["score"]), p["action"],
        float(p["propensity"]), bool(p.get("explored", False)), p["unit_id"], decided_at(e), e.seq,
    )  # fmt: skip


@projects_run("decision.made")
async def _decisions_made(conn: asyncpg.Connection, events: Sequence[StoredEvent]) -> None:
    """Many decision.made in one INSERT (a decision applied twice violates the key, as one by one)."""
    columns: list[list[Any]] = [[] for _ in range(11)]
    for e in events:
        p = e.payload
        row = (
            p["decision_id"], p["model"], _version_number(p["model_version"]), p["arm"], float(p["score"]),
            p["action"], float(p["propensity"]), bool(p.get("explored", False)), p["unit_id"], decided_at(e), e.seq,
        )  # fmt: skip
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    await conn.execute(
        "INSERT INTO decision_outcomes (decision_id, model, model_version, arm, score, action, propensity, explored,"
        " unit_id, decided_at, decision_seq) SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[],"
        " $5::float8[], $6::text[], $7::float8[], $8::bool[], $9::text[], $10::timestamptz[], $11::bigint[])",
        *columns,
    )


@projects("decision.withdrawn", applied_by=FEEDBACK)
async def _decision_withdrawn(conn: asyncpg.Connection, e: StoredEvent) -> None:
    await conn.execute(
        "UPDATE decision_outcomes SET withdrawn = true WHERE decision_id = $1::uuid", e.payload["decision_id"]
    )


@projects("outcome.recorded", applied_by=FEEDBACK)
async def _outcome_recorded(conn: asyncpg.Connection, e: StoredEvent) -> None:
    """The decision's first outcome wins; a later one (another outcome id) changes nothing."""
    p = e.payload
    reward = p.get("reward")
    await conn.execute(
        "UPDATE decision_outcomes SET outcome_id = $2, label = $3, reward = $4, outcome_at = $5, outcome_seq = $6,"
        " outcome_source = $7 WHERE decision_id = $1::uuid AND outcome_id IS NULL",
        p["decision_id"], p["outcome_id"], p.get("label"), None if reward is None else float(reward),
        datetime.fromisoformat(p["occurred_at"]), e.seq, p["source"],
    )  # fmt: skip


@projects_run("outcome.recorded")
async def _outcomes_recorded(conn: asyncpg.Connection, events: Sequence[StoredEvent]) -> None:
    """Many outcome.recorded in one UPDATE. Only each decision's first outcome in the run is offered:
    one by one, a later one could only land where the first did not, i.e. never (first outcome wins)."""
    columns: list[list[Any]] = [[] for _ in range(7)]
    seen: set[uuid.UUID] = set()
    for e in events:
        p = e.payload
        decision = uuid.UUID(p["decision_id"])
        if decision in seen:
            continue
        seen.add(decision)
        reward = p.get("reward")
        row = (
            decision, p["outcome_id"], p.get("label"), None if reward is None else float(reward),
            datetime.fromisoformat(p["occurred_at"]), e.seq, p["source"],
        )  # fmt: skip
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    await conn.execute(
        "UPDATE decision_outcomes d SET outcome_id = o.outcome_id, label = o.label, reward = o.reward,"
        " outcome_at = o.outcome_at, outcome_seq = o.outcome_seq, outcome_source = o.outcome_source"
        " FROM unnest($1::uuid[], $2::text[], $3::smallint[], $4::float8[], $5::timestamptz[], $6::bigint[],"
        " $7::text[]) AS o(decision_id, outcome_id, label, reward, outcome_at, outcome_seq, outcome_source)"
        " WHERE d.decision_id = o.decision_id AND d.outcome_id IS NULL",
        *columns,
    )


# ---------------------------------------------------------------------------------------------
# Rebuilding and comparing


async def rebuild(source_url: str, target_url: str, *, batch: int = 5000, to_seq: int | None = None) -> int:
    """Recompute every projection of the log at `source_url` into the migrated, empty database at
    `target_url` (owner connections): copy the log (up to `to_seq`, default all of it) and the
    artifact blobs (checking each sha256), then run the projectors over every event in order.
    Returns the number of events replayed."""
    from d2d.eventlog import EventLog, create_pool

    source = EventLog(await create_pool(source_url, role=None, max_size=1))
    target = await create_pool(target_url, role=None, max_size=1)
    try:
        async with source.pool.acquire() as conn:
            artifacts = await conn.fetch("SELECT sha256, data, size_bytes, created_at FROM artifacts")
        async with target.acquire() as conn:
            for row in artifacts:
                if hashlib.sha256(row["data"]).hexdigest() != row["sha256"]:
                    raise ValueError(f"artifact {row['sha256']} does not hash to its name")
                await conn.execute(
                    "INSERT INTO artifacts (sha256, data, size_bytes, created_at) VALUES ($1, $2, $3, $4)",
                    *row.values(),
                )
            after, replayed = 0, 0
            while events := [e for e in await source.read(after, batch) if to_seq is None or e.seq <= to_seq]:
                async with conn.transaction():
                    await EventLog.copy_in(conn, events)
                    await apply(conn, events, applied_by=None)
                after, replayed = events[-1].seq, replayed + len(events)
            return replayed
    finally:
        await source.pool.close()
        await target.close()


@dataclass(frozen=True)
class Difference:
    table: str
    key: tuple[Any, ...]
    live: dict[str, Any] | None  # None: the row is missing live
    rebuilt: dict[str, Any] | None  # None: the rebuild has no such row

    def __str__(self) -> str:
        where = f"{self.table} {dict(zip(TABLES[self.table], self.key, strict=True))}"
        if self.live is None:
            return f"{where}: only in the rebuild"
        if self.rebuilt is None:
            return f"{where}: not in the rebuild"
        changed = sorted(k for k in self.live if self.live[k] != self.rebuilt.get(k))
        return f"{where}: {', '.join(f'{k} {self.live[k]!r} != {self.rebuilt.get(k)!r}' for k in changed)}"


async def compare(live_url: str, rebuilt_url: str) -> list[Difference]:
    """Every row of every projection table that differs between two databases, by key."""
    differences = []
    live, rebuilt = await asyncpg.connect(live_url), await asyncpg.connect(rebuilt_url)
    try:
        for table, key in TABLES.items():
            differences += diff_rows(table, await table_rows(live, table, key), await table_rows(rebuilt, table, key))
    finally:
        await live.close()
        await rebuilt.close()
    return differences


async def table_rows(
    conn: asyncpg.Connection, table: str, key: tuple[str, ...]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every row of `table` by its key (`TABLES[table]`), as column -> value."""
    return {tuple(r[c] for c in key): dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")}


def diff_rows(
    table: str, live: dict[tuple[Any, ...], dict[str, Any]], rebuilt: dict[tuple[Any, ...], dict[str, Any]]
) -> list[Difference]:
    """A Difference (both rows) for each key of `table` whose rows differ or only one side has."""
    return [
        Difference(table, key, live.get(key), rebuilt.get(key))
        for key in sorted(live.keys() | rebuilt.keys(), key=repr)
        if live.get(key) != rebuilt.get(key)
    ]
