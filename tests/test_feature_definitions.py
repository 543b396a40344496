"""Feature definitions: windows, filters, validation, versioning, serialisation, request transforms."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from d2d.features.definitions import (
    LIFETIME,
    Aggregate,
    Aggregation,
    FeatureView,
    Filter,
    RequestTransform,
    Window,
    days,
    hours,
    minutes,
    seconds,
    views_by_name,
)
from d2d.sim import PaymentsSimulator
from d2d.sim.views import TRANSFORMS, VIEWS


def small_view(**overrides) -> FeatureView:
    kwargs = dict(
        name="small_view",
        entity="customer",
        entity_key="customer_id",
        source="payment.authorized",
        aggregates=(
            Aggregate("count", Aggregation.COUNT, windows=(hours(1), LIFETIME)),
            Aggregate(
                "amount_sum", Aggregation.SUM, "amount", (days(1),), where=Filter("channel", "in", ("ecom", "moto"))
            ),
        ),
        allowed_lateness_seconds=600,
        description="x",
    )
    kwargs.update(overrides)
    return FeatureView(**kwargs)


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("window", "name"),
    [
        (minutes(10), "10m"),
        (hours(1), "1h"),
        (days(1), "1d"),
        (days(7), "7d"),
        (seconds(90), "90s"),
        (minutes(90), "90m"),
        (hours(36), "36h"),
        (hours(48), "2d"),
        (Window(1), "1s"),
        (Window(86_401), "86401s"),
        (LIFETIME, "lifetime"),
    ],
)
def test_window_names(window: Window, name: str) -> None:
    assert window.name == name


@pytest.mark.parametrize("bad", [0, -60, 1.5, True, "60"])
def test_window_must_be_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        Window(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("op", "value", "present", "expected"),
    [
        ("==", "ecom", "ecom", True),
        ("==", "ecom", "pos", False),
        ("!=", "ecom", "pos", True),
        ("!=", "ecom", "ecom", False),
        ("<", 10, 9.5, True),
        ("<", 10, 10, False),
        ("<=", 10, 10, True),
        (">", 10, 10.01, True),
        (">", 10, 10, False),
        (">=", 10, 10.0, True),
        ("in", ("a", "b"), "b", True),
        ("in", ("a", "b"), "c", False),
        ("not_in", ("a", "b"), "c", True),
        ("not_in", ("a", "b"), "a", False),
    ],
)
def test_filter_ops(op: str, value: object, present: object, expected: bool) -> None:
    assert Filter("x", op, value).matches({"x": present}) is expected


@pytest.mark.parametrize("op", ["==", "<", "<=", ">", ">=", "in"])
def test_filter_missing_field_never_matches(op: str) -> None:
    f = Filter("x", op, ("a",) if op == "in" else 1)
    assert not f.matches({})
    assert not f.matches({"x": None})  # null is missing


@pytest.mark.parametrize("op", ["!=", "not_in"])
def test_filter_missing_field_matches_negations(op: str) -> None:
    f = Filter("x", op, ("a",) if op == "not_in" else 1)
    assert f.matches({})
    assert f.matches({"x": None})
    assert f.matches({"y": 1})


def test_filter_nested_path() -> None:
    f = Filter("card.country", "==", "DE")
    assert f.matches({"card": {"country": "DE"}})
    assert not f.matches({"card": {"country": "FR"}})
    assert not f.matches({"card": {}})
    assert not f.matches({"card": "DE"})  # not an object: missing
    assert not f.matches({"card.country": "DE"})  # a dotted path is never a literal key
    assert Filter("card.country", "!=", "DE").matches({"card": None})


def test_filter_incomparable_values_do_not_match() -> None:
    assert not Filter("x", "<", 10).matches({"x": "5"})
    assert not Filter("x", ">=", "a").matches({"x": 3})
    assert Filter("x", "!=", 10).matches({"x": "10"})


def test_filter_in_normalises_to_tuple_and_is_hashable() -> None:
    f = Filter("x", "in", ["a", "b"])
    assert f.value == ("a", "b")
    assert hash(f) == hash(Filter("x", "in", ("a", "b")))
    assert f == Filter.from_dict(json.loads(json.dumps(f.to_dict())))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("x", "~=", 1), "filter op '~=' is not one of"),
        (("x", "in", "ab"), "value must be a tuple"),
        (("x", "in", ({"a": 1},)), "values must be strings, numbers or booleans"),
        (("x", "==", None), "must be a string, finite number or boolean"),
        (("x", "==", math.nan), "must be a string, finite number or boolean"),
        (("x", "<", True), "ordering a boolean"),
        (("x..y", "==", 1), "must be a payload field name"),
        (("", "==", 1), "must be a payload field name"),
    ],
)
def test_filter_validation(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Filter(*args)


# --------------------------------------------------------------------------- aggregates and views


def test_feature_names() -> None:
    agg = Aggregate("amount_sum", Aggregation.SUM, "amount", (days(1), LIFETIME))
    assert agg.feature_names() == ["amount_sum_1d", "amount_sum_lifetime"]
    view = small_view()
    assert view.feature_names() == ["count_1h", "count_lifetime", "amount_sum_1d"]
    assert view.qualified_feature_names()[0] == "small_view.count_1h"
    assert view.max_window_seconds == 86_400
    lifetime_only = small_view(aggregates=(Aggregate("count", Aggregation.COUNT),))
    assert lifetime_only.max_window_seconds == 0


def test_aggregation_accepts_its_string_value() -> None:
    assert Aggregate("n", "count").aggregation is Aggregation.COUNT  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="Amount", aggregation=Aggregation.COUNT), "aggregate name 'Amount' must be lower_snake_case"),
        (dict(name="a__b", aggregation=Aggregation.COUNT), "must be lower_snake_case"),
        (dict(name="amount_sum", aggregation=Aggregation.SUM), "amount_sum: sum needs a field"),
        (dict(name="last", aggregation=Aggregation.LAST), "last: last needs a field"),
        (dict(name="m", aggregation="median", field="amount"), "aggregation 'median' is not one of"),
        (dict(name="n", aggregation=Aggregation.COUNT, windows=()), "needs at least one window"),
        (dict(name="n", aggregation=Aggregation.COUNT, windows=hours(1)), "windows must be a tuple of Window"),
        (dict(name="n", aggregation=Aggregation.COUNT, windows=(3600,)), "windows must be Window objects"),
        (dict(name="n", aggregation=Aggregation.COUNT, windows=(hours(1), minutes(60))), "duplicate window"),
        (dict(name="n", aggregation=Aggregation.COUNT, field="a b"), "must be a payload field name"),
    ],
)
def test_aggregate_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Aggregate(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(name="SmallView"), "view name 'SmallView' must be lower_snake_case"),
        (dict(entity="Customer"), "entity 'Customer' must be lower_snake_case"),
        (dict(entity_key="customer id"), "entity_key 'customer id' must be a payload field name"),
        (dict(source="Payment Authorized"), "source 'Payment Authorized' must be an event type"),
        (dict(aggregates=()), "needs at least one aggregate"),
        (
            dict(aggregates=(Aggregate("n", Aggregation.COUNT), Aggregate("n", Aggregation.SUM, "amount"))),
            "duplicate aggregate name 'n'",
        ),
        (dict(allowed_lateness_seconds=-1), "allowed_lateness_seconds must be a non-negative integer"),
        (dict(allowed_lateness_seconds=1.5), "allowed_lateness_seconds must be a non-negative integer"),
    ],
)
def test_view_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_view(**overrides)


def test_feature_names_are_unique_by_construction() -> None:
    # Window names contain no "_", so f"{name}_{window}" splits back uniquely: distinct aggregate names
    # and distinct windows (both checked) already make feature names unique.
    for view in VIEWS:
        assert len(set(view.feature_names())) == len(view.feature_names())
    assert all("_" not in w.name for w in (minutes(10), hours(1), days(7), seconds(90), LIFETIME))


def test_views_by_name() -> None:
    a, b = small_view(), small_view(name="other_view")
    assert views_by_name([a, b]) == {"small_view": a, "other_view": b}
    with pytest.raises(ValueError, match="duplicate feature view name 'small_view'"):
        views_by_name([a, a])


# --------------------------------------------------------------------------- versions and serialisation

# The version of small_view(), computed once and written here: if this fails, the canonical form of
# a definition changed, and with it every view's version (which invalidates snapshots and lineage).
SMALL_VIEW_VERSION = "6eddd6ace86cf71f"


def test_version_is_stable() -> None:
    assert small_view().version == SMALL_VIEW_VERSION


def test_version_is_sha256_of_canonical_json_without_description() -> None:
    view = small_view()
    d = view.to_dict()
    del d["description"]
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    assert view.version == hashlib.sha256(canonical).hexdigest()[:16]


def test_version_ignores_description() -> None:
    assert small_view(description="something else entirely").version == SMALL_VIEW_VERSION


@pytest.mark.parametrize(
    "overrides",
    [
        dict(name="small_view_two"),
        dict(entity="account"),
        dict(entity_key="account_id"),
        dict(source="payment.captured"),
        dict(allowed_lateness_seconds=601),
        dict(aggregates=(Aggregate("count", Aggregation.COUNT, windows=(hours(2), LIFETIME)),)),
        dict(
            aggregates=(
                Aggregate("count", Aggregation.COUNT, windows=(hours(1), LIFETIME)),
                Aggregate(
                    "amount_sum", Aggregation.SUM, "amount", (days(1),), where=Filter("channel", "in", ("ecom",))
                ),
            )
        ),
        dict(
            aggregates=(
                Aggregate("count", Aggregation.COUNT, windows=(hours(1), LIFETIME)),
                Aggregate("amount_sum", Aggregation.MEAN, "amount", (days(1),)),
            )
        ),
    ],
)
def test_version_changes_with_definition(overrides: dict) -> None:
    assert small_view(**overrides).version != SMALL_VIEW_VERSION


def test_round_trip() -> None:
    for view in (small_view(), *VIEWS):
        d = view.to_dict()
        again = FeatureView.from_dict(json.loads(json.dumps(d)))
        assert again == view
        assert again.to_dict() == d
        assert again.version == view.version
        assert hash(again) == hash(view)


def test_from_dict_rejects_unknown_keys() -> None:
    d = small_view().to_dict()
    d["aggregates"][0]["windw"] = [60]
    with pytest.raises(ValueError, match="unknown keys \\['windw'\\]"):
        FeatureView.from_dict(d)


def test_definitions_are_hashable_and_frozen() -> None:
    view = small_view()
    assert {view: 1}[small_view()] == 1
    with pytest.raises(AttributeError):
        view.name = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- request transforms


def tf(op: str, *inputs: str) -> RequestTransform:
    return RequestTransform("t", op, inputs)


FEATS = {"v.mean": 50.0, "v.zero": 0.0, "v.none": None, "v.country": "DE", "v.count": 3}


@pytest.mark.parametrize(
    ("transform", "request_", "expected"),
    [
        (tf("ratio", "request.amount", "v.mean"), {"amount": 125.0}, 2.5),
        (tf("ratio", "request.amount", "v.count"), {"amount": 3}, 1.0),
        (tf("ratio", "request.amount", "v.zero"), {"amount": 1.0}, None),
        (tf("ratio", "request.amount", "v.none"), {"amount": 1.0}, None),
        (tf("ratio", "request.amount", "v.missing"), {"amount": 1.0}, None),
        (tf("ratio", "request.amount", "v.mean"), {}, None),
        (tf("ratio", "request.amount", "v.mean"), {"amount": "12"}, None),
        (tf("ratio", "request.amount", "v.mean"), {"amount": True}, None),
        (tf("ratio", "request.amount", "v.mean"), {"amount": 1e308}, 2e306),
        (tf("difference", "request.amount", "v.mean"), {"amount": 80}, 30.0),
        (tf("difference", "request.amount", "v.none"), {"amount": 80}, None),
        (tf("difference", "v.none", "request.amount"), {"amount": 80}, None),
        (tf("equals", "request.country", "v.country"), {"country": "DE"}, 1.0),
        (tf("equals", "request.country", "v.country"), {"country": "FR"}, 0.0),
        (tf("equals", "request.country", "v.country"), {}, None),
        (tf("equals", "request.country", "v.none"), {"country": "DE"}, None),
        (tf("log1p", "request.amount"), {"amount": math.e - 1}, 1.0),
        (tf("log1p", "request.amount"), {"amount": 0}, 0.0),
        (tf("log1p", "request.amount"), {"amount": -1}, None),
        (tf("log1p", "request.amount"), {}, None),
        (tf("hour_of_day", "request.at"), {"at": "2026-01-01T13:59:59Z"}, 13.0),
        (tf("hour_of_day", "request.at"), {"at": "2026-01-01t13:00:00.25z"}, 13.0),
        (tf("hour_of_day", "request.at"), {"at": "2026-01-01T01:30:00+02:00"}, 23.0),
        (tf("hour_of_day", "request.at"), {"at": datetime(2026, 1, 1, 7, 5, tzinfo=UTC)}, 7.0),
        (
            tf("hour_of_day", "request.at"),
            {"at": datetime(2026, 1, 1, 7, 5, tzinfo=timezone(timedelta(hours=-3)))},
            10.0,
        ),
        (tf("hour_of_day", "request.at"), {"at": datetime(2026, 1, 1, 7, 5)}, 7.0),  # naive = UTC
        (tf("hour_of_day", "request.at"), {"at": datetime(2026, 1, 1, 22, tzinfo=UTC).timestamp()}, 22.0),
        (tf("hour_of_day", "request.at"), {"at": "yesterday"}, None),
        (tf("hour_of_day", "request.at"), {}, None),
        (tf("is_missing", "v.none"), {}, 1.0),
        (tf("is_missing", "v.missing"), {}, 1.0),
        (tf("is_missing", "v.mean"), {}, 0.0),
        (tf("is_missing", "request.card.country"), {"card": {"country": "DE"}}, 0.0),
        (tf("is_missing", "request.card.country"), {"card": {}}, 1.0),
    ],
)
def test_transform_ops(transform: RequestTransform, request_: dict, expected: float | None) -> None:
    got = transform.compute(request_, FEATS)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-15)
        assert type(got) is float


def test_transform_non_finite_result_is_none() -> None:
    assert tf("difference", "request.a", "request.b").compute({"a": 1e308, "b": -1e308}, {}) is None
    assert tf("ratio", "request.a", "request.b").compute({"a": 1e308, "b": 1e-10}, {}) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("t", "sqrt", ("request.a",)), "op 'sqrt' is not one of"),
        (("t", "ratio", ("request.a",)), "ratio takes 2 input\\(s\\), got 1"),
        (("t", "log1p", ("request.a", "request.b")), "log1p takes 1 input\\(s\\), got 2"),
        (("t", "is_missing", ("amount",)), "input 'amount' must be 'request.<field>' or '<view>.<feature>'"),
        (("t", "is_missing", ("View.feature",)), "must be 'request.<field>'"),
        (("t", "is_missing", "request.a"), "inputs must be a tuple"),
        (("T", "is_missing", ("request.a",)), "transform name 'T' must be lower_snake_case"),
    ],
)
def test_transform_validation(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RequestTransform(*args)


def test_transform_round_trip() -> None:
    for t in TRANSFORMS:
        assert RequestTransform.from_dict(json.loads(json.dumps(t.to_dict()))) == t


# --------------------------------------------------------------------------- the simulator's views


def test_sim_views_reference_real_payload_fields() -> None:
    contracts = {c.event_type: c for c in PaymentsSimulator().contracts()}
    names = views_by_name(VIEWS)
    assert set(names) == {"customer_payments", "merchant_payments", "card_payments"}
    for view in VIEWS:
        assert view.allowed_lateness_seconds == 3600
        props = contracts[view.source].schema["properties"]
        assert view.entity_key in props
        for agg in view.aggregates:
            if agg.field is not None:
                assert agg.field in props, (view.name, agg.name)
            if agg.where is not None:
                assert agg.where.field in props
                enum = props[agg.where.field].get("enum")
                if enum is not None and agg.where.op == "==":
                    assert agg.where.value in enum
    payment_props = contracts["payment.authorized"].schema["properties"]
    for t in TRANSFORMS:
        for ref in t.inputs:
            head, _, rest = ref.partition(".")
            if head == "request":
                assert rest in payment_props or rest == "occurred_at", ref
            else:
                assert rest in names[head].feature_names(), ref


def test_sim_view_features() -> None:
    c = views_by_name(VIEWS)["customer_payments"]
    assert c.feature_names() == [
        "count_1h", "count_1d", "count_7d", "count_lifetime",
        "amount_sum_1d", "amount_sum_lifetime", "amount_mean_1d", "amount_mean_lifetime",
        "amount_max_1d", "amount_max_lifetime", "distinct_merchants_1d", "distinct_merchants_7d",
        "distinct_devices_7d", "distinct_devices_lifetime", "ecom_count_1h", "ecom_count_1d",
        "ip_country_last_lifetime",
    ]  # fmt: skip
    assert views_by_name(VIEWS)["card_payments"].feature_names()[0] == "count_10m"
    assert [t.name for t in TRANSFORMS] == ["amount_vs_customer_mean_1d", "hour_of_day", "ip_country_same_as_last"]


def test_every_transform_op_says_what_its_request_inputs_must_be() -> None:
    """Serving checks a Predict's context by these kinds; an op without one could not be served."""
    from d2d.features import definitions

    assert set(definitions.TRANSFORM_INPUT_KIND) == set(definitions._TRANSFORM_ARITY)
