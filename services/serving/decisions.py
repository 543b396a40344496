"""How a decision is made from a score, as pure functions: routing a unit to an arm and choosing an
action by the model's decision policy (d2d.policies). Deterministic given their inputs, so any logged
decision can be replayed, and the logged propensity is exactly the probability the policy gave the
action."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from d2d.policies import Policy, as_policy

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


def choose(score: float, policy: Policy | Mapping[str, Any], decision: uuid.UUID) -> Choice:
    """The action the policy draws for `score`, the uniform draw coming from the decision id (so it
    replays), with the probability the policy gave it as its propensity."""
    policy = as_policy(policy)
    probabilities = policy.probabilities(score)
    u, v = unit_interval("explore", str(decision)), unit_interval("pick", str(decision))
    action = policy.draw_from(probabilities, score, u, v)  # Policy.draw, its probabilities kept for the propensity
    greedy = policy.greedy(score)
    return Choice(action, probabilities[action], action != greedy, greedy, policy.action_scores(score))
