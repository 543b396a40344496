"""One decision and everything behind it, from the log alone.

For each feature the decision read, the ids of the events that fed it: the view's source events of
the decision's entity with seq <= its feature watermark that the fold accepted (lateness is decided
view-wide, so the view's whole stream up to the watermark is folded to know which were dropped),
then, of those, the rows the feature's query as of the decision's time took as inputs (inside its
window, passing its filter, holding its field). The accepted events of the entity, folded alone
into a fresh state, give the same values: the explanation checks that for every feature
(`matches_logged`), so an auditor holds the evidence, not a claim.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from d2d.eventlog import EventLog, StoredEvent
from d2d.features.definitions import FeatureView, resolve_path
from d2d.features.fold import FoldEvent, StaleQueryError, ViewState, fold_event, posix_seconds
from d2d.features.offline import source_events
from d2d.personal import KeyStore, envelopes
from d2d.policies import describe
from d2d.replay.log import PAGE, Progress, load_version, no_progress, read_all
from d2d.replay.log import decision_event as find_decision
from d2d.training.decisions import decision_time

WIDTH = 100
LISTED_EVENTS = 60  # a view's events the report lists one by one (the oldest few and the newest)
LINEAGE_LEFT_OUT = ("baseline",)  # the training distributions drift is measured against: large, not lineage


async def log_views(log: EventLog, *, to_seq: int | None = None) -> dict[tuple[str, str], tuple[int, FeatureView]]:
    """Every view version registered in the log up to `to_seq`: (name, version) -> (seq, view)."""
    return {
        (e.payload["name"], e.payload["version"]): (e.seq, FeatureView.from_dict(e.payload["definition"]))
        for e in await read_all(log, ["feature_view.registered"], to_seq=to_seq)
    }


Registered = Mapping[tuple[str, str], tuple[int, FeatureView]]  # (name, version) -> (seq, view)


def decision_views(
    payload: Mapping[str, Any], spec_views: Sequence[Sequence[str]], registered: Registered, seq: int
) -> list[FeatureView]:
    """The views a decision read (the prefixes of its `features`), each in the version its model
    version's spec names, else the newest registered before the decision."""
    pinned = {name: version for name, version in spec_views}
    views = []
    for name in dict.fromkeys(key.split(".", 1)[0] for key in payload.get("features", {})):
        found = registered.get((name, pinned[name])) if name in pinned else None
        if found is None:
            candidates = [(s, v) for (n, _), (s, v) in registered.items() if n == name and s < seq]
            found = max(candidates, key=lambda c: c[0]) if candidates else None
        if found is not None:
            views.append(found[1])
    return views


def entity_key_of(view: FeatureView, payload: Mapping[str, Any]) -> str | None:
    """The entity id an event's (upcast) payload names for `view`, as the fold keys it."""
    value = resolve_path(payload, tuple(view.entity_key.split(".")))
    return None if value is None else str(value)


def as_fold_event(stored: StoredEvent) -> FoldEvent:
    """A stored event as the fold takes it (payload upcast), as both feature paths build it."""
    return fold_event(stored.seq, stored.type, stored.schema_version, stored.occurred_at.timestamp(), stored.payload)


