"""Off-policy evaluation: what a candidate policy would have earned on the decisions the logging
policy made, estimated from the logged actions, their propensities and the rewards they got.

The estimators are pure functions over arrays, for any number of actions K. For logged decision i:
the logged action a_i, the propensity p_i the logging policy gave it, the reward r_i, the
candidate's probability of every action pi(.|x_i) (n x K) and, for doubly robust, a reward model's
prediction q(x_i, a) for every action (n x K). With the importance weight w_i = pi(a_i|x_i) / p_i:

- IPS (inverse propensity scoring): mean_i w_i r_i. Unbiased when p_i > 0 wherever pi acts.
- SNIPS (self-normalised IPS): sum_i w_i r_i / sum_i w_i. Slightly biased, far less variance.
- DR (doubly robust): mean_i [sum_a pi(a|x_i) q(x_i,a) + w_i (r_i - q(x_i,a_i))]. Unbiased if
  either the propensities or the reward model are right; its variance shrinks as q improves.

Clipping is *propensity* clipping (Strehl et al. 2010, "Learning from logged implicit exploration
data"): propensities below `clip` are raised to it, so no weight exceeds pi/clip; this trades bias
for variance and, unlike weight clipping (Ionides 2008), depends only on the log, not on the
candidate. Intervals are bootstrap 95% percentile intervals (seeded); standard errors are the
plug-in ones: std(terms)/sqrt(n) for IPS and DR, the delta method for SNIPS. The effective sample
size (sum w)^2 / sum w^2 says how many on-policy decisions the weighted log is worth.

`evaluate_policy` reads the logged decisions, scores them with a candidate version on the inputs
they logged, and answers for the candidate's policy (d2d.policies). The reward model of DR is
cross-fitted: decisions are split into folds by a hash of their id, and each fold's q comes from
models fitted on the other folds only, so no decision's own reward feeds its prediction.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.policies import Policy, policy_from_dict, with_changes
from d2d.replay.log import LoggedDecision, Progress, load_version, logged_decisions, logged_vectors, no_progress

ESTIMATORS = ("ips", "snips", "dr")
FOLDS = 2
DEFAULT_BOOTSTRAP = 200
MAX_BOOTSTRAP = 100_000
REWARD_MODEL_ROUNDS = 80
MIN_ROWS_FOR_MODEL = 20  # fewer rows of an action: its reward model is their mean


# -- estimators ---------------------------------------------------------------------------------


def importance_weights(
    actions: np.ndarray, propensities: np.ndarray, target: np.ndarray, clip: float = 0.0
) -> np.ndarray:
    """w_i = pi(a_i|x_i) / max(p_i, clip): the candidate's probability of the logged action over
    the logging propensity, raised to `clip` (propensity clipping)."""
    actions = np.asarray(actions, dtype=np.int64)
    chosen = np.asarray(target, dtype=float)[np.arange(len(actions)), actions]
    return chosen / np.maximum(np.asarray(propensities, dtype=float), clip)


def ips(weights: np.ndarray, rewards: np.ndarray) -> float:
    return float(np.mean(weights * rewards))


def snips(weights: np.ndarray, rewards: np.ndarray) -> float | None:
    """None when the candidate gives no logged action any probability (sum w = 0)."""
    total = float(np.sum(weights))
    return float(np.sum(weights * rewards)) / total if total > 0 else None


def dr_terms(
    weights: np.ndarray, rewards: np.ndarray, actions: np.ndarray, target: np.ndarray, predicted: np.ndarray
) -> np.ndarray:
    """Per decision: sum_a pi(a|x) q(x,a) + w (r - q(x, a_logged)); DR is their mean."""
    rows = np.arange(len(actions))
    direct = np.sum(np.asarray(target, dtype=float) * predicted, axis=1)
    return direct + weights * (rewards - predicted[rows, np.asarray(actions, dtype=np.int64)])


def doubly_robust(
    weights: np.ndarray, rewards: np.ndarray, actions: np.ndarray, target: np.ndarray, predicted: np.ndarray
) -> float:
    return float(np.mean(dr_terms(weights, rewards, actions, target, predicted)))


def effective_sample_size(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2: n when every weight is equal, far less when a few weights dominate."""
    squares = float(np.sum(np.square(weights)))
    return float(np.sum(weights)) ** 2 / squares if squares > 0 else 0.0


