"""How a decision is made from a score, as pure functions: routing a unit to an arm and choosing an
action with epsilon-greedy exploration. Deterministic given their inputs, so any logged decision
can be replayed, and the logged propensity is exactly the probability the policy gave the action."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

DECISION_NAMESPACE = uuid.UUID("3f0c1d52-6a4e-4c8e-9b61-0d2d0d2d0d2d")


def unit_interval(*parts: str) -> float:
    """A uniform number in [0, 1) from the sha256 of the parts: the same parts, the same number."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def route(model: str, unit_id: str, canary_share: float) -> str:
    """`canary` for a `canary_share` of units, `production` for the rest; one unit, one arm."""
    return "canary" if unit_interval("route", model, unit_id) < canary_share else "production"


def decision_id(model: str, request_id: str | None) -> uuid.UUID:
    """A repeat of a request id names the same decision; without one, a fresh id."""
    return uuid.uuid5(DECISION_NAMESPACE, f"{model}/{request_id}") if request_id else uuid.uuid4()


@dataclass(frozen=True)
class Choice:
    action: str
    propensity: float
    explored: bool
    greedy_action: str
    action_scores: dict[str, float]


def choose(score: float, policy: dict[str, Any], decision: uuid.UUID) -> Choice:
    """Threshold policy with epsilon-greedy exploration.

    The greedy action is actions[1] (e.g. decline) when score >= threshold, else actions[0]. With
    probability epsilon the action is drawn uniformly from both instead (the draw comes from the
    decision id, so it replays). Propensity of the action taken: 1 - epsilon + epsilon/2 for the
    greedy one, epsilon/2 for the other.
    """
    first, second = policy["actions"]
    epsilon = float(policy["epsilon"])
    greedy = second if score >= policy["threshold"] else first
    action = greedy
    if epsilon > 0 and unit_interval("explore", str(decision)) < epsilon:
        action = first if unit_interval("pick", str(decision)) < 0.5 else second
    propensity = (1.0 - epsilon + epsilon / 2) if action == greedy else epsilon / 2
    return Choice(action, propensity, action != greedy, greedy, {second: score, first: 1.0 - score})
