"""Decision policies: small frozen values that say, for a model's score, which action each prefers
and the probability it gives every action.

Serving draws its action from these probabilities (`draw`, with a uniform number derived from the
decision id) and logs the drawn action's probability as its propensity; replay (OPE, rescore) asks
the same objects what a logged or a candidate policy would have done. One piece of code computes a
logged propensity and a counterfactual one, so they cannot disagree. Everything here is pure and
deterministic: a decision replays, and an importance weight is exactly pi / propensity.

Two kinds, each with either exploration:

- `threshold` over exactly two actions: the greedy action is actions[1] (e.g. decline) when
  score >= threshold, else actions[0]. Its utilities (for softmax) are {actions[0]: 0,
  actions[1]: score - threshold}.
- `best_action` over any number (>= 2) of actions, each with a utility linear in the score
  (weight * score + bias); the greedy action maximises it, ties going to the earlier action.

- `epsilon_greedy`: the greedy action, except that with probability epsilon the action is drawn
  uniformly from all of them (so each non-greedy action has epsilon / K).
- `softmax`: probabilities proportional to exp(utility / temperature), temperature > 0.

The dict form (`to_dict`, `policy_from_dict`) is what the registry's events and every
`decision.made` carry. A dict without `kind` is the shape logged before kinds existed
({epsilon, threshold, actions}): a threshold policy with epsilon-greedy exploration.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from d2d.errors import Refusal
from d2d.v1 import registry_pb2

KINDS = ("threshold", "best_action")
EXPLORATIONS = ("epsilon_greedy", "softmax")


# -- exploration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpsilonGreedy:
    """The greedy action with probability 1 - epsilon + epsilon / K, every other one epsilon / K."""

    epsilon: float = 0.0
    name: ClassVar[str] = "epsilon_greedy"

    def probabilities(self, actions: Sequence[str], utilities: Mapping[str, float], greedy: str) -> dict[str, float]:
        share = self.epsilon / len(actions)
        return {a: (1.0 - self.epsilon + share) if a == greedy else share for a in actions}

    def draw(self, actions: Sequence[str], probabilities: Mapping[str, float], greedy: str, u: float, v: float) -> str:
        """Explore when u < epsilon, then take the action v falls on (K equal parts of [0, 1)); else
        the greedy one: each action with exactly its probability. (The two numbers, not one inverse
        CDF, so decisions logged before the policy kinds existed replay to the same action.)"""
        if self.epsilon > 0 and u < self.epsilon:
            return actions[min(int(v * len(actions)), len(actions) - 1)]
        return greedy

    def to_dict(self) -> dict[str, Any]:
        return {"exploration": self.name, "epsilon": self.epsilon}


@dataclass(frozen=True)
class Softmax:
    """Probabilities proportional to exp(utility / temperature): a high temperature explores more."""

    temperature: float
    name: ClassVar[str] = "softmax"

    def probabilities(self, actions: Sequence[str], utilities: Mapping[str, float], greedy: str) -> dict[str, float]:
        top = max(utilities.values())  # subtracted so no exp overflows; the ratios are unchanged
        weights = [math.exp((utilities[a] - top) / self.temperature) for a in actions]
        total = math.fsum(weights)
        return {a: w / total for a, w in zip(actions, weights, strict=True)}

    def draw(self, actions: Sequence[str], probabilities: Mapping[str, float], greedy: str, u: float, v: float) -> str:
        """Inverse CDF of u over the probabilities, in `actions` order (v is not used)."""
        return inverse_cdf(actions, probabilities, u)

    def to_dict(self) -> dict[str, Any]:
        return {"exploration": self.name, "temperature": self.temperature}


Exploration = EpsilonGreedy | Softmax


# -- policies -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy(ABC):
    """What every kind answers for a score. `draw(score, u, v)` with u, v independent uniforms in
    [0, 1) takes an action by its exploration's draw, so an action is drawn with exactly the
    probability `probabilities` gives it, and that is the propensity to log."""

    actions: tuple[str, ...]
    exploration: Exploration
    kind: ClassVar[str]

    @abstractmethod
    def utilities(self, score: float) -> dict[str, float]:
        """Every action's utility for `score` (what softmax weighs)."""

    @abstractmethod
    def greedy(self, score: float) -> str:
        """The action the policy prefers for `score`, without exploration."""

    @abstractmethod
    def _kind_dict(self) -> dict[str, Any]: ...

    def probabilities(self, score: float) -> dict[str, float]:
        """The probability of each action for `score`, in `actions` order (they sum to 1)."""
        return self.exploration.probabilities(self.actions, self.utilities(score), self.greedy(score))

    def draw(self, score: float, u: float, v: float) -> str:
        """The action for `score` and independent uniforms `u`, `v` in [0, 1) (see the exploration's draw)."""
        return self.draw_from(self.probabilities(score), score, u, v)

    def draw_from(self, probabilities: Mapping[str, float], score: float, u: float, v: float) -> str:
        """`draw` with `probabilities(score)` already computed."""
        return self.exploration.draw(self.actions, probabilities, self.greedy(score), u, v)

    def action_scores(self, score: float) -> dict[str, float]:
        """Every action's score as logged with a decision (its utility)."""
        return self.utilities(score)

    def to_dict(self) -> dict[str, Any]:
        """The policy as JSON data; `policy_from_dict` reads it back to an equal policy."""
        return {"kind": self.kind, "actions": list(self.actions), **self._kind_dict(), **self.exploration.to_dict()}


