"""Point-in-time folds partitioned by entity over worker processes.

A view's entities are split into `n` partitions by a stable hash of the entity id (the first 31
bits of its MD5, modulo n). One *work unit* is partition k of the views that fold one source type:
a worker process opens its own connection, reads that type's events in seq order through a
server-side cursor, and folds, per view, only the entities of partition k (a unit per (view, k)
would read the same events once per view; one per (source, k) reads them once). Postgres sends,
per event, each view's entity key as text (where every key of the source is a JSON string or
integer, that text is the fold's entity id) and the payload as JSON text; the worker maps a key to
its partition once per entity (a dict of the keys met so far: one MD5 per entity, none per event,
and none in Postgres, which shares the cores) and decodes a payload only when some view of its
partition folds it. Every event still counts for the whole view: the fold's lateness, pruning
horizon and `StaleQueryError` depend on the view-wide newest event time, so where an event's
entity is another partition's, `ViewState.apply_elsewhere` advances the time and watermark
without storing anything (a run of such events is noted in one call, before the state next folds
or answers). Each state therefore accepts, prunes and refuses exactly as the
single-process fold does, for its entities. (A source with upcasters, or with an entity key of
another JSON type somewhere, is read whole: every payload decoded and upcast, its keys taken from it.)

A frame row is answered, per view, by the unit holding its entity there; rows are merged back by
index, so `partitioned_frame` equals `d2d.features.offline.training_frame` cell for cell.

The same decomposition is what a distributed engine needs: units share nothing but the log (each
could read its own copy or a shard of it), and each returns its rows' answers keyed by row index:
a map over (source, partition) and a join on row index.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
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


@dataclass(frozen=True)
class StateCheck:
    """Compare the fold at `watermark` with a saved online state: the features snapshot of
    `consumer` (its `state` bytes), entity by entity, values as of the view's newest event time."""

    watermark: int
    state: bytes


@dataclass(frozen=True)
class Unit:
    """Partition k of the views folding one source type: one scan of that type's events."""

    url: str
    role: str | None
    views: list[dict[str, Any]]  # FeatureView.to_dict() of each view of the source
    partition: int
    partitions: int
    in_sql: bool  # entity keys' text from SQL (no upcasters, keys strings or integers), else from payloads
    rows: list[tuple[int, int, str, float, int]]  # (view position, row index, entity id, as_of, watermark)
    to_seq: int
    check: StateCheck | None = None


@dataclass
class UnitResult:
    """One view's answers from one partition."""

    view: str
    partition: int
    answers: list[tuple[int, list[Any] | None, bool]] = field(default_factory=list)  # (row, values or None, stale)
    events: int = 0
    differences: list[dict[str, Any]] = field(default_factory=list)
    checked: dict[str, Any] | None = None  # with a StateCheck: the view-wide figures at its watermark


def _unit_sql(views: int, in_sql: bool) -> str:
    """$1 the type, $2 the last seq; with `in_sql`, $3.. each view's entity key path, whose text
    (NULL: the event has no entity key) the worker maps to a partition, else the schema version (to
    upcast). The payload comes as JSON text: the worker decodes only the payloads a view of its
    partition folds."""
    micros = "(extract(epoch FROM occurred_at) * 1000000)::int8"
    columns = "".join(f"payload #>> ${3 + i}, " for i in range(views)) if in_sql else "schema_version, "
    return f"SELECT seq, {micros}, {columns}payload FROM events WHERE type = $1 AND seq <= $2 ORDER BY seq"


