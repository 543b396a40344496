"""What the report shows, gathered through the platform's public gRPC APIs.

The log is the source of truth: events are read with `ListEvents` and folded here (events per type,
decisions per arm, the alias history, each decision's feature watermark, the inputs drift is measured
on). The registry gives each version's training baseline and held-out evaluation, feedback the live
metrics, audit the off-policy estimates and one decision's explanation. A service that cannot be
reached, or has nothing to say yet, leaves its part empty with the reason, which the page shows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

KEPT_PAYLOADS = ("decision.made", "decision.withdrawn", "outcome.recorded", "model.alias_set", "quality.alert")
DRIFT_WINDOW = 1000  # a version's newest decisions whose inputs are compared with its training baseline
OPE_VERSIONS = 3  # a model's newest versions whose policies are estimated off-policy
OPE_BOOTSTRAP = 200


@dataclass(frozen=True)
class LoggedEvent:
    """One event as the report needs it; the payload only for the types it folds (KEPT_PAYLOADS)."""

    seq: int
    type: str
    occurred_at: datetime
    recorded_at: datetime
    payload: dict[str, Any] | None = None


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    feature_names: list[str]
    baseline: dict[str, Any] | None  # {"inputs": {name: entry}, "score": entry} (d2d.training.baseline)
    heldout_auc: float | None


@dataclass
class ReportData:
    """Everything the page is drawn from; `missing` says why a part is empty (part -> reason)."""

    generated_at: datetime
    head_seq: int = 0
    event_counts: dict[str, int] = field(default_factory=dict)
    events: list[LoggedEvent] = field(default_factory=list)  # oldest first
    features_watermark: int | None = None
    versions: list[VersionInfo] = field(default_factory=list)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # model -> arms (feedback's JSON)
    ope: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # model -> audit results
    ope_refused: dict[str, str] = field(default_factory=dict)  # model_version -> why not estimated
    explanation: dict[str, Any] | None = None
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return sum(self.event_counts.values()) > len(self.events)


def _time(ts: Any) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _why(exc: grpc.aio.AioRpcError, service: str) -> str:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return f"the {service} service is not reachable"
    return f"the {service} service answered {exc.code().name}: {exc.details()}"


def decision_payloads(events: list[LoggedEvent]) -> list[tuple[LoggedEvent, dict[str, Any]]]:
    """The decisions that took effect (a withdrawn one never did), oldest first."""
    withdrawn = {e.payload.get("decision_id") for e in events if e.type == "decision.withdrawn" and e.payload}
    return [
        (e, e.payload)
        for e in events
        if e.type == "decision.made" and e.payload and e.payload.get("decision_id") not in withdrawn
    ]


def chosen_decision(events: list[LoggedEvent], wanted: str | None) -> str | None:
    """The decision to trace: `wanted` (a decision id or the Predict's request id), else the newest
    decision with an outcome, else the newest decision."""
    decisions = decision_payloads(events)
    if wanted:
        for _, p in decisions:
            if wanted in (p.get("decision_id"), p.get("request_id")):
                return str(p["decision_id"])
        return wanted  # not among the events read: audit answers whether it exists
    with_outcome = {e.payload.get("decision_id") for e in events if e.type == "outcome.recorded" and e.payload}
    for _, p in reversed(decisions):
        if p.get("decision_id") in with_outcome:
            return str(p["decision_id"])
    return str(decisions[-1][1]["decision_id"]) if decisions else None


async def _events(addr: str, data: ReportData, max_events: int) -> None:
    from d2d.client import IngestClient

    async with IngestClient(addr) as ingest:
        log = await ingest.get_event_log(counts=True)
        data.head_seq, data.event_counts = log.head_seq, dict(log.event_counts)
        newest, _ = await ingest.list_events(limit=max_events)
    data.events = [
        LoggedEvent(e.seq, e.type, _time(e.occurred_at), _time(e.recorded_at),
                    json.loads(e.payload) if e.type in KEPT_PAYLOADS else None)
        for e in reversed(newest)
    ]  # fmt: skip


async def _registry(addr: str, data: ReportData) -> None:
    from d2d.client import RegistryClient

    async with RegistryClient(addr) as registry:
        for model in await registry.list_models():
            name = model.name.removeprefix("models/")
            for v in await registry.list_versions(name):
                lineage = json.loads(v.lineage_json or "{}")
                evaluation = json.loads(v.evaluation_json or "{}")
                data.versions.append(VersionInfo(
                    name, int(v.name.rsplit("/", 1)[1]), list(v.feature_names), lineage.get("baseline"),
                    evaluation.get("auc"),
                ))  # fmt: skip


async def _metrics(addr: str, data: ReportData, models: list[str]) -> None:
    from d2d.client import FeedbackClient

    async with FeedbackClient(addr) as feedback:
        for model in models:
            answer = await feedback.model_metrics(model, positive_action="approve")
            data.metrics[model] = [
                {**json.loads(a.metrics_json), "model_version": a.model_version, "arm": a.arm} for a in answer.arms
            ]


async def _features_watermark(addr: str, data: ReportData) -> None:
    from d2d.client import FeatureClient

    async with FeatureClient(addr) as features:
        views = await features.list_views()
        if views:  # any feature of any view: the answer carries the service's watermark
            view = views[0]
            answer = await features.get_online([f"{view.name.removeprefix('featureViews/')}.*"], [{view.entity: "-"}])
            data.features_watermark = answer.watermark


async def _audit(
    addr: str, data: ReportData, decision: str | None, reward: dict[str, Any] | None, bootstrap: int
) -> None:
    from d2d.client import AuditClient

    async with AuditClient(addr) as audit:
        if decision is not None:
            try:
                answer = await audit.explain(decision)
                data.explanation = json.loads(answer.explanation_json)
            except grpc.aio.AioRpcError as exc:
                data.missing["lineage"] = _why(exc, "audit")
        decided = {p.get("model") for _, p in decision_payloads(data.events)}
        for model in sorted({v.model for v in data.versions}):
            if model not in decided:
                continue
            newest = sorted((v.version for v in data.versions if v.model == model), reverse=True)[:OPE_VERSIONS]
            for version in sorted(newest):
                name = f"models/{model}/versions/{version}"
                try:
                    result = await audit.evaluate_policy(name, model=model, bootstrap=bootstrap, reward=reward)
                    data.ope.setdefault(model, []).append(result)
                except grpc.aio.AioRpcError as exc:
                    data.ope_refused[name] = _why(exc, "audit")
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        return


async def gather(
    addrs: Mapping[str, str], *, decision: str | None = None, reward: dict[str, Any] | None = None,
    max_events: int = 100_000, bootstrap: int = OPE_BOOTSTRAP,
) -> ReportData:  # fmt: skip
    """Read what the report shows from the services at `addrs` (service name -> host:port).

    Only ingest is required (the log); any other service that is away leaves its sections empty with
    the reason. `decision`: the decision whose lineage is drawn (id or request id; default the newest
    with an outcome). `reward`: the OPE reward table (default the outcomes' own rewards)."""
    data = ReportData(generated_at=datetime.now(UTC))
    await _events(addrs["ingest"], data, max_events)
    try:
        await _registry(addrs["registry"], data)
    except grpc.aio.AioRpcError as exc:
        data.missing["registry"] = _why(exc, "registry")
    models = sorted({v.model for v in data.versions} | {p.get("model") for _, p in decision_payloads(data.events)})
    try:
        await _metrics(addrs["feedback"], data, [m for m in models if m])
    except grpc.aio.AioRpcError as exc:
        data.missing["metrics"] = _why(exc, "feedback")
    try:
        await _features_watermark(addrs["features"], data)
    except grpc.aio.AioRpcError as exc:
        data.missing["features"] = _why(exc, "features")
    try:
        await _audit(addrs["audit"], data, chosen_decision(data.events, decision), reward, bootstrap)
    except grpc.aio.AioRpcError as exc:
        data.missing["audit"] = _why(exc, "audit")
    return data