def inverse_cdf(actions: Sequence[str], probabilities: Mapping[str, float], u: float) -> str:
    """The first action whose cumulative probability (in `actions` order) exceeds `u` in [0, 1): each
    action is drawn with its probability (u's resolution aside)."""
    cumulative = 0.0
    for action in actions:
        cumulative += probabilities[action]
        if u < cumulative:
            return action
    # u within rounding of 1: the last action with any probability
    return next(a for a in reversed(actions) if probabilities[a] > 0)


@dataclass(frozen=True)
class ThresholdPolicy(Policy):
    """actions[1] when score >= threshold, else actions[0] (exactly two actions)."""

    threshold: float = 0.5
    kind: ClassVar[str] = "threshold"

    def utilities(self, score: float) -> dict[str, float]:
        return {self.actions[0]: 0.0, self.actions[1]: score - self.threshold}

    def greedy(self, score: float) -> str:
        return self.actions[1] if score >= self.threshold else self.actions[0]

    def action_scores(self, score: float) -> dict[str, float]:
        """The score for actions[1] and its complement for actions[0], as logged before kinds existed."""
        return {self.actions[1]: score, self.actions[0]: 1.0 - score}

    def _kind_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}


@dataclass(frozen=True)
class ActionUtility:
    """utility = weight * score + bias for `action`."""

    action: str
    weight: float
    bias: float = 0.0


@dataclass(frozen=True)
class BestActionPolicy(Policy):
    """The action with the highest utility weight * score + bias (ties: the earlier action)."""

    action_utilities: tuple[ActionUtility, ...] = ()
    kind: ClassVar[str] = "best_action"

    def utilities(self, score: float) -> dict[str, float]:
        return {u.action: u.weight * score + u.bias for u in self.action_utilities}

    def greedy(self, score: float) -> str:
        return max(self.actions, key=self.utilities(score).__getitem__)  # max keeps the first of equals

    def _kind_dict(self) -> dict[str, Any]:
        return {"utilities": [{"action": u.action, "weight": u.weight, "bias": u.bias} for u in self.action_utilities]}


def _explore(epsilon: float, temperature: float | None) -> dict[str, Any]:
    return {"exploration": "softmax", "temperature": temperature} if temperature is not None else {"epsilon": epsilon}


def threshold_policy(
    actions: Sequence[str], threshold: float, *, epsilon: float = 0.0, temperature: float | None = None
) -> ThresholdPolicy:
    """A checked threshold policy (softmax when `temperature` is given, else epsilon-greedy)."""
    policy = policy_from_dict(
        {"kind": "threshold", "actions": list(actions), "threshold": threshold, **_explore(epsilon, temperature)}
    )
    assert isinstance(policy, ThresholdPolicy)
    return policy


def best_action_policy(
    utilities: Mapping[str, tuple[float, float]], *, epsilon: float = 0.0, temperature: float | None = None
) -> BestActionPolicy:
    """A checked best_action policy from {action: (weight, bias)} in action order."""
    entries = [{"action": a, "weight": w, "bias": b} for a, (w, b) in utilities.items()]
    policy = policy_from_dict({"kind": "best_action", "utilities": entries, **_explore(epsilon, temperature)})
    assert isinstance(policy, BestActionPolicy)
    return policy


# -- reading the dict form ------------------------------------------------------------------------


def _refuse(message: str, field: str) -> Refusal:
    return Refusal("INVALID_ARGUMENT", message, field)


