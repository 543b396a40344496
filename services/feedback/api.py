"""`d2d.v1.FeedbackService` over gRPC: outcomes of decisions and outcome rules.

Refusals (`d2d.errors.Refusal`, raised here and by the store) propagate: `d2d.grpcserver` answers
each with its status and a BadRequest naming the field.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

import grpc
from google.protobuf import duration_pb2

from d2d.errors import Refusal
from d2d.eventlog import EventLog, StoredEvent
from d2d.metrics import compute
from d2d.v1 import feedback_pb2
from services.feedback.store import FeedbackStore, outcome_rule, outcome_terms, rule_field

SERVICE_NAME = "d2d.v1.FeedbackService"


def _outcome_name(name: str) -> tuple[str, str]:
    parts = name.split("/", 3)
    if len(parts) != 4 or parts[0] != "decisions" or parts[2] != "outcomes" or not parts[1] or not parts[3]:
        raise Refusal("INVALID_ARGUMENT", f"{name!r} is not 'decisions/{{decision}}/outcomes/{{outcome}}'", "name")
    return parts[1], parts[3]


def _rule_name(name: str) -> str:
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != "outcomeRules" or not parts[1]:
        raise Refusal("INVALID_ARGUMENT", f"{name!r} is not an outcome rule name 'outcomeRules/{{rule}}'", "name")
    return parts[1]


def outcome_to_proto(e: StoredEvent) -> feedback_pb2.Outcome:
    p = e.payload
    msg = feedback_pb2.Outcome(
        name=f"decisions/{p['decision_id']}/outcomes/{p['outcome_id']}", decision=p["decision_id"],
        outcome_id=p["outcome_id"], source=p["source"], rule=p.get("rule", ""),
        cause_event_id=p.get("cause_event_id", ""), window_closed=p.get("window_closed", False), seq=e.seq,
    )  # fmt: skip
    if p.get("label") is not None:
        msg.label = p["label"]
    if p.get("reward") is not None:
        msg.reward = p["reward"]
    msg.occur_time.FromDatetime(e.occurred_at)
    msg.record_time.FromDatetime(e.recorded_at)
    return msg


def _seconds(msg: Any, field: str) -> int:
    """A Duration of whole seconds (0 when unset)."""
    duration: duration_pb2.Duration = getattr(msg, field)
    if duration.nanos:
        raise Refusal("INVALID_ARGUMENT", f"{field} must be whole seconds", rule_field(f"{field}_seconds"))
    return duration.seconds


def rule_terms(rule_id: str, msg: feedback_pb2.OutcomeRule) -> dict[str, Any]:
    """The terms of `d2d.outcomes.OutcomeRule` a request states (an absent optional term is None)."""

    def present(field: str) -> Any:
        return getattr(msg, field) if msg.HasField(field) else None

    return {
        "name": rule_id, "event_type": msg.event_type, "event_key": msg.event_key, "decision_key": msg.decision_key,
        "label": present("label"), "reward": present("reward"), "window_seconds": _seconds(msg, "window"),
        "otherwise_label": present("otherwise_label"), "otherwise_reward": present("otherwise_reward"),
        "observed_actions": list(msg.observed_actions),
        "allowed_lateness_seconds": _seconds(msg, "allowed_lateness"),
    }  # fmt: skip


def rule_to_proto(row: dict[str, Any]) -> feedback_pb2.OutcomeRule:
    t = row["terms"]
    msg = feedback_pb2.OutcomeRule(
        name=f"outcomeRules/{row['name']}", event_type=t["event_type"], event_key=t["event_key"],
        decision_key=t["decision_key"], observed_actions=t.get("observed_actions", []),
        window=duration_pb2.Duration(seconds=t.get("window_seconds", 0)),
        allowed_lateness=duration_pb2.Duration(seconds=t.get("allowed_lateness_seconds", 0)),
        registered_seq=row["registered_seq"],
    )  # fmt: skip
    for term in ("label", "reward", "otherwise_label", "otherwise_reward"):
        if t.get(term) is not None:
            setattr(msg, term, t[term])
    msg.create_time.FromDatetime(row["created_at"])
    return msg


class FeedbackApi:
    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.store = FeedbackStore(log)

    async def RecordOutcome(self, request: Any, context: grpc.aio.ServicerContext) -> feedback_pb2.Outcome:
        if not request.HasField("outcome"):
            raise Refusal("INVALID_ARGUMENT", "outcome is required", "outcome")
        o = request.outcome
        terms = outcome_terms(
            o.decision, o.outcome_id, o.label if o.HasField("label") else None,
            o.reward if o.HasField("reward") else None,
            o.occur_time.ToDatetime(tzinfo=UTC) if o.HasField("occur_time") else None,
        )  # fmt: skip
        return outcome_to_proto(await self.store.record_outcome(terms))

    async def GetOutcome(self, request: Any, context: grpc.aio.ServicerContext) -> feedback_pb2.Outcome:
        decision, outcome_id = _outcome_name(request.name)
        stored = await self.store.get_outcome(decision, outcome_id)
        if stored is None:
            raise Refusal("NOT_FOUND", f"{request.name} is not in the log", "name")
        return outcome_to_proto(stored)

    async def CreateOutcomeRule(self, request: Any, context: grpc.aio.ServicerContext) -> feedback_pb2.OutcomeRule:
        if not request.HasField("outcome_rule"):
            raise Refusal("INVALID_ARGUMENT", "outcome_rule is required", "outcome_rule")
        rule = outcome_rule(rule_terms(request.outcome_rule_id, request.outcome_rule))
        return rule_to_proto(await self.store.register_rule(rule))

    async def GetOutcomeRule(self, request: Any, context: grpc.aio.ServicerContext) -> feedback_pb2.OutcomeRule:
        row = await self.store.get_rule(_rule_name(request.name))
        if row is None:
            raise Refusal("NOT_FOUND", f"{request.name} is not registered", "name")
        return rule_to_proto(row)

    async def ListOutcomeRules(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.ListOutcomeRulesResponse:
        """Every rule, by name (there are few: one page)."""
        return feedback_pb2.ListOutcomeRulesResponse(
            outcome_rules=[rule_to_proto(r) for r in await self.store.list_rules()]
        )

    async def GetModelMetrics(self, request: Any, context: grpc.aio.ServicerContext) -> feedback_pb2.ModelMetrics:
        model = request.name.removeprefix("models/")
        if not request.name.startswith("models/") or not model or "/" in model:
            raise Refusal("INVALID_ARGUMENT", f"{request.name!r} is not a model name 'models/{{model}}'", "name")
        start = request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None
        end = request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None
        if start and end and end < start:
            raise Refusal("INVALID_ARGUMENT", f"end_time {end.isoformat()} is before start_time", "end_time")
        rows, position = await self.store.join_rows(model, start, end)
        response = feedback_pb2.ModelMetrics(name=f"models/{model}", position=position)
        for m in compute(rows, positive_action=request.positive_action or None):
            arm = response.arms.add(
                model_version=f"models/{model}/versions/{m.model_version}", arm=m.arm, decisions=m.decisions,
                labelled=m.labelled, metrics_json=json.dumps(m.to_dict(), sort_keys=True),
            )  # fmt: skip
            if m.auc is not None:
                arm.auc = m.auc
        return response
