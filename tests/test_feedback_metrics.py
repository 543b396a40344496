"""Live metrics over the join of decisions and outcomes (d2d.metrics) and drift against
the training baseline (d2d.training.baseline): pure logic, every number checked against a hand
computation. No servers."""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from d2d.metrics import JoinRow, Metrics, compute, windows
from d2d.training.baseline import EPSILON, baseline, column_baseline, psi, reading

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
MODEL = "fraud"


def row(
    n: int,
    score: float,
    label: int | None = None,
    *,
    version: int = 1,
    arm: str = "production",
    action: str = "approve",
    explored: bool = False,
    propensity: float = 0.95,
    delay: float | None = None,
    reward: float | None = None,
    withdrawn: bool = False,
    decided_at: datetime = T0,
) -> JoinRow:
    return JoinRow(
        decision_id=str(uuid.UUID(int=n)),
        model=MODEL,
        model_version=version,
        arm=arm,
        score=score,
        action=action,
        propensity=propensity,
        explored=explored,
        decided_at=decided_at,
        withdrawn=withdrawn,
        label=label,
        reward=reward,
        outcome_at=None if delay is None else decided_at + timedelta(seconds=delay),
    )


# Six decisions of version 1 in production (four labelled, scores 0.6 tied across the classes), and a
# withdrawn one that would lower the AUC if it counted.
PRODUCTION = [
    row(1, 0.2, 0, delay=100, reward=1.5),
    row(2, 0.6, 1, delay=300, reward=-20.0),
    row(3, 0.6, 0, delay=500, reward=1.5),
    row(4, 0.9, 1, delay=1000),
    row(5, 0.95, action="decline"),
    row(6, 0.7, explored=True, propensity=0.1),
    row(7, 0.01, 1, delay=50, withdrawn=True),
]


def production_metrics() -> Metrics:
    (metrics,) = compute(PRODUCTION, positive_action="approve")
    return metrics


def test_counts_and_label_coverage() -> None:
    m = production_metrics()
    assert (m.model, m.model_version, m.arm) == (MODEL, 1, "production")
    assert (m.decisions, m.labelled, m.positives) == (6, 4, 2)
    assert m.label_coverage == 4 / 6


def test_auc_counts_a_tie_across_the_classes_as_half() -> None:
    # positives 0.6 and 0.9, negatives 0.2 and 0.6: 1 + 0.5 + 1 + 1 of 4 pairs
    assert production_metrics().auc == 0.875


def test_log_loss_and_brier_by_hand() -> None:
    m = production_metrics()
    assert m.log_loss == pytest.approx(-(math.log(0.8) + math.log(0.6) + math.log(0.4) + math.log(0.9)) / 4, rel=1e-12)
    assert m.brier == pytest.approx((0.2**2 + 0.4**2 + 0.6**2 + 0.1**2) / 4, rel=1e-12)


def test_log_loss_clips_a_certain_mistake() -> None:
    (m,) = compute([row(1, 0.0, 1, delay=1), row(2, 0.5, 0, delay=1)])
    assert m.log_loss == pytest.approx((-math.log(1e-15) - math.log(0.5)) / 2, rel=1e-12)


def test_calibration_in_ten_equal_width_bins() -> None:
    table = production_metrics().calibration
    assert len(table) == 10 and [b["count"] for b in table] == [0, 0, 1, 0, 0, 0, 2, 0, 0, 1]
    assert table[2] == {"bin_lower": 0.2, "bin_upper": 0.3, "count": 1, "mean_predicted": 0.2, "observed_rate": 0.0}
    assert table[6]["mean_predicted"] == pytest.approx(0.6) and table[6]["observed_rate"] == 0.5
    assert table[9]["observed_rate"] == 1.0 and table[0]["mean_predicted"] is None


def test_action_rates_and_the_positive_actions_rate() -> None:
    m = production_metrics()
    assert m.action_rates == {"approve": 5 / 6, "decline": 1 / 6}
    assert m.positive_action_rate == 5 / 6
    (without,) = compute(PRODUCTION)
    assert without.positive_action_rate is None


def test_average_reward_is_over_rows_with_a_reward() -> None:
    m = production_metrics()
    assert m.rewarded == 3 and m.average_reward == pytest.approx((1.5 - 20.0 + 1.5) / 3)


def test_label_delay_mean_and_median_in_seconds() -> None:
    m = production_metrics()
    assert m.label_delay_mean_seconds == (100 + 300 + 500 + 1000) / 4
    assert m.label_delay_p50_seconds == (300 + 500) / 2


def test_explored_share() -> None:
    assert production_metrics().explored_share == 1 / 6


