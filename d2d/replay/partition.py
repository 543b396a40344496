"""Point-in-time folds partitioned by entity over worker processes.

A view's entities are split into `n` partitions by a stable hash of the entity id (the first 31
bits of its MD5, modulo n; Postgres computes the same number, so the filter runs in SQL). One
*work unit* is (view, partition k): a worker process opens its own connection, reads the view's
source events in seq order through a server-side cursor, and folds only the entities of partition
k. Every event still counts for the whole view: the fold's lateness, pruning horizon and
`StaleQueryError` depend on the view-wide newest event time, so an event of another partition
arrives as its seq and time only (no payload: Postgres sends payloads for partition k alone) and
`ViewState.apply_elsewhere` advances the time and watermark without storing anything. Each state
therefore accepts, prunes and refuses exactly as the single-process fold does, for its entities.

A frame row is answered, per view, by the unit holding its entity there; rows are merged back in
order, so `partitioned_frame` equals `d2d.features.offline.training_frame` cell for cell.

The same decomposition is what a distributed engine needs: units share nothing but the log, and
each returns its rows' answers keyed by row index (a map over (view, partition), then a join on
row index).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import asyncpg
import orjson

from d2d.contracts.upcasting import upcaster_names
from d2d.eventlog import EventLog, create_pool
from d2d.features.definitions import FeatureView, resolve_path
from d2d.features.fold import StaleQueryError, ViewState, fold_event
from d2d.features.offline import FrameRow, assemble_frame, training_frame, watermarks_at
from d2d.replay.log import Progress, no_progress

__all__ = [
    "StateCheck",
    "entity_partition",
    "fold_partitions",
    "partitioned_frame",
    "training_frame_on_every_core",
    "usable_cores",
]

PREFETCH = 20_000

# The partition of an entity id, in SQL: the same number as `entity_partition` (the first 8 hex
# digits of the MD5 of the id's UTF-8 text, low 31 bits, modulo n).
_SQL_PARTITION = "((('x' || substr(md5({key}), 1, 8))::bit(32)::int4 & 2147483647) % {n})"


def entity_partition(entity_id: str, partitions: int) -> int:
    """Which of `partitions` holds `entity_id` (stable across processes, machines and Postgres)."""
    return (int(hashlib.md5(entity_id.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF) % partitions  # noqa: S324


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class PartitionKeyMismatch(RuntimeError):
    """Postgres's text of an entity key is not Python's `str` of it (a non-string key such as a
    boolean or float): partitioning in SQL would split that entity, so the view is refolded with
    partitions chosen in Python."""


@dataclass(frozen=True)
class StateCheck:
    """Compare the fold at `watermark` with a saved online state: the features snapshot of
    `consumer` (its `state` bytes), entity by entity, values as of the view's newest event time."""

    watermark: int
    state: bytes


@dataclass(frozen=True)
class Unit:
    url: str
    role: str | None
    view: dict[str, Any]  # FeatureView.to_dict()
    partition: int
    partitions: int
    in_sql: bool  # partition in SQL (payloads only for partition k) or in Python (every payload sent)
    rows: list[tuple[int, str, float, int]]  # (row index, entity id, as_of, watermark) by watermark
    to_seq: int
    check: StateCheck | None = None


@dataclass
class UnitResult:
    view: str
    partition: int
    answers: list[tuple[int, list[Any] | None, bool]] = field(default_factory=list)  # (row, values or None, stale)
    events: int = 0
    differences: list[dict[str, Any]] = field(default_factory=list)
    checked: dict[str, Any] | None = None  # with a StateCheck: the view-wide figures at its watermark


# $1 type, $2 the entity key's path, $3 the last seq; in SQL also $4 partitions, $5 partition k.
_UNIT_SQL = (
    "SELECT seq, schema_version, (extract(epoch FROM occurred_at) * 1000000)::int8, payload #>> $2 IS NOT NULL,"
    " {payload} FROM events WHERE type = $1 AND seq <= $3 ORDER BY seq"
)


def _run_unit(unit: Unit) -> UnitResult:
    """A worker process's entry point."""
    return asyncio.run(_fold_unit(unit))


