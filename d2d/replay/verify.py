"""Verify: every derived state recomputed from the log and compared, every logged vector checked.

- Projections: every projector replayed from the log into a scratch database and each table
  compared with the live one, row by row and column by column. The live side is read in one
  snapshot with the head and each consumer's position: a projection applied by a consumer that
  tails the log (the decision/outcome join, by `feedback`) is compared at that consumer's
  position, so a verify while the platform runs reports no lag as a difference.
- Feature state: each saved features snapshot against the offline fold to its watermark, entity
  by entity, every feature's value as of the view's newest event time.
- Decisions: for every `decision.made`, its feature vector recomputed offline at (its entities,
  as_of, feature_watermark) and compared with the logged `features`, and with the logged `inputs`
  where an input is a feature by name. This is the per-decision form of "zero skew".
- Joins and metrics: the join is the `decision_outcomes` projection (checked above) and the metrics
  are a function of it (`d2d.metrics`), so they hold when it does.

The fold of the last two runs once, in (source, partition) units over every core
(`d2d.replay.partition`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from d2d.eventlog import EventLog, create_pool
from d2d.features.definitions import FeatureView
from d2d.features.fold import ViewState
from d2d.features.offline import FrameRow
from d2d.features.store import registered_views
from d2d.projections import FEEDBACK, PROJECTORS, TABLES, apply, diff_rows, table_rows
from d2d.replay.log import PAGE, Progress, no_progress, read_all
from d2d.replay.partition import StateCheck, fold_partitions, same_value
from d2d.replay.scratch import scratch_database
from d2d.training.decisions import decision_time, version_inputs

# Projection tables a log consumer applies (not the appending transaction), by that consumer's
# position name in `log_positions`.
APPLIED_BY_CONSUMER = {"decision_outcomes": FEEDBACK}

JOINS_AND_METRICS = (
    "the decision/outcome join is the decision_outcomes projection (compared above, at the feedback"
    " consumer's position); live metrics are computed from it (d2d.metrics)"
)


async def verify(
    url: str, *, workers: int | None = None, skip_projections: bool = False, progress: Progress = no_progress
) -> dict[str, Any]:
    """Recompute everything derived from the log at `url` (the owner's: a scratch database is
    created next to it) and compare; the result lists every difference (`ok` when none)."""
    started = time.perf_counter()
    pool = await create_pool(url, role=None, max_size=4)
    log = EventLog(pool)
    projection_differences: list[dict[str, Any]] = []
    fold_differences: list[dict[str, Any]] = []
    checked: dict[str, Any] = {}
    try:
        if skip_projections:
            head = await log.head()
            checked["projections"] = "skipped"
        else:
            head, positions, live = await _live_projections(log)
        # The fold runs in worker processes; meanwhile this process rebuilds the projections.
        fold = _verify_folds(url, log, head, workers, fold_differences, progress)
        if skip_projections:
            checked.update(await fold)
        else:
            rebuild = _verify_projections(url, log, head, positions, live, projection_differences, progress)
            for counts in await asyncio.gather(rebuild, fold):
                checked.update(counts)
    finally:
        await pool.close()
    differences = projection_differences + fold_differences
    return {
        "ok": not differences,
        "head": head,
        "checked": checked,
        "joins_and_metrics": JOINS_AND_METRICS,
        "differences": differences,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---------------------------------------------------------------------------------------------
# Projections


async def _live_projections(log: EventLog) -> tuple[int, dict[str, int], dict[str, dict[tuple[Any, ...], Any]]]:
    """One snapshot of the live side: the head, the consumers' positions and every projection row."""
    async with log.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
        positions = dict(await conn.fetch("SELECT name, seq FROM log_positions"))
        live = {table: await table_rows(conn, table, key) for table, key in TABLES.items()}
    return head, positions, live