def _standard_error(terms: np.ndarray) -> float | None:
    return float(np.std(terms, ddof=1) / math.sqrt(len(terms))) if len(terms) > 1 else None


def snips_standard_error(weights: np.ndarray, rewards: np.ndarray) -> float | None:
    """Delta method: sqrt(sum w^2 (r - V)^2) / sum w, V the SNIPS value."""
    value = snips(weights, rewards)
    if value is None:
        return None
    return float(math.sqrt(np.sum(np.square(weights * (rewards - value)))) / np.sum(weights))


def estimate(
    actions: np.ndarray, propensities: np.ndarray, rewards: np.ndarray, target: np.ndarray,
    predicted: np.ndarray | None = None, *, clip: float = 0.0, bootstrap: int = 200, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Every estimator with its standard error and bootstrap 95% percentile interval (`bootstrap`
    resamples of the decisions drawn from `seed`; 0: no intervals), the effective sample size, and
    the logging policy's own average reward. DR only with `predicted`."""
    actions = np.asarray(actions, dtype=np.int64)
    rewards = np.asarray(rewards, dtype=float)
    target = np.asarray(target, dtype=float)
    weights = importance_weights(actions, propensities, target, clip)
    n = len(actions)
    terms: dict[str, np.ndarray] = {"ips": weights * rewards, "logging": rewards}
    values: dict[str, float | None] = {"ips": ips(weights, rewards), "snips": snips(weights, rewards)}
    errors: dict[str, float | None] = {
        "ips": _standard_error(terms["ips"]), "snips": snips_standard_error(weights, rewards),
        "logging": _standard_error(rewards),
    }  # fmt: skip
    values["logging"] = float(np.mean(rewards)) if n else None
    if predicted is not None:
        terms["dr"] = dr_terms(weights, rewards, actions, target, np.asarray(predicted, dtype=float))
        values["dr"] = float(np.mean(terms["dr"]))
        errors["dr"] = _standard_error(terms["dr"])
    intervals = _bootstrap_intervals(terms, weights, bootstrap, seed) if n and bootstrap > 0 else {}
    names = [name for name in (*ESTIMATORS, "logging") if name in values]
    found = {
        name: {"value": values[name], "se": errors[name], **intervals.get(name, {"ci_low": None, "ci_high": None})}
        for name in names
    }
    return {
        "estimates": {name: found[name] for name in names if name != "logging"},
        "logging": found["logging"],
        "ess": effective_sample_size(weights),
        "max_weight": float(np.max(weights)) if n else None,
        "clipped": int(np.sum(np.asarray(propensities, dtype=float) < clip)),
    }


def _bootstrap_intervals(
    terms: Mapping[str, np.ndarray], weights: np.ndarray, resamples: int, seed: int
) -> dict[str, dict[str, float | None]]:
    """95% percentile intervals: each estimator recomputed on `resamples` resamples of the
    decisions (with replacement), all estimators on the same resamples."""
    rng = np.random.default_rng(seed)
    n = len(weights)
    draws: dict[str, list[float]] = {name: [] for name in (*terms, "snips")}
    for _ in range(resamples):
        picked = rng.integers(0, n, n)
        for name, values in terms.items():
            draws[name].append(float(np.mean(values[picked])))
        total = float(np.sum(weights[picked]))
        draws["snips"].append(float(np.sum(terms["ips"][picked])) / total if total > 0 else math.nan)
    intervals: dict[str, dict[str, float | None]] = {}
    for name, values in draws.items():
        finite = np.asarray(values)[np.isfinite(values)]
        if len(finite) == 0:
            intervals[name] = {"ci_low": None, "ci_high": None}
        else:
            low, high = np.percentile(finite, [2.5, 97.5])
            intervals[name] = {"ci_low": float(low), "ci_high": float(high)}
    return intervals


# -- the reward model ---------------------------------------------------------------------------


def fold_of(decision_id: str, folds: int) -> int:
    """A decision's fold, from the sha256 of its id: the same decision, the same fold, every run."""
    return int.from_bytes(hashlib.sha256(decision_id.encode()).digest()[:8], "big") % folds


def cross_fitted_rewards(
    features: np.ndarray, actions: np.ndarray, rewards: np.ndarray, decision_ids: Sequence[str],
    n_actions: int, *, label_rewards: np.ndarray | None = None, labels: np.ndarray | None = None,
    folds: int = FOLDS, seed: int = 0, threads: int = 1,
) -> np.ndarray:  # fmt: skip
    """q(x_i, a) for every decision and action (n x K), each fold predicted by per-action xgboost
    models fitted on the other folds only.

    With `label_rewards` (n x K x L: the reward decision i gets for action a and label l) and
    `labels` (n, the logged label's index, -1 unknown), the model predicts the label and q is the
    expected reward under it: a label is far less noisy to learn than a reward that scales with,
    say, the amount at stake, and an action whose reward does not depend on the label needs no
    model. Otherwise the model regresses the reward. An action with fewer than MIN_ROWS_FOR_MODEL
    rows in the other folds gets their mean (or label frequencies)."""
    features = np.asarray(features, dtype=float).reshape(len(actions), -1)
    actions = np.asarray(actions, dtype=np.int64)
    rewards = np.asarray(rewards, dtype=float)
    fold = np.asarray([fold_of(d, folds) for d in decision_ids], dtype=np.int64)
    predicted = np.zeros((len(actions), n_actions))
    for k in range(folds):
        held, train = fold == k, fold != k
        if not held.any():
            continue
        for a in range(n_actions):
            rows = train & (actions == a)
            if label_rewards is None or labels is None:
                fallback = float(np.mean(rewards[train])) if train.any() else 0.0
                predicted[held, a] = _regress(features[rows], rewards[rows], features[held], fallback, seed, threads)
                continue
            by_label = np.asarray(label_rewards, dtype=float)[held, a, :]
            if np.all(by_label == by_label[:, :1]):  # the same reward whatever the label
                predicted[held, a] = by_label[:, 0]
                continue
            known = rows & (np.asarray(labels) >= 0)
            chances = _classify(
                features[known], np.asarray(labels)[known], features[held], by_label.shape[1],
                seed, threads,
            )  # fmt: skip
            predicted[held, a] = np.sum(chances * by_label, axis=1)
    return predicted


def _params(objective: str, seed: int, threads: int) -> dict[str, Any]:
    return {
        "objective": objective, "max_depth": 3, "eta": 0.1, "min_child_weight": 5, "tree_method": "hist",
        "nthread": threads, "seed": seed,
    }  # fmt: skip


def _regress(x: np.ndarray, y: np.ndarray, new: np.ndarray, fallback: float, seed: int, threads: int) -> np.ndarray:
    if len(y) < MIN_ROWS_FOR_MODEL:
        return np.full(len(new), float(np.mean(y)) if len(y) else fallback)
    import xgboost as xgb

    params = {**_params("reg:squarederror", seed, threads), "base_score": float(np.mean(y))}
    booster = xgb.train(params, xgb.DMatrix(x, label=y, missing=np.nan), REWARD_MODEL_ROUNDS)
    return booster.predict(xgb.DMatrix(new, missing=np.nan))


def _classify(x: np.ndarray, y: np.ndarray, new: np.ndarray, n_labels: int, seed: int, threads: int) -> np.ndarray:
    """P(label | x) for rows `new` (len(new) x n_labels); label frequencies when a model cannot be fit."""
    frequencies = (
        np.bincount(y.astype(np.int64), minlength=n_labels) / len(y) if len(y) else np.ones(n_labels) / n_labels
    )
    if len(y) < MIN_ROWS_FOR_MODEL or np.count_nonzero(frequencies) < 2:
        return np.tile(frequencies, (len(new), 1))
    import xgboost as xgb

    if n_labels == 2:
        params = {**_params("binary:logistic", seed, threads), "base_score": float(frequencies[1])}
        booster = xgb.train(params, xgb.DMatrix(x, label=y, missing=np.nan), REWARD_MODEL_ROUNDS)
        positive = booster.predict(xgb.DMatrix(new, missing=np.nan))
        return np.column_stack([1.0 - positive, positive])
    params = {**_params("multi:softprob", seed, threads), "num_class": n_labels}
    booster = xgb.train(params, xgb.DMatrix(x, label=y, missing=np.nan), REWARD_MODEL_ROUNDS)
    return booster.predict(xgb.DMatrix(new, missing=np.nan)).reshape(len(new), n_labels)


# -- refusals -----------------------------------------------------------------------------------


def check_propensities(propensities: Sequence[float | None], decision_ids: Sequence[str], field: str) -> None:
    """FAILED_PRECONDITION naming the first decision whose logged propensity is missing or not in (0, 1]:
    its weight would be undefined, so no estimate is honest."""
    for decision, p in zip(decision_ids, propensities, strict=True):
        if p is None or isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
            raise Refusal("FAILED_PRECONDITION", f"decision {decision} logged no propensity: its importance weight "
                          "is unknown, so off-policy estimates over it would be guesses", field)  # fmt: skip
        if not 0 < p <= 1:
            raise Refusal("FAILED_PRECONDITION", f"decision {decision} logged propensity {p} for the action it took: "
                          "an action the logging policy could not take has no importance weight", field)  # fmt: skip


def check_support(
    target: np.ndarray, logging: np.ndarray, decision_ids: Sequence[str], actions: Sequence[str], field: str
) -> None:
    """FAILED_PRECONDITION naming the first decision where the candidate gives an action positive
    probability that the logging policy gave probability 0: what it would earn there is unseen."""
    violating = (np.asarray(target) > 0) & (np.asarray(logging) == 0)
    if violating.any():
        i, a = (int(v) for v in np.argwhere(violating)[0])
        raise Refusal(
            "FAILED_PRECONDITION",
            f"decision {decision_ids[i]}: the candidate takes {actions[a]!r} with probability {target[i, a]:.4g} "
            f"where the logging policy never could (probability 0); {int(violating.any(axis=1).sum())} decision(s) "
            "are like it. Off-policy estimates need logging exploration wherever the candidate acts",
            field,
        )


# -- rewards ------------------------------------------------------------------------------------


def reward_table(table: Any, field: str = "reward_json") -> dict[str, dict[str, float] | float]:
    """`{"action": {"label": reward} | reward}` checked: INVALID_ARGUMENT naming `field` otherwise."""
    if not isinstance(table, dict) or not table:
        raise Refusal("INVALID_ARGUMENT", 'the reward table must be an object like {"approve": {"0": 1.0, "1": '
                      '-10.0}, "decline": 0.0}', field)  # fmt: skip
    checked: dict[str, dict[str, float] | float] = {}
    for action, rewards in table.items():
        if _is_number(rewards):
            checked[str(action)] = float(rewards)
        elif isinstance(rewards, dict) and rewards and all(_is_number(v) for v in rewards.values()):
            checked[str(action)] = {str(label): float(v) for label, v in rewards.items()}
        else:
            raise Refusal("INVALID_ARGUMENT", f"the reward of {action!r} must be a number or an object of label -> "
                          f"number, not {rewards!r}", field)  # fmt: skip
    return checked


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def reward_of(
    decision: LoggedDecision, table: Mapping[str, dict[str, float] | float] | None, field: str = "reward_json"
) -> tuple[float | None, str]:
    """(reward, "") or (None, why it is not known yet): from the table by (action, label), else the
    outcome's own reward. A table action whose reward is the same for every label needs no outcome."""
    if table is None:
        if decision.outcome is None:
            return None, "no_outcome"
        reward = decision.reward
        return (reward, "") if reward is not None and math.isfinite(reward) else (None, "no_reward")
    action = str(decision.payload["action"])
    if action not in table:
        raise Refusal("INVALID_ARGUMENT", f"the reward table has no reward for action {action!r} (decision "
                      f"{decision.decision_id} took it)", field)  # fmt: skip
    rewards = table[action]
    if isinstance(rewards, float):
        return rewards, ""
    if len(set(rewards.values())) == 1:
        return next(iter(rewards.values())), ""
    if decision.outcome is None:
        return None, "no_outcome"
    label = decision.label
    if label is None:
        return None, "no_label"
    if str(label) not in rewards:
        raise Refusal("INVALID_ARGUMENT", f"the reward table has no reward for action {action!r} with label "
                      f"{label} (decision {decision.decision_id})", field)  # fmt: skip
    return rewards[str(label)], ""


# -- the candidate policy -----------------------------------------------------------------------


def candidate_policy(logged: Mapping[str, Any] | None, override: Mapping[str, Any] | None, decision: str,
                     field: str) -> Policy:  # fmt: skip
    """The candidate's policy for one decision: the logged policy with `override`'s fields over it
    (`d2d.policies.with_changes`); an override naming its `kind` is a whole policy of its own."""
    if override and "kind" in override:
        return policy_from_dict(with_changes({}, override), field)
    try:
        policy = policy_from_dict(with_changes(logged or {}, override or {}), field)
    except Refusal as refusal:
        raise Refusal("FAILED_PRECONDITION", f"decision {decision} logged no complete policy ({refusal.message}): "
                      "give the candidate's policy in full", field) from None  # fmt: skip
    foreign = sorted(k for k in override or {} if KIND_ONLY_FIELDS.get(k, policy.kind) != policy.kind)
    if foreign:
        raise Refusal("INVALID_ARGUMENT", f"decision {decision} logged a {policy.kind} policy, which has no "
                      f"{', '.join(foreign)}: give the candidate's policy in full, with its kind", field)  # fmt: skip
    return policy


KIND_ONLY_FIELDS = {"threshold": "threshold", "utilities": "best_action"}  # a field -> the one kind that has it


POLICY_FIELDS = {"kind", "actions", "threshold", "utilities", "exploration", "epsilon", "temperature", "canary_share"}


def policy_override(policy: Any, field: str = "policy_json") -> dict[str, Any] | None:
    """The candidate's policy fields checked: either fields over each decision's logged policy
    (`threshold`, `epsilon`, `temperature`, `actions`, ...) or, with a `kind`, a whole policy
    (d2d.policies' dict form, e.g. a best_action policy with its `utilities`)."""
    if policy is None:
        return None
    if not isinstance(policy, dict):
        raise Refusal("INVALID_ARGUMENT", "the policy must be an object: a policy's fields (threshold, epsilon, "
                      "actions, ...) or a whole policy with its kind", field)  # fmt: skip
    unknown = sorted(set(policy) - POLICY_FIELDS)
    if unknown:
        raise Refusal("INVALID_ARGUMENT", f"unknown policy field(s) {', '.join(unknown)}", field)
    if "kind" in policy:
        policy_from_dict(with_changes({}, policy), field)  # a whole policy: all of it checked now
        return dict(policy)
    if "threshold" in policy and not _is_number(policy["threshold"]):
        raise Refusal("INVALID_ARGUMENT", f"threshold must be a number, not {policy['threshold']!r}", field)
    if "epsilon" in policy and not (_is_number(policy["epsilon"]) and 0 <= policy["epsilon"] <= 1):
        raise Refusal("INVALID_ARGUMENT", f"epsilon must be in [0, 1], not {policy['epsilon']!r}", field)
    if "temperature" in policy and not (_is_number(policy["temperature"]) and policy["temperature"] > 0):
        raise Refusal("INVALID_ARGUMENT", f"temperature must be above 0, not {policy['temperature']!r}", field)
    actions = policy.get("actions", ["a", "b"])
    if not (isinstance(actions, list) and len(actions) >= 2 and all(isinstance(a, str) and a for a in actions)):
        raise Refusal("INVALID_ARGUMENT", f"actions must be a list of action names, not {actions!r}", field)
    return dict(policy)


# -- the operation ------------------------------------------------------------------------------


async def evaluate_policy(
    log: EventLog, model_version: str, *, policy: dict[str, Any] | None = None, model: str | None = None,
    after_seq: int = 0, to_seq: int | None = None, clip: float = 0.0, bootstrap: int = DEFAULT_BOOTSTRAP,
    reward: dict[str, Any] | None = None, seed: int = 0, progress: Progress = no_progress,
) -> dict[str, Any]:  # fmt: skip
    """The value of the candidate (`model_version`'s scores under `policy`, by default each decision's
    logged policy; `policy` fields override the logged ones) on the logged decisions of `model`
    (default: the candidate's model) in (after_seq, to_seq], by IPS, SNIPS and DR.

    Rewards come from `reward` (`{action: {label: reward}}`) or the outcomes' rewards; a decision
    whose reward is not known yet is left out and counted. Refuses (FAILED_PRECONDITION) a logged
    decision without a usable propensity and a candidate that acts where the logging policy could not."""
    if not 0 <= clip <= 1 or not math.isfinite(clip):
        raise Refusal("INVALID_ARGUMENT", f"clip must be in [0, 1], not {clip}", "clip")
    if not 0 <= bootstrap <= MAX_BOOTSTRAP:
        raise Refusal("INVALID_ARGUMENT", f"bootstrap must be in [0, {MAX_BOOTSTRAP}], not {bootstrap}", "bootstrap")
    if after_seq < 0 or (to_seq is not None and to_seq < after_seq):
        raise Refusal("INVALID_ARGUMENT", f"the range ({after_seq}, {to_seq}] is empty or negative", "to_seq")
    override = policy_override(policy)
    table = reward_table(reward) if reward is not None else None
    policy_field = "policy_json" if override else "model_version"
    version = await load_version(log, model_version)
    logged_model = model or version.model
    decisions = await logged_decisions(log, model=logged_model, after=after_seq, to_seq=to_seq)
    progress("decisions", len(decisions), len(decisions))
    if not decisions:
        raise Refusal("FAILED_PRECONDITION", f"the log range ({after_seq}, {to_seq or 'end'}] holds no decisions of "
                      f"models/{logged_model}", "model")  # fmt: skip
    ids = [d.decision_id for d in decisions]
    check_propensities([d.payload.get("propensity") for d in decisions], ids, "model")

    head = to_seq if to_seq is not None else await log.head()
    features = await logged_vectors(log, version, decisions)
    progress("scoring", 0, len(decisions))
    scores = (await asyncio.to_thread(version.predict, features)).tolist()
    progress("scoring", len(decisions), len(decisions))

    logging_policies, policies = _policies(decisions, override, policy_field)
    actions = _action_names(decisions, logging_policies, policies)
    index = {a: k for k, a in enumerate(actions)}
    target = np.zeros((len(decisions), len(actions)))
    logging = np.ones((len(decisions), len(actions)))  # unknown: no support check for that decision
    for i, (decision, candidate, score) in enumerate(zip(decisions, policies, scores, strict=True)):
        for action, p in candidate.probabilities(score).items():
            target[i, index[action]] = p
        logging_policy, logged_score = logging_policies[i], decision.payload.get("score")
        if logging_policy is not None and _is_number(logged_score):
            logging[i] = 0.0
            for action, p in logging_policy.probabilities(float(logged_score)).items():
                logging[i, index[action]] = p
    check_support(target, logging, ids, actions, policy_field)

    found = [reward_of(d, table) for d in decisions]
    used = [i for i, (r, _) in enumerate(found) if r is not None]
    left_out = Counter(why for r, why in found if r is None)
    if not used:
        raise Refusal("FAILED_PRECONDITION", f"none of the {len(decisions)} decisions has a known reward yet "
                      f"({dict(left_out)}): record outcomes or give a reward table", "reward_json")  # fmt: skip
    taken = np.asarray([index[str(decisions[i].payload["action"])] for i in used], dtype=np.int64)
    propensities = np.asarray([float(decisions[i].payload["propensity"]) for i in used])
    rewards = np.asarray([found[i][0] for i in used], dtype=float)
    used_ids = [ids[i] for i in used]
    # The reward model sees the inputs, the logged score and the candidate's: the logging model's
    # score summarises what it learned from a longer history than the log range holds.
    logged_scores = [d.payload.get("score") for d in decisions]
    known = np.column_stack([
        features, [float(x) if _is_number(x) else math.nan for x in logged_scores], scores,
    ])[used]  # fmt: skip
    label_rewards, labels = _label_rewards([decisions[i] for i in used], actions, table) if table else (None, None)
    progress("reward model", 0, FOLDS)
    predicted = await asyncio.to_thread(
        cross_fitted_rewards, known, taken, rewards, used_ids, len(actions), label_rewards=label_rewards,
        labels=labels, seed=seed,
    )  # fmt: skip
    progress("reward model", FOLDS, FOLDS)
    progress("bootstrap", 0, bootstrap)
    result = await asyncio.to_thread(
        estimate, taken, propensities, rewards, target[used], predicted, clip=clip, bootstrap=bootstrap, seed=seed
    )
    progress("bootstrap", bootstrap, bootstrap)
    warnings = []
    if left_out:
        warnings.append(
            f"{sum(left_out.values())} decision(s) left out for want of a reward: the estimates describe the rest, "
            "which is biased if whether a reward is known depends on the action (e.g. declines never get a label; "
            "a reward table with a label-free reward for them keeps them in)"
        )
    if result["ess"] < 0.01 * len(used):
        warnings.append(f"effective sample size {result['ess']:.1f} of {len(used)}: the candidate is far from the "
                        "logging policy and the estimates rest on a few decisions")  # fmt: skip
    return {
        "model_version": version.name, "model": logged_model, "policy": override, "actions": actions,
        "after_seq": after_seq, "to_seq": head, **result,
        "counts": {"read": len(decisions), "used": len(used), "left_out": dict(sorted(left_out.items()))},
        "clip": clip, "bootstrap": bootstrap, "seed": seed, "folds": FOLDS,
        "reward": table if table is not None else "outcome", "warnings": warnings,
    }  # fmt: skip


def _label_rewards(
    decisions: Sequence[LoggedDecision], actions: Sequence[str], table: Mapping[str, dict[str, float] | float]
) -> tuple[np.ndarray, np.ndarray]:
    """The reward table as (n x K x L) rewards by action and label, and each decision's label index
    (-1 when unknown), for a reward model that predicts the label."""
    missing = [a for a in actions if a not in table]
    if missing:
        raise Refusal("INVALID_ARGUMENT", f"the reward table has no reward for action(s) {', '.join(missing)}: "
                      "the doubly robust estimate needs every action's", "reward_json")  # fmt: skip
    names = sorted({label for rewards in table.values() if isinstance(rewards, dict) for label in rewards}) or ["0"]
    by_label = np.zeros((len(actions), len(names)))
    for a, action in enumerate(actions):
        rewards = table[action]
        if isinstance(rewards, float) or len(set(rewards.values())) == 1:
            by_label[a] = rewards if isinstance(rewards, float) else next(iter(rewards.values()))
        elif set(rewards) != set(names):
            raise Refusal("INVALID_ARGUMENT", f"the reward of {action!r} depends on the label but names only labels "
                          f"{sorted(rewards)} of {names}", "reward_json")  # fmt: skip
        else:
            by_label[a] = [rewards[name] for name in names]
    index = {name: k for k, name in enumerate(names)}
    labels = np.asarray([index.get(str(d.label), -1) if d.label is not None else -1 for d in decisions])
    return np.broadcast_to(by_label, (len(decisions), *by_label.shape)), labels


def _policies(
    decisions: Sequence[LoggedDecision], override: Mapping[str, Any] | None, field: str
) -> tuple[list[Policy | None], list[Policy]]:
    """Each decision's logging policy (None where it logged no complete one: its support is unknown)
    and the candidate's policy for it. Decisions share a few distinct policies, each read once."""
    logging: dict[bytes, Policy | None] = {}
    candidates: dict[bytes, Policy] = {}
    logging_policies, policies = [], []
    for d in decisions:
        logged = d.payload.get("policy")
        key = orjson.dumps(logged, option=orjson.OPT_SORT_KEYS)
        if key not in logging:
            try:
                logging[key] = policy_from_dict(logged)
            except Refusal:
                logging[key] = None
            candidates[key] = candidate_policy(logged, override, d.decision_id, field)
        logging_policies.append(logging[key])
        policies.append(candidates[key])
    return logging_policies, policies


def _action_names(
    decisions: Sequence[LoggedDecision], logging: Sequence[Policy | None], candidates: Sequence[Policy]
) -> list[str]:
    """Every action a logging or candidate policy names or a decision took, in first-seen order."""
    names: dict[str, None] = {}
    for decision, logged, candidate in zip(decisions, logging, candidates, strict=True):
        for action in [*(logged.actions if logged else ()), *candidate.actions, decision.payload["action"]]:
            names.setdefault(str(action), None)
    return list(names)
