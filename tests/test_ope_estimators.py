"""Off-policy estimators (d2d.replay.ope) against their textbook definitions, and on the simulator,
which knows every payment's true fraud probability and so every policy's true value."""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import pytest

from d2d.errors import Refusal
from d2d.policies import action_probabilities
from d2d.replay.ope import (
    check_propensities,
    check_support,
    cross_fitted_rewards,
    doubly_robust,
    effective_sample_size,
    estimate,
    importance_weights,
    ips,
    snips,
)
from d2d.sim import PaymentsSimulator, SimConfig
from services.serving.decisions import choose, decision_id

ACTIONS = ["approve", "decline"]
MERCHANT_TIERS = {"low": 0, "medium": 1, "high": 2}
MARGIN = 0.3  # approving a legitimate payment earns this share of its amount; a fraudulent one loses it all
EPSILON = 0.2
HISTORY = SimConfig(seed=1000, customers=1_500, merchants=120, days=1.0, payments_per_day=10_000)
SEEDS = range(20)


def logged_days(seed: int) -> SimConfig:
    return SimConfig(seed=seed, customers=1_500, merchants=120, days=1.0, payments_per_day=10_000)


# ---------------------------------------------------------------------------------------------
# The estimators against their definitions, on four decisions over three actions worked by hand

LOGGED_ACTIONS = np.array([0, 1, 2, 0])
PROPENSITIES = np.array([0.5, 0.25, 0.5, 0.8])
REWARDS = np.array([1.0, 2.0, 0.0, -1.0])
CANDIDATE = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.2, 0.2, 0.6], [0.4, 0.6, 0.0]])
REWARD_MODEL = np.array([[0.5, 1.0, 0.0], [0.0, 1.5, 1.0], [0.0, 0.0, 0.5], [-1.0, 0.0, 0.0]])
# w_i = pi(a_i|x_i) / p_i = 0.5/0.5, 0.5/0.25, 0.6/0.5, 0.4/0.8
WEIGHTS = [1.0, 2.0, 1.2, 0.5]


def test_importance_weights_are_the_candidates_probability_of_the_logged_action_over_its_propensity() -> None:
    assert importance_weights(LOGGED_ACTIONS, PROPENSITIES, CANDIDATE).tolist() == pytest.approx(WEIGHTS)


def test_ips_is_the_mean_of_weight_times_reward() -> None:
    # (1*1 + 2*2 + 1.2*0 + 0.5*-1) / 4
    assert ips(np.array(WEIGHTS), REWARDS) == pytest.approx(4.5 / 4)


def test_self_normalised_ips_divides_by_the_sum_of_the_weights() -> None:
    # (1*1 + 2*2 + 1.2*0 + 0.5*-1) / (1 + 2 + 1.2 + 0.5)
    assert snips(np.array(WEIGHTS), REWARDS) == pytest.approx(4.5 / 4.7)
    assert snips(np.zeros(4), REWARDS) is None  # the candidate never takes a logged action


def test_doubly_robust_is_the_model_value_plus_the_weighted_residual() -> None:
    # row 0: 0.5*0.5 + 0.5*1.0            + 1.0*(1 - 0.5)   = 1.25
    # row 1: 0.5*1.5 + 0.5*1.0            + 2.0*(2 - 1.5)   = 2.25
    # row 2: 0.6*0.5                      + 1.2*(0 - 0.5)   = -0.30
    # row 3: 0.4*-1.0                     + 0.5*(-1 - -1.0) = -0.40
    value = doubly_robust(np.array(WEIGHTS), REWARDS, LOGGED_ACTIONS, CANDIDATE, REWARD_MODEL)
    assert value == pytest.approx((1.25 + 2.25 - 0.30 - 0.40) / 4)


def test_effective_sample_size_is_the_squared_sum_of_weights_over_the_sum_of_squares() -> None:
    assert effective_sample_size(np.array(WEIGHTS)) == pytest.approx(4.7**2 / (1 + 4 + 1.44 + 0.25))
    assert effective_sample_size(np.full(7, 3.0)) == pytest.approx(7)


def test_propensity_clipping_raises_small_propensities_to_the_clip() -> None:
    # p = 0.25 becomes 0.5: the second weight is 0.5/0.5 = 1 (weight clipping would cap w itself instead)
    clipped = importance_weights(LOGGED_ACTIONS, PROPENSITIES, CANDIDATE, clip=0.5)
    assert clipped.tolist() == pytest.approx([1.0, 1.0, 1.2, 0.5])
    found = estimate(LOGGED_ACTIONS, PROPENSITIES, REWARDS, CANDIDATE, clip=0.5, bootstrap=0)
    assert found["estimates"]["ips"]["value"] == pytest.approx((1 + 2 + 0 - 0.5) / 4)
    assert found["clipped"] == 1