def test_ips_metrics_weight_each_labelled_row_by_its_inverse_propensity() -> None:
    # weight 4 on the positive at 0.6 counts it four times: pairs (pos, neg) weighted
    # 0.6 vs 0.2: 4, 0.6 vs 0.6: 4 * 0.5, 0.9 vs 0.2: 1, 0.9 vs 0.6: 1 -> 8 of (4 + 1) * (1 + 1)
    rows = [replace(r, propensity=0.25) if r.decision_id == PRODUCTION[1].decision_id else replace(r, propensity=1.0)
            for r in PRODUCTION]  # fmt: skip
    (m,) = compute(rows)
    assert m.ips_auc == 0.8 and m.auc == 0.875
    expected = -(math.log(0.8) + 4 * math.log(0.6) + math.log(0.4) + math.log(0.9)) / 7
    assert m.ips_log_loss == pytest.approx(expected, rel=1e-12)
    (equal,) = compute([replace(r, propensity=0.5) for r in PRODUCTION])  # equal weights change nothing
    assert equal.ips_auc == equal.auc and equal.ips_log_loss == pytest.approx(equal.log_loss, rel=1e-12)
    (clipped,) = compute([replace(r, propensity=0.0) for r in PRODUCTION])  # weight at most 100, never infinite
    assert clipped.ips_auc == clipped.auc


def test_withdrawn_decisions_are_ignored() -> None:
    with_withdrawn = compute(PRODUCTION)
    assert with_withdrawn == compute([r for r in PRODUCTION if not r.withdrawn])
    assert compute([replace(r, withdrawn=True) for r in PRODUCTION]) == []


def test_metrics_are_per_version_and_arm() -> None:
    canary = [
        row(11, 0.3, 0, version=2, arm="canary", delay=10),
        row(12, 0.4, 0, version=2, arm="canary", delay=30),
        row(13, 0.8, version=2, arm="canary", action="decline"),
    ]
    unlabelled = [row(21, 0.5, version=1, arm="canary")]
    result = compute([*canary, *PRODUCTION, *unlabelled])
    assert [(m.model_version, m.arm, m.decisions) for m in result] == [
        (1, "canary", 1),
        (1, "production", 6),
        (2, "canary", 3),
    ]
    v1_canary, v1_production, v2_canary = result
    assert v1_production == compute(PRODUCTION)[0]
    assert v2_canary.auc is None  # one class only
    assert v2_canary.labelled == 2 and v2_canary.log_loss == pytest.approx(-(math.log(0.7) + math.log(0.6)) / 2)
    assert v2_canary.label_delay_p50_seconds == 20
    assert v1_canary.labelled == 0 and v1_canary.label_coverage == 0.0
    assert (v1_canary.auc, v1_canary.log_loss, v1_canary.brier, v1_canary.calibration) == (None, None, None, [])
    assert v1_canary.label_delay_mean_seconds is None and v1_canary.average_reward is None


def test_same_rows_in_any_order_give_identical_numbers() -> None:
    rng = random.Random(7)
    rows = [
        row(
            n,
            rng.random(),
            rng.choice([0, 1, None]),
            arm=rng.choice(["production", "canary"]),
            action=rng.choice(["approve", "decline"]),
            delay=rng.random() * 1e5,
            reward=rng.random() * 100 - 50,
        )
        for n in range(1, 2001)
    ]
    expected = [m.to_dict() for m in compute(rows, positive_action="approve")]
    for _ in range(3):
        rng.shuffle(rows)
        assert [m.to_dict() for m in compute(rows, positive_action="approve")] == expected


def test_join_row_from_a_table_row() -> None:
    decision = uuid.uuid4()
    record = {**PRODUCTION[1].__dict__, "decision_id": decision, "unit_id": "c-1", "outcome_seq": 9}
    assert JoinRow.from_mapping(record) == replace(PRODUCTION[1], decision_id=str(decision))


def test_windows_group_by_decision_event_time() -> None:
    day = timedelta(days=1)
    rows = [row(n, 0.5, decided_at=T0 + offset) for n, offset in
            enumerate([-day, timedelta(0), day / 2, day, 2 * day + day / 2, 3 * day], start=1)]  # fmt: skip
    groups = windows(rows, T0, T0 + 2 * day + day / 2 + timedelta(seconds=1), day)
    assert [(lo, hi) for lo, hi, _ in groups] == [
        (T0, T0 + day), (T0 + day, T0 + 2 * day), (T0 + 2 * day, T0 + 2 * day + day / 2 + timedelta(seconds=1))
    ]  # fmt: skip
    assert [[r.decision_id for r in members] for _, _, members in groups] == [
        [rows[1].decision_id, rows[2].decision_id], [rows[3].decision_id], [rows[4].decision_id]
    ]  # fmt: skip
    assert windows([], T0, T0 + day, day) == [(T0, T0 + day, [])]
    with pytest.raises(ValueError, match="step"):
        windows(rows, T0, T0 + day, timedelta(0))
    with pytest.raises(ValueError, match="end"):
        windows(rows, T0, T0, day)


