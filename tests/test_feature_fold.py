"""The fold: hand-computed values per aggregation and window, lateness, redelivery, ties, snapshots,
pruning independence, stale queries, and a randomized comparison against a brute-force recomputation."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest

from d2d.features.aggregates import KINDS
from d2d.features.definitions import (
    LIFETIME,
    Aggregate,
    Aggregation,
    FeatureView,
    Filter,
    Window,
    hours,
    minutes,
)
from d2d.features.fold import FoldEvent, StaleQueryError, ViewState, fold_all, posix_seconds

T = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SRC = "payment.authorized"

VIEW = FeatureView(
    name="test_payments",
    entity="customer",
    entity_key="customer_id",
    source=SRC,
    aggregates=(
        Aggregate("count", Aggregation.COUNT, windows=(minutes(10), hours(1), LIFETIME)),
        Aggregate("amount_sum", Aggregation.SUM, "amount", (minutes(10), LIFETIME)),
        Aggregate("amount_mean", Aggregation.MEAN, "amount", (minutes(10), LIFETIME)),
        Aggregate("amount_min", Aggregation.MIN, "amount", (minutes(10), LIFETIME)),
        Aggregate("amount_max", Aggregation.MAX, "amount", (minutes(10), LIFETIME)),
        Aggregate("country_last", Aggregation.LAST, "country", (minutes(10), LIFETIME)),
        Aggregate("merchants", Aggregation.DISTINCT_COUNT, "merchant_id", (minutes(10), LIFETIME)),
        Aggregate("ecom_count", Aggregation.COUNT, windows=(hours(1), LIFETIME), where=Filter("channel", "==", "ecom")),
    ),
    allowed_lateness_seconds=300,
)


class Log:
    """Builds FoldEvents with consecutive seqs, like the event log."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, offset: float, type_: str = SRC, **payload: Any) -> FoldEvent:
        self.seq += 1
        payload.setdefault("customer_id", "c1")
        return FoldEvent(self.seq, type_, T + offset, payload)


def pay(log: Log, offset: float, amount: Any, merchant: str, country: str, channel: str = "pos", **kw: Any):
    return log(offset, amount=amount, merchant_id=merchant, country=country, channel=channel, **kw)


def folded(events: list[FoldEvent], view: FeatureView = VIEW, **kwargs: Any) -> ViewState:
    state = ViewState(view, **kwargs)
    for e in events:
        state.apply(e)
    return state


def four_payments() -> list[FoldEvent]:
    log = Log()
    return [
        pay(log, 0, 10, "m1", "DE"),
        pay(log, 100, 2.5, "m2", "FR", "ecom"),
        pay(log, 700, 4, "m1", "NL", "ecom"),
        pay(log, 1000, 20.0, "m3", "DE"),
    ]


# --------------------------------------------------------------------------- hand-computed values


def test_every_aggregation_and_window_by_hand() -> None:
    state = folded(four_payments())
    assert state.values("c1", T + 1000) == {
        # 10m = (400, 1000]: the payments at 700 (4) and 1000 (20.0)
        "count_10m": 2,
        "count_1h": 4,
        "count_lifetime": 4,
        "amount_sum_10m": 24.0,
        "amount_sum_lifetime": 36.5,
        "amount_mean_10m": 12.0,
        "amount_mean_lifetime": 9.125,
        "amount_min_10m": 4.0,
        "amount_min_lifetime": 2.5,
        "amount_max_10m": 20.0,
        "amount_max_lifetime": 20.0,
        "country_last_10m": "DE",
        "country_last_lifetime": "DE",
        "merchants_10m": 2,
        "merchants_lifetime": 3,
        "ecom_count_1h": 2,
        "ecom_count_lifetime": 2,
    }
    # As of 650: only the first two payments exist; 10m = (50, 650] holds the one at 100.
    v = state.values("c1", T + 650)
    assert (v["count_10m"], v["count_1h"], v["count_lifetime"]) == (1, 2, 2)
    assert (v["amount_sum_10m"], v["amount_sum_lifetime"]) == (2.5, 12.5)
    assert (v["amount_mean_10m"], v["amount_mean_lifetime"]) == (2.5, 6.25)
    assert (v["amount_min_lifetime"], v["amount_max_lifetime"]) == (2.5, 10.0)
    assert (v["country_last_10m"], v["country_last_lifetime"], v["merchants_lifetime"]) == ("FR", "FR", 2)
    assert v["ecom_count_1h"] == 1
    # As of 1700: 10m = (1100, 1700] is empty; 1h = (-1900, 1700] holds all four.
    v = state.values("c1", T + 1700)
    assert v["count_10m"] == 0 and v["amount_sum_10m"] == 0.0
    assert v["amount_mean_10m"] is None and v["amount_min_10m"] is None and v["amount_max_10m"] is None
    assert v["country_last_10m"] is None and v["merchants_10m"] == 0
    assert v["count_1h"] == 4 and v["count_lifetime"] == 4 and v["country_last_lifetime"] == "DE"
    # As of 4300: 1h = (700, 4300] holds only the payment at 1000 (700 is exactly on the edge: out).
    v = state.values("c1", T + 4300)
    assert (v["count_1h"], v["ecom_count_1h"], v["ecom_count_lifetime"]) == (1, 0, 2)