async def _verify_projections(
    url: str,
    log: EventLog,
    head: int,
    positions: dict[str, int],
    live: dict[str, dict[tuple[Any, ...], Any]],
    differences: list[dict[str, Any]],
    progress: Progress,
) -> dict[str, Any]:
    """Replay every projector into a scratch database and compare each table with the live one:
    at `head`, or at the position of the consumer that applies it."""
    stop_at = {table: min(head, positions.get(APPLIED_BY_CONSUMER[table], 0)) if table in APPLIED_BY_CONSUMER
               else head for table in TABLES}  # fmt: skip
    rebuilt: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    async with scratch_database(url, "verify") as scratch:
        scratch_pool = await create_pool(scratch, role=None, max_size=1)  # jsonb decoded as live
        try:
            async with scratch_pool.acquire() as target:
                await _copy_artifacts(log, target)
                stops = sorted(set(stop_at.values()))
                total = await _count(log, head)
                done, after = 0, 0
                for stop in stops:
                    while after < stop:
                        page = [e for e in await log.read(after, PAGE, types=list(PROJECTORS)) if e.seq <= stop]
                        if not page:
                            break
                        async with target.transaction():
                            await EventLog.copy_in(target, page)
                            await apply(target, page, applied_by=None)
                        after, done = page[-1].seq, done + len(page)
                        progress("projections", done, total)
                    after = stop
                    for table, at in stop_at.items():
                        if at == stop:
                            rebuilt[table] = await table_rows(target, table, TABLES[table])
        finally:
            await scratch_pool.close()
    rows = 0
    for table, key in TABLES.items():
        rows += len(live[table].keys() | rebuilt[table].keys())
        for difference in diff_rows(table, live[table], rebuilt[table]):
            differences += _projection_differences(table, key, difference.live, difference.rebuilt)
    counts = {"projection_tables": len(TABLES), "projection_rows": rows, "projection_events": done,
              "positions": {name: stop_at[table] for table, name in APPLIED_BY_CONSUMER.items()}}  # fmt: skip
    return counts


def _projection_differences(
    table: str, key: tuple[str, ...], stored: dict[str, Any] | None, recomputed: dict[str, Any] | None
) -> list[dict[str, Any]]:
    row = stored if stored is not None else recomputed
    assert row is not None
    named = {column: row[column] for column in key}
    if stored is None or recomputed is None:
        return [{"kind": "projection", "table": table, "key": named, "column": "(row)",
                 "stored": None if stored is None else "present",
                 "recomputed": None if recomputed is None else "present"}]  # fmt: skip
    return [
        {"kind": "projection", "table": table, "key": named, "column": column, "stored": stored[column],
         "recomputed": recomputed.get(column)}
        for column in stored if stored[column] != recomputed.get(column)
    ]  # fmt: skip


async def _copy_artifacts(log: EventLog, target: asyncpg.Connection) -> None:
    """The artifact blobs (model versions name them), each checked against its hash."""
    async with log.pool.acquire() as conn:
        artifacts = await conn.fetch("SELECT sha256, data, size_bytes, created_at FROM artifacts")
    for row in artifacts:
        if hashlib.sha256(row["data"]).hexdigest() != row["sha256"]:
            raise ValueError(f"artifact {row['sha256']} does not hash to its name")
        await target.execute(
            "INSERT INTO artifacts (sha256, data, size_bytes, created_at) VALUES ($1, $2, $3, $4)", *row.values()
        )


async def _count(log: EventLog, head: int) -> int:
    async with log.pool.acquire() as conn:
        return await conn.fetchval(
            "SELECT count(*) FROM events WHERE type = ANY($1) AND seq <= $2", list(PROJECTORS), head
        )


# ---------------------------------------------------------------------------------------------
# Feature state and logged decisions: one partitioned fold


async def _verify_folds(
    url: str, log: EventLog, head: int, workers: int | None, differences: list[dict[str, Any]], progress: Progress
) -> dict[str, Any]:
    registered = await registered_views(log.pool)
    async with log.pool.acquire() as conn:
        snapshots = await conn.fetch("SELECT consumer, watermark, state FROM feature_snapshots ORDER BY consumer")
    decisions = await read_all(log, ["decision.made"], to_seq=head)
    input_names = await version_inputs(log, None, head)
    progress("decisions", 0, len(decisions))
    checked: dict[str, Any] = {"feature_snapshots": {}, "feature_entities": 0}
    first = True
    for consumer, watermark, state in snapshots or [(None, 0, None)]:
        views = _snapshot_views(registered, state) if state is not None else _newest(registered)
        rows, used = _decision_rows(decisions, differences) if first else ([], [])
        check = StateCheck(watermark, state) if state is not None else None
        stage = f"fold ({consumer})" if consumer else "fold"
        folded = await fold_partitions(url, views, rows, [r.watermark for r in rows], workers=workers, role=None,
                                       check=check, progress=progress, stage=stage)  # fmt: skip
        if check is not None:
            checked["feature_snapshots"][consumer] = watermark
            checked["feature_entities"] += _state_differences(consumer, views, folded.units, differences)
        if first:
            checked.update(_decision_differences(used, views, folded.answers, input_names, differences))
            progress("decisions", len(decisions), len(decisions))
        first = False
    return checked


def _newest(registered: Sequence[FeatureView]) -> list[FeatureView]:
    """The newest registered version of each view."""
    return list({v.name: v for v in registered}.values())


