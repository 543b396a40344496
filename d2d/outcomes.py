"""Outcome rules: how a domain event becomes the outcome of an earlier decision, declared as data.

A rule says which event type yields an outcome (`payment.chargeback`), how it finds its decision
(the event's `event_key` equals the decision's `decision_key`, both dotted payload paths), what it
means (`label`, `reward`), and what a decision gets when its attribution window closes in event
time without such an event (`otherwise_label`, `otherwise_reward`). Labels are selective: only
decisions whose action is in `observed_actions` ever show an outcome (a declined payment never
shows whether it was fraud), so only they get one.

Rules are registered with the feedback service (`outcome_rule.registered` events); a domain's
rules are named by `D2D_OUTCOME_RULES` (default `d2d.sim.outcomes`, whose `RULES` the feedback
service registers at start).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["OUTCOME_NAMESPACE", "OutcomeRule", "outcome_event_id", "resolve"]

RULE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
OUTCOME_NAMESPACE = uuid.UUID("b7a4f0a2-51c3-4f7e-8d0e-0d2d0d2d0c0e")


def outcome_event_id(outcome_id: str) -> uuid.UUID:
    """The `outcome.recorded` event id of an outcome id: one outcome id, one event in the log."""
    return uuid.uuid5(OUTCOME_NAMESPACE, outcome_id)


def resolve(payload: dict[str, Any], path: str) -> Any:
    """The value at a dotted path in a payload (None where any step is missing)."""
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


@dataclass(frozen=True)
class OutcomeRule:
    name: str  # lower case letters, digits and '-'
    event_type: str  # the domain event that yields an outcome, e.g. payment.chargeback
    event_key: str  # dotted path in that event's payload, e.g. "payment_id"
    decision_key: str  # dotted path in the decision.made payload, e.g. "context.payment_id"
    label: int | None = 1  # what the event means
    reward: float | None = None
    window_seconds: int = 0  # attribution window after the decision's event time
    otherwise_label: int | None = 0  # when the window closes without the event (None: no outcome)
    otherwise_reward: float | None = None
    observed_actions: tuple[str, ...] = ()  # only decisions with these actions get outcomes; () = all
    allowed_lateness_seconds: int = 0  # the window closes this much later in event time

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not RULE_NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be lower case letters, digits and '-'")
        for name in ("event_type", "event_key", "decision_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        for name in ("label", "otherwise_label"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value not in (0, 1)):
                raise ValueError(f"{name} must be 0, 1 or absent, got {value!r}")
        for name in ("reward", "otherwise_reward"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{name} must be a number or absent, got {value!r}")
        if self.label is None and self.reward is None:
            raise ValueError("label: a rule's event must mean a label, a reward or both")
        for name in ("window_seconds", "allowed_lateness_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.observed_actions, tuple) or not all(
            isinstance(a, str) and a for a in self.observed_actions
        ):
            raise ValueError(f"observed_actions must be a tuple of action names, got {self.observed_actions!r}")

    def observes(self, action: str) -> bool:
        """Whether a decision that took `action` can show this rule's outcome."""
        return not self.observed_actions or action in self.observed_actions

    def outcome_id(self, decision_id: str) -> str:
        """The one outcome this rule gives a decision: its event and its window closing share it,
        so whichever is recorded first is the decision's outcome and the other stores nothing."""
        return f"rule:{self.name}:{decision_id}"

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["observed_actions"] = list(self.observed_actions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutcomeRule:
        """The inverse of `to_dict`; ValueError naming the field for unknown, missing or bad terms."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown outcome rule field(s): {', '.join(unknown)}")
        missing = sorted(n for n in ("name", "event_type", "event_key", "decision_key") if n not in d)
        if missing:
            raise ValueError(f"outcome rule: missing field(s) {', '.join(missing)}")
        terms = dict(d)
        if "observed_actions" in terms:
            actions = terms["observed_actions"]
            if not isinstance(actions, list | tuple):
                raise ValueError(f"observed_actions must be a list of action names, got {actions!r}")
            terms["observed_actions"] = tuple(actions)
        return cls(**terms)
