"""Unit tests for the pure training logic: labels from the log (d2d.training.labels), time-based splits
(d2d.training.split) and evaluation metrics (d2d.training.evaluation). No servers."""

from __future__ import annotations

import json
import math
import random
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from d2d.eventlog import StoredEvent
from d2d.sim.training import CHARGEBACK_LABEL
from d2d.training import (
    Evaluation,
    LabelDefinition,
    brier,
    calibration_table,
    evaluate,
    label_examples,
    log_loss,
    roc_auc,
    time_split,
)
from d2d.training.evaluation import weighted_metrics

# ---------------------------------------------------------------------------------------------
# Evaluation


def test_roc_auc_hand_computed() -> None:
    # positives 0.35 (beats 0.1, loses to 0.4) and 0.8 (beats both): 3 of 4 pairs
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_roc_auc_ties_count_half() -> None:
    # pairs (pos, neg): (0.5, 0.5) tie -> 0.5, (0.5, 0.2) 1, (0.9, 0.5) 1, (0.9, 0.2) 1 -> 3.5 / 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    assert roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_roc_auc_perfect_and_inverted() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    # scores need not be probabilities
    assert roc_auc(np.array([True, False]), [-3.0, 7.0]) == 0.0


def test_roc_auc_matches_brute_force_pairwise_count() -> None:
    rng = random.Random(20240601)
    for n in (2, 7, 50, 400):
        labels = [rng.random() < 0.3 for _ in range(n)]
        labels[0], labels[1] = True, False  # both classes
        scores = [round(rng.random(), 1) for _ in range(n)]  # many ties
        pos = [s for s, y in zip(scores, labels, strict=True) if y]
        neg = [s for s, y in zip(scores, labels, strict=True) if not y]
        wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
        assert roc_auc([int(y) for y in labels], scores) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


def test_roc_auc_one_class_raises() -> None:
    with pytest.raises(ValueError, match="one class"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        roc_auc([0], [0.1])


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1])
    with pytest.raises(ValueError):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError):
        log_loss([], [])
    with pytest.raises(ValueError):
        brier([0, 1], [0.5, 1.5])
    with pytest.raises(ValueError):
        calibration_table([0, 1], [0.5, 0.5], bins=0)


def test_weighted_metrics_equal_repeating_each_example_by_its_weight() -> None:
    rng = random.Random(11)
    labels = [1, 0] + [int(rng.random() < 0.4) for _ in range(60)]
    scores = [round(rng.random(), 1) for _ in labels]  # many ties
    weights = [rng.randint(0, 4) for _ in labels]
    weights[:2] = [1, 1]
    repeated = [(y, p) for y, p, w in zip(labels, scores, weights, strict=True) for _ in range(w)]
    got = weighted_metrics(labels, scores, weights)
    assert got["auc"] == pytest.approx(roc_auc([y for y, _ in repeated], [p for _, p in repeated]), rel=1e-12)
    assert got["log_loss"] == pytest.approx(log_loss([y for y, _ in repeated], [p for _, p in repeated]), rel=1e-12)
    assert got["brier"] == pytest.approx(brier([y for y, _ in repeated], [p for _, p in repeated]), rel=1e-12)
    assert weighted_metrics([1, 0], [0.4, 0.6], [1.0, 0.0])["auc"] is None  # no weight on the negatives
    with pytest.raises(ValueError, match="weights"):
        weighted_metrics([1, 0], [0.4, 0.6], [1.0, -1.0])


def test_log_loss_and_brier_by_hand() -> None:
    labels, probabilities = [1, 0], [0.8, 0.4]
    assert log_loss(labels, probabilities) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, rel=1e-12)
    assert brier(labels, probabilities) == pytest.approx((0.2**2 + 0.4**2) / 2, rel=1e-12)
    assert brier([1, 0], [1.0, 0.0]) == 0.0


