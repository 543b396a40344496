"""The features service as its own process on real Postgres and NATS: online answers captured while
a simulated stream with out-of-order arrivals flows equal the offline training frame at the same
(entity, time, watermark); a process killed with SIGKILL mid-stream and restarted ends in the same
state as one that never stopped, with no event applied twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import nats
import pandas as pd
import pytest

from d2d import bus
from d2d.client import FeatureClient, IngestClient, make_event
from d2d.eventlog import EventLog
from d2d.features.offline import FrameRow, training_frame
from d2d.features.online import OnlineState
from d2d.runtime.servers import NatsServer, free_port
from d2d.sim import PaymentsSimulator, SimConfig, load_contracts
from d2d.sim.views import VIEWS
from d2d.v1 import features_pb2
from tests.conftest import run_cli, settings_env

ALL_FEATURES = [f"{v.name}.*" for v in VIEWS]


def simulated(days: float, seed: int = 11) -> list:
    config = SimConfig(seed=seed, days=days, payments_per_day=25_000, out_of_order_fraction=0.1)
    return list(PaymentsSimulator(config).events())


def keys_of(event) -> dict[str, str]:  # noqa: ANN001
    payload = event.payload
    return {"customer": payload["customer_id"], "merchant": payload["merchant_id"], "card": payload["card_id"]}


async def start_platform(start_service, database_url: str, nats_url: str, namespace: str, consumers: list[str]):  # noqa: ANN001, ANN201
    """Ingest, relay and one features process per consumer name; returns (ingest addr, {consumer: (addr, env)})."""
    ingest_port = free_port()
    env = settings_env(database_url, nats_url, namespace, ingest_port)
    start_service(["-m", "services.ingest", "serve"], env, "ingest")
    start_service(["-m", "services.ingest", "relay"], env, "relay")
    features = {}
    for name in consumers:
        port = free_port()
        feature_env = {
            **env, "D2D_FEATURES_ADDR": f"127.0.0.1:{port}", "D2D_FEATURES_CONSUMER": name,
            "D2D_FEATURES_SNAPSHOT_SECONDS": "0.5",
        }  # fmt: skip
        process = start_service(["-m", "services.features"], feature_env, f"features-{name}")
        features[name] = (f"127.0.0.1:{port}", feature_env, process)
    async with IngestClient(f"127.0.0.1:{ingest_port}") as ingest:
        await ingest.wait_ready()
        for spec in load_contracts():
            await ingest.create_contract_version(spec.event_type, owner=spec.owner, json_schema=spec.schema)
    return f"127.0.0.1:{ingest_port}", features


async def send_all(target: str, events: list, on_batch=None) -> None:  # noqa: ANN001
    async with IngestClient(target) as ingest:
        for i in range(0, len(events), 500):
            batch = events[i : i + 500]
            protos = [
                make_event(
                    e.type, e.entity_type, e.entity_id, e.payload_json(), occurred_at=e.occurred_at, event_id=e.event_id
                )  # fmt: skip
                for e in batch
            ]
            response = await ingest.append(protos)
            assert all(r.WhichOneof("outcome") == "seq" for r in response.results)
            if on_batch is not None:
                await on_batch(batch)


async def snapshot_watermark(event_log: EventLog, consumer: str, above: int, timeout: float = 60) -> int:
    """Wait until the consumer has a snapshot past `above`; its watermark."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with event_log.pool.acquire() as conn:
            watermark = await conn.fetchval(
                "SELECT watermark FROM feature_snapshots WHERE consumer LIKE $1", f"{consumer}:%"
            )
        if watermark and watermark > above:
            return watermark
        assert asyncio.get_running_loop().time() < deadline, "no snapshot in time"
        await asyncio.sleep(0.05)


async def wait_caught_up(features: FeatureClient, head: int, timeout: float = 120) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            answer = await features.get_online(["customer_payments.count_lifetime"], [{"customer": "x"}])
            if answer.watermark >= head:
                return
        except grpc.aio.AioRpcError:
            pass
        assert asyncio.get_running_loop().time() < deadline, "features did not catch up"
        await asyncio.sleep(0.2)