def test_value_types() -> None:
    v = folded(four_payments()).values("c1", T + 1000)
    assert type(v["count_10m"]) is int and type(v["merchants_lifetime"]) is int
    for name in ("amount_sum_10m", "amount_mean_10m", "amount_min_10m", "amount_max_lifetime"):
        assert type(v[name]) is float, name  # ints in payloads are taken as floats


def test_window_edges() -> None:
    state = folded(four_payments())
    # An event exactly at as_of - w is out; exactly at as_of is in.
    v = state.values("c1", T + 700)  # 10m = (100, 700]: the payment at 100 is out, the one at 700 in
    assert (v["count_10m"], v["amount_sum_10m"], v["country_last_10m"]) == (1, 4.0, "NL")
    v = state.values("c1", T + 699.5)  # (99.5, 699.5]: 100 in, 700 not yet
    assert (v["count_10m"], v["amount_sum_10m"], v["country_last_10m"]) == (1, 2.5, "FR")
    assert state.values("c1", T + 3600)["count_1h"] == 3  # (0, 3600]: the payment at 0 is out
    assert state.values("c1", T + 3599.999)["count_1h"] == 4
    with pytest.raises(StaleQueryError):  # older than max_event_time - 2 * lateness = T + 400
        state.values("c1", T + 0)
    state = folded(four_payments()[:2])
    v = state.values("c1", T + 0)  # lifetime includes the event exactly at as_of
    assert (v["count_lifetime"], v["count_10m"], v["amount_sum_lifetime"]) == (1, 1, 10.0)
    v = state.values("c1", T - 0.001)  # before its first event, a known entity has empty aggregates
    assert (v["count_lifetime"], v["amount_sum_lifetime"], v["country_last_lifetime"]) == (0, 0.0, None)


def test_out_of_order_inside_lateness_is_applied_as_if_in_order() -> None:
    log = Log()
    # Arrival order 0.3, 0.2, 0.1 (occurred 3, 2, 1): in arrival order the sum would be (0.3+0.2)+0.1 = 0.6;
    # in (occurred_at, seq) order it is (0.1+0.2)+0.3 = 0.6000000000000001, which the fold must give.
    late = [
        pay(log, 3, 0.3, "m3", "NL"),
        pay(log, 2, 0.2, "m2", "FR"),
        pay(log, 1, 0.1, "m1", "DE"),
    ]
    state = ViewState(VIEW)
    assert all(state.apply(e) for e in late)
    v = state.values("c1", T + 3)
    assert v["amount_sum_lifetime"] == v["amount_sum_10m"] == 0.6000000000000001
    assert (0.3 + 0.2) + 0.1 == 0.6  # (the arrival-order sum differs)
    assert v["amount_mean_lifetime"] == 0.6000000000000001 / 3
    assert v["country_last_lifetime"] == "NL"  # the latest occurred_at, though it arrived first
    assert v["amount_min_lifetime"] == 0.1 and v["amount_max_lifetime"] == 0.3
    assert state.values("c1", T + 2)["country_last_10m"] == "FR"
    log = Log()
    in_order = folded([pay(log, 1, 0.1, "m1", "DE"), pay(log, 2, 0.2, "m2", "FR"), pay(log, 3, 0.3, "m3", "NL")])
    assert in_order.values("c1", T + 3) == v
    assert state.max_event_time == T + 3 and state.dropped_late == 0