def test_log_loss_clips_certain_mistakes() -> None:
    value = log_loss([1, 0], [0.0, 1.0])
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(1e-15), rel=1e-12)
    assert log_loss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_calibration_table_by_hand() -> None:
    labels = [0, 1, 0, 1]
    probabilities = [0.05, 0.3, 0.35, 1.0]  # 0.3 is an edge: it belongs to [0.3, 0.4); 1.0 to the last bin
    table = calibration_table(labels, probabilities, bins=10)
    assert len(table) == 10
    assert [b["count"] for b in table] == [1, 0, 0, 2, 0, 0, 0, 0, 0, 1]
    assert table[0] == {"bin_lower": 0.0, "bin_upper": 0.1, "count": 1, "mean_predicted": 0.05, "observed_rate": 0.0}
    assert table[1] == {"bin_lower": 0.1, "bin_upper": 0.2, "count": 0, "mean_predicted": None, "observed_rate": None}
    assert table[3]["bin_lower"] == 0.3 and table[3]["bin_upper"] == 0.4
    assert table[3]["mean_predicted"] == pytest.approx(0.325)
    assert table[3]["observed_rate"] == 0.5
    assert table[9] == {"bin_lower": 0.9, "bin_upper": 1.0, "count": 1, "mean_predicted": 1.0, "observed_rate": 1.0}


def test_calibration_table_small_bin_count() -> None:
    table = calibration_table([0, 1, 1], [0.0, 0.5, 1.0], bins=2)
    assert [(b["bin_lower"], b["bin_upper"], b["count"]) for b in table] == [(0.0, 0.5, 1), (0.5, 1.0, 2)]
    assert table[1]["mean_predicted"] == 0.75 and table[1]["observed_rate"] == 1.0


def test_evaluate_overall_and_slices() -> None:
    labels = [1, 0, 1, 0, 1]
    probabilities = [0.9, 0.2, 0.6, 0.7, 0.4]
    channel = ["web", "web", "pos", "pos", "pos"]
    merchant = ["a", "b", "a", "b", "a"]
    size = [1, 1, 2, np.int64(2), 2]
    result = evaluate(labels, probabilities, slices={"channel": channel, "merchant": merchant, "size": size}, bins=5)

    assert (result.rows, result.positives) == (5, 3)
    # pos 0.9 beats 0.2 and 0.7; pos 0.6 beats 0.2 only; pos 0.4 beats 0.2 only -> 4 of 6
    assert result.auc == pytest.approx(4 / 6)
    assert result.log_loss == pytest.approx(log_loss(labels, probabilities))
    assert result.brier == pytest.approx((0.01 + 0.04 + 0.16 + 0.49 + 0.36) / 5)
    assert result.baseline_auc == 0.5
    assert result.base_rate_log_loss == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    assert [b["count"] for b in result.calibration] == [0, 1, 1, 2, 1]

    web, pos = result.slices["channel"]["web"], result.slices["channel"]["pos"]
    assert web == {
        "rows": 2,
        "positives": 1,
        "auc": 1.0,
        "log_loss": pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2),
        "brier": pytest.approx((0.01 + 0.04) / 2),
    }
    assert (pos["rows"], pos["positives"], pos["auc"]) == (3, 2, 0.0)  # 0.7 (negative) beats both positives
    assert pos["brier"] == pytest.approx((0.16 + 0.49 + 0.36) / 3)
    # one class in a slice: auc None, other metrics still there
    assert result.slices["merchant"]["a"]["auc"] is None and result.slices["merchant"]["a"]["positives"] == 3
    assert result.slices["merchant"]["b"]["auc"] is None and result.slices["merchant"]["b"]["positives"] == 0
    assert result.slices["merchant"]["a"]["log_loss"] == pytest.approx(log_loss([1, 1, 1], [0.9, 0.6, 0.4]))
    # keys are strings, numpy scalars grouped with their Python equivalents
    assert list(result.slices["size"]) == ["1", "2"] and result.slices["size"]["2"]["rows"] == 3


def test_evaluate_one_class_and_round_trip() -> None:
    result = evaluate([0, 0, 0], [0.1, 0.2, 0.0], slices={"c": ["x", None, float("nan")]})
    assert result.auc is None
    assert result.positives == 0
    assert math.isfinite(result.base_rate_log_loss) and result.base_rate_log_loss < 1e-12
    assert set(result.slices["c"]) == {"x", "None", "nan"}
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert Evaluation.from_dict(json.loads(text)) == result

    full = evaluate([0, 1, 1, 0], [0.2, 0.7, 0.5, 0.5], slices={"s": ["a", "a", "b", "b"]})
    again = Evaluation.from_dict(json.loads(json.dumps(full.to_dict(), allow_nan=False)))
    assert again == full and again.to_dict() == full.to_dict()


def test_evaluate_slice_length_mismatch() -> None:
    with pytest.raises(ValueError, match="slice"):
        evaluate([0, 1], [0.1, 0.9], slices={"c": ["a"]})