def _number(d: Mapping[str, Any], key: str, field: str, default: float | None = None) -> float:
    value = d.get(key, default)
    if value is None:
        raise _refuse(f"{field} is missing", field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(f"{field} must be a finite number, got {value!r}", field)
    return float(value)


def _action_names(names: Any, field: str) -> tuple[str, ...]:
    if not isinstance(names, list | tuple):
        raise _refuse(f"{field} must be a list of action names, got {names!r}", field)
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise _refuse(f"{field}[{i}] must be a non-empty action name, got {name!r}", f"{field}[{i}]")
        if name in seen:
            raise _refuse(f"{field}[{i}] names {name!r} twice: actions must be distinct", f"{field}[{i}]")
        seen.add(name)
    return tuple(names)


def _exploration(d: Mapping[str, Any], field: str) -> Exploration:
    name = d.get("exploration") or "epsilon_greedy"
    if name == "epsilon_greedy":
        epsilon = _number(d, "epsilon", f"{field}.epsilon", 0.0)
        if not 0.0 <= epsilon <= 1.0:
            raise _refuse(f"{field}.epsilon must be within 0..1, got {epsilon!r}", f"{field}.epsilon")
        return EpsilonGreedy(epsilon)
    if name == "softmax":
        temperature = _number(d, "temperature", f"{field}.temperature")
        if temperature <= 0:
            raise _refuse(f"{field}.temperature must be above 0, got {temperature!r}", f"{field}.temperature")
        return Softmax(temperature)
    raise _refuse(f"{field}.exploration must be one of {', '.join(EXPLORATIONS)}, got {name!r}", f"{field}.exploration")


def policy_from_dict(d: Mapping[str, Any], field: str = "policy") -> Policy:
    """The policy a dict describes (every shape ever logged), or INVALID_ARGUMENT naming the field
    under `field` (e.g. `policy.utilities[2].weight`). Keys of another kind (a `threshold` in a
    best_action dict) and `canary_share` (routing, not deciding) are ignored."""
    if not isinstance(d, Mapping):
        raise _refuse(f"{field} must be an object, got {d!r}", field)
    kind = d.get("kind") or "threshold"  # the only kind before kinds were logged
    exploration = _exploration(d, field)
    if kind == "threshold":
        actions = _action_names(d.get("actions"), f"{field}.actions")
        if len(actions) != 2:
            raise _refuse(f"{field}.actions: a threshold policy has exactly two actions (the first taken below the"
                          f" threshold), got {len(actions)}", f"{field}.actions")  # fmt: skip
        threshold = _number(d, "threshold", f"{field}.threshold")
        if not 0.0 <= threshold <= 1.0:
            raise _refuse(f"{field}.threshold must be within 0..1 (scores are probabilities), got {threshold!r}",
                          f"{field}.threshold")  # fmt: skip
        return ThresholdPolicy(actions, exploration, threshold)
    if kind == "best_action":
        entries = d.get("utilities")
        if not isinstance(entries, list | tuple) or len(entries) < 2:
            raise _refuse(f"{field}.utilities: a best_action policy needs a utility for each of at least two actions,"
                          f" got {entries!r}", f"{field}.utilities")  # fmt: skip
        utilities: list[ActionUtility] = []
        for i, entry in enumerate(entries):
            where = f"{field}.utilities[{i}]"
            if not isinstance(entry, Mapping):
                raise _refuse(f"{where} must be an object with action, weight and bias, got {entry!r}", where)
            action = entry.get("action")
            if not isinstance(action, str) or not action:
                raise _refuse(f"{where}.action must be a non-empty action name, got {action!r}", f"{where}.action")
            if any(u.action == action for u in utilities):
                raise _refuse(f"{where}.action names {action!r} twice: actions must be distinct", f"{where}.action")
            weight = _number(entry, "weight", f"{where}.weight")
            utilities.append(ActionUtility(action, weight, _number(entry, "bias", f"{where}.bias", 0.0)))
        actions = tuple(u.action for u in utilities)
        named = d.get("actions")
        if named not in (None, [], ()) and list(named) != list(actions):
            raise _refuse(f"{field}.actions must be the utilities' actions in their order ({list(actions)}) or"
                          f" empty, got {named!r}", f"{field}.actions")  # fmt: skip
        return BestActionPolicy(actions, exploration, tuple(utilities))
    raise _refuse(f"{field}.kind must be one of {', '.join(KINDS)}, got {kind!r}", f"{field}.kind")


def with_changes(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` (a policy's dict form) with `changes` over it, unchecked. A None or an empty list
    leaves a field as it is; utilities without actions name the actions themselves; an epsilon
    without an exploration means epsilon_greedy, a temperature without one softmax."""
    given = {k: v for k, v in changes.items() if v is not None and not (isinstance(v, list | tuple) and not v)}
    merged = {**base, **given}
    if "utilities" in given and "actions" not in given:
        merged.pop("actions", None)
    if "exploration" not in given and ("epsilon" in given) != ("temperature" in given):
        merged["exploration"] = "epsilon_greedy" if "epsilon" in given else "softmax"
    return merged


def describe(policy: Policy | Mapping[str, Any]) -> str:
    """The policy in a line a person reads, e.g. `threshold 0.5, epsilon 0.1, actions approve/decline`;
    a dict that is no complete policy is shown as it is."""
    try:
        policy = as_policy(policy)
    except Refusal:
        return str(dict(policy)) if isinstance(policy, Mapping) else repr(policy)
    if isinstance(policy, ThresholdPolicy):
        head = f"threshold {policy.threshold:g}"
    else:
        assert isinstance(policy, BestActionPolicy)
        terms = ", ".join(f"{u.action} {u.weight:g}*score{u.bias:+g}" for u in policy.action_utilities)
        head = f"best_action of {terms}"
    exploration = policy.exploration
    explore = f"epsilon {exploration.epsilon:g}" if isinstance(exploration, EpsilonGreedy) else (
        f"softmax temperature {exploration.temperature:g}")  # fmt: skip
    return f"{head}, {explore}, actions {'/'.join(policy.actions)}"


def as_policy(policy: Policy | Mapping[str, Any]) -> Policy:
    """`policy` itself, or the policy its dict form describes."""
    return policy if isinstance(policy, Policy) else policy_from_dict(policy)


# The functions replay and tests called before policies were objects, over either form.


def greedy_action(score: float, policy: Policy | Mapping[str, Any]) -> str:
    return as_policy(policy).greedy(score)


def action_probabilities(score: float, policy: Policy | Mapping[str, Any]) -> dict[str, float]:
    """The probability of each of the policy's actions for `score` (they sum to 1)."""
    return as_policy(policy).probabilities(score)


# -- the registry's DeploymentPolicy message ------------------------------------------------------


def deployment_dict_from_proto(p: registry_pb2.DeploymentPolicy) -> dict[str, Any]:
    """The message as a deployment policy dict (`canary_share` and the policy's fields, unchecked):
    an unset kind or exploration reads as threshold / epsilon_greedy, as before they existed."""
    Message = registry_pb2.DeploymentPolicy
    return {
        "canary_share": p.canary_share,
        "kind": Message.Kind.Name(p.kind).lower() if p.kind else "threshold",
        "actions": list(p.actions),
        "threshold": p.threshold,
        "utilities": [{"action": u.action, "weight": u.weight, "bias": u.bias} for u in p.utilities],
        "exploration": Message.Exploration.Name(p.exploration).lower() if p.exploration else "epsilon_greedy",
        "epsilon": p.epsilon,
        "temperature": p.temperature,
    }


def policy_from_proto(p: registry_pb2.DeploymentPolicy) -> Policy:
    """The decision policy a DeploymentPolicy message carries (the routing share aside)."""
    return policy_from_dict(deployment_dict_from_proto(p), "deployment_policy")


def deployment_policy_proto(
    policy: Policy | Mapping[str, Any], canary_share: float = 0.0
) -> registry_pb2.DeploymentPolicy:
    """The message for a policy (or a deployment policy dict, whose `canary_share` it takes)."""
    if not isinstance(policy, Policy):
        canary_share = float(policy.get("canary_share", canary_share))
        policy = policy_from_dict(policy)
    Message = registry_pb2.DeploymentPolicy
    message = Message(
        canary_share=canary_share, kind=Message.Kind.Value(policy.kind.upper()), actions=list(policy.actions),
        exploration=Message.Exploration.Value(policy.exploration.name.upper()),
    )  # fmt: skip
    if isinstance(policy, ThresholdPolicy):
        message.threshold = policy.threshold
    if isinstance(policy, BestActionPolicy):
        message.utilities.extend(
            registry_pb2.ActionUtility(action=u.action, weight=u.weight, bias=u.bias) for u in policy.action_utilities
        )
    if isinstance(policy.exploration, EpsilonGreedy):
        message.epsilon = policy.exploration.epsilon
    else:
        message.temperature = policy.exploration.temperature
    return message