# ---------------------------------------------------------------------------------------------
# Drift: baseline and population stability index


def test_baseline_by_hand() -> None:
    # quantiles at 0 and 1/2 (observed values): 1 and 2 -> buckets (-inf, 1], (1, 2], (2, inf)
    assert column_baseline([1, 2, 3, 4, None], bins=2) == {
        "edges": [1.0, 2.0], "shares": [0.2, 0.2, 0.4], "null_share": 0.2, "rows": 5
    }  # fmt: skip
    entries = baseline({"b": np.array([0.0, 0.0, 1.0, np.nan]), "a": [3.0]})
    assert list(entries) == ["a", "b"]
    assert entries["b"] == {"edges": [0.0, 1.0], "shares": [0.5, 0.25, 0.0], "null_share": 0.25, "rows": 4}


def test_psi_of_identical_distributions_is_zero() -> None:
    values = [v if v % 7 else None for v in np.random.default_rng(1).normal(size=5000).round(2).tolist()]
    entry = column_baseline(values)
    assert psi(entry, values) == 0.0
    assert psi(entry, list(reversed(values))) == 0.0


def test_psi_by_hand() -> None:
    entry = column_baseline([1, 2, 3, 4, None], bins=2)
    # live buckets: 1 and 0 -> (-inf, 1]; 2 -> (1, 2]; 3, 3, 4, 5, 6 -> (2, inf); two nulls
    live = [1, 3, 3, 5, None, None, 2, 4, 6, 0]
    # actual 0.2, 0.1, 0.5, 0.2 against expected 0.2, 0.2, 0.4, 0.2
    assert psi(entry, live) == pytest.approx((0.1 - 0.2) * math.log(0.1 / 0.2) + (0.5 - 0.4) * math.log(0.5 / 0.4))


def test_psi_reads_stable_for_a_resample_and_major_for_a_shift() -> None:
    rng = np.random.default_rng(5)
    entry = column_baseline(rng.normal(size=20_000))
    resample = psi(entry, rng.normal(size=20_000))
    shifted = psi(entry, rng.normal(loc=1.0, size=20_000))
    assert resample < 0.01 and reading(resample) == "stable"
    assert shifted > 0.25 and reading(shifted) == "major"
    assert reading(0.1) == "moderate" and reading(0.25) == "moderate"


def test_psi_is_finite_when_a_bucket_is_empty() -> None:
    entry = column_baseline([5.0] * 100)  # one value: buckets (-inf, 5] and (5, inf), the second empty
    assert entry["shares"] == [1.0, 0.0]
    value = psi(entry, [7.0] * 100)  # everything moves to the empty bucket
    assert math.isfinite(value)
    assert value == pytest.approx(2 * (1 - EPSILON) * math.log(1 / EPSILON))


def test_a_shift_of_a_flag_is_seen() -> None:
    entry = column_baseline([1.0] * 95 + [0.0] * 5)  # quantiles are all 1 but for the minimum
    assert entry["edges"] == [0.0, 1.0]
    assert psi(entry, [1.0] * 50 + [0.0] * 50) > 0.25


def test_nulls_are_their_own_bucket() -> None:
    entry = column_baseline(list(range(100)))
    assert entry["null_share"] == 0.0
    assert psi(entry, [*range(0, 100, 2), *[None] * 50]) > 0.25
    assert psi(entry, [float(v) if v % 2 else math.nan for v in range(100)]) > 0.25
    everything_null = column_baseline([None, None])
    assert everything_null == {"edges": [], "shares": [0.0], "null_share": 1.0, "rows": 2}
    assert psi(everything_null, [None]) == 0.0 and psi(everything_null, [1.0]) > 0.25


def test_baseline_and_psi_refuse_what_they_cannot_measure() -> None:
    with pytest.raises(ValueError, match="bins"):
        column_baseline([1.0], bins=0)
    with pytest.raises(ValueError, match="no rows"):
        column_baseline([])
    with pytest.raises(ValueError, match="finite"):
        column_baseline([1.0, math.inf])
    with pytest.raises(ValueError, match="no values"):
        psi(column_baseline([1.0]), [])