async def _fold_unit(unit: Unit) -> UnitResult:
    view = FeatureView.from_dict(unit.view)
    state = ViewState(view)
    result = UnitResult(view.name, unit.partition)
    names = view.feature_names()
    path = tuple(view.entity_key.split("."))
    k, n, source = unit.partition, unit.partitions, view.source
    rows, r = unit.rows, 0
    check = unit.check

    def answer_until(seq: int) -> None:
        """Answer the rows (and the check) whose watermark is below `seq`: every event up to it is folded."""
        nonlocal r, check
        while r < len(rows) and rows[r][3] < seq:
            index, entity_id, as_of, _ = rows[r]
            try:
                values = state.values(entity_id, as_of)
            except StaleQueryError:
                result.answers.append((index, None, True))
            else:
                result.answers.append((index, None if values is None else [values[f] for f in names], False))
            r += 1
        if check is not None and check.watermark < seq:
            _check_state(state, check, k, n, result)
            check = None

    if unit.in_sql:
        partition = _SQL_PARTITION.format(key="payload #>> $2", n="$4")
        sql, args = _UNIT_SQL.format(payload=f"CASE WHEN {partition} = $5 THEN payload END"), (n, k)
    else:
        sql, args = _UNIT_SQL.format(payload="payload"), ()
    conn = await asyncpg.connect(unit.url)
    try:
        await conn.set_type_codec("jsonb", encoder=lambda v: v, decoder=orjson.loads, schema="pg_catalog")
        if unit.role:
            await conn.execute(f'SET ROLE "{unit.role}"')
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = conn.cursor(sql, source, list(path), unit.to_seq, *args, prefetch=PREFETCH)
            async for seq, schema_version, micros, keyed, payload in cursor:
                result.events += 1
                answer_until(seq)
                if unit.in_sql and not keyed:  # no entity key: folds into nothing, on every path
                    continue
                occurred_at = micros / 1_000_000  # exact microseconds, divided once: datetime.timestamp()
                if payload is None:  # another partition's entity (SQL sends its payload there)
                    state.apply_elsewhere(seq, occurred_at)
                    continue
                event = fold_event(seq, source, schema_version, occurred_at, payload)
                entity = resolve_path(event.payload, path)
                if unit.in_sql:
                    if not (type(entity) is str or type(entity) is int):
                        raise PartitionKeyMismatch(f"{view.name}: event seq {seq} has the key {entity!r}")
                    state.apply(event)
                elif entity is not None and entity_partition(str(entity), n) == k:
                    state.apply(event)
                elif entity is not None:
                    state.apply_elsewhere(seq, occurred_at)
        answer_until(unit.to_seq + 1)
    finally:
        await conn.close()
    return result


def _check_state(state: ViewState, check: StateCheck, k: int, n: int, result: UnitResult) -> None:
    """Compare this partition's entities with the saved state's, values as of its newest event time."""
    name = state.view.name
    snap = orjson.loads(zlib.decompress(check.state))["views"].get(name)
    result.checked = {"max_event_time": state.max_event_time, "dropped_late": state.dropped_late, "entities": 0}
    if snap is None:  # the caller names the view missing from the saved state
        return
    online = ViewState.from_snapshot(state.view, snap)
    result.checked.update(online_max_event_time=online.max_event_time, online_dropped_late=online.dropped_late)
    mine = {e for e in state.entity_ids() if entity_partition(e, n) == k}
    theirs = {e for e in online.entity_ids() if entity_partition(e, n) == k}
    as_of = online.max_event_time
    for entity in sorted(mine | theirs):
        result.checked["entities"] += 1
        if entity not in theirs or entity not in mine:
            result.differences.append({
                "view": name, "entity": entity, "field": "(entity)",
                "online": "present" if entity in theirs else "absent",
                "recomputed": "present" if entity in mine else "absent",
            })  # fmt: skip
            continue
        want, got = online.values(entity, as_of), state.values(entity, as_of)
        for feature, value in want.items():
            if not same_value(value, got[feature]):
                result.differences.append(
                    {"view": name, "entity": entity, "field": feature, "online": value, "recomputed": got[feature]}
                )


def same_value(a: Any, b: Any) -> bool:
    """Equal feature values: None only to None, NaN to NaN, numbers by value (a JSON 3 is 3.0),
    everything else by type and value."""
    if type(a) is float and type(b) is float and a != a and b != b:
        return True
    if _number(a) and _number(b):
        return a == b
    return type(a) is type(b) and a == b


def _number(value: Any) -> bool:
    return type(value) is int or type(value) is float


@dataclass
class FoldResults:
    """The answers of every unit, by view: per row index, (values or None for an unknown entity, stale)."""

    answers: dict[str, dict[int, tuple[list[Any] | None, bool]]]
    units: list[UnitResult]