def test_event_past_allowed_lateness_is_refused() -> None:
    events = four_payments()  # max_event_time = T + 1000; lateness 300: the limit is T + 700
    state = folded(events)
    before = state.values("c1", T + 1000)
    log = Log()
    log.seq = 4
    too_late = pay(log, 699.999, 1000.0, "m9", "US", "ecom")
    assert state.apply(too_late) is False
    assert state.dropped_late == 1
    assert state.watermark == too_late.seq
    assert state.values("c1", T + 1000) == before
    assert state.values("c1", T + 800) == folded(events).values("c1", T + 800)
    on_the_limit = pay(log, 700, 1.0, "m9", "US")  # occurred_at == max_event_time - lateness: accepted
    assert state.apply(on_the_limit) is True
    assert state.values("c1", T + 1000)["count_lifetime"] == 5
    assert state.dropped_late == 1


def test_redelivery_changes_nothing() -> None:
    events = four_payments()
    state = folded(events)
    snap = state.to_snapshot()
    assert state.apply(events[-1]) is False  # same seq again
    assert state.apply(events[1]) is False  # an older seq
    other = FoldEvent(2, SRC, T + 900, {"customer_id": "c2", "amount": 1.0})  # a different event, old seq
    assert state.apply(other) is False
    assert state.to_snapshot() == snap
    assert state.values("c2", T + 1000) is None


def test_other_types_and_missing_keys_only_advance_the_watermark() -> None:
    log = Log()
    state = ViewState(VIEW)
    assert state.apply(log(0, "payment.chargeback", amount=5.0)) is False
    assert state.apply(FoldEvent(2, SRC, T, {"amount": 5.0})) is False  # no customer_id
    assert state.apply(FoldEvent(3, SRC, T, {"customer_id": None, "amount": 5.0})) is False
    assert (state.watermark, state.max_event_time, state.entities()) == (3, None, 0)


def test_last_ties_broken_by_seq() -> None:
    log = Log()
    events = [
        pay(log, 10, 1.0, "m1", "FR"),  # seq 1
        pay(log, 10, 1.0, "m1", "DE"),  # seq 2, same occurred_at: the later seq wins
        pay(log, 9, 1.0, "m1", "US"),  # seq 3 but occurred earlier: does not win
    ]
    state = folded(events)
    v = state.values("c1", T + 10)
    assert v["country_last_lifetime"] == "DE" and v["country_last_10m"] == "DE"
    assert state.values("c1", T + 9.5)["country_last_lifetime"] == "US"
    # Arrival order does not matter beyond the seqs: the same events, the tie arriving reversed.
    log = Log()
    reversed_tie = [pay(log, 10, 1.0, "m1", "DE"), pay(log, 10, 1.0, "m1", "FR")]
    assert folded(reversed_tie).values("c1", T + 10)["country_last_lifetime"] == "FR"


def test_filters_and_missing_or_invalid_fields() -> None:
    log = Log()
    events = [
        pay(log, 0, 10.0, "m1", "DE", "ecom"),
        pay(log, 1, 10.0, "m1", "DE", "pos"),
        log(2, channel="ecom"),  # no amount, merchant or country: counted, aggregated by nothing else
        log(3, amount="12.5", merchant_id=["m1"], country=None, channel=None),  # wrong types, null
        log(4, amount=math.inf, merchant_id=7, country={"code": "FR"}),
        log(5, amount=True, merchant_id=7.0),  # bool is not a number; 7.0 == 7 as a distinct value
    ]
    v = folded(events).values("c1", T + 5)
    assert v["count_lifetime"] == 6
    assert v["ecom_count_lifetime"] == 2 and v["ecom_count_1h"] == 2
    assert v["amount_sum_lifetime"] == 20.0 and v["amount_mean_lifetime"] == 10.0  # finite numbers only
    assert v["merchants_lifetime"] == 2  # "m1", 7
    assert v["country_last_lifetime"] == {"code": "FR"}  # LAST takes any non-null value


