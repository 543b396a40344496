"""The platform's derived state as it was at a log position, rebuilt from the log alone.

Feature state: every view (the newest version of each name registered by then, or the first
version of a name registered only later) folded over its source events up to the position, by the
fold the features service runs. Registry and feedback state: the projections rebuilt up to the
position into a scratch database (models with their deployment and promotion policies, aliases,
versions, outcome rules, the decision/outcome join), and the live metrics computed over that join
by the function the feedback service uses.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from d2d import projections
from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.features.definitions import FeatureView
from d2d.features.fold import StaleQueryError, ViewState
from d2d.features.offline import fold_pages, utc
from d2d.metrics import JoinRow, compute
from d2d.policies import describe
from d2d.replay.explain import Registered, log_views
from d2d.replay.log import Progress, no_progress
from d2d.replay.scratch import scratch_database


async def position_at(log: EventLog, time: datetime) -> int:
    """The last seq recorded at or before `time` (0 before the first event)."""
    async with log.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events WHERE recorded_at <= $1", time))


def parse_entities(entities: Sequence[str]) -> list[tuple[str, str]]:
    """`{entity}/{id}` strings -> (entity, id); INVALID_ARGUMENT naming `entities` otherwise."""
    parsed = []
    for text in entities:
        entity, _, entity_id = text.partition("/")
        if not entity or not entity_id:
            raise Refusal("INVALID_ARGUMENT", f"{text!r} is not '{{entity}}/{{id}}' (e.g. 'customer/c-17')", "entities")
        parsed.append((entity, entity_id))
    return parsed


def views_at(registered: Registered, seq: int) -> list[tuple[int, FeatureView]]:
    """Per view name, the newest version registered at or before `seq`, or, for a name registered
    only later, its first version (the state it would have had): (registration seq, view)."""
    chosen: dict[str, tuple[int, FeatureView]] = {}
    for at, view in sorted(registered.values(), key=lambda found: found[0]):
        if view.name not in chosen or at <= seq:
            chosen[view.name] = (at, view)
    return sorted(chosen.values(), key=lambda found: found[0])


async def feature_state(
    log: EventLog, seq: int, entities: Sequence[tuple[str, str]], progress: Progress = no_progress
) -> dict[str, Any]:
    """Per view folded up to `seq`: watermark, entities, dropped_late, newest event time, and the
    values of the `entities` asked as of that newest event time."""
    chosen = views_at(await log_views(log), seq)
    registered_at = {view.name: at for at, view in chosen}
    views = [view for _, view in chosen]
    states = {v.name: ViewState(v) for v in views}
    by_source: dict[str, list[ViewState]] = {}
    for view in views:
        by_source.setdefault(view.source, []).append(states[view.name])
    done = 0
    async for page in fold_pages(log, list(by_source), seq):
        for event in page:
            for state in by_source[event.type]:
                state.apply(event)
        done += len(page)
        progress("features", done, 0)
    progress("features", done, done)
    found: dict[str, Any] = {}
    for view in views:
        state = states[view.name]
        as_of = state.max_event_time
        asked: dict[str, Any] = {}
        for entity, entity_id in entities:
            if entity != view.entity:
                continue
            try:
                values = state.values(entity_id, as_of) if as_of is not None else None
            except StaleQueryError:  # cannot happen at the newest event time; said for completeness
                values = None
            asked[f"{entity}/{entity_id}"] = {"known": values is not None, "values": values or state.defaults()}
        found[view.name] = {
            "version": view.version,
            "entity": view.entity,
            "source": view.source,
            "registered_seq": registered_at[view.name],
            "registered_after": registered_at[view.name] > seq,
            "watermark": seq,
            "events_folded": done,
            "entities": state.entities(),
            "dropped_late": state.dropped_late,
            "as_of": None if as_of is None else utc(as_of).isoformat(),
            "values": asked,
        }
    return found


def _jsonb(value: Any) -> Any:
    """A jsonb cell (a plain connection returns it as its JSON text)."""
    return json.loads(value) if isinstance(value, str) else value


async def rebuilt_state(owner_url: str, seq: int) -> dict[str, Any]:
    """Models, policies, aliases, versions, outcome rules, the join and live metrics: the
    projections rebuilt up to `seq` in a scratch database (dropped afterwards)."""
    async with scratch_database(owner_url) as url:
        await projections.rebuild(owner_url, url, to_seq=seq)
        conn = await asyncpg.connect(url)
        try:
            models = await conn.fetch(
                "SELECT name, registered_seq, deployment_policy, promotion_policy FROM models ORDER BY name"
            )
            aliases = await conn.fetch("SELECT model, alias, version, set_seq FROM model_aliases ORDER BY model, alias")
            versions = await conn.fetch(
                "SELECT model, version, sha256, registered_seq FROM model_versions ORDER BY model, version"
            )
            rules = await conn.fetch("SELECT name, event_type, terms, registered_seq FROM outcome_rules ORDER BY name")
            joined = [JoinRow.from_mapping(r) for r in await conn.fetch("SELECT * FROM decision_outcomes")]
        finally:
            await conn.close()
    by_model: dict[str, dict[str, Any]] = {}
    for m in models:
        by_model[m["name"]] = {
            "registered_seq": m["registered_seq"], "policy": _jsonb(m["deployment_policy"]),
            "promotion_policy": _jsonb(m["promotion_policy"]), "aliases": {}, "versions": [],
        }  # fmt: skip
    for a in aliases:
        by_model[a["model"]]["aliases"][a["alias"]] = {"version": a["version"], "set_seq": a["set_seq"]}
    for v in versions:
        by_model[v["model"]]["versions"].append(
            {"version": v["version"], "sha256": v["sha256"], "registered_seq": v["registered_seq"]}
        )
    joins: dict[str, dict[str, int]] = {}
    for row in joined:
        counts = joins.setdefault(row.model, {"decisions": 0, "withdrawn": 0, "with_outcome": 0, "labelled": 0})
        counts["decisions"] += 1
        counts["withdrawn"] += row.withdrawn
        counts["with_outcome"] += row.outcome_at is not None
        counts["labelled"] += row.label is not None
    return {
        "models": by_model,
        "outcome_rules": [{**dict(r), "terms": _jsonb(r["terms"])} for r in rules],
        "joins": joins,
        "metrics": [m.to_dict() for m in compute(joined)],
    }


async def replay_state(
    log: EventLog, owner_url: str, *, seq: int | None = None, time: datetime | None = None,
    entities: Sequence[str] = (), progress: Progress = no_progress,
) -> dict[str, Any]:  # fmt: skip
    """The state after the event at `seq` (or after every event recorded at or before `time`; the
    log's head when neither is given): `features`, `models`, `outcome_rules`, `joins`, `metrics`.
    INVALID_ARGUMENT naming `seq` for a position past the head (or negative)."""
    asked = parse_entities(entities)
    head = await log.head()
    if seq is not None:
        if seq < 0 or seq > head:
            raise Refusal("INVALID_ARGUMENT", f"seq {seq} is not a log position: the log holds 0 to {head}", "seq")
    elif time is not None:
        seq = await position_at(log, time)
    else:
        seq = head
    features = await feature_state(log, seq, asked, progress)
    progress("projections", 0, seq)
    rebuilt = await rebuilt_state(owner_url, seq)
    progress("projections", seq, seq)
    at = None if time is None else time.isoformat()
    return {"seq": seq, "head": head, "time": at, "features": features, **rebuilt}


def render(state: dict[str, Any]) -> str:
    """The state as a report a person reads (at most 100 columns)."""
    lines = [f"State after log seq {state['seq']:,} (the log's head is {state['head']:,})", "", "Models"]
    for name, model in state["models"].items():
        policy = model["policy"] or {}
        aliases = ", ".join(f"{alias} -> {a['version']} (seq {a['set_seq']})" for alias, a in model["aliases"].items())
        lines += [
            f"  models/{name}: {len(model['versions'])} versions; aliases: {aliases or 'none'}",
            f"    policy: {describe(policy)}, canary share {policy.get('canary_share')}",
        ]
        if model["promotion_policy"]:
            promotion = ", ".join(f"{k} {v}" for k, v in sorted(model["promotion_policy"].items()))
            lines.append(f"    promotion policy: {promotion}")
    if not state["models"]:
        lines.append("  none")
    lines += ["", "Outcome rules"]
    lines += [f"  {r['name']} on {r['event_type']} (seq {r['registered_seq']})" for r in state["outcome_rules"]] or [
        "  none"
    ]
    lines += ["", "Join (decisions and outcomes)"]
    for model, counts in state["joins"].items():
        lines.append(
            f"  models/{model}: {counts['decisions']:,} decisions, {counts['withdrawn']:,} withdrawn,"
            f" {counts['with_outcome']:,} with an outcome, {counts['labelled']:,} labelled"
        )
    if not state["joins"]:
        lines.append("  none")
    if state["metrics"]:
        lines += ["", f"  {'version':<24} {'arm':<11} {'decisions':>10} {'labelled':>9} {'AUC':>7} {'IPS AUC':>8}"]
        for m in state["metrics"]:
            version = f"{m['model']}@{m['model_version']}"
            lines.append(
                f"  {version:<24} {m['arm']:<11} {m['decisions']:>10,} {m['labelled']:>9,} {_num(m['auc']):>7}"
                f" {_num(m['ips_auc']):>8}"
            )
    lines += ["", "Feature views"]
    for name, view in state["features"].items():
        lines.append(
            f"  {name} ({view['entity']}, version {view['version']}): {view['entities']:,} entities,"
            f" {view['dropped_late']:,} dropped late, newest event {view['as_of'] or '-'}"
        )
        for entity, asked in view["values"].items():
            lines.append(f"    {entity}{'' if asked['known'] else ' (unknown: defaults)'}")
            for feature, value in asked["values"].items():
                lines.append(f"      {feature:<40} {_value(value):>20}")
    return "".join(line + "\n" for long in lines for line in _fit(long))


def _fit(line: str, width: int = 100) -> list[str]:
    """A line wrapped to `width`, continuation lines indented under it."""
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.wrap(line, width, subsequent_indent=indent)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)
