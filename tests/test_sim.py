"""Tests for the deterministic payments simulator (d2d.sim)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from jsonschema import Draft202012Validator

from d2d.sim import (
    PaymentsSimulator,
    SimConfig,
    SimEvent,
    load_contracts,
    write_truth_csv,
)

SMALL = SimConfig(customers=300, merchants=40, payments_per_day=3_000)
# Long enough (with short delays) that many chargebacks fall inside the period.
LONG = SimConfig(
    customers=300,
    merchants=40,
    days=12.0,
    payments_per_day=1_000,
    chargeback_delay_days=(0.5, 8.0),
)


@pytest.fixture(scope="module")
def default_run() -> tuple[PaymentsSimulator, list[SimEvent]]:
    sim = PaymentsSimulator()
    return sim, list(sim.events())


def _digest(config: SimConfig) -> str:
    import hashlib

    sim = PaymentsSimulator(config)
    h = hashlib.sha256()
    for e in sim.events():
        h.update(f"{e.event_id}|{e.type}|{e.occurred_at.isoformat()}|".encode() + e.payload_json())
    for payment_id, t in sorted(sim.truth().items()):
        h.update(f"{payment_id}|{t.fraud_probability!r}|{t.is_fraud}|{t.chargeback_at}".encode())
    return h.hexdigest()


def _digest_in_a_process(hash_seed: str) -> str:
    import os
    import subprocess
    import sys

    code = "from tests.test_sim import SMALL, _digest; print(_digest(SMALL))"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_same_seed_is_byte_identical_and_other_seed_differs() -> None:
    a = [(e.event_id, e.type, e.occurred_at, e.payload_json()) for e in PaymentsSimulator(SMALL).events()]
    b = [(e.event_id, e.type, e.occurred_at, e.payload_json()) for e in PaymentsSimulator(SMALL).events()]
    assert a == b
    # another process with another hash seed (set iteration order) gives the same events and truth
    assert _digest_in_a_process("1") == _digest_in_a_process("2") == _digest(SMALL)

    other = replace(SMALL, seed=SMALL.seed + 1)
    c = [(e.event_id, e.payload_json()) for e in PaymentsSimulator(other).events()]
    assert {x[0] for x in a}.isdisjoint({x[0] for x in c})
    assert [x[3] for x in a] != [x[1] for x in c]


def test_truth_does_not_depend_on_iterating_events() -> None:
    fresh = PaymentsSimulator(SMALL).truth()
    sim = PaymentsSimulator(SMALL)
    for _ in sim.events():
        pass
    assert sim.truth() == fresh
    payment_ids = [e.entity_id for e in sim.events() if e.type == "payment.authorized"]
    assert sorted(payment_ids) == sorted(fresh)


def test_every_payload_validates_against_its_contract() -> None:
    validators = {
        c.event_type: Draft202012Validator(c.schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        for c in PaymentsSimulator().contracts()
    }
    for c in PaymentsSimulator().contracts():
        Draft202012Validator.check_schema(c.schema)
    seen: set[str] = set()
    for e in PaymentsSimulator(LONG).events():
        errors = list(validators[e.type].iter_errors(e.payload))
        assert not errors, (e.type, e.payload, errors[0].message)
        assert e.schema_version == 1
        assert e.occurred_at.tzinfo is not None and e.occurred_at.utcoffset() == timedelta(0)
        json.loads(e.payload_json())
        seen.add(e.type)
    assert seen == set(validators)


def test_contracts_reject_obvious_mistakes() -> None:
    spec = {c.event_type: c for c in load_contracts()}["payment.authorized"]
    v = Draft202012Validator(spec.schema)
    good = {
        "payment_id": "pay_00000001",
        "customer_id": "cus_000001",
        "card_id": "card_000001_1",
        "merchant_id": "mer_0001",
        "amount": 12.5,
        "currency": "EUR",
        "channel": "ecom",
        "ip_country": "DE",
        "device_id": "dev_0123456789ab",
    }
    assert v.is_valid(good)
    for bad in (
        {**good, "amount": 0},
        {**good, "amount": "12.5"},
        {**good, "channel": "atm"},
        {**good, "currency": "USD"},
        {**good, "payment_id": "p1"},
        {**good, "extra": 1},
        {k: x for k, x in good.items() if k != "card_id"},
    ):
        assert not v.is_valid(bad), bad


def test_entities_and_reference_events_come_first(default_run) -> None:
    sim, events = default_run
    cfg = sim.config
    n_ref = cfg.customers + cfg.merchants + sum(e.type == "card.issued" for e in events)
    ref, rest = events[:n_ref], events[n_ref:]
    assert {e.type for e in ref} == {"customer.registered", "card.issued", "merchant.onboarded"}
    assert all(cfg.start - timedelta(hours=1) <= e.occurred_at < cfg.start for e in ref)
    assert all(e.type.startswith("payment.") and e.entity_type == "payment" for e in rest)
    assert all(e.entity_id == e.payload["payment_id"] for e in rest)
    assert sum(e.type == "customer.registered" for e in ref) == cfg.customers
    assert sum(e.type == "merchant.onboarded" for e in ref) == cfg.merchants
    cards_per_customer: dict[str, int] = {}
    for e in ref:
        if e.type == "card.issued":
            cid = e.payload["customer_id"]
            cards_per_customer[cid] = cards_per_customer.get(cid, 0) + 1
    assert set(cards_per_customer.values()) == {1, 2}
    assert sum(e.type == "payment.authorized" for e in rest) == cfg.payments_per_day
    assert len({e.event_id for e in events}) == len(events)


def test_chargebacks_only_for_fraud_after_payment_and_within_period() -> None:
    sim = PaymentsSimulator(LONG)
    truth = sim.truth()
    end = LONG.start + timedelta(days=LONG.days)
    paid_at: dict[str, datetime] = {}
    amounts: dict[str, float] = {}
    chargebacks: dict[str, datetime] = {}
    for e in sim.events():
        if e.type == "payment.authorized":
            paid_at[e.entity_id] = e.occurred_at
            amounts[e.entity_id] = e.payload["amount"]
        elif e.type == "payment.chargeback":
            pid = e.payload["payment_id"]
            assert pid not in chargebacks
            assert truth[pid].is_fraud
            assert e.occurred_at == truth[pid].chargeback_at
            assert e.occurred_at > paid_at[pid]
            assert e.occurred_at < end
            assert e.payload["amount"] == amounts[pid]
            chargebacks[pid] = e.occurred_at
    # every fraud chargeback inside the period is emitted; later ones stay in the truth only
    lo, hi = LONG.chargeback_delay_days
    for pid, t in truth.items():
        if not t.is_fraud:
            assert t.chargeback_at is None
            continue
        delay = t.chargeback_at - paid_at[pid]
        assert timedelta(days=lo) <= delay <= timedelta(days=hi)
        assert (pid in chargebacks) == (t.chargeback_at < end)
    assert chargebacks
    assert any(t.is_fraud and t.chargeback_at >= end for t in truth.values())


def test_default_period_emits_no_chargebacks(default_run) -> None:
    sim, events = default_run
    assert not any(e.type == "payment.chargeback" for e in events)
    assert any(t.is_fraud for t in sim.truth().values())


def _late_share(events: list[SimEvent]) -> tuple[float, float]:
    """Share of events whose occurred_at precedes an earlier-arrived event, and max lag (s)."""
    latest: datetime | None = None
    late, max_lag = 0, 0.0
    for e in events:
        if latest is not None and e.occurred_at < latest:
            late += 1
            max_lag = max(max_lag, (latest - e.occurred_at).total_seconds())
        if latest is None or e.occurred_at > latest:
            latest = e.occurred_at
    return late / len(events), max_lag


def test_in_order_when_out_of_order_fraction_is_zero(default_run) -> None:
    _, events = default_run
    times = [e.occurred_at for e in events]
    assert times == sorted(times)


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_out_of_order_share_and_bound(fraction: float) -> None:
    cfg = SimConfig(
        customers=300,
        merchants=40,
        payments_per_day=10_000,
        out_of_order_fraction=fraction,
        max_lateness_seconds=300.0,
    )
    events = list(PaymentsSimulator(cfg).events())
    dynamic = [e for e in events if e.type.startswith("payment.")]
    share, max_lag = _late_share(dynamic)
    assert fraction * 0.85 <= share <= fraction * 1.1
    assert 0 < max_lag <= cfg.max_lateness_seconds
    # the same events as the in-order run, only the order differs
    in_order = PaymentsSimulator(replace(cfg, out_of_order_fraction=0.0))
    assert sorted(e.event_id for e in in_order.events()) == sorted(e.event_id for e in events)


def test_mean_fraud_probability_near_fraud_rate() -> None:
    for rate in (0.02, 0.05):
        truth = PaymentsSimulator(replace(SMALL, fraud_rate=rate)).truth()
        probs = [t.fraud_probability for t in truth.values()]
        assert abs(sum(probs) / len(probs) - rate) < 0.1 * rate
        realised = sum(t.is_fraud for t in truth.values()) / len(truth)
        assert abs(realised - rate) < 0.5 * rate


def test_truth_is_learnable(default_run) -> None:
    sim, events = default_run
    truth = sim.truth()
    card_country = {e.payload["card_id"]: e.payload["card_country"] for e in events if e.type == "card.issued"}
    risky, safe = [], []
    scores, labels = [], []
    for e in events:
        if e.type != "payment.authorized":
            continue
        p = e.payload
        foreign = p["ip_country"] != card_country[p["card_id"]]
        prob = truth[p["payment_id"]].fraud_probability
        if p["channel"] == "ecom" and foreign:
            risky.append(prob)
        elif p["channel"] == "pos" and not foreign:
            safe.append(prob)
        scores.append(prob)
        labels.append(truth[p["payment_id"]].is_fraud)
    assert risky and safe
    assert sum(risky) / len(risky) > 5 * sum(safe) / len(safe)
    # the true probability ranks frauds well (upper bound for any model)
    ranked = sorted(zip(scores, labels, strict=True))
    pos = sum(labels)
    rank_sum = sum(i for i, (_, y) in enumerate(ranked, start=1) if y)
    auc = (rank_sum - pos * (pos + 1) / 2) / (pos * (len(labels) - pos))
    assert 0.85 < auc < 0.97


def test_load_contracts_matches_simulator() -> None:
    shipped = load_contracts()
    assert shipped == PaymentsSimulator().contracts()
    assert [(c.event_type, c.version) for c in shipped] == [
        ("card.issued", 1),
        ("customer.registered", 1),
        ("merchant.onboarded", 1),
        ("payment.authorized", 1),
        ("payment.chargeback", 1),
    ]
    by_type = {c.event_type: c for c in shipped}
    assert by_type["customer.registered"].pii_fields == ("/name", "/email")
    for c in shipped:
        assert c.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert c.schema["additionalProperties"] is False
        assert c.owner.startswith("team-")


def test_write_truth_csv(tmp_path) -> None:
    truth = PaymentsSimulator(LONG).truth()
    path = tmp_path / "truth.csv"
    write_truth_csv(truth, path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["payment_id", "fraud_probability", "is_fraud", "chargeback_at"]
    assert len(rows) == len(truth)
    for row in rows:
        t = truth[row["payment_id"]]
        assert float(row["fraud_probability"]) == t.fraud_probability
        assert row["is_fraud"] == str(int(t.is_fraud))
        if t.chargeback_at is None:
            assert row["chargeback_at"] == ""
        else:
            parsed = datetime.fromisoformat(row["chargeback_at"].replace("Z", "+00:00"))
            assert parsed == t.chargeback_at.astimezone(UTC)


def test_default_config_is_the_demos_simulated_day(default_run) -> None:
    """`d2d demo` promises about 25,000 events for one simulated day; the default config is that day."""
    sim, events = default_run
    assert 20_000 < len(events) < 30_000
    payments = [e for e in events if e.type == "payment.authorized"]
    assert len(payments) == sim.config.payments_per_day
    end = sim.config.start + timedelta(days=1)
    assert all(sim.config.start <= e.occurred_at <= end for e in payments)


DRIFT = replace(SMALL, days=2.0, payments_per_day=6_000, drift_day=1.0)


def test_drift_leaves_the_days_before_it_as_they_were() -> None:
    drifted = PaymentsSimulator(DRIFT)
    plain = PaymentsSimulator(replace(DRIFT, drift_day=None))
    drift_at = DRIFT.start + timedelta(days=1)
    before = [e for e in plain.events() if e.occurred_at < drift_at]
    assert before == [e for e in drifted.events() if e.occurred_at < drift_at]
    truth, plain_truth = drifted.truth(), plain.truth()
    kept = [e.payload["payment_id"] for e in before if e.type == "payment.authorized"]
    assert kept and all(truth[p] == plain_truth[p] for p in kept)


def test_drift_is_a_new_pattern_a_model_of_the_old_truth_misses() -> None:
    from d2d.training.evaluation import roc_auc

    sim = PaymentsSimulator(DRIFT)
    truth, old_truth = sim.truth(), PaymentsSimulator(replace(DRIFT, drift_day=None)).truth()
    drift_at = DRIFT.start + timedelta(days=1)
    after = [e.payload for e in sim.events() if e.type == "payment.authorized" and e.occurred_at >= drift_at]
    lo, hi = DRIFT.drift_amount_band
    in_band = [p for p in after if p["channel"] == DRIFT.drift_channel and lo <= p["amount"] < hi]
    out_band = [p for p in after if p not in in_band]
    rate = [sum(truth[p["payment_id"]].is_fraud for p in ps) / len(ps) for ps in (in_band, out_band)]
    old_rate = sum(old_truth[p["payment_id"]].fraud_probability for p in in_band) / len(in_band)
    assert rate[0] > 2 * rate[1] and rate[0] > 5 * old_rate  # benign before, the riskiest band after
    labels = [truth[p["payment_id"]].is_fraud for p in after]
    new_auc = roc_auc(labels, [truth[p["payment_id"]].fraud_probability for p in after])
    stale_auc = roc_auc(labels, [old_truth[p["payment_id"]].fraud_probability for p in after])
    assert new_auc - stale_auc > 0.08, (new_auc, stale_auc)


BURSTS = replace(DRIFT, drift_bursts_per_day=600.0)


def test_drift_bursts_leave_the_days_before_it_and_every_customers_payment_as_they_were() -> None:
    bursty, drifted = PaymentsSimulator(BURSTS), PaymentsSimulator(DRIFT)
    drift_at = BURSTS.start + timedelta(days=1)
    events = list(bursty.events())
    assert [e for e in events if e.occurred_at < drift_at] == [e for e in drifted.events() if e.occurred_at < drift_at]
    truth, drifted_truth = bursty.truth(), drifted.truth()
    own = {e.payload["payment_id"]: e.payload for e in drifted.payment_events()}
    payments = {e.payload["payment_id"]: e.payload for e in events if e.type == "payment.authorized"}
    assert all(payments[p] == payload and truth[p] == drifted_truth[p] for p, payload in own.items())
    added = [e for e in events if e.type == "payment.authorized" and e.payload["payment_id"] not in own]
    assert added and all(e.occurred_at >= drift_at for e in added)
    lo, hi = BURSTS.drift_amount_band
    assert all(e.payload["channel"] == BURSTS.drift_channel and lo <= e.payload["amount"] < hi for e in added)
    assert [e.payload["payment_id"] for e in bursty.payment_events()] == list(truth)


def _card_counts_10m(sim: PaymentsSimulator) -> list[tuple[datetime, float]]:
    """Each payment's `card_payments.count_10m` as the features service serves it (before the payment)."""
    from d2d.features.fold import ViewState, fold_event
    from d2d.sim.views import CARD_PAYMENTS

    state, found = ViewState(CARD_PAYMENTS), []
    for seq, e in enumerate(sim.payment_events(), start=1):
        values = state.values(e.payload["card_id"], e.occurred_at.timestamp()) or state.defaults()
        found.append((e.occurred_at, float(values["count_10m"])))
        state.apply(fold_event(seq, e.type, e.schema_version, e.occurred_at.timestamp(), e.payload))
    return found