async def test_online_answers_during_streaming_equal_the_offline_frame(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    events = simulated(days=2.0)
    assert len(events) >= 50_000 and any(
        b.occurred_at < a.occurred_at for a, b in zip(events, events[1:], strict=False)
    )
    ingest_target, features = await start_platform(start_service, database_url, nats_server.url, namespace, ["f"])
    target = features["f"][0]
    rng = random.Random(5)
    captured: list[tuple[dict[str, str], datetime, int, dict]] = []

    async with FeatureClient(target) as online:
        await online.wait_ready()

        async def capture(batch: list) -> None:
            payments = [e for e in batch if e.type == "payment.authorized"]
            if not payments:
                return
            sample = rng.sample(payments, min(20, len(payments)))
            as_of = max(e.occurred_at for e in batch) + timedelta(seconds=rng.choice([0, 30, 600]))
            answer = await online.get_online(ALL_FEATURES, [keys_of(e) for e in sample], as_of=as_of)
            for event, values in zip(sample, answer.rows, strict=True):
                captured.append((keys_of(event), as_of, answer.watermark, values))

        await send_all(ingest_target, events, capture)

    watermarks = {w for _, _, w, _ in captured}
    assert len(captured) >= 1000 and len(watermarks) > 20, "answers were captured at many points of the stream"
    rows = [FrameRow(keys, as_of, watermark) for keys, as_of, watermark, _ in captured]
    frame = await training_frame(event_log, VIEWS, rows)
    names = [c for c in frame.columns if "." in c]
    mismatches = []
    for i, (_, _, _, online_values) in enumerate(captured):
        offline_values = {n: _none(frame.at[i, n]) for n in names}
        if offline_values != online_values:
            mismatches.append((rows[i], online_values, offline_values))
    assert mismatches == [], f"{len(mismatches)} of {len(rows)} rows differ; first: {mismatches[:1]}"
    assert sum(1 for _, _, _, v in captured if v["customer_payments.count_1d"]) > len(captured) // 2


def _none(value):  # noqa: ANN001, ANN202
    """pandas turns None into NaN in float columns; the online answer says None."""
    return None if value is None or value != value else value


async def test_features_killed_mid_stream_reach_the_same_state_as_one_never_stopped(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    events = simulated(days=1.0, seed=12)
    ingest_target, features = await start_platform(
        start_service, database_url, nats_server.url, namespace, ["steady", "killed"]
    )
    steady_target, _, _ = features["steady"]
    killed_target, killed_env, killed = features["killed"]
    half = len(events) // 2
    await send_all(ingest_target, events[:half])
    async with FeatureClient(killed_target) as victim:
        await victim.wait_ready()
    sender = asyncio.create_task(send_all(ingest_target, events[half:]))
    snapshot_at = await snapshot_watermark(event_log, "killed", above=half // 2)
    killed.kill()  # SIGKILL, with events still arriving and folded state past its last snapshot
    restarted = start_service(["-m", "services.features"], killed_env, "features-killed")
    await sender
    head = await event_log.head()
    customers = sorted({e.payload["customer_id"] for e in events if e.type == "payment.authorized"})
    rows = [{"customer": c, "merchant": "mer_0001", "card": "card_000001_1"} for c in customers]
    as_of = max(e.occurred_at for e in events).astimezone(UTC)
    counted = 0
    async with FeatureClient(steady_target) as steady, FeatureClient(killed_target) as again:
        await again.wait_ready()
        await wait_caught_up(steady, head)
        await wait_caught_up(again, head)
        for start in range(0, len(rows), 1000):
            part = rows[start : start + 1000]
            expected = await steady.get_online(ALL_FEATURES, part, as_of=as_of)
            got = await again.get_online(ALL_FEATURES, part, as_of=as_of)
            assert got.watermark == expected.watermark == head
            assert got.rows == expected.rows
            counted += sum(r["customer_payments.count_lifetime"] for r in got.rows)
    payments = sum(1 for e in events if e.type == "payment.authorized")
    assert counted == payments  # every payment folded once: none lost, none twice
    assert f"restored snapshot at seq {snapshot_at}" in restarted.log() or "restored snapshot" in restarted.log()
    assert "folding from seq 1 " not in restarted.log()  # it replayed only what the snapshot lacked
    assert restarted.terminate() == 0, restarted.log()


async def test_unknown_view_or_feature_is_not_found_and_unknown_entity_gets_defaults(
    database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    _, features = await start_platform(start_service, database_url, nats_server.url, namespace, ["f"])
    async with FeatureClient(features["f"][0]) as online:
        await online.wait_ready()
        for name, needle in [("nosuch.count", "'nosuch'"), ("customer_payments.nosuch", "'nosuch'")]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await online.get_online([name], [{"customer": "cus_000001"}])
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND and needle in caught.value.details()
        answer = await online.get_online(["customer_payments.*"], [{"customer": "cus_999999"}])
        assert answer.unknown_entities == [["customer"]]
        assert answer.rows[0]["customer_payments.count_lifetime"] == 0
        views = [v.name for v in await online.list_views()]
        assert views == [f"featureViews/{v.name}" for v in VIEWS]  # in declaration order, all pages
        first = await online.stub.ListFeatureViews(features_pb2.ListFeatureViewsRequest(page_size=1))
        rest = await online.stub.ListFeatureViews(
            features_pb2.ListFeatureViewsRequest(page_size=5, page_token=first.next_page_token)
        )
        assert [v.name for v in [*first.feature_views, *rest.feature_views]] == views and not rest.next_page_token
        assert [v.version for v in await online.view_definitions()] == [v.version for v in VIEWS]
        for bad, field in [({"page_token": "nosuch"}, "page_token"), ({"page_size": -1}, "page_size")]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await online.stub.ListFeatureViews(features_pb2.ListFeatureViewsRequest(**bad))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in caught.value.details()
        got = await online.stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="featureViews/card_payments"))
        card = next(v for v in VIEWS if v.name == "card_payments")
        assert got.version == card.version and list(got.features) == card.feature_names()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await online.stub.GetFeatureView(features_pb2.GetFeatureViewRequest(name="featureViews/nosuch"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "nosuch" in caught.value.details()


async def test_frame_and_verify_commands_use_no_event_after_the_row(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service, tmp_path: Path
) -> None:
    events = simulated(days=0.5, seed=13)
    ingest_target, features = await start_platform(start_service, database_url, nats_server.url, namespace, ["f"])
    target, env, _ = features["f"]
    await send_all(ingest_target, events)
    async with FeatureClient(target) as online:
        await online.wait_ready()
        await wait_caught_up(online, await event_log.head())

    code, out = await run_cli(env, "features", "views")
    assert code == 0 and all(v.name in out and v.version in out for v in VIEWS), out
    code, out = await run_cli(env, "features", "verify", "--sample", "150")
    assert code == 0 and "0 mismatches" in out and "of 150 entity rows" in out, out

    path = tmp_path / "frame.parquet"
    code, out = await run_cli(env, "features", "frame", "--from-events", "payment.authorized", "--out", str(path))
    assert code == 0, out
    frame = pd.read_parquet(path)
    stored = await event_log.read(0, 1_000_000, types=["payment.authorized"])
    assert len(frame) == len(stored) and not frame["stale"].any()
    by_customer: dict[str, list] = {}
    for e in stored:
        by_customer.setdefault(e.payload["customer_id"], []).append(e)
    for _, row in frame.sample(300, random_state=1).iterrows():
        earlier = [
            e for e in by_customer[row["customer"]]
            if e.seq <= row["watermark"] and e.occurred_at <= row["as_of"].to_pydatetime()
        ]  # fmt: skip
        day = [e for e in earlier if (row["as_of"].to_pydatetime() - e.occurred_at).total_seconds() < 86_400]
        assert row["customer_payments.count_lifetime"] == len(earlier)
        assert row["customer_payments.count_1d"] == len(day)
        expected_max = max(e.payload["amount"] for e in day) if day else None
        assert _none(row["customer_payments.amount_max_1d"]) == expected_max

    given = frame.sample(5, random_state=2)[["customer", "merchant", "card", "as_of", "watermark"]]
    given.to_csv(tmp_path / "rows.csv", index=False)
    again = tmp_path / "again.parquet"
    code, out = await run_cli(env, "features", "frame", "--rows", str(tmp_path / "rows.csv"), "--out", str(again))
    assert code == 0 and "wrote 5 rows" in out, out
    expected = given.reset_index(drop=True).merge(frame, on=list(given.columns))
    assert pd.read_parquet(again).equals(expected[pd.read_parquet(again).columns]), "the same rows, the same values"

    registered = await event_log.read(0, 100, types=["feature_view.registered"])
    assert {e.payload["name"] for e in registered} == {v.name for v in VIEWS}


async def test_only_source_types_reach_the_service_and_its_watermark_still_reaches_the_head(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    events = simulated(days=0.1, seed=17)
    ingest_target, features = await start_platform(start_service, database_url, nats_server.url, namespace, ["f"])
    target, _, _ = features["f"]
    await send_all(ingest_target, events)
    payments = [e for e in events if e.type == "payment.authorized"]
    assert len(payments) < len(events), "the simulator's log holds other types too"
    # The log now ends with events no view folds.
    late = [
        make_event("merchant.onboarded", "merchant", f"mer_9{i:03d}", {"merchant_id": f"mer_9{i:03d}", "name": "Shop",
                   "mcc": "5411", "category": "grocery", "country": "DE", "risk_tier": "low"},
                   occurred_at=datetime.now(UTC))
        for i in range(300)
    ]  # fmt: skip
    async with IngestClient(ingest_target) as ingest:
        response = await ingest.append(late)
    assert all(r.WhichOneof("outcome") == "seq" for r in response.results)
    head = await event_log.head()
    assert (await event_log.get(uuid.UUID(late[-1].event_id))).seq == head
    async with FeatureClient(target) as online:
        await online.wait_ready()
        await wait_caught_up(online, head)  # no payment is at the head: the idle check moves it there
    topology = bus.Topology(namespace)
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().consumer_info(topology.events_stream, "f_" + topology.events_stream)
        assert info.config.filter_subjects == [f"{topology.events_prefix}.payment.authorized"]
        assert info.delivered.consumer_seq == len(payments), "only payments were delivered, each once"
    finally:
        await nc.close()


async def test_the_consumer_acknowledges_only_what_a_snapshot_holds(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    events = simulated(days=0.3, seed=19)
    ingest_target, features = await start_platform(start_service, database_url, nats_server.url, namespace, ["f"])
    topology = bus.Topology(namespace)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    seen: list[tuple[int, int]] = []

    async def ack_floor_and_snapshot() -> tuple[int, int]:
        # the acknowledgement first: a snapshot read after it can only be newer
        try:
            floor = (await js.consumer_info(topology.events_stream, "f_" + topology.events_stream)).ack_floor.stream_seq
        except nats.js.errors.NotFoundError:  # not created yet
            floor = 0
        async with event_log.pool.acquire() as conn:
            snapshot = await conn.fetchval("SELECT stream_seq FROM feature_snapshots WHERE consumer LIKE 'f:%'")
        return floor, snapshot or 0

    async def check(_: list) -> None:
        floor, snapshot = await ack_floor_and_snapshot()
        assert floor <= snapshot, f"stream position {floor} acknowledged, the snapshot holds only {snapshot}"
        seen.append((floor, snapshot))

    try:
        await send_all(ingest_target, events, check)
        async with FeatureClient(features["f"][0]) as online:
            await online.wait_ready()
            await wait_caught_up(online, await event_log.head())
        for _ in range(100):  # until a snapshot holds everything and it is acknowledged
            floor, snapshot = await ack_floor_and_snapshot()
            assert floor <= snapshot
            info = await js.stream_info(topology.events_stream)
            if floor and floor == snapshot:
                break
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert floor > 0 and floor == snapshot <= info.state.last_seq
    assert len({f for f, _ in seen}) > 1, "acknowledgements moved while the stream flowed"


def payment_at(n: int, at: datetime, amount: float) -> object:
    payload = {
        "payment_id": f"pay_{n:08d}", "customer_id": "cus_000001", "card_id": "card_000001_1",
        "merchant_id": "mer_0001", "amount": amount, "currency": "EUR", "channel": "ecom",
        "ip_country": "DE", "device_id": "dev_0123456789ab",
    }  # fmt: skip
    return make_event("payment.authorized", "payment", payload["payment_id"], payload, occurred_at=at)


async def test_too_late_events_are_left_out_online_and_offline_and_counted_and_stale_queries_are_out_of_range(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    from google.rpc import error_details_pb2

    from d2d.client import error_details

    t0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
    lateness = timedelta(seconds=next(v for v in VIEWS if v.name == "customer_payments").allowed_lateness_seconds)
    assert lateness == timedelta(hours=1)
    ingest_target, features = await start_platform(start_service, database_url, nats_server.url, namespace, ["f"])
    newest = t0 + 3 * lateness
    payments = [
        payment_at(1, t0, 10.0),
        payment_at(2, newest, 20.0),
        payment_at(3, newest - 2 * lateness, 400.0),  # two spans behind the newest: too late
        payment_at(4, newest - lateness / 2, 30.0),  # half a span behind: folded where it belongs
    ]
    async with IngestClient(ingest_target) as ingest:
        for payment in payments:  # one by one: the order of arrival is the point
            [result] = (await ingest.append([payment])).results
            assert result.WhichOneof("outcome") == "seq", result  # every one is in the log
    head = await event_log.head()
    wanted = ["customer_payments.count_lifetime", "customer_payments.amount_sum_lifetime"]
    request = features_pb2.GetOnlineFeaturesRequest(
        features=wanted, rows=[features_pb2.EntityRow(keys={"customer": "cus_000001"})]
    )
    request.as_of.FromDatetime(newest)
    async with FeatureClient(features["f"][0]) as online:
        await online.wait_ready()
        await wait_caught_up(online, head)
        answer = await online.stub.GetOnlineFeatures(request)
        assert [v.number_value for v in answer.rows[0].values] == [3, 60.0]
        assert dict(answer.dropped_late) == {"customer_payments": 1}
        stale = features_pb2.GetOnlineFeaturesRequest()
        stale.CopyFrom(request)
        stale.as_of.FromDatetime(newest - 2 * lateness - timedelta(seconds=1))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await online.stub.GetOnlineFeatures(stale)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    [violation] = [d for d in error_details(caught.value) if isinstance(d, error_details_pb2.BadRequest)]
    assert violation.field_violations[0].field == "as_of"

    frame = await training_frame(event_log, VIEWS, [FrameRow({"customer": "cus_000001"}, newest, head)])
    assert frame.at[0, "customer_payments.count_lifetime"] == 3
    assert frame.at[0, "customer_payments.amount_sum_lifetime"] == 60.0


async def test_a_frame_row_without_a_watermark_uses_no_event_after_its_time(event_log: EventLog) -> None:
    """A row without a watermark gets max{seq : occurred_at <= as_of}: checked against the log by brute force."""
    from d2d.eventlog import NewEvent

    rng = random.Random(23)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    events = []
    for n in range(120):  # arrival order differs from event time (within the views' lateness)
        at = t0 + timedelta(minutes=n * 5 + rng.uniform(-50, 0))
        p = payment_at(n + 1, at, float(n + 1))
        p.payload = json.dumps({**json.loads(p.payload), "customer_id": f"cus_00000{n % 3}"}).encode()
        events.append(NewEvent(uuid.UUID(p.event_id), p.type, 1, p.entity_type, p.entity_id, at, p.payload.decode()))
    await event_log.append(events)
    stored = await event_log.read(0, 1000)
    times = [t0 - timedelta(hours=2), *(t0 + timedelta(minutes=rng.uniform(0, 600)) for _ in range(40))]
    rows = [FrameRow({"customer": f"cus_00000{i % 3}"}, as_of) for i, as_of in enumerate(times)]
    frame = await training_frame(event_log, VIEWS, rows)
    for i, row in enumerate(rows):
        watermark = max((e.seq for e in stored if e.occurred_at <= row.as_of), default=0)
        assert frame.at[i, "watermark"] == watermark, i
        counted = [
            e for e in stored
            if e.seq <= watermark and e.occurred_at <= row.as_of and e.payload["customer_id"] == row.keys["customer"]
        ]  # fmt: skip
        assert frame.at[i, "customer_payments.count_lifetime"] == len(counted), i
    assert frame.at[0, "watermark"] == 0 and frame.at[0, "customer_payments.count_lifetime"] == 0
    assert len({frame.at[i, "watermark"] for i in range(len(rows))}) > 10, "rows at many points of the log"


@contextlib.asynccontextmanager
async def feature_service(event_log: EventLog, state: OnlineState) -> AsyncIterator[FeatureClient]:
    """The FeatureService over `state` in this process, built as `services.features` builds it."""
    from d2d import auth, grpcserver
    from services.features.api import SERVICE_NAME, FeatureApi
    from tests.conftest import TEST_KEY_CREATED

    server, _ = grpcserver.new_server([SERVICE_NAME])
    keys = auth.KeyRing.of(TEST_KEY_CREATED)  # the tests' key, without putting it in the log
    grpcserver.add_service(
        server, features_pb2.DESCRIPTOR.services_by_name["FeatureService"], FeatureApi(state, event_log), keys
    )
    port = free_port()
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    try:
        async with FeatureClient(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        await server.stop(None)


async def refused(call) -> tuple[grpc.StatusCode, str]:  # noqa: ANN001
    """(code, the field its BadRequest names) of a call that must fail; streaming calls are drained."""
    from google.rpc import error_details_pb2

    from d2d.client import error_details

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        answer = call()
        if hasattr(answer, "__aiter__"):
            [_ async for _ in answer]
        else:
            await answer
    [violation] = [d for d in error_details(caught.value) if isinstance(d, error_details_pb2.BadRequest)]
    return caught.value.code(), violation.field_violations[0].field


async def append_payments(event_log: EventLog, customers: list[str], t0: datetime) -> list:
    """Ten payments per customer, five minutes apart, straight into the log; the stored events."""
    from d2d.eventlog import NewEvent

    new = []
    for n in range(10 * len(customers)):
        p = payment_at(n + 1, t0 + timedelta(minutes=5 * n), float(n + 1))
        p.payload = json.dumps({**json.loads(p.payload), "customer_id": customers[n % len(customers)]}).encode()
        new.append(
            NewEvent(uuid.UUID(p.event_id), p.type, 1, p.entity_type, p.entity_id, p.occurred_at.ToDatetime(UTC),
                     p.payload.decode())
        )  # fmt: skip
    await event_log.append(new)
    return await event_log.read(0, 1000)


async def test_frame_and_skew_requests_that_cannot_be_answered_are_refused_naming_the_field(
    event_log: EventLog,
) -> None:
    Frame, Skew = features_pb2.ExportTrainingFrameRequest, features_pb2.CheckFeatureSkewRequest  # noqa: N806
    at = features_pb2.TrainingFrameRow(keys={"customer": "cus_000001"})
    at.as_of.FromDatetime(datetime(2026, 3, 1, tzinfo=UTC))
    no_time = features_pb2.TrainingFrameRow(keys={"customer": "cus_000001"})
    nobody = features_pb2.TrainingFrameRow(keys={"planet": "mars"}, as_of=at.as_of)
    below_zero = features_pb2.TrainingFrameRow(keys={"customer": "cus_000001"}, as_of=at.as_of, watermark=-1)
    customer = features_pb2.EntityRow(keys={"customer": "cus_000001"})
    frame_cases = [
        (Frame(), grpc.StatusCode.INVALID_ARGUMENT, "from_event_type"),
        (Frame(from_event_type="payment.authorized", rows=[at]), grpc.StatusCode.INVALID_ARGUMENT, "from_event_type"),
        (Frame(from_event_type="merchant.onboarded"), grpc.StatusCode.INVALID_ARGUMENT, "from_event_type"),
        (Frame(from_event_type="payment.authorized", limit=-1), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (Frame(rows=[at], limit=5), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (Frame(rows=[at, no_time]), grpc.StatusCode.INVALID_ARGUMENT, "rows[1].as_of"),
        (Frame(rows=[nobody]), grpc.StatusCode.INVALID_ARGUMENT, "rows[0].keys"),
        (Frame(rows=[below_zero]), grpc.StatusCode.INVALID_ARGUMENT, "rows[0].watermark"),
        (Frame(rows=[at], feature_views=["featureViews/nosuch"]), grpc.StatusCode.NOT_FOUND, "feature_views[0]"),
        (Frame(rows=[at], feature_views=["customer_payments"]), grpc.StatusCode.INVALID_ARGUMENT, "feature_views[0]"),
    ]
    skew_cases = [
        (Skew(), grpc.StatusCode.INVALID_ARGUMENT, "sample"),
        (Skew(sample=-3), grpc.StatusCode.INVALID_ARGUMENT, "sample"),
        (Skew(sample=10_001), grpc.StatusCode.INVALID_ARGUMENT, "sample"),
        (Skew(sample=5, rows=[customer]), grpc.StatusCode.INVALID_ARGUMENT, "sample"),
        (Skew(sample=5), grpc.StatusCode.FAILED_PRECONDITION, "sample"),  # the log is empty
        (Skew(rows=[customer]), grpc.StatusCode.INVALID_ARGUMENT, "as_of"),
        (
            Skew(rows=[features_pb2.EntityRow(keys={})], as_of=at.as_of),
            grpc.StatusCode.INVALID_ARGUMENT,
            "rows[0].keys",
        ),
        (Skew(sample=5, feature_views=["featureViews/nosuch"]), grpc.StatusCode.NOT_FOUND, "feature_views[0]"),
    ]
    async with feature_service(event_log, OnlineState(VIEWS)) as features:
        for request, code, field in frame_cases:
            assert await refused(lambda r=request: features.stub.ExportTrainingFrame(r)) == (code, field), request
        for request, code, field in skew_cases:
            assert await refused(lambda r=request: features.stub.CheckFeatureSkew(r)) == (code, field), request


async def test_the_skew_check_reports_an_online_state_that_missed_an_event(event_log: EventLog, tmp_path: Path) -> None:
    t0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
    stored = await append_payments(event_log, ["cus_000001", "cus_000002"], t0)
    missed = next(e for e in stored[5:] if e.payload["customer_id"] == "cus_000002")
    state = OnlineState(VIEWS)
    for e in stored:
        if e.seq != missed.seq:  # as if a delivery had been lost
            state.offer_event(e.seq, e.type, e.schema_version, e.occurred_at.timestamp(), e.payload)
    assert state.watermark == stored[-1].seq
    as_of = stored[-1].occurred_at
    intact, harmed = {"customer": "cus_000001"}, {"customer": "cus_000002"}
    async with feature_service(event_log, state) as features:
        fine = await features.check_skew(rows=[intact], as_of=as_of, views=["customer_payments"])
        report = await features.check_skew(rows=[intact, harmed], as_of=as_of, views=["customer_payments"])
        sampled = await features.check_skew(sample=50, seed=3)
        written = await features.export_frame(
            tmp_path / "f.parquet", views=["customer_payments"], rows=[(harmed, as_of, None)]
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await features.check_skew(rows=[harmed], as_of=t0 - timedelta(days=2))
    assert fine.mismatch_count == 0 and fine.checked_rows == 1 and fine.checked_values > 0
    assert report.watermark == stored[-1].seq and report.as_of == as_of
    assert report.mismatch_count == len(report.mismatches) > 0
    assert [k for k, _, _, _ in report.mismatches] == [harmed] * report.mismatch_count
    counts = {name: (online, offline) for _, name, online, offline in report.mismatches}
    assert counts["customer_payments.count_lifetime"] == (9, 10)
    assert sampled.checked_rows == 20 and sampled.mismatch_count > 0  # every stored payment, two of them harmed's
    frame = pd.read_parquet(written.path)
    assert written.rows == len(frame) == 1 and frame.at[0, "customer_payments.count_lifetime"] == 10
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