def test_filter_only_view_knows_entities_without_inputs() -> None:
    view = FeatureView(
        name="ecom_only",
        entity="customer",
        entity_key="customer_id",
        source=SRC,
        aggregates=(
            Aggregate("ecom_count", Aggregation.COUNT, windows=(hours(1),), where=Filter("channel", "==", "ecom")),
        ),
    )
    state = ViewState(view)
    assert state.apply(pay(Log(), 0, 1.0, "m1", "DE", "pos")) is True
    assert state.values("c1", T) == {"ecom_count_1h": 0}
    assert state.rows() == 0  # nothing to aggregate, nothing buffered


def test_nested_entity_key_and_fields() -> None:
    view = FeatureView(
        name="nested",
        entity="card",
        entity_key="card.id",
        source=SRC,
        aggregates=(Aggregate("country_last", Aggregation.LAST, "card.country"),),
    )
    state = ViewState(view)
    state.apply(FoldEvent(1, SRC, T, {"card": {"id": "k1", "country": "DE"}}))
    state.apply(FoldEvent(2, SRC, T + 1, {"card": {"id": 42, "country": "FR"}}))  # ids are strings
    assert state.values("k1", T + 1) == {"country_last_lifetime": "DE"}
    assert state.values("42", T + 1) == {"country_last_lifetime": "FR"}


def test_unknown_entity() -> None:
    state = folded(four_payments())
    assert state.values("nobody", T + 1000) is None
    assert state.entities() == 1
    assert ViewState(VIEW).values("c1", T) is None
    assert state.defaults() == {
        "count_10m": 0, "count_1h": 0, "count_lifetime": 0,
        "amount_sum_10m": 0.0, "amount_sum_lifetime": 0.0,
        "amount_mean_10m": None, "amount_mean_lifetime": None,
        "amount_min_10m": None, "amount_min_lifetime": None,
        "amount_max_10m": None, "amount_max_lifetime": None,
        "country_last_10m": None, "country_last_lifetime": None,
        "merchants_10m": 0, "merchants_lifetime": 0,
        "ecom_count_1h": 0, "ecom_count_lifetime": 0,
    }  # fmt: skip
    assert list(state.defaults()) == VIEW.feature_names()
    assert list(state.values("c1", T + 1000)) == VIEW.feature_names()


def test_non_finite_times_are_errors() -> None:
    state = ViewState(VIEW)
    with pytest.raises(ValueError, match="occurred_at must be finite"):
        state.apply(FoldEvent(1, SRC, math.nan, {"customer_id": "c1"}))
    assert (state.watermark, state.entities()) == (0, 0)  # refused before any change
    with pytest.raises(ValueError, match="as_of must be finite"):
        state.values("c1", math.inf)


# --------------------------------------------------------------------------- pruning, staleness, snapshots


def long_history(seed: int = 3, n: int = 1500, entities: int = 6) -> list[FoldEvent]:
    """Events over ~2 days (far beyond the 1h max window) with out-of-order arrivals and float sums
    whose value depends on the order of addition."""
    rng = random.Random(seed)
    log = Log()
    events = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(1 / 120)
        occurred = t - (rng.uniform(0, 400) if rng.random() < 0.2 else 0.0)  # some late, some too late
        events.append(
            pay(
                log,
                occurred,
                rng.choice([0.1, 0.2, 0.3, 1e16, 1.0, rng.uniform(0, 100)]),
                f"m{rng.randrange(40)}",
                rng.choice(["DE", "FR", "NL"]),
                rng.choice(["ecom", "pos"]),
                customer_id=f"c{rng.randrange(entities)}",
            )
        )
    return events


def test_pruning_does_not_change_results() -> None:
    events = long_history()
    auto = ViewState(VIEW)  # prunes the touched entity after each apply
    never = ViewState(VIEW, prune_on_apply=False)
    eager = ViewState(VIEW, prune_on_apply=False)  # prunes every entity after every event
    lazy = ViewState(VIEW, prune_on_apply=False)  # prunes now and then
    rng = random.Random(5)
    checked = 0
    for i, e in enumerate(events):
        results = {s.apply(e) for s in (auto, never, eager, lazy)}
        assert len(results) == 1
        eager.prune()
        if rng.random() < 0.02:
            lazy.prune(f"c{rng.randrange(6)}")
        if i % 25 == 0:
            m = auto.max_event_time
            for as_of in (m, m + 1800.0, m - 599.0, e.occurred_at):
                if as_of < m - 600:
                    continue
                for eid in auto.entity_ids():
                    expected = never.values(eid, as_of)
                    assert auto.values(eid, as_of) == expected
                    assert eager.values(eid, as_of) == expected
                    assert lazy.values(eid, as_of) == expected
                    checked += 1
    assert checked > 500
    assert never.rows() == len(events) - never.dropped_late
    assert eager.rows() < auto.rows() < never.rows() / 5  # pruning did happen (a lot)
    assert auto.to_snapshot()["prefixes"]