async def fold_partitions(
    url: str,
    views: Sequence[FeatureView],
    rows: Sequence[FrameRow],
    watermarks: Sequence[int],
    *,
    workers: int | None = None,
    role: str | None = None,
    check: StateCheck | None = None,
    to_seq: int = 0,
    progress: Progress = no_progress,
    stage: str = "features",
) -> FoldResults:
    """Fold every view in (view, partition) units over `workers` processes (default: every usable
    core), answering each row (with its resolved watermark) for the views whose entity it names,
    and, with `check`, comparing the fold at `check.watermark` with the saved online state. Units
    read the log up to the largest watermark asked (or `to_seq`, if larger)."""
    workers = max(1, workers or usable_cores())
    partitions = workers
    times = [r.as_of.timestamp() for r in rows]
    units: list[Unit] = []
    for view in views:
        in_sql = not upcaster_names(view.source)
        per_partition: list[list[tuple[int, str, float, int]]] = [[] for _ in range(partitions)]
        for i, row in enumerate(rows):
            entity = row.keys.get(view.entity)
            if entity:
                per_partition[entity_partition(entity, partitions)].append((i, entity, times[i], watermarks[i]))
        for k, mine in enumerate(per_partition):
            mine.sort(key=lambda x: x[3])
            reach = max([to_seq, *(w for *_, w in mine), check.watermark if check else 0])
            if mine or check is not None:
                units.append(Unit(url, role, view.to_dict(), k, partitions, in_sql, mine, reach, check))
    progress(stage, 0, len(units))
    results: list[UnitResult] = []
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=min(workers, max(1, len(units))), mp_context=get_context("spawn")) as pool:

        async def run(unit: Unit) -> UnitResult:
            try:
                return await loop.run_in_executor(pool, _run_unit, unit)
            except PartitionKeyMismatch:
                return await loop.run_in_executor(pool, _run_unit, _python_partitioned(unit))

        for done in asyncio.as_completed([run(u) for u in units]):
            results.append(await done)
            progress(stage, len(results), len(units))
    answers: dict[str, dict[int, tuple[list[Any] | None, bool]]] = {v.name: {} for v in views}
    for result in results:
        for index, values, stale in result.answers:
            answers[result.view][index] = (values, stale)
    return FoldResults(answers, results)


def _python_partitioned(unit: Unit) -> Unit:
    return Unit(unit.url, unit.role, unit.view, unit.partition, unit.partitions, False, unit.rows, unit.to_seq,
                unit.check)  # fmt: skip


async def resolve_watermarks(url: str, rows: Sequence[FrameRow], role: str | None = None) -> list[int]:
    """Each row's watermark, as `training_frame` resolves a missing one (max seq occurred by as_of)."""
    missing = [i for i, r in enumerate(rows) if r.watermark is None]
    found: dict[int, int] = {}
    if missing:
        pool = await create_pool(url, role=role, max_size=1)
        try:
            times = [rows[i].as_of.timestamp() for i in missing]
            found = dict(zip(missing, await watermarks_at(EventLog(pool), times), strict=True))
        finally:
            await pool.close()
    return [r.watermark if r.watermark is not None else found[i] for i, r in enumerate(rows)]


async def partitioned_frame(
    url: str,
    views: Sequence[FeatureView],
    rows: Sequence[FrameRow],
    *,
    workers: int | None = None,
    role: str | None = None,
    progress: Progress = no_progress,
) -> Any:
    """`training_frame(log, views, rows)` computed in (view, partition) units over `workers`
    processes (default: every usable core): the same DataFrame, cell for cell. `url` is the
    database's; `role`, if given, is SET on the workers' connections (they only read events)."""
    watermarks = await resolve_watermarks(url, rows, role)
    folded = await fold_partitions(url, views, rows, watermarks, workers=workers, role=role, progress=progress)
    defaults = {v.name: ViewState(v).defaults() for v in views}
    values: list[list[Any]] = []
    unknown: list[str] = []
    stale: list[bool] = []
    for i in range(len(rows)):
        row_values: list[Any] = []
        unknown_here: list[str] = []
        row_stale = False
        for view in views:
            names = view.feature_names()
            answer, view_stale = folded.answers[view.name].get(i, (None, False))
            if view_stale:
                row_stale = True
                row_values.extend([None] * len(names))
                continue
            if answer is None:
                answer = [defaults[view.name][f] for f in names]
                if view.entity not in unknown_here:
                    unknown_here.append(view.entity)
            row_values.extend(answer)
        values.append(row_values)
        unknown.append(",".join(unknown_here))
        stale.append(row_stale)
    return assemble_frame(views, rows, watermarks, values, unknown, stale)


# Below this many events a single process folds the log in about the time worker processes take
# to start: partitioning pays from here on.
PARTITION_FROM_EVENTS = 100_000


async def training_frame_on_every_core(
    log: EventLog, views: Sequence[FeatureView], rows: Sequence[FrameRow], *, min_events: int = PARTITION_FROM_EVENTS
) -> Any:
    """`training_frame(log, views, rows)`, computed over every usable core when there is more than
    one and the log holds at least `min_events` (the same frame; the workers connect as the log's
    pool does, in its role)."""
    cores = usable_cores()
    connect_args = getattr(log.pool, "_connect_args", None)  # the URL the pool was created with
    if cores < 2 or not connect_args or not isinstance(connect_args[0], str) or await log.head() < min_events:
        return await training_frame(log, views, rows)
    async with log.pool.acquire() as conn:
        role, login = await conn.fetchrow("SELECT current_user, session_user")
    return await partitioned_frame(connect_args[0], views, rows, workers=cores, role=role if role != login else None)