def test_standard_errors_are_the_plug_in_ones() -> None:
    found = estimate(LOGGED_ACTIONS, PROPENSITIES, REWARDS, CANDIDATE, REWARD_MODEL, bootstrap=0)
    # IPS terms 1, 4, 0, -0.5 (mean 1.125): squared deviations sum to 12.1875
    assert found["estimates"]["ips"]["se"] == pytest.approx(math.sqrt(12.1875 / 3) / 2)
    # DR terms 1.25, 2.25, -0.3, -0.4 (mean 0.7): squared deviations 0.3025 + 2.4025 + 1 + 1.21
    assert found["estimates"]["dr"]["se"] == pytest.approx(math.sqrt(4.915 / 3) / 2)
    # SNIPS (delta method): sqrt(sum w^2 (r - V)^2) / sum w, V = 4.5/4.7
    v = 4.5 / 4.7
    expected = math.sqrt((1 - v) ** 2 + 4 * (2 - v) ** 2 + 1.44 * v**2 + 0.25 * (-1 - v) ** 2) / 4.7
    assert found["estimates"]["snips"]["se"] == pytest.approx(expected)
    assert found["logging"]["value"] == pytest.approx(0.5)  # the rewards' own mean: (1 + 2 + 0 - 1) / 4


def test_bootstrap_intervals_are_seeded_percentile_intervals() -> None:
    rng = np.random.default_rng(3)
    n = 400
    actions = rng.integers(0, 2, n)
    rewards = rng.normal(1.0, 1.0, n)
    uniform = np.full((n, 2), 0.5)
    found = estimate(actions, np.full(n, 0.5), rewards, uniform, np.zeros((n, 2)), bootstrap=300, seed=5)
    for name in ("ips", "snips", "dr"):
        e = found["estimates"][name]
        assert e["ci_low"] < e["value"] < e["ci_high"]
        # a percentile interval of the mean is about +-1.96 standard errors wide
        assert e["ci_high"] - e["ci_low"] == pytest.approx(2 * 1.96 * e["se"], rel=0.25)
    again = estimate(actions, np.full(n, 0.5), rewards, uniform, np.zeros((n, 2)), bootstrap=300, seed=5)
    other = estimate(actions, np.full(n, 0.5), rewards, uniform, np.zeros((n, 2)), bootstrap=300, seed=6)
    assert again == found and other["estimates"]["dr"]["ci_low"] != found["estimates"]["dr"]["ci_low"]
    # A constant reward under the logging policy itself: every resample gives the same value.
    constant = estimate(actions, np.full(n, 0.5), np.full(n, 2.0), uniform, bootstrap=50)
    assert constant["logging"]["ci_low"] == constant["logging"]["ci_high"] == 2.0


def test_a_missing_or_zero_propensity_is_refused_naming_the_decision() -> None:
    for bad in (None, 0.0, 1.5):
        with pytest.raises(Refusal, match="decision d-2") as refused:
            check_propensities([0.9, bad, 0.5], ["d-1", "d-2", "d-3"], "model")
        assert refused.value.code == "FAILED_PRECONDITION" and refused.value.field == "model"


def test_a_candidate_acting_where_the_logging_policy_could_not_is_refused_naming_the_decision() -> None:
    logging = np.array([[1.0, 0.0], [0.9, 0.1]])
    check_support(np.array([[1.0, 0.0], [0.0, 1.0]]), logging, ["d-1", "d-2"], ACTIONS, "policy_json")
    with pytest.raises(Refusal, match="decision d-1: the candidate takes 'decline'") as refused:
        check_support(np.array([[0.5, 0.5], [0.0, 1.0]]), logging, ["d-1", "d-2"], ACTIONS, "policy_json")
    assert refused.value.code == "FAILED_PRECONDITION" and refused.value.field == "policy_json"