def test_stale_query() -> None:
    log = Log()
    state = folded([pay(log, 10_000, 1.0, "m1", "DE")])
    # max_event_time M = T + 10000, lateness L = 300, max window W = 3600: queries need as_of >= M - 2L.
    assert state.horizon == T + 10_000 - 3600 - 600
    assert state.values("c1", T + 9400)["count_lifetime"] == 0  # the oldest as_of answered (the event is later)
    assert state.values("c1", T + 10_000)["count_lifetime"] == 1
    with pytest.raises(
        StaleQueryError, match=r"feature view test_payments: as_of 1767234999\.5 .*>= .* 1767235000\.0"
    ) as exc:
        state.values("c1", T + 9399.5)
    assert isinstance(exc.value, ValueError)
    with pytest.raises(StaleQueryError, match="test_payments"):
        state.values("nobody", T)  # even for an unknown entity: the answer must not depend on pruning
    assert ViewState(VIEW).values("c1", 0.0) is None  # nothing applied: nothing pruned


def test_snapshot_round_trip() -> None:
    events = long_history(seed=11)
    split = len(events) * 2 // 3
    state = folded(events[:split])
    blob = orjson.dumps(state.to_snapshot())
    restored = ViewState.from_snapshot(VIEW, orjson.loads(blob))
    assert restored.to_snapshot() == state.to_snapshot()
    assert orjson.dumps(restored.to_snapshot()) == blob
    assert (restored.watermark, restored.max_event_time, restored.dropped_late) == (
        state.watermark,
        state.max_event_time,
        state.dropped_late,
    )

    def same(as_of: float) -> None:
        for eid in state.entity_ids():
            assert restored.values(eid, as_of) == state.values(eid, as_of)

    same(state.max_event_time)
    for e in events[split:]:  # both continue identically
        assert restored.apply(e) == state.apply(e)
    same(state.max_event_time)
    same(state.max_event_time - 500)
    assert orjson.dumps(restored.to_snapshot()) == orjson.dumps(state.to_snapshot())
    assert restored.values("c0", state.max_event_time) == folded(events).values("c0", state.max_event_time)


def test_snapshot_is_plain_json_and_floats_are_exact() -> None:
    import json

    log = Log()
    state = folded([pay(log, 0, 0.1, "m1", "DE"), pay(log, 1, 0.2, "m2", "FR"), pay(log, 7200, 1 / 3, "m1", "NL")])
    snap = json.loads(json.dumps(state.to_snapshot()))
    restored = ViewState.from_snapshot(VIEW, snap)
    assert restored.values("c1", T + 7200) == state.values("c1", T + 7200)
    assert restored.values("c1", T + 7200)["amount_sum_lifetime"] == (0.1 + 0.2) + 1 / 3


def test_snapshot_of_another_version_is_refused() -> None:
    snap = folded(four_payments()).to_snapshot()
    changed = FeatureView.from_dict({**VIEW.to_dict(), "allowed_lateness_seconds": 301})
    with pytest.raises(ValueError, match="snapshot is of 'test_payments' version .*, not version"):
        ViewState.from_snapshot(changed, snap)
    renamed = FeatureView.from_dict({**VIEW.to_dict(), "name": "other"})
    with pytest.raises(ValueError, match="not version"):
        ViewState.from_snapshot(renamed, snap)
    described = FeatureView.from_dict({**VIEW.to_dict(), "description": "same definition"})
    assert ViewState.from_snapshot(described, snap).values("c1", T + 1000) == folded(four_payments()).values(
        "c1", T + 1000
    )


