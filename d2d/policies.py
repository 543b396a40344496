"""Decision policies as pure functions of a score: the action a policy prefers and the probability
it gives every action. Serving draws its action from these probabilities (and logs the drawn
action's as its propensity); replay uses the same functions to ask what another policy would
have done, so a logged propensity and a counterfactual one are computed by one piece of code.

The one kind today is a threshold over two actions with epsilon-greedy exploration: the greedy
action is actions[1] (e.g. decline) when score >= threshold, else actions[0]; with probability
epsilon the action is drawn uniformly from both instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def greedy_action(score: float, policy: Mapping[str, Any]) -> str:
    first, second = policy["actions"]
    return second if score >= policy["threshold"] else first


def action_probabilities(score: float, policy: Mapping[str, Any]) -> dict[str, float]:
    """The probability of each of the policy's actions for `score` (they sum to 1)."""
    epsilon = float(policy.get("epsilon", 0.0))
    greedy = greedy_action(score, policy)
    share = epsilon / len(policy["actions"])
    return {a: (1.0 - epsilon + share) if a == greedy else share for a in policy["actions"]}