def test_the_reward_model_never_sees_the_reward_of_the_decision_it_predicts() -> None:
    rng = np.random.default_rng(1)
    n = 200
    features = rng.normal(size=(n, 2))
    actions = rng.integers(0, 2, n)
    rewards = features[:, 0] + actions + rng.normal(0, 0.1, n)
    ids = [f"decision-{i}" for i in range(n)]
    predicted = cross_fitted_rewards(features, actions, rewards, ids, 2)
    changed = rewards.copy()
    changed[0] += 100.0
    again = cross_fitted_rewards(features, actions, changed, ids, 2)
    assert again[0].tolist() == predicted[0].tolist()  # its own fold's prediction ignores its reward
    assert not np.array_equal(again, predicted)  # the other fold's model learned from it
    assert np.corrcoef(predicted[np.arange(n), actions], rewards)[0, 1] > 0.8


def test_a_reward_that_does_not_depend_on_the_label_needs_no_model() -> None:
    n = 50
    label_rewards = np.zeros((n, 2, 2))
    label_rewards[:, 0] = [1.0, -10.0]  # approve: 1 if legitimate, -10 if fraud
    label_rewards[:, 1] = [-0.5, -0.5]  # decline: the same whatever the label
    labels = np.array([i % 10 == 0 for i in range(n)], dtype=np.int64)
    predicted = cross_fitted_rewards(
        np.zeros((n, 1)), np.zeros(n, dtype=np.int64), np.zeros(n), [str(i) for i in range(n)], 2,
        label_rewards=label_rewards, labels=labels,
    )  # fmt: skip
    assert predicted[:, 1].tolist() == [-0.5] * n
    assert np.all((predicted[:, 0] > -10.0) & (predicted[:, 0] < 1.0))  # between the two labels' rewards


# ---------------------------------------------------------------------------------------------
# On the simulator: 20 logs of the same two policies, each against the policies' true values
#
# Payments are decided in process by serving's own `choose` (epsilon-greedy, propensities logged)
# on inputs a model could read from the event stream. Rewards: approving a legitimate payment earns
# MARGIN * amount, approving a fraudulent one loses the amount, declining earns 0; only approved
# payments show whether they were fraud. The true value of the candidate on a log is the mean over
# its payments of pi(approve|x) * E[reward | x, approve], E from the simulator's fraud probability.

LOGGING_POLICY = {"threshold": 0.05, "epsilon": EPSILON, "actions": ACTIONS}
CANDIDATE_POLICY = {"threshold": 0.15, "epsilon": 0.0, "actions": ACTIONS}


@dataclass
class Payments:
    inputs: np.ndarray
    ids: list[str]
    amounts: np.ndarray
    fraud_probability: np.ndarray
    is_fraud: np.ndarray


def simulated_payments(config: SimConfig) -> Payments:
    """Each payment's inputs as of its time: log amount, e-commerce, IP country unlike the card's,
    a device new to the customer, hour, the customer's payments in the past hour, merchant tier, MCC."""
    sim = PaymentsSimulator(config)
    truth = sim.truth()
    cards: dict[str, str] = {}
    merchants: dict[str, dict] = {}
    devices: dict[str, set[str]] = defaultdict(set)
    recent: dict[str, deque[float]] = defaultdict(deque)
    rows, ids = [], []
    for event in sim.events():
        p = event.payload
        if event.type == "card.issued":
            cards[p["card_id"]] = p["card_country"]
        elif event.type == "merchant.onboarded":
            merchants[p["merchant_id"]] = p
        elif event.type == "payment.authorized":
            at, past = event.occurred_at.timestamp(), recent[p["customer_id"]]
            while past and past[0] < at - 3600:
                past.popleft()
            merchant = merchants[p["merchant_id"]]
            rows.append([
                math.log(p["amount"]), p["channel"] == "ecom", p["ip_country"] != cards[p["card_id"]],
                p["device_id"] not in devices[p["customer_id"]], event.occurred_at.hour, len(past),
                MERCHANT_TIERS[merchant["risk_tier"]], int(merchant["mcc"]),
            ])  # fmt: skip
            devices[p["customer_id"]].add(p["device_id"])
            past.append(at)
            ids.append(p["payment_id"])
    inputs = np.asarray(rows, dtype=float)
    fraud = np.asarray([truth[i].is_fraud for i in ids], dtype=float)
    return Payments(inputs, ids, np.exp(inputs[:, 0]), np.asarray([truth[i].fraud_probability for i in ids]), fraud)


def fraud_model(inputs: np.ndarray, labels: np.ndarray, rounds: int, depth: int) -> object:
    import xgboost as xgb

    params = {"objective": "binary:logistic", "max_depth": depth, "eta": 0.1, "nthread": 2, "seed": 1}
    return xgb.train(params, xgb.DMatrix(inputs, label=labels), rounds)