def test_posix_seconds() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    dt = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    assert posix_seconds(dt) == T + 0.123456 == dt.timestamp()
    assert posix_seconds("2026-01-01T00:00:00.123456Z") == posix_seconds(dt)
    assert posix_seconds("2026-01-01T01:00:00.123456+01:00") == posix_seconds(dt)
    assert posix_seconds(dt.replace(tzinfo=None)) == posix_seconds(dt)  # naive = UTC
    assert posix_seconds(dt.astimezone(timezone(timedelta(hours=-5)))) == posix_seconds(dt)
    rng = random.Random(4)
    for _ in range(1000):  # the same float as datetime.timestamp(), for microsecond times
        d = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(10**14))
        assert posix_seconds(d) == d.timestamp() == posix_seconds(d.isoformat())


def test_fold_all() -> None:
    assert fold_all(VIEW, four_payments()).to_snapshot() == folded(four_payments()).to_snapshot()


# --------------------------------------------------------------------------- randomized, against brute force

RANDOM_VIEW = FeatureView(
    name="random_view",
    entity="customer",
    entity_key="customer_id",
    source=SRC,
    aggregates=(
        Aggregate("count", Aggregation.COUNT, windows=(minutes(1), minutes(10), hours(1), LIFETIME)),
        Aggregate("with_amount", Aggregation.COUNT, "amount", (minutes(10), LIFETIME)),
        Aggregate("amount_sum", Aggregation.SUM, "amount", (minutes(10), hours(1), LIFETIME)),
        Aggregate("amount_mean", Aggregation.MEAN, "amount", (minutes(10), LIFETIME)),
        Aggregate("amount_min", Aggregation.MIN, "amount", (hours(1), LIFETIME)),
        Aggregate("amount_max", Aggregation.MAX, "amount", (minutes(1), LIFETIME)),
        Aggregate("country_last", Aggregation.LAST, "country", (minutes(10), LIFETIME)),
        Aggregate("merchants", Aggregation.DISTINCT_COUNT, "merchant_id", (hours(1), LIFETIME)),
        Aggregate("big_sum", Aggregation.SUM, "amount", (hours(1), LIFETIME), where=Filter("amount", ">", 50)),
        Aggregate("ecom_last", Aggregation.LAST, "country", (LIFETIME,), where=Filter("channel", "==", "ecom")),
        Aggregate("not_pos", Aggregation.COUNT, windows=(minutes(10),), where=Filter("channel", "!=", "pos")),
    ),
    allowed_lateness_seconds=240,
)


def _num(v: Any) -> float | None:
    if type(v) in (int, float) and math.isfinite(v):
        return float(v)
    return None


def _scalar(v: Any) -> Any:
    if type(v) in (str, int, bool) or (type(v) is float and math.isfinite(v)):
        return v
    return None


def brute_force(view: FeatureView, accepted: list[FoldEvent], entity: str, as_of: float) -> dict[str, Any] | None:
    """Every feature recomputed plainly from the accepted events.

    Inputs are taken in (occurred_at, seq) order, and sums are computed left to right in that order
    starting from 0.0 -- float addition is not associative, so this order is part of the definition
    and the fold must match it bit for bit (`sum()` is avoided on purpose: it is not specified to add
    left to right in every Python version).
    """
    mine = sorted(
        (e for e in accepted if e.payload.get(view.entity_key) == entity), key=lambda e: (e.occurred_at, e.seq)
    )
    if not mine:
        return None
    out: dict[str, Any] = {}
    for agg in view.aggregates:
        for w in agg.windows:
            in_window = [
                e for e in mine if e.occurred_at <= as_of and (w.seconds is None or as_of - w.seconds < e.occurred_at)
            ]
            if agg.where is not None:
                in_window = [e for e in in_window if agg.where.matches(e.payload)]
            raw = [e.payload.get(agg.field) if agg.field else 1 for e in in_window]
            name = f"{agg.name}_{w.name}"
            if agg.aggregation is Aggregation.COUNT:
                out[name] = sum(1 for v in raw if v is not None)
            elif agg.aggregation is Aggregation.LAST:
                present = [v for v in raw if v is not None]
                out[name] = present[-1] if present else None
            elif agg.aggregation is Aggregation.DISTINCT_COUNT:
                out[name] = len({s for s in map(_scalar, raw) if s is not None})
            else:
                nums = [n for n in map(_num, raw) if n is not None]
                if agg.aggregation in (Aggregation.SUM, Aggregation.MEAN):
                    total = 0.0
                    for n in nums:
                        total = total + n
                    if agg.aggregation is Aggregation.SUM:
                        out[name] = total
                    else:
                        out[name] = total / len(nums) if nums else None
                else:
                    best = None
                    for n in nums:
                        if best is None or (n < best if agg.aggregation is Aggregation.MIN else n > best):
                            best = n
                    out[name] = best
    return out