def _run_unit(unit: Unit) -> list[UnitResult]:
    """A worker process's entry point.

    Not `asyncio.run`: on its way out (Python 3.11) it looks the SIGINT handler it installed up in
    the `Signals` enum, whose refusal formats the handler, with it the finished task and so the
    repr of every answer in the result: seconds of CPU per unit, for nothing."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_fold_unit(unit))
    finally:
        loop.close()


async def _fold_unit(unit: Unit) -> list[UnitResult]:
    views = [FeatureView.from_dict(v) for v in unit.views]
    states = [ViewState(v) for v in views]
    results = [UnitResult(v.name, unit.partition) for v in views]
    names = [v.feature_names() for v in views]
    # Where a state answers in feature order (its plan's), its values are taken as they come.
    in_order = [list(state.defaults()) == names[position] for position, state in enumerate(states)]
    paths = [tuple(v.entity_key.split(".")) for v in views]
    k, n, source, width = unit.partition, unit.partitions, views[0].source, len(views)
    in_sql = unit.in_sql
    rows, r = unit.rows, 0
    check = unit.check

    # Per view, other partitions' events not yet noted in its state: the seq of the last (0: none)
    # and the newest occurred_at met (a running maximum). `apply_elsewhere` of that pair equals its
    # calls for each of them, so they are noted in one call, when the state is next used.
    behind = [0] * width
    newest = [-math.inf] * width

    def note_elsewhere() -> None:
        for position, state in enumerate(states):
            if behind[position]:
                state.apply_elsewhere(behind[position], newest[position])
                behind[position] = 0

    def answer_until(seq: int) -> None:
        """Answer the rows (and the check) whose watermark is below `seq`: every event up to it is folded."""
        nonlocal r, check
        note_elsewhere()
        while r < len(rows) and rows[r][4] < seq:
            position, index, entity_id, as_of, _ = rows[r]
            state, result = states[position], results[position]
            try:
                values = state.values(entity_id, as_of)
            except StaleQueryError:
                result.answers.append((index, None, True))
            else:
                answer = None
                if values is not None:
                    answer = list(values.values()) if in_order[position] else [values[f] for f in names[position]]
                result.answers.append((index, answer, False))
            r += 1
        if check is not None and check.watermark < seq:
            for state, result in zip(states, results, strict=True):
                _check_state(state, check, k, n, result)
            check = None

    def due() -> int:
        """The first seq after which a row or the check is due (`to_seq`, which no seq exceeds: none)."""
        return min(rows[r][4] if r < len(rows) else unit.to_seq, check.watermark if check is not None else unit.to_seq)

    sql = _unit_sql(width, in_sql)
    args = [source, unit.to_seq, *([list(p) for p in paths] if in_sql else [])]
    # Whether each entity key text met so far is this partition's (entities recur: one MD5 per entity).
    is_mine: dict[str, bool] = {}
    by_view = [(position, 2 + position, state) for position, state in enumerate(states)]  # key column of each
    loads = orjson.loads
    conn = await asyncpg.connect(unit.url)  # no jsonb codec: payloads arrive as text
    try:
        if unit.role:
            await conn.execute(f'SET ROLE "{unit.role}"')
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            events = 0
            next_due = due()
            cursor = await conn.cursor(sql, *args)
            while page := await cursor.fetch(PREFETCH):  # pages: no per-record await
                events += len(page)
                for record in page:
                    seq = record[0]
                    if next_due < seq:
                        answer_until(seq)
                        next_due = due()
                    occurred_at = record[1] / 1_000_000  # exact microseconds, divided once: datetime.timestamp()
                    if in_sql:  # a type without upcasters: the payload is folded as stored
                        payload = None
                        for position, column, state in by_view:
                            key = record[column]
                            if key is None:  # no entity key: folds into nothing, on every path
                                continue
                            mine = is_mine.get(key)
                            if mine is None:
                                mine = is_mine[key] = entity_partition(key, n) == k
                            if mine:
                                if payload is None:
                                    payload = loads(record[-1])
                                if behind[position]:
                                    state.apply_elsewhere(behind[position], newest[position])
                                    behind[position] = 0
                                state.apply_payload(seq, occurred_at, payload)
                            else:  # another partition's entity: noted when this state is next used
                                behind[position] = seq
                                if occurred_at > newest[position]:
                                    newest[position] = occurred_at
                        continue
                    event = fold_event(seq, source, record[2], occurred_at, loads(record[-1]))
                    for position in range(width):
                        entity = resolve_path(event.payload, paths[position])
                        if entity is None:
                            continue
                        if entity_partition(str(entity), n) == k:
                            states[position].apply(event)
                        else:
                            states[position].apply_elsewhere(seq, occurred_at)
        answer_until(unit.to_seq + 1)
    finally:
        await conn.close()
    for result in results:
        result.events = events
    return results


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
    """Fold every view in (source, partition) units over `workers` processes (default: every usable
    core), answering each row (with its resolved watermark) for the views whose entity it names,
    and, with `check`, comparing the fold at `check.watermark` with the saved online state. Units
    read the log up to the largest watermark asked (or `to_seq`, if larger)."""
    workers = max(1, workers or usable_cores())
    partitions = workers
    times = [r.as_of.timestamp() for r in rows]
    by_source: dict[str, list[FeatureView]] = {}
    for view in views:
        by_source.setdefault(view.source, []).append(view)
    results: list[UnitResult] = []
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        # The worker processes start (Python, imports) and Postgres checks each source's keys while
        # this process sorts the rows into units (in a thread: the event loop runs the checks).
        for _ in range(workers if rows or check is not None else 0):  # (no rows, no check: no units)
            pool.submit(os.getpid)
        plain = [source for source in by_source if not upcaster_names(source)]
        partition_of: dict[str, int] = {}  # each row entity's partition (entities recur in rows)

        def sort_rows(group: list[FeatureView]) -> list[list[tuple[int, int, str, float, int]]]:
            """The rows asking `group`'s views, by the partition of the entity asked."""
            per_partition: list[list[tuple[int, int, str, float, int]]] = [[] for _ in range(partitions)]
            for position, view in enumerate(group):
                for i, row in enumerate(rows):
                    entity = row.keys.get(view.entity)
                    if entity:
                        part = partition_of.get(entity)
                        if part is None:
                            part = partition_of[entity] = entity_partition(entity, partitions)
                        per_partition[part].append((position, i, entity, times[i], watermarks[i]))
            for mine in per_partition:
                mine.sort(key=lambda x: x[4])
            return per_partition

        checked, sorted_rows = await asyncio.gather(
            asyncio.gather(*(_keys_are_text(url, role, source, by_source[source]) for source in plain)),
            asyncio.to_thread(lambda: {source: sort_rows(group) for source, group in by_source.items()}),
        )
        text_keys = dict(zip(plain, checked, strict=True))
        units: list[Unit] = []
        for source, group in by_source.items():
            views_json = [v.to_dict() for v in group]
            for k, mine in enumerate(sorted_rows[source]):
                reach = max([to_seq, *(x[4] for x in mine), check.watermark if check else 0])
                if mine or check is not None:
                    units.append(
                        Unit(url, role, views_json, k, partitions, text_keys.get(source, False), mine, reach, check)
                    )
        progress(stage, 0, len(units))

        async def run(unit: Unit) -> list[UnitResult]:
            return await loop.run_in_executor(pool, _run_unit, unit)

        for finished, done in enumerate(asyncio.as_completed([run(u) for u in units]), 1):
            results += await done
            progress(stage, finished, len(units))
    answers: dict[str, dict[int, tuple[list[Any] | None, bool]]] = {v.name: {} for v in views}
    for result in results:
        for index, values, stale in result.answers:
            answers[result.view][index] = (values, stale)
    return FoldResults(answers, results)