def test_drift_bursts_move_the_card_velocity_the_model_sees_after_the_drift_day() -> None:
    """PSI of the card's 10-minute count on the drift day against the day before: a major shift with
    bursts, stable without (the concept drift alone leaves the inputs as they were)."""
    from d2d.training.baseline import MAJOR_ABOVE, STABLE_BELOW, column_baseline, psi

    drift_at = BURSTS.start + timedelta(days=1)
    found = {}
    for name, config in (("bursts", BURSTS), ("concept only", DRIFT)):
        counts = _card_counts_10m(PaymentsSimulator(config))
        before = column_baseline([c for t, c in counts if t < drift_at])
        found[name] = psi(before, [c for t, c in counts if t >= drift_at])
    assert found["bursts"] > MAJOR_ABOVE and found["concept only"] < STABLE_BELOW, found


def test_drift_settings_are_checked() -> None:
    for bad in (
        {"drift_day": -1.0}, {"drift_channel": "atm"}, {"drift_amount_band": (80.0, 20.0)},
        {"drift_bursts_per_day": -1.0},
    ):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            PaymentsSimulator(replace(SMALL, **bad))


def test_a_chargeback_on_demand_is_the_one_the_period_emits_at_its_truth_time() -> None:
    sim = PaymentsSimulator(LONG)
    truth = sim.truth()
    emitted = {e.payload["payment_id"]: e for e in sim.events() if e.type == "payment.chargeback"}
    assert emitted
    for payment_id, e in emitted.items():
        on_demand = sim.chargeback(payment_id)
        assert on_demand is not None
        assert (on_demand.type, on_demand.occurred_at, on_demand.payload) == (e.type, e.occurred_at, e.payload)
        assert on_demand.event_id == sim.chargeback(payment_id).event_id  # one id per payment, every time
    late = [p for p, t in truth.items() if t.is_fraud and p not in emitted]
    assert late and all(sim.chargeback(p).occurred_at == truth[p].chargeback_at for p in late)
    genuine = next(p for p, t in truth.items() if not t.is_fraud)
    assert sim.chargeback(genuine) is None
    assert [e.payload["payment_id"] for e in sim.payment_events()] == list(truth)
    assert sim.reference_events() == list(sim.events())[: len(sim.reference_events())]