def test_every_aggregation_has_a_kind_and_is_compared_with_brute_force_windowed_and_lifetime() -> None:
    """A new `Aggregation` member needs its kind (d2d/features/aggregates.py) and a place in the
    randomized comparison below, over a finite window and over the lifetime (which folds a prefix)."""
    assert set(KINDS) == set(Aggregation)
    for aggregation in Aggregation:
        windows = {w for a in RANDOM_VIEW.aggregates if a.aggregation is aggregation for w in a.windows}
        assert LIFETIME in windows and len(windows) > 1, f"{aggregation} is not in RANDOM_VIEW both ways"


def random_events(seed: int, n: int, entities: int) -> list[FoldEvent]:
    rng = random.Random(seed)
    events: list[FoldEvent] = []
    seq = 0
    t = 0.0
    for _ in range(n):
        seq += 1
        t += rng.expovariate(1 / 20)
        r = rng.random()
        if r < 0.25:
            occurred = t - rng.uniform(0, 230)  # late, inside the allowed lateness (mostly)
        elif r < 0.28:
            occurred = t - rng.uniform(240, 2000)  # past the allowed lateness
        else:
            occurred = t
        if rng.random() < 0.1:
            occurred = float(round(occurred / 60) * 60)  # whole minutes: ties, and window edges
        payload: dict[str, Any] = {
            "customer_id": f"c{rng.randrange(entities)}",
            "amount": rng.choice([0.1, 0.2, 0.7, 1e15, -1e15, 3, 99.99, rng.uniform(0, 120), rng.uniform(0, 120)]),
            "merchant_id": rng.choice([f"m{rng.randrange(30)}", rng.randrange(5), 2.0]),
            "country": rng.choice(["DE", "FR", "NL", "US"]),
            "channel": rng.choice(["ecom", "pos", "moto"]),
        }
        k = rng.random()
        if k < 0.03:
            del payload["amount"]
        elif k < 0.05:
            payload["amount"] = None
        elif k < 0.06:
            payload["amount"] = "12"
        if rng.random() < 0.03:
            del payload["country"]
        if rng.random() < 0.03:
            del payload["channel"]
        type_ = SRC
        if rng.random() < 0.04:
            type_ = "payment.chargeback"
        elif rng.random() < 0.02:
            del payload["customer_id"]
        events.append(FoldEvent(seq, type_, T + occurred, payload))
        if rng.random() < 0.02:  # a redelivery of a recent event
            events.append(events[rng.randrange(max(0, len(events) - 10), len(events))])
    return events


def test_randomized_against_brute_force() -> None:
    view = RANDOM_VIEW
    events = random_events(seed=20260101, n=4000, entities=25)
    rng = random.Random(99)
    state = ViewState(view)
    lateness = view.allowed_lateness_seconds
    accepted: list[FoldEvent] = []
    known: set[str] = set()
    watermark, newest, dropped = 0, None, 0
    checks = 0
    for e in events:
        # The acceptance rule, restated plainly.
        if e.seq <= watermark:
            expected_applied = False
        else:
            watermark = e.seq
            eid = e.payload.get("customer_id")
            if e.type != SRC or eid is None:
                expected_applied = False
            elif newest is not None and e.occurred_at < newest - lateness:
                dropped += 1
                expected_applied = False
            else:
                expected_applied = True
                accepted.append(e)
                known.add(eid)
                newest = e.occurred_at if newest is None else max(newest, e.occurred_at)
        assert state.apply(e) is expected_applied
        assert (state.watermark, state.max_event_time, state.dropped_late) == (watermark, newest, dropped)
        if newest is None or rng.random() > 0.04:
            continue
        earliest = newest - 2 * lateness  # the oldest as_of answered exactly
        times = [newest, earliest, newest + 90, rng.uniform(earliest, newest), e.occurred_at, earliest - 0.5]
        # window edges: as_of exactly w after an accepted event
        for w in (60, 600, 3600):
            x = rng.choice(accepted[-50:]).occurred_at + w
            times.append(x)
        for as_of in times:
            entities = rng.sample(sorted(known), min(6, len(known))) + ["c_unknown"]
            if as_of < earliest:
                with pytest.raises(StaleQueryError):
                    state.values(entities[0], as_of)
                continue
            for eid in entities:
                assert state.values(eid, as_of) == brute_force(view, accepted, eid, as_of), (eid, as_of)
                checks += 1
    assert checks > 1000
    assert state.dropped_late > 10 and len(accepted) > 3000
    assert state.rows() < len(accepted)  # pruned along the way
    # Bit-identical, not approximately equal: sums where order matters are present.
    finals = [brute_force(view, accepted, f"c{i}", newest) for i in range(25)]
    assert any(f is not None and f["amount_sum_lifetime"] != 0.0 for f in finals)