async def _keys_are_text(url: str, role: str | None, source: str, views: Sequence[FeatureView]) -> bool:
    """Whether every entity key in `source` events is a JSON string or integer, whose text in
    Postgres is Python's `str` of it, so that Postgres may choose partitions (a float or boolean
    key has another text there: then Python chooses, from every payload)."""
    conn = await asyncpg.connect(url)
    try:
        if role:
            await conn.execute(f'SET ROLE "{role}"')
        odd = " OR ".join(
            f"(jsonb_typeof(payload #> ${i}) NOT IN ('string', 'null')"
            f" AND NOT (jsonb_typeof(payload #> ${i}) = 'number' AND payload #>> ${i} ~ '^-?[0-9]+$'))"
            for i in range(2, len(views) + 2)
        )
        paths = [v.entity_key.split(".") for v in views]
        sql = f"SELECT EXISTS (SELECT 1 FROM events WHERE type = $1 AND ({odd}))"
        return not await conn.fetchval(sql, source, *paths)
    finally:
        await conn.close()


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
    """`training_frame(log, views, rows)` computed in (source, partition) units over `workers`
    processes (default: every usable core): the same DataFrame, cell for cell. `url` is the
    database's; `role`, if given, is SET on the workers' connections (they only read events)."""
    watermarks = await resolve_watermarks(url, rows, role)
    folded = await fold_partitions(url, views, rows, watermarks, workers=workers, role=role, progress=progress)
    # Per view: its answers by row, its defaults in feature order, its entity type (hoisted: per row
    # and view the loop below only looks up and extends).
    per_view = []
    for view in views:
        defaults = ViewState(view).defaults()
        names = view.feature_names()
        per_view.append((folded.answers[view.name], [defaults[f] for f in names], [None] * len(names), view.entity))
    values: list[list[Any]] = []
    unknown: list[str] = []
    stale: list[bool] = []
    unanswered = (None, False)
    for i in range(len(rows)):
        row_values: list[Any] = []
        unknown_here: list[str] = []
        row_stale = False
        for answers, default, empty, entity in per_view:
            answer, view_stale = answers.get(i, unanswered)
            if view_stale:
                row_stale = True
                row_values += empty
                continue
            if answer is None:
                answer = default
                if entity not in unknown_here:
                    unknown_here.append(entity)
            row_values += answer
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