def test_evaluate_slices_equal_brute_force_and_ignore_row_order() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    p = rng.random(200)
    groups = rng.choice(["x", "y", "z"], 200)
    result = evaluate(y, p, slices={"g": groups})
    for group in ("x", "y", "z"):
        rows = [i for i in range(200) if groups[i] == group]
        pos = [p[i] for i in rows if y[i]]
        neg = [p[i] for i in rows if not y[i]]
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
        brier = sum((p[i] - y[i]) ** 2 for i in rows) / len(rows)
        nll = -sum(math.log(p[i]) if y[i] else math.log(1 - p[i]) for i in rows) / len(rows)
        got = result.slices["g"][group]
        assert (got["rows"], got["positives"]) == (len(rows), len(pos))
        assert got["auc"] == pytest.approx(wins / (len(pos) * len(neg)))
        assert got["brier"] == pytest.approx(brier) and got["log_loss"] == pytest.approx(nll)
    order = rng.permutation(200)  # the metrics describe a set of rows, not a sequence
    shuffled = evaluate(y[order], p[order], slices={"g": groups[order]})
    for group in ("x", "y", "z"):
        assert shuffled.slices["g"][group] == pytest.approx(result.slices["g"][group])
    assert shuffled.auc == pytest.approx(result.auc)


# ---------------------------------------------------------------------------------------------
# Labels

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