def scores(model: object, inputs: np.ndarray) -> np.ndarray:
    import xgboost as xgb

    return model.predict(xgb.DMatrix(inputs))  # type: ignore[attr-defined]


def evaluate_on_one_log(seed: int, logging_model: object, candidate_model: object) -> tuple[float, dict]:
    """(the candidate's true value, the estimates) on one simulated day decided by the logging policy."""
    payments = simulated_payments(logged_days(seed))
    n = len(payments.ids)
    logged_scores, candidate_scores = scores(logging_model, payments.inputs), scores(candidate_model, payments.inputs)
    actions, propensities, rewards, labels, ids = [], [], [], [], []
    target = np.zeros((n, len(ACTIONS)))
    for i, payment_id in enumerate(payments.ids):
        decision = decision_id("fraud", payment_id)
        choice = choose(float(logged_scores[i]), LOGGING_POLICY, decision)
        approved = choice.action == "approve"
        fraud = bool(payments.is_fraud[i])
        ids.append(str(decision))
        actions.append(ACTIONS.index(choice.action))
        propensities.append(choice.propensity)
        rewards.append(0.0 if not approved else -payments.amounts[i] if fraud else MARGIN * payments.amounts[i])
        labels.append(int(fraud) if approved else -1)  # a declined payment never shows whether it was fraud
        candidate = action_probabilities(float(candidate_scores[i]), CANDIDATE_POLICY)
        target[i] = [candidate[a] for a in ACTIONS]
    by_label = np.zeros((n, len(ACTIONS), 2))  # [payment, action, label]: the reward table per payment
    by_label[:, 0, 0], by_label[:, 0, 1] = MARGIN * payments.amounts, -payments.amounts
    p = payments.fraud_probability
    true_value = float(np.mean(target[:, 0] * ((1 - p) * MARGIN * payments.amounts - p * payments.amounts)))
    # The reward model sees what evaluate_policy gives it: the inputs, the logged and the candidate's score.
    features = np.column_stack([payments.inputs, logged_scores, candidate_scores])
    predicted = cross_fitted_rewards(
        features, np.asarray(actions), np.asarray(rewards), ids, len(ACTIONS), label_rewards=by_label,
        labels=np.asarray(labels), seed=seed, threads=2,
    )  # fmt: skip
    found = estimate(np.asarray(actions), np.asarray(propensities), np.asarray(rewards), target, predicted,
                     bootstrap=200, seed=seed)  # fmt: skip
    return true_value, found


def test_doubly_robust_intervals_cover_the_true_value_and_beat_ips_on_the_simulator() -> None:
    history = simulated_payments(HISTORY)  # a fully labelled day the two models learn from
    logging_model = fraud_model(history.inputs, history.is_fraud, rounds=60, depth=3)
    half = len(history.ids) // 2  # the candidate: another, smaller model, on half of it
    candidate_model = fraud_model(history.inputs[:half], history.is_fraud[:half], rounds=40, depth=2)
    lines = [f"{'seed':>4} {'true':>8} {'IPS':>8} {'SNIPS':>8} {'DR':>8} {'DR 95% interval':>20}  {'ESS':>6}"]
    errors: dict[str, list[float]] = defaultdict(list)
    covered = 0
    for seed in SEEDS:
        true_value, found = evaluate_on_one_log(seed, logging_model, candidate_model)
        e = found["estimates"]
        inside = e["dr"]["ci_low"] <= true_value <= e["dr"]["ci_high"]
        covered += inside
        for name in ("ips", "snips", "dr"):
            errors[name].append(abs(e[name]["value"] - true_value))
        lines.append(
            f"{seed:>4} {true_value:8.3f} {e['ips']['value']:8.3f} {e['snips']['value']:8.3f} {e['dr']['value']:8.3f} "
            f"[{e['dr']['ci_low']:8.3f}, {e['dr']['ci_high']:8.3f}]{'' if inside else '*'} {found['ess']:6.0f}"
        )
    mae = {name: float(np.mean(v)) for name, v in errors.items()}
    lines.append(
        f"true value inside the DR 95% interval in {covered} of {len(SEEDS)} logs (* outside); mean absolute error: "
        f"IPS {mae['ips']:.3f}, SNIPS {mae['snips']:.3f}, DR {mae['dr']:.3f}"
    )
    table = "\n".join(lines)
    print("\n" + table)
    assert covered >= 17, table
    assert mae["dr"] < mae["ips"], table