def _snapshot_views(registered: Sequence[FeatureView], state: bytes) -> list[FeatureView]:
    """The registered versions of the views a features snapshot folded (others: the newest)."""
    versions = {name: snap["version"] for name, snap in orjson.loads(zlib.decompress(state))["views"].items()}
    by_version = {(v.name, v.version): v for v in registered}
    chosen = {v.name: v for v in _newest(registered)}
    for name, version in versions.items():
        if (name, version) in by_version:
            chosen[name] = by_version[(name, version)]
    return list(chosen.values())


def _state_differences(consumer: str, views: Sequence[FeatureView], units: Sequence[Any], out: list) -> int:
    entities = 0
    for view in views:
        mine = [u for u in units if u.view == view.name and u.checked is not None]
        if not mine or "online_max_event_time" not in mine[0].checked:
            out.append({"kind": "feature_state", "consumer": consumer, "view": view.name, "entity": None,
                        "field": "(view)", "online": "absent", "recomputed": "present"})  # fmt: skip
            continue
        figures = mine[0].checked
        entities += sum(u.checked["entities"] for u in mine)
        for u in mine:
            out += [{"kind": "feature_state", "consumer": consumer, **d} for d in u.differences]
        recomputed = {"max_event_time": figures["max_event_time"],
                      "dropped_late": sum(u.checked["dropped_late"] for u in mine)}  # fmt: skip
        for field, value in recomputed.items():
            if not same_value(figures[f"online_{field}"], value):
                out.append({"kind": "feature_state", "consumer": consumer, "view": view.name, "entity": None,
                            "field": field, "online": figures[f"online_{field}"], "recomputed": value})  # fmt: skip
    return entities


def _decision_rows(decisions: Sequence[Any], out: list[dict[str, Any]]) -> tuple[list[FrameRow], list[Any]]:
    """A frame row per decision whose payload says what it read (entities, as_of, watermark)."""
    rows, used = [], []
    for event in decisions:
        p = event.payload
        watermark = p.get("feature_watermark")
        if not isinstance(watermark, int) or not isinstance(p.get("entities"), dict):
            out.append({"kind": "decision", "decision_id": str(p.get("decision_id")), "feature": "(payload)",
                        "logged": None, "recomputed": "entities and feature_watermark"})  # fmt: skip
            continue
        rows.append(FrameRow({k: str(v) for k, v in p["entities"].items()}, decision_time(event), watermark))
        used.append(event)
    return rows, used


def _decision_differences(
    decisions: Sequence[Any],
    views: Sequence[FeatureView],
    answers: dict[str, dict[int, tuple[list[Any] | None, bool]]],
    input_names: dict[str, list[str]],
    out: list[dict[str, Any]],
) -> dict[str, int]:
    """Each decision's logged features (and the inputs named after them) against the fold's answers."""
    by_name = {v.name: (v, v.feature_names(), ViewState(v).defaults()) for v in views}
    features_checked = inputs_checked = 0
    for i, event in enumerate(decisions):
        p = event.payload
        decision_id = str(p["decision_id"])
        recomputed: dict[str, Any] = {}
        for name, logged in (p.get("features") or {}).items():
            view_name, _, feature = name.partition(".")
            found = by_name.get(view_name)
            if found is None or feature not in found[1]:
                out.append({"kind": "decision", "decision_id": decision_id, "feature": name, "logged": logged,
                            "recomputed": "no such registered feature"})  # fmt: skip
                continue
            view, names, defaults = found
            values, stale = answers[view_name].get(i, (None, False))
            if stale:
                out.append({"kind": "decision", "decision_id": decision_id, "feature": name, "logged": logged,
                            "recomputed": "stale (as_of older than the view's queryable range)"})  # fmt: skip
                continue
            value = defaults[feature] if values is None else values[names.index(feature)]
            recomputed[name] = value
            features_checked += 1
            if not same_value(logged, value):
                out.append({"kind": "decision", "decision_id": decision_id, "feature": name, "logged": logged,
                            "recomputed": value})  # fmt: skip
        inputs = p.get("inputs") or []
        for position, name in enumerate(input_names.get(str(p.get("model_version")), [])[: len(inputs)]):
            if name in recomputed:
                inputs_checked += 1
                want = _as_input(recomputed[name])
                if not same_value(_as_input(inputs[position]), want):
                    out.append({"kind": "decision", "decision_id": decision_id, "feature": f"inputs[{name}]",
                                "logged": inputs[position], "recomputed": want})  # fmt: skip
    return {"decisions": len(decisions), "decision_features": features_checked, "decision_inputs": inputs_checked}


def _as_input(value: Any) -> float | None:
    """A feature value as a model input (serving's conversion: numbers as floats, else missing)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return float(value)
