"""What the feedback service records: outcomes of decisions and outcome rules, each checked against
the log itself inside `EventLog.recording()` (the append lock is held, so two callers cannot both
pass a check and both append).

Outcomes are checked against the decision's own events (`decision.made`, `decision.withdrawn`,
`outcome.recorded` of entity decision/<id>), not against `decision_outcomes`: that join is applied
by the log consumer and may lag the log by a batch.

Refusals name the API's fields (`outcome.decision`, `outcome_rule.event_type`, ...).
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from d2d import auth
from d2d.errors import Refusal
from d2d.eventlog import EventLog, NewEvent, StoredEvent
from d2d.limits import check_text
from d2d.metrics import JoinRow
from d2d.outcomes import OUTCOME_NAMESPACE, OutcomeRule, outcome_event_id
from d2d.projections import FEEDBACK

DECISION_EVENTS = ("decision.made", "decision.withdrawn", "outcome.recorded")
MAX_OUTCOME_ID = 200


@dataclass(frozen=True)
class OutcomeTerms:
    """An outcome as a caller states it; the terms that make it "the same outcome" on a retry."""

    decision_id: str
    outcome_id: str
    label: int | None
    reward: float | None
    occurred_at: datetime

    def payload(self) -> dict[str, Any]:
        p: dict[str, Any] = {"outcome_id": self.outcome_id, "decision_id": self.decision_id}
        if self.label is not None:
            p["label"] = self.label
        if self.reward is not None:
            p["reward"] = self.reward
        return {**p, "occurred_at": self.occurred_at.isoformat(), "source": "api"}


def outcome_terms(
    decision: str, outcome_id: str, label: int | None, reward: float | None, occurred_at: datetime | None
) -> OutcomeTerms:
    """Checked terms of an outcome (Refusal naming the `outcome.*` field otherwise)."""
    try:
        decision_id = str(uuid.UUID(decision))
    except ValueError:
        raise Refusal(
            "INVALID_ARGUMENT", f"decision {decision!r} is not a decision id (a UUID)", "outcome.decision"
        ) from None
    outcome_id = outcome_id or f"api:{decision_id}"
    check_text(outcome_id, "outcome.outcome_id")
    if len(outcome_id) > MAX_OUTCOME_ID:
        raise Refusal(
            "INVALID_ARGUMENT", f"outcome_id is {len(outcome_id)} characters; at most {MAX_OUTCOME_ID}",
            "outcome.outcome_id",
        )  # fmt: skip
    if label is not None and label not in (0, 1):
        raise Refusal("INVALID_ARGUMENT", f"label must be 0 or 1, got {label}", "outcome.label")
    if reward is not None and not math.isfinite(reward):
        raise Refusal("INVALID_ARGUMENT", f"reward must be a finite number, got {reward}", "outcome.reward")
    if label is None and reward is None:
        raise Refusal("INVALID_ARGUMENT", "an outcome needs a label, a reward or both", "outcome.label")
    if occurred_at is None:
        raise Refusal("INVALID_ARGUMENT", "occur_time (when the outcome happened) is required", "outcome.occur_time")
    return OutcomeTerms(decision_id, outcome_id, label, reward, occurred_at.astimezone(UTC))


def _differing_term(terms: OutcomeTerms, stored: dict[str, Any]) -> str | None:
    """The API field in which a stored outcome differs from `terms` (None: the same outcome)."""
    pairs = (
        ("outcome.decision", terms.decision_id, stored["decision_id"]),
        ("outcome.label", terms.label, stored.get("label")),
        ("outcome.reward", terms.reward, stored.get("reward")),
        ("outcome.occur_time", terms.occurred_at, datetime.fromisoformat(stored["occurred_at"])),
        ("outcome.outcome_id", "api", stored["source"]),  # a rule's outcome id, given to the API
    )
    return next((field for field, mine, theirs in pairs if mine != theirs), None)


# A rule term and the API field that carries it.
RULE_FIELDS = {
    "name": "outcome_rule_id",
    "window_seconds": "outcome_rule.window",
    "allowed_lateness_seconds": "outcome_rule.allowed_lateness",
}


def rule_field(term: str) -> str:
    return RULE_FIELDS.get(term, f"outcome_rule.{term}")


def outcome_rule(terms: dict[str, Any]) -> OutcomeRule:
    """`OutcomeRule.from_dict`, its ValueError refused naming the API field of the term."""
    try:
        return OutcomeRule.from_dict(terms)
    except ValueError as exc:
        match = re.match(r"[a-z_]+", str(exc))
        term = match.group(0) if match else ""
        field = rule_field(term) if term in terms else "outcome_rule"
        raise Refusal("INVALID_ARGUMENT", f"outcome rule: {exc}", field) from None


def rule_event_id(name: str) -> uuid.UUID:
    return uuid.uuid5(OUTCOME_NAMESPACE, f"outcome_rule:{name}")


class FeedbackStore:
    def __init__(self, log: EventLog) -> None:
        self.log = log

    async def record_outcome(self, terms: OutcomeTerms) -> StoredEvent:
        """Append the outcome, or return it if this outcome id is stored with the same terms."""
        async with self.log.recording() as tx:
            events = await self.log.entity_events("decision", terms.decision_id, types=DECISION_EVENTS, conn=tx.conn)
            if not any(e.type == "decision.made" for e in events):
                raise Refusal("NOT_FOUND", f"decision {terms.decision_id} is not in the log", "outcome.decision")
            event_id = outcome_event_id(terms.outcome_id)
            stored = await self.log.get(event_id, conn=tx.conn)
            if stored is not None:
                field = _differing_term(terms, stored.payload)
                if field is None:
                    return stored
                raise Refusal(
                    "ALREADY_EXISTS",
                    f"outcome {terms.outcome_id!r} is recorded (seq {stored.seq}) with other terms: "
                    f"{orjson.dumps(stored.payload).decode()}",
                    field,
                )
            if any(e.type == "decision.withdrawn" for e in events):
                raise Refusal(
                    "FAILED_PRECONDITION",
                    f"decision {terms.decision_id} was withdrawn: its caller never received it, so it has no outcome",
                    "outcome.decision",
                )
            earlier = next((e for e in events if e.type == "outcome.recorded"), None)
            if earlier is not None:
                raise Refusal(
                    "ALREADY_EXISTS",
                    f"decision {terms.decision_id} already has outcome {earlier.payload['outcome_id']!r}"
                    f" (seq {earlier.seq}); a decision has one outcome",
                    "outcome.decision",
                )
            [appended] = await tx.append(
                NewEvent(
                    event_id, "outcome.recorded", 1, "decision", terms.decision_id, terms.occurred_at,
                    orjson.dumps(terms.payload()).decode(), {"producer": "feedback", **auth.actor_metadata()},
                )
            )  # fmt: skip
            return appended

    async def get_outcome(self, decision_id: str, outcome_id: str) -> StoredEvent | None:
        stored = await self.log.get(outcome_event_id(outcome_id))
        if stored is None or stored.type != "outcome.recorded" or stored.entity_id != decision_id:
            return None
        return stored

    async def register_rule(self, rule: OutcomeRule) -> dict[str, Any]:
        """Append `outcome_rule.registered`, or return the stored rule when its terms are the same."""
        async with self.log.recording() as tx:
            [existing] = await self.log.entity_events(
                "outcome_rule", rule.name, types=("outcome_rule.registered",), conn=tx.conn
            ) or [None]
            terms = rule.to_dict()
            if existing is not None:
                differing = [k for k in terms if existing.payload.get(k) != terms[k]]
                if differing:
                    raise Refusal(
                        "ALREADY_EXISTS",
                        f"outcome rule {rule.name!r} is registered (seq {existing.seq}) with other terms: "
                        + ", ".join(f"{k} {existing.payload.get(k)!r} (not {terms[k]!r})" for k in differing),
                        rule_field(differing[0]),
                    )
            else:
                if not await tx.conn.fetchval("SELECT 1 FROM contracts WHERE event_type = $1", rule.event_type):
                    raise Refusal(
                        "FAILED_PRECONDITION",
                        f"event type {rule.event_type!r} has no contract: register it before a rule that reads it",
                        "outcome_rule.event_type",
                    )
                await tx.append(
                    NewEvent(
                        rule_event_id(rule.name), "outcome_rule.registered", 1, "outcome_rule", rule.name,
                        datetime.now(UTC), orjson.dumps(terms).decode(),
                        {"producer": "feedback", **auth.actor_metadata()},
                    )
                )  # fmt: skip
            row = await tx.conn.fetchrow(RULE_SQL + " WHERE name = $1", rule.name)
            return dict(row)

    async def get_rule(self, name: str) -> dict[str, Any] | None:
        async with self.log.pool.acquire() as conn:
            row = await conn.fetchrow(RULE_SQL + " WHERE name = $1", name)
        return dict(row) if row else None

    async def list_rules(self) -> list[dict[str, Any]]:
        async with self.log.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(RULE_SQL + " ORDER BY name")]

    async def join_rows(self, model: str, start: datetime | None, end: datetime | None) -> tuple[list[JoinRow], int]:
        """The join's rows of `model`'s decisions with an event time in [start, end), and the log
        position the join reflects; NOT_FOUND naming `name` for a model the registry does not hold."""
        async with self.log.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            if not await conn.fetchval("SELECT 1 FROM models WHERE name = $1", model):
                raise Refusal("NOT_FOUND", f"models/{model} does not exist", "name")
            rows = await conn.fetch(
                "SELECT * FROM decision_outcomes WHERE model = $1 AND ($2::timestamptz IS NULL OR decided_at >= $2)"
                " AND ($3::timestamptz IS NULL OR decided_at < $3)",
                model, start, end,
            )  # fmt: skip
            position = await self.log.position(FEEDBACK, conn=conn)
        return [JoinRow.from_mapping(r) for r in rows], position


RULE_SQL = "SELECT name, terms, registered_seq, created_at FROM outcome_rules"