async def fed_events(
    log: EventLog, views: Sequence[FeatureView], entities: Mapping[str, str], as_of: float, watermark: int,
    progress: Progress = no_progress,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per view: the entity's events the fold accepted up to `watermark` (id, seq, occurred_at), how
    many it dropped for lateness, and per feature the value those events give alone as of `as_of`
    and the ids of the events that fed it."""
    full = {v.name: ViewState(v) for v in views}
    accepted: dict[str, list[tuple[FoldEvent, StoredEvent]]] = {v.name: [] for v in views}
    dropped: dict[str, int] = {v.name: 0 for v in views}
    by_source: dict[str, list[FeatureView]] = {}
    for view in views:
        by_source.setdefault(view.source, []).append(view)
    done = 0
    async for stored in source_events(log, list(by_source), watermark):
        event = as_fold_event(stored)
        for view in by_source[stored.type]:
            state = full[view.name]
            before = state.dropped_late
            folded = state.apply(event)
            entity_id = entities.get(view.entity)
            if entity_id is None or entity_key_of(view, event.payload) != entity_id:
                continue
            if folded:
                accepted[view.name].append((event, stored))
            elif state.dropped_late > before:
                dropped[view.name] += 1
        done += 1
        if done % PAGE == 0:
            progress("events", done, 0)
    progress("events", done, done)

    personal = await _personal_fields([stored for view in views for _, stored in accepted[view.name]], log)
    explained: dict[str, dict[str, Any]] = {}
    for view in views:
        entity_id = entities.get(view.entity)
        alone = ViewState(view, prune_on_apply=False)
        for event, _ in accepted[view.name]:
            alone.apply(event)
        ids = {event.seq: str(stored.event_id) for event, stored in accepted[view.name]}
        stale = False
        values: dict[str, Any] | None = None
        try:
            if entity_id:
                full[view.name].values(entity_id, as_of)  # raises where the online read could not answer
                values = alone.values(entity_id, as_of)
        except StaleQueryError:
            stale = True
        known = values is not None
        values = values if values is not None else alone.defaults()
        inputs = alone.inputs_of(entity_id, as_of) if entity_id and known else {}
        explained[view.name] = {
            "entity": view.entity,
            "entity_id": entity_id,
            "version": view.version,
            "known": known,
            "stale": stale,
            "dropped_late": dropped[view.name],
            "events": [
                {
                    "event_id": str(stored.event_id),
                    "seq": stored.seq,
                    "occurred_at": stored.occurred_at.isoformat(),
                    **personal.get(stored.seq, {}),
                }  # fmt: skip
                for _, stored in accepted[view.name]
            ],
            "features": {
                f: {"value": None if stale else values[f], "events": [ids[s] for s in inputs.get(f, [])]}
                for f in view.feature_names()
            },
        }
    return explained


async def _personal_fields(events: Sequence[StoredEvent], log: EventLog) -> dict[int, dict[str, Any]]:
    """Per event (by seq) holding personal fields: `personal` (pointer -> clear value, None once its
    subject is forgotten) and `erased` (the pointers whose key is destroyed). Explain is an
    auditor's: its caller must be entitled to clear personal data (it reads `personal_keys`)."""
    sealed = {e.seq: e for e in events if any(True for _ in envelopes(e.payload))}
    if not sealed:
        return {}
    revealed = await KeyStore(log.pool).reveal([(e.event_id, e.payload) for e in sealed.values()])
    return {
        seq: {"personal": r.personal, "erased": [*r.erased, *r.unreadable]}
        for seq, r in zip(sealed, revealed, strict=True)
    }


def _same(logged: Any, recomputed: Any) -> bool:
    if isinstance(logged, bool) or isinstance(recomputed, bool):
        return logged == recomputed
    if isinstance(logged, int | float) and isinstance(recomputed, int | float):
        return float(logged) == float(recomputed)
    return logged == recomputed


async def _outcome(log: EventLog, decision_id: str, after: int) -> tuple[StoredEvent | None, StoredEvent | None]:
    """The decision's first `outcome.recorded` and its `decision.withdrawn`, if any."""
    outcome = withdrawn = None
    for event in await read_all(log, ["outcome.recorded", "decision.withdrawn"], after=after):
        if str(event.payload.get("decision_id")) != decision_id:
            continue
        if event.type == "outcome.recorded" and outcome is None:
            outcome = event
        elif event.type == "decision.withdrawn" and withdrawn is None:
            withdrawn = event
    return outcome, withdrawn


async def explain(log: EventLog, decision_id: str, *, progress: Progress = no_progress) -> dict[str, Any]:
    """The decision `decision_id` (a UUID; `decisions/{id}` also taken) and everything behind it:
    its vector, the events that fed each feature, the model version with its spec, evaluation and
    lineage, the policy, the outcome and the trace. NOT_FOUND / INVALID_ARGUMENT naming `name`."""
    decision_id = decision_id.removeprefix("decisions/")
    event = await find_decision(log, decision_id, "name")
    p = event.payload
    version = await load_version(log, p["model_version"], field="name")
    spec = version.payload.get("spec", {})
    views = decision_views(p, spec.get("views", []), await log_views(log, to_seq=event.seq), event.seq)
    decided = decision_time(event)
    watermark = int(p.get("feature_watermark") or 0)
    per_view = await fed_events(log, views, p.get("entities", {}), posix_seconds(decided), watermark, progress)

    logged_features = p.get("features", {})
    features: dict[str, Any] = {}
    for view in views:
        for feature, answer in per_view[view.name]["features"].items():
            name = f"{view.name}.{feature}"
            logged = logged_features.get(name)
            features[name] = {
                "logged": logged, "recomputed": answer["value"], "matches_logged": _same(logged, answer["value"]),
                "events": answer["events"],
            }  # fmt: skip
    outcome, withdrawn = await _outcome(log, decision_id, event.seq)
    lineage = {k: v for k, v in version.payload.get("lineage", {}).items() if k not in LINEAGE_LEFT_OUT}
    return {
        "name": f"decisions/{decision_id}",
        "decision": {
            "decision_id": decision_id,
            "seq": event.seq,
            "recorded_at": event.recorded_at.isoformat(),
            "as_of": decided.isoformat(),
            "model": p["model"],
            "model_version": p["model_version"],
            "arm": p["arm"],
            "score": p["score"],
            "action": p["action"],
            "greedy_action": p.get("greedy_action"),
            "propensity": p.get("propensity"),
            "explored": p.get("explored"),
            "action_scores": p.get("action_scores"),
            "policy": p.get("policy"),
            "entities": p.get("entities", {}),
            "context": p.get("context", {}),
            "unit_id": p.get("unit_id"),
            "request_id": p.get("request_id"),
            "shadow": p.get("shadow", []),
            "withdrawn": withdrawn is not None,
        },  # fmt: skip
        "vector": {
            "feature_watermark": watermark,
            "unknown_entities": p.get("unknown_entities", []),
            "features": logged_features,
            "inputs": dict(zip(version.feature_names, p.get("inputs", []), strict=False)),
        },
        "features": features,
        "views": {
            name: {k: v for k, v in view.items() if k != "features"} for name, view in per_view.items()
        },  # fmt: skip
        "matches_logged": all(f["matches_logged"] for f in features.values()),
        "model_version": {
            "name": version.name,
            "registered_seq": version.seq,
            "sha256": version.payload.get("sha256"),
            "feature_names": version.feature_names,
            "spec": spec,
            "evaluation": version.payload.get("evaluation", {}),
            "lineage": lineage,
            "log_range": lineage.get("log_range"),
        },  # fmt: skip
        "outcome": None if outcome is None else {"seq": outcome.seq, **outcome.payload},
        "trace_id": p.get("trace_id", ""),
    }


# ---------------------------------------------------------------------------------------------
# The readable report


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _wrap(label: str, text: str, indent: int = 14) -> list[str]:
    return textwrap.wrap(
        text, WIDTH, initial_indent=f"  {label:<{indent - 2}}", subsequent_indent=" " * indent
    ) or [f"  {label}"]  # fmt: skip


def _when(value: str | None) -> str:
    return "-" if not value else datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def render(explanation: Mapping[str, Any]) -> str:
    """The explanation as a report a person reads (lines at most 100 columns)."""
    d, vec, mv = explanation["decision"], explanation["vector"], explanation["model_version"]
    lines = [f"Decision {d['decision_id']}  (log seq {d['seq']})"]
    lines += _wrap("decided at", f"{_when(d['as_of'])} (event time); recorded {_when(d['recorded_at'])}")
    lines += _wrap("model", f"{d['model_version']}  arm {d['arm']}")
    lines += _wrap(
        "action", f"{d['action']} with score {_short(d['score'])} (greedy {d['greedy_action']}, propensity"
        f" {_short(d['propensity'])}, {'explored' if d['explored'] else 'not explored'})",
    )  # fmt: skip
    policy = d.get("policy") or {}
    lines += _wrap("policy", f"{describe(policy)}, canary share {_short(policy.get('canary_share'))}")
    lines += _wrap("entities", ", ".join(f"{k} {v}" for k, v in d["entities"].items()))
    lines += _wrap("context", ", ".join(f"{k}={_short(v)}" for k, v in sorted(d["context"].items())))
    lines += _wrap("trace", explanation["trace_id"] or "-")
    if d["withdrawn"]:
        lines.append("  WITHDRAWN: this decision never took effect")
    outcome = explanation["outcome"]
    lines.append("")
    if outcome is None:
        lines.append("Outcome: none recorded")
    else:
        source = " ".join(str(outcome[k]) for k in ("source", "rule") if outcome.get(k))
        lines += [f"Outcome {outcome.get('outcome_id')} (log seq {outcome['seq']})"]
        lines += _wrap(
            "label", f"{_short(outcome.get('label'))}, reward {_short(outcome.get('reward'))}, from {source}"
        )
    lines += ["", f"Inputs scored ({len(vec['inputs'])}, in the version's order)"]
    for name, value in vec["inputs"].items():
        lines.append(f"  {name:<60} {_short(value):>20}")
    verdict = "all reproduced" if explanation["matches_logged"] else "SOME DIFFER from the logged values"
    lines += ["", f"Features as of {_when(d['as_of'])}, log watermark {vec['feature_watermark']} ({verdict})"]
    for view_name, view in explanation["views"].items():
        events = view["events"]
        index = {e["event_id"]: i + 1 for i, e in enumerate(events)}
        state = "unknown entity (defaults)" if not view["known"] else f"{len(events)} events accepted"
        late = f", {view['dropped_late']} dropped late" if view["dropped_late"] else ""
        lines += ["", f"  {view_name} (version {view['version']}): {view['entity']} {view['entity_id']}: {state}{late}"]
        if view["stale"]:
            lines.append("    STALE: the as-of time is older than the fold's queryable range")
        for name, feature in explanation["features"].items():
            if not name.startswith(f"{view_name}."):
                continue
            mark = "" if feature["matches_logged"] else f"  (logged {_short(feature['logged'])})"
            fed = _ranges([index[e] for e in feature["events"]]) or "none"
            lines += textwrap.wrap(
                f"{name.split('.', 1)[1]:<26} {_short(feature['recomputed']):>12}{mark}  events {fed}", WIDTH,
                initial_indent="    ", subsequent_indent=" " * 45,
            )  # fmt: skip
        if events:
            lines.append("    events (#, event id, log seq, occurred at):")
            for i, e in enumerate(events, start=1):
                if len(events) <= LISTED_EVENTS or i <= 5 or i > len(events) - LISTED_EVENTS + 5:
                    erased = f"  erased: {', '.join(e['erased'])}" if e.get("erased") else ""
                    lines.append(f"    {i:>4}  {e['event_id']}  {e['seq']:>10}  {_when(e['occurred_at'])}{erased}")
                elif i == 6:
                    lines.append(
                        f"          ... #6-{len(events) - LISTED_EVENTS + 5} (the JSON document lists every one)"
                    )
    lines += ["", f"Model version {mv['name']} (registered at log seq {mv['registered_seq']})"]
    lines += _wrap("artifact", f"sha256 {mv['sha256']}")
    log_range = mv.get("log_range")
    if log_range:
        lines += _wrap("trained on", f"log seqs ({log_range[0]}, {log_range[1]}]; {mv['lineage'].get('examples', '-')}"
                       f" examples, {mv['lineage'].get('positives', '-')} positive")  # fmt: skip
    if mv["lineage"].get("external"):
        lines += _wrap("trained on", "registered externally (no training lineage)")
    spec = mv["spec"]
    lines += _wrap("views", ", ".join(f"{n}@{v}" for n, v in spec.get("views", [])))
    label = spec.get("label", {})
    lines += _wrap("label", ", ".join(f"{k}={_short(v)}" for k, v in sorted(label.items())))
    evaluation = mv["evaluation"]
    scalars = {k: v for k, v in sorted(evaluation.items()) if isinstance(v, int | float) and not isinstance(v, bool)}
    lines += _wrap("evaluation", ", ".join(f"{k} {_short(v)}" for k, v in scalars.items()) or "-")
    return "\n".join(lines) + "\n"


def _ranges(numbers: Sequence[int]) -> str:
    """1,2,3,5 -> '#1-3, #5'."""
    parts: list[str] = []
    start = prev = None
    for n in numbers:
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            parts.append(f"#{start}" if start == prev else f"#{start}-{prev}")
            start = prev = n
    if start is not None:
        parts.append(f"#{start}" if start == prev else f"#{start}-{prev}")
    return ", ".join(parts)


__all__ = ["explain", "fed_events", "log_views", "render"]