class Log:
    """Builds StoredEvents with increasing seq."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []

    def add(self, type_: str, occurred_at: datetime, **payload: object) -> StoredEvent:
        event = StoredEvent(
            seq=len(self.events) + 1,
            event_id=uuid.uuid4(),
            type=type_,
            schema_version=1,
            entity_type=type_.split(".")[0],
            entity_id=str(payload.get("payment_id") or payload.get("merchant_id")),
            occurred_at=occurred_at,
            recorded_at=occurred_at,
            payload=payload,
            metadata={},
        )
        self.events.append(event)
        return event

    def payment(self, payment_id: str, at: datetime) -> StoredEvent:
        return self.add(
            "payment.authorized",
            at,
            payment_id=payment_id,
            customer_id="cus_1",
            merchant_id="mer_1",
            amount=12.5,
            channel="web",
        )

    def chargeback(self, payment_id: str, at: datetime) -> StoredEvent:
        return self.add("payment.chargeback", at, payment_id=payment_id, chargeback_id=f"cb_{len(self.events):08d}")


def labels_by_payment(examples: list) -> dict[str, int]:
    return {e.payload["payment_id"]: e.label for e in examples}


def test_labels_window_rules() -> None:
    log = Log()
    as_of = T0 + 100 * DAY
    log.add("merchant.onboarded", T0 - DAY, merchant_id="mer_1", category="grocery")
    log.payment("pay_within", T0)
    log.payment("pay_late", T0 + DAY)
    log.payment("pay_skew", T0 + 2 * DAY)
    log.payment("pay_edge", T0 + 3 * DAY)
    log.payment("pay_none", T0 + 4 * DAY)
    log.chargeback("pay_skew", T0 + 2 * DAY - timedelta(hours=1))  # before its example: clock skew
    log.chargeback("pay_within", T0 + 10 * DAY)
    log.chargeback("pay_late", T0 + DAY + 30 * DAY + timedelta(seconds=1))  # just after the window
    log.chargeback("pay_edge", T0 + 3 * DAY + 30 * DAY)  # exactly at the end of the window: counts
    log.chargeback("pay_outside_range", T0 + 20 * DAY)  # its payment is not in this range
    log.add("payment.authorized", as_of, payment_id="pay_newest", customer_id="c", merchant_id="m", amount=1.0)

    examples = label_examples(log.events, CHARGEBACK_LABEL, as_of=as_of)
    assert labels_by_payment(examples) == {
        "pay_within": 1,
        "pay_late": 0,
        "pay_skew": 0,
        "pay_edge": 1,
        "pay_none": 0,
    }
    first = examples[0]
    source = log.events[1]
    assert (first.event_id, first.seq, first.occurred_at) == (str(source.event_id), source.seq, source.occurred_at)
    assert first.payload["channel"] == "web"


def test_labels_censor_young_examples() -> None:
    log = Log()
    as_of = T0 + 60 * DAY
    log.payment("pay_old_enough", as_of - 30 * DAY)  # window closes exactly at as_of: kept
    log.payment("pay_young", as_of - 30 * DAY + timedelta(seconds=1))
    log.payment("pay_very_young", as_of - DAY)
    log.chargeback("pay_very_young", as_of)  # a young example is left out even when its outcome came
    examples = label_examples(log.events, CHARGEBACK_LABEL, as_of=as_of)
    assert labels_by_payment(examples) == {"pay_old_enough": 0}
    short = label_examples(log.events, replace(CHARGEBACK_LABEL, window_seconds=86400), as_of=as_of)
    assert labels_by_payment(short) == {"pay_old_enough": 0, "pay_young": 0, "pay_very_young": 1}


def test_labels_duplicate_outcomes_count_once() -> None:
    log = Log()
    log.payment("pay_1", T0)
    log.chargeback("pay_1", T0 + 5 * DAY)
    log.chargeback("pay_1", T0 + 5 * DAY)
    log.chargeback("pay_1", T0 + 6 * DAY)
    examples = label_examples(log.events, CHARGEBACK_LABEL, as_of=T0 + 90 * DAY)
    assert [(e.payload["payment_id"], e.label) for e in examples] == [("pay_1", 1)]


def test_labels_in_seq_order() -> None:
    log = Log()
    log.payment("pay_b", T0 + 5 * DAY)
    log.payment("pay_a", T0)  # later seq, earlier event time
    log.payment("pay_c", T0 + 2 * DAY)
    log.chargeback("pay_a", T0 + DAY)
    as_of = T0 + 60 * DAY
    examples = label_examples(log.events, CHARGEBACK_LABEL, as_of=as_of)
    assert [e.payload["payment_id"] for e in examples] == ["pay_b", "pay_a", "pay_c"]
    assert [e.seq for e in examples] == [1, 2, 3]
    assert [e.label for e in examples] == [0, 1, 0]
    # any iterable, in any order, gives the same result
    assert label_examples(iter(reversed(log.events)), CHARGEBACK_LABEL, as_of=as_of) == examples


def test_labels_custom_definition() -> None:
    log = Log()
    log.add("merchant.onboarded", T0, merchant_id="mer_1", category="travel")
    log.add("merchant.onboarded", T0, merchant_id="mer_2", category="grocery")
    log.payment("pay_1", T0 + DAY)  # merchant_id mer_1
    definition = LabelDefinition("merchant.onboarded", "payment.authorized", "merchant_id", 7 * 86400)
    examples = label_examples(log.events, definition, as_of=T0 + 10 * DAY)
    assert [(e.payload["merchant_id"], e.label) for e in examples] == [("mer_1", 1), ("mer_2", 0)]


def test_labels_errors() -> None:
    log = Log()
    log.payment("pay_1", T0)
    with pytest.raises(ValueError, match="aware"):
        label_examples(log.events, CHARGEBACK_LABEL, as_of=datetime(2024, 6, 1))
    log.add("payment.chargeback", T0 + DAY, chargeback_id="cb_00000001")
    with pytest.raises(ValueError, match="payment_id"):
        label_examples(log.events, CHARGEBACK_LABEL, as_of=T0 + 60 * DAY)


def test_label_definition_round_trip_and_validation() -> None:
    definition = replace(CHARGEBACK_LABEL, window_seconds=7 * 86400)
    d = definition.to_dict()
    assert d == {
        "example_type": "payment.authorized",
        "outcome_type": "payment.chargeback",
        "join_field": "payment_id",
        "window_seconds": 604800,
    }
    assert LabelDefinition.from_dict(json.loads(json.dumps(d))) == definition
    with pytest.raises(ValueError, match="missing field.*window_seconds"):
        LabelDefinition.from_dict({k: v for k, v in d.items() if k != "window_seconds"})
    with pytest.raises(ValueError, match="unknown"):
        LabelDefinition.from_dict({**d, "extra": 1})
    with pytest.raises(ValueError):
        replace(definition, window_seconds=-1)
    with pytest.raises(ValueError):
        replace(definition, window_seconds=1.5)
    with pytest.raises(ValueError):
        replace(definition, join_field="")


def test_a_spec_learns_from_decisions_or_events_by_its_label() -> None:
    from d2d.sim.training import default_spec
    from d2d.training.labels import DecisionLabel
    from d2d.training.spec import SpecError, TrainingSpec

    stored = json.loads(default_spec().to_json())  # a spec as every version so far stores it
    assert TrainingSpec.from_dict(stored) == default_spec()
    assert isinstance(TrainingSpec.from_dict(stored).label, LabelDefinition)
    decided = {**stored, "label": {"source": "decisions", "model": "fraud", "weighting": "none"}}
    spec = TrainingSpec.from_dict(decided)
    assert spec.label == DecisionLabel("fraud", "none")
    assert json.loads(spec.to_json()) == decided
    defaulted = TrainingSpec.from_dict({**stored, "label": {"source": "decisions", "model": "fraud"}})
    assert defaulted.label == DecisionLabel("fraud", "inverse_propensity", window_seconds=0)
    windowed = {**stored, "label": {"source": "decisions", "model": "fraud", "weighting": "none", "window_seconds": 60}}
    assert TrainingSpec.from_dict(windowed).label.window_seconds == 60
    assert json.loads(TrainingSpec.from_dict(windowed).to_json()) == windowed
    bad = [
        ({"source": "decisions"}, "model"),
        ({"source": "decisions", "model": "fraud", "weighting": "sometimes"}, "weighting"),
        ({"source": "events", "model": "fraud"}, "source"),
        ({"source": "decisions", "model": "fraud", "window": 1}, "unknown"),
        ({"source": "decisions", "model": "fraud", "window_seconds": -1}, "window_seconds"),
    ]
    for label, field in bad:
        with pytest.raises(SpecError, match=field) as refused:
            TrainingSpec.from_dict({**stored, "label": label})
        assert refused.value.code == "INVALID_ARGUMENT"


def test_decision_weights_are_inverse_propensity_capped() -> None:
    from d2d.training.labels import DecisionLabel

    weighted, plain = DecisionLabel("fraud"), DecisionLabel("fraud", "none")
    assert [weighted.weight(p) for p in (1.0, 0.9, 0.1, 0.01, 0.001)] == [1.0, 1 / 0.9, 10.0, 100.0, 100.0]
    assert {plain.weight(p) for p in (1.0, 0.1, 0.001)} == {1.0}


# ---------------------------------------------------------------------------------------------
# Split


def test_time_split_shares_and_order() -> None:
    times = [T0 + i * timedelta(hours=1) for i in range(20)]
    shuffled = list(range(20))
    random.Random(3).shuffle(shuffled)
    occurred = [times[k] for k in shuffled]  # occurred[i] is the shuffled[i]-th hour
    split = time_split(occurred)
    assert (len(split.train), len(split.validation), len(split.test)) == (14, 3, 3)
    # the parts, concatenated, are the examples in time order
    assert [shuffled[i] for i in split.train + split.validation + split.test] == list(range(20))
    assert max(occurred[i] for i in split.train) < min(occurred[i] for i in split.validation)
    assert max(occurred[i] for i in split.validation) < min(occurred[i] for i in split.test)


def test_time_split_sizes() -> None:
    def sizes(n: int, **shares: float) -> tuple[int, int, int]:
        s = time_split([T0] * n, **shares)
        assert sorted(s.train + s.validation + s.test) == list(range(n))
        return len(s.train), len(s.validation), len(s.test)

    assert sizes(100) == (70, 15, 15)  # 0.7 + 0.15 is 0.8499999999999999 in floating point
    assert sizes(3) == (1, 1, 1)  # every part non-empty
    assert sizes(10, train=0.5, validation=0.25) == (5, 2, 3)
    assert sizes(4, train=0.9, validation=0.05) == (2, 1, 1)


def test_time_split_ties_broken_by_index() -> None:
    occurred = [T0 + DAY, T0, T0, T0 + DAY, T0, T0 + DAY, T0, T0, T0 + DAY, T0]
    split = time_split(occurred, train=0.5, validation=0.2)
    assert split.train == [1, 2, 4, 6, 7]
    assert split.validation == [9, 0]
    assert split.test == [3, 5, 8]
    assert time_split(occurred, train=0.5, validation=0.2) == split
    assert split.to_dict() == {"train": [1, 2, 4, 6, 7], "validation": [9, 0], "test": [3, 5, 8]}


@pytest.mark.parametrize(
    ("n", "shares"),
    [
        (2, {}),
        (0, {}),
        (10, {"train": 0.0}),
        (10, {"train": 1.0}),
        (10, {"validation": 0.0}),
        (10, {"validation": -0.1}),
        (10, {"train": 0.5, "validation": 0.5}),
        (10, {"train": 0.8, "validation": 0.3}),
        (10, {"train": float("nan")}),
    ],
)
def test_time_split_errors(n: int, shares: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        time_split([T0 + i * DAY for i in range(n)], **shares)