def test_lifetime_totals_kept_across_pruning_and_late_events_equal_brute_force() -> None:
    """Queries at or after an entity's newest row take lifetime aggregates from running totals. Asked
    now and then for a few of many entities (so between two queries of one entity its totals fall
    behind, rows they have not seen leave the buffer for the prefix, and out-of-order rows make them
    rebuilt), they still equal the plain recomputation bit for bit."""
    view = RANDOM_VIEW
    state = ViewState(view)
    accepted: list[FoldEvent] = []
    rng = random.Random(3)
    checked = rebuilt = 0
    for e in random_events(seed=7, n=8000, entities=25):
        eid = e.payload.get("customer_id")
        had_totals = eid in state._totals
        if not state.apply(e):
            continue
        accepted.append(e)
        rebuilt += had_totals and eid not in state._totals  # an out-of-order row dropped them
        if rng.random() > 0.05:
            continue
        newest = state.max_event_time
        for x in rng.sample(state.entity_ids(), min(4, state.entities())):
            for as_of in (newest, newest + 30):
                assert state.values(x, as_of) == brute_force(view, accepted, x, as_of), (e.seq, x, as_of)
                checked += 1
    assert checked > 1000 and rebuilt > 20
    assert state.rows() < len(accepted) - 1000, "pruning happened between queries"


def test_simulator_stream_against_brute_force() -> None:
    from d2d.sim import PaymentsSimulator, SimConfig
    from d2d.sim.views import VIEWS

    cfg = SimConfig(customers=40, merchants=10, days=0.5, payments_per_day=2000, out_of_order_fraction=0.1)
    events = [
        FoldEvent(i, e.type, e.occurred_at.timestamp(), e.payload)
        for i, e in enumerate(PaymentsSimulator(cfg).events(), start=1)
    ]
    rng = random.Random(1)
    for view in VIEWS:
        state = fold_all(view, events)
        accepted = [e for e in events if e.type == view.source]  # the simulator is never later than 600 s
        assert state.dropped_late == 0
        as_of = state.max_event_time
        for eid in rng.sample(state.entity_ids(), 8):
            for t in (as_of, as_of - 700.5):
                assert state.values(eid, t) == brute_force(view, accepted, eid, t)


def test_lifetime_only_view_with_zero_lateness() -> None:
    view = FeatureView(
        name="lifetime_only",
        entity="customer",
        entity_key="customer_id",
        source=SRC,
        aggregates=(Aggregate("amount_sum", Aggregation.SUM, "amount", (Window(None),)),),
        allowed_lateness_seconds=0,
    )
    log = Log()
    state = folded([pay(log, 0, 1e16, "m", "DE"), pay(log, 1, 1.0, "m", "DE"), pay(log, 2, 1.0, "m", "DE")], view)
    assert state.horizon == T + 2  # W = 0, L = 0: everything before the newest event is pruned
    assert state.rows() == 1
    assert state.values("c1", T + 2) == {"amount_sum_lifetime": (1e16 + 1.0) + 1.0}
    assert state.values("c1", T + 2)["amount_sum_lifetime"] != 1e16 + (1.0 + 1.0)
    with pytest.raises(StaleQueryError):
        state.values("c1", T + 1)
    assert state.apply(pay(log, 1.5, 5.0, "m", "DE")) is False and state.dropped_late == 1
