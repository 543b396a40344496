"""The feedback monitor: drift, a drop in live AUC, new labels and contract SLAs, found at positions
fixed by the log, at most one retrain asked per model until its production moves, and the same
findings after a checkpoint and restart as without one."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from d2d.training.baseline import baseline
from services.feedback.monitor import Finding, Monitor, MonitorSettings

NAMES = ["amount", "count"]
SETTINGS = MonitorSettings(drift_window=400, drift_every=200, performance_window=200, performance_every=100)


def trained(rng: random.Random, n: int = 2000) -> dict:
    amounts = [rng.gauss(50, 10) for _ in range(n)]
    counts = [float(rng.randint(0, 5)) for _ in range(n)]
    scores = [rng.random() for _ in range(n)]
    return {"inputs": baseline({"amount": amounts, "count": counts}), "score": baseline({"score": scores})["score"]}


def monitor_with_production(rng: random.Random, settings: MonitorSettings = SETTINGS) -> Monitor:
    monitor = Monitor(settings)
    monitor.know_version("fraud", 1, baseline=trained(rng), feature_names=NAMES, heldout_auc=0.9)
    monitor.production_set("fraud", 1)
    return monitor


def decide(monitor: Monitor, rng: random.Random, seq: int, shift: float = 0.0) -> list[Finding]:
    inputs = [rng.gauss(50 + shift, 10), float(rng.randint(0, 5))]
    return monitor.on_decision(seq, "fraud", 1, inputs, rng.random())


def test_drift_is_found_on_shifted_inputs_only_and_asks_one_retrain_until_production_moves() -> None:
    rng = random.Random(1)
    monitor = monitor_with_production(rng)
    assert [f for seq in range(1, 1001) for f in decide(monitor, rng, seq)] == []  # same population: stable
    findings = [f for seq in range(1001, 2001) for f in decide(monitor, rng, seq, shift=25)]
    assert findings and {f.kind for f in findings} == {"drift"}
    first = findings[0]
    assert first.details["worst"] == "amount" and first.details["psi_max"] > 0.25
    assert first.at_seq % SETTINGS.drift_every == 0 and first.source == "models/fraud/versions/1"
    assert len(findings) == 1 and findings[0].retrain  # a lasting breach is one alert and one request
    assert first.retrain_payload()["reason"] == "drift" and first.retrain_payload()["model"] == "fraud"
    monitor.production_set("fraud", 1)  # answered (the same version set again)
    again = [f for seq in range(2001, 2401) for f in decide(monitor, rng, seq, shift=25)]
    assert [f.retrain for f in again][:1] == [True]


def test_inputs_excluded_by_name_pattern_are_not_checked_for_drift() -> None:
    """A lifetime count grows with the log's age: excluded, its growth raises nothing, while a shift of
    an input still checked is found."""
    rng = random.Random(5)
    names = ["amount", "customer.count_lifetime"]
    settings = MonitorSettings(**{**SETTINGS.__dict__, "drift_inputs_exclude": ["*_lifetime"]})
    training = {"amount": [rng.gauss(50, 10) for _ in range(2000)],
                "customer.count_lifetime": [float(rng.randint(0, 20)) for _ in range(2000)]}  # fmt: skip
    monitors = {}
    for label, chosen in (("all", SETTINGS), ("excluded", settings)):
        monitors[label] = Monitor(chosen)
        monitors[label].know_version("fraud", 1, baseline={"inputs": baseline(training)}, feature_names=names,
                                     heldout_auc=None)  # fmt: skip
        monitors[label].production_set("fraud", 1)

    def decide_all(seq: int, amount_shift: float, age: int) -> dict[str, list[Finding]]:
        inputs = [rng.gauss(50 + amount_shift, 10), float(rng.randint(0, 20) + age)]
        return {label: m.on_decision(seq, "fraud", 1, inputs, 0.5) for label, m in monitors.items()}

    grown = [decide_all(seq, 0.0, 40 + seq // 100) for seq in range(1, 1001)]
    assert [f.details["worst"] for d in grown for f in d["all"]] == ["customer.count_lifetime"]
    assert [f for d in grown for f in d["excluded"]] == []
    shifted = [f for seq in range(1001, 2001) for f in decide_all(seq, 25.0, 50)["excluded"]]
    assert [f.details["worst"] for f in shifted] == ["amount"] and shifted[0].details["drifted"] == ["amount"]


def test_drift_exclusions_are_read_from_the_settings_json() -> None:
    settings = MonitorSettings.from_json(json.dumps({"drift_inputs_exclude": ["*_lifetime", "*_7d"]}))
    assert settings.drift_inputs_exclude == ("*_lifetime", "*_7d")
    assert not settings.drift_checked("customer_payments.count_7d") and settings.drift_checked("score")
    assert MonitorSettings.from_dict(json.loads(json.dumps(settings.__dict__))) == settings  # a checkpoint's copy
    for bad in ('{"drift_inputs_exclude": "*_7d"}', '{"drift_inputs_exclude": [7]}'):
        with pytest.raises(SystemExit, match="drift_inputs_exclude"):
            MonitorSettings.from_json(bad)


def test_a_version_not_in_production_raises_alerts_but_asks_no_retrain() -> None:
    rng = random.Random(2)
    monitor = monitor_with_production(rng)
    monitor.know_version("fraud", 2, baseline=trained(rng), feature_names=NAMES, heldout_auc=0.9)
    findings = [f for seq in range(1, 801) for f in
                monitor.on_decision(seq, "fraud", 2, [rng.gauss(90, 10), 1.0], rng.random())]  # fmt: skip
    assert findings and not any(f.retrain for f in findings)


def test_a_drop_in_live_auc_below_the_heldout_auc_is_found() -> None:
    rng = random.Random(3)
    monitor = monitor_with_production(rng)
    good = []
    for seq in range(1, 401):  # scores that separate the labels: AUC near 1
        label = rng.random() < 0.3
        good += monitor.on_outcome(seq, "fraud", 1, 0.7 + 0.3 * rng.random() if label else 0.3 * rng.random(),
                                   int(label), 1.0)  # fmt: skip
    assert good == []
    bad = []
    for seq in range(401, 801):  # scores unrelated to the labels: AUC near 0.5
        bad += monitor.on_outcome(seq, "fraud", 1, rng.random(), int(rng.random() < 0.3), 1.0)
    assert bad and bad[0].kind == "performance_drop" and bad[0].retrain
    assert bad[0].details["live_auc"] < 0.85 and bad[0].details["heldout_auc"] == 0.9


def test_new_labels_ask_a_retrain_after_n_labels_of_the_production_version() -> None:
    rng = random.Random(4)
    monitor = monitor_with_production(rng, MonitorSettings(labels_for_retrain=50, performance_every=10**9))
    findings = [f for seq in range(1, 120) for f in monitor.on_outcome(seq, "fraud", 1, rng.random(), 0, 1.0)]
    assert [(f.kind, f.at_seq, f.retrain) for f in findings] == [("new_labels", 50, True)]


def test_contract_null_rates_and_lateness_are_checked_over_windows() -> None:
    monitor = Monitor(MonitorSettings(sla_window=100, sla_every=100, late_share_limit=0.05))
    monitor.know_contract("payment.authorized", {"/ip_country": 0.1}, allowed_lateness_seconds=60)
    t = datetime(2026, 1, 1, tzinfo=UTC)
    findings = []
    for seq in range(1, 201):
        payload = {"ip_country": None if seq > 100 and seq % 4 == 0 else "IT"}  # 25% null in the second window
        late = seq > 100 and seq % 10 == 0  # 10% late in the second window
        findings += monitor.on_event(seq, "payment.authorized", payload, t, t + timedelta(seconds=120 if late else 1))
    assert [(f.kind, f.at_seq) for f in findings] == [("null_rate", 200), ("lateness", 200)]
    assert findings[0].details["null_rates"] == {"/ip_country": 0.25} and not findings[0].retrain
    assert findings[1].details["late_share"] == 0.1
    assert monitor.on_event(201, "other.type", {}, t, t) == []  # no contract terms known: nothing checked


def test_a_checkpoint_mid_stream_gives_the_findings_of_an_uninterrupted_run() -> None:
    def run(checkpoint_every: int | None) -> list[Finding]:
        rng = random.Random(5)
        monitor = monitor_with_production(rng)
        findings = []
        for seq in range(1, 3001):
            if checkpoint_every and seq % checkpoint_every == 0:
                monitor = Monitor.from_dict(json.loads(json.dumps(monitor.to_dict())))
            if seq % 3 == 0:
                findings += monitor.on_outcome(seq, "fraud", 1, rng.random(), int(rng.random() < 0.2), 0.5)
            else:
                findings += decide(monitor, rng, seq, shift=0 if seq < 1500 else 20)
        return findings

    uninterrupted = run(None)
    assert uninterrupted and run(337) == uninterrupted
    assert len({f.alert_event_id() for f in uninterrupted}) == len(uninterrupted)


def test_a_features_service_behind_the_log_for_too_long_is_alerted_once_per_breach() -> None:
    from services.feedback.freshness import FreshnessCheck

    check = FreshnessCheck(max_lag_seconds=60)
    t = datetime(2026, 1, 1, tzinfo=UTC)
    assert check.observe(t, watermark=100, head=100, oldest_unfolded_at=None) is None  # caught up
    assert check.observe(t, watermark=90, head=100, oldest_unfolded_at=t - timedelta(seconds=30)) is None
    alert = check.observe(t, watermark=90, head=100, oldest_unfolded_at=t - timedelta(seconds=90))
    assert alert is not None and alert["kind"] == "feature_freshness"
    assert (alert["lag_events"], alert["lag_seconds"]) == (10, 90.0)
    assert (
        check.observe(t, watermark=95, head=120, oldest_unfolded_at=t - timedelta(seconds=200)) is None
    )  # same breach
    assert check.observe(t, watermark=120, head=120, oldest_unfolded_at=None) is None  # fresh again
    assert check.observe(t, watermark=120, head=130, oldest_unfolded_at=t - timedelta(seconds=61)) is not None


def test_a_lasting_breach_is_reported_once_and_again_only_after_a_check_passes() -> None:
    monitor = Monitor(MonitorSettings(sla_window=100, sla_every=100))
    monitor.know_contract("payment.authorized", {"/ip_country": 0.1}, allowed_lateness_seconds=3600)
    t = datetime(2026, 1, 1, tzinfo=UTC)

    def window(start: int, null_every: int | None) -> list[Finding]:
        found = []
        for seq in range(start, start + 100):
            payload = {"ip_country": None if null_every and seq % null_every == 0 else "IT"}
            found += monitor.on_event(seq, "payment.authorized", payload, t, t)
        return found

    assert [f.kind for f in window(1, 2)] == ["null_rate"]  # 50 % null: a breach begins
    assert window(101, 2) == []  # still breached: already reported
    assert window(201, None) == []  # the check passes: the breach is over
    assert [(f.kind, f.at_seq) for f in window(301, 2)] == [("null_rate", 400)]  # a new breach
