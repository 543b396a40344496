"""The ingest service on real Postgres and NATS: contracts, per-event results, dead letters,
limits and malformed input."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import nats
import pytest
from google.rpc import error_details_pb2

from d2d import grpcserver
from d2d.client import IngestClient, error_details, make_event
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.v1 import ingest_pb2
from services.ingest.server import relay, serve
from tests.conftest import run_cli, settings_for

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def payment(payment_id: str = "pay_00000001", **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "payment_id": payment_id, "customer_id": "cus_000001", "card_id": "card_000001_1",
        "merchant_id": "mer_0001", "amount": 42.5, "currency": "EUR", "channel": "ecom",
        "ip_country": "DE", "device_id": "dev_0123456789ab",
    }  # fmt: skip
    body.update(overrides)
    return body


def payment_event(payload: dict[str, object] | bytes, **kwargs: object) -> object:
    return make_event("payment.authorized", "payment", "pay_00000001", payload, occurred_at=NOW, **kwargs)  # type: ignore[arg-type]


async def test_valid_batch_gets_positions_in_order(ingest: IngestClient) -> None:
    events = [payment_event(payment(f"pay_{i:08d}")) for i in range(1, 6)]
    response = await ingest.append(events)
    seqs = [r.seq for r in response.results]
    assert [r.event_id for r in response.results] == [e.event_id for e in events]
    assert (
        seqs == sorted(seqs) and len(set(seqs)) == 5 and all(r.WhichOneof("outcome") == "seq" for r in response.results)
    )
    assert response.appended_count == 5 and response.head_seq == seqs[-1]


async def test_resent_batch_is_answered_with_first_positions(ingest: IngestClient) -> None:
    events = [payment_event(payment(f"pay_{i:08d}")) for i in range(1, 4)]
    first = await ingest.append(events)
    again = await ingest.append(events)
    assert [r.seq for r in again.results] == [r.seq for r in first.results]
    assert all(r.duplicate for r in again.results) and again.appended_count == 0


async def test_event_breaking_its_contract_is_refused_naming_the_field_and_kept(ingest: IngestClient) -> None:
    good = payment_event(payment())
    bad = payment_event(payment(amount="lots"))
    response = await ingest.append([good, bad])
    ok, refused = response.results
    assert ok.WhichOneof("outcome") == "seq"
    assert refused.WhichOneof("outcome") == "error"
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "payload.amount" in refused.error.message
    violation = error_details_pb2.BadRequest()
    assert refused.error.details[0].Unpack(violation)
    assert violation.field_violations[0].field == "events[1].payload.amount"
    [letter] = await ingest.list_dead_letters()
    assert letter.name == refused.dead_letter and letter.event_id == bad.event_id
    assert letter.raw == bad.SerializeToString()
    assert "payload.amount" in letter.error.message and letter.source == "grpc"


async def test_missing_required_field_is_named(ingest: IngestClient) -> None:
    body = payment()
    del body["currency"]
    [result] = (await ingest.append([payment_event(body)])).results
    assert "payload.currency" in result.error.message


async def test_unknown_event_type_is_not_found_and_kept(ingest: IngestClient) -> None:
    event = make_event("widget.spun", "widget", "w1", {"x": 1}, occurred_at=NOW)
    [result] = (await ingest.append([event])).results
    assert result.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "widget.spun" in result.error.message
    assert [d.event_id for d in await ingest.list_dead_letters()] == [event.event_id]


async def test_unknown_schema_version_is_not_found_naming_the_field_and_kept(ingest: IngestClient) -> None:
    good = payment_event(payment("pay_00000002"), schema_version=1)
    unknown = payment_event(payment("pay_00000003"), schema_version=7)
    results = (await ingest.append([good, unknown])).results
    assert results[0].WhichOneof("outcome") == "seq"  # the other event of the batch is stored
    assert results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "payment.authorized" in results[1].error.message and "7" in results[1].error.message
    violation = error_details_pb2.BadRequest()
    results[1].error.details[0].Unpack(violation)
    assert violation.field_violations[0].field == "events[1].schema_version"
    assert [d.event_id for d in await ingest.list_dead_letters()] == [unknown.event_id]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.get_contract_version("payment.authorized", 7)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "versions/7" in caught.value.details()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda e: setattr(e, "event_id", "not-a-uuid"), "events[0].event_id"),
        (lambda e: e.ClearField("occurred_at"), "events[0].occurred_at"),
        (lambda e: setattr(e, "entity_id", ""), "events[0].entity_id"),
        (lambda e: setattr(e, "payload", b"{not json"), "events[0].payload"),
        (lambda e: setattr(e, "payload", b"[1, 2]"), "events[0].payload"),
    ],
)
async def test_broken_envelope_is_refused_with_the_field(ingest: IngestClient, mutate, field: str) -> None:
    event = payment_event(payment())
    mutate(event)
    [result] = (await ingest.append([event])).results
    assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    violation = error_details_pb2.BadRequest()
    result.error.details[0].Unpack(violation)
    assert violation.field_violations[0].field == field


async def test_oversized_batch_is_invalid_argument_naming_the_limit(ingest: IngestClient) -> None:
    events = [payment_event(payment())] * 10_001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.append(events)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10000" in caught.value.details() and "10001" in caught.value.details()
    [bad_request, info] = error_details(caught.value)
    assert bad_request.field_violations[0].field == "events" and info.reason == "BATCH_TOO_LARGE"
    assert (await ingest.append([payment_event(payment())])).appended_count == 1  # still serving


async def test_oversized_message_is_resource_exhausted_naming_the_limit(ingest: IngestClient) -> None:
    big = payment_event(payment(device_id="x" * (17 * 1024 * 1024)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.append([big])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(16 * 1024 * 1024) in caught.value.details()
    assert (await ingest.append([payment_event(payment())])).appended_count == 1


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x0a\x05\x0a\x03\xc3\x28\x00", b"\x0a"])
async def test_malformed_request_bytes_are_invalid_argument(ingest: IngestClient, garbage: bytes) -> None:
    call = ingest.channel.unary_unary(
        "/d2d.v1.IngestService/AppendEvents", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(garbage, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid d2d.v1.AppendEventsRequest" in caught.value.details()
    assert (await ingest.append([payment_event(payment())])).appended_count == 1


async def test_stream_append_commits_every_batch_and_reports_refusals(ingest: IngestClient) -> None:
    batches = [[payment_event(payment(f"pay_{b * 100 + i:08d}")) for i in range(50)] for b in range(6)]
    batches[3][7] = payment_event(payment(channel="carrier-pigeon"))
    response = await ingest.stream_append(batches)
    assert response.received_count == 300 and response.appended_count == 299 and response.rejected_count == 1
    violation = error_details_pb2.BadRequest()
    response.rejected[0].error.details[0].Unpack(violation)
    assert violation.field_violations[0].field == "events[157].payload.channel"


async def test_incompatible_contract_version_is_refused_naming_the_field(ingest: IngestClient) -> None:
    current = await ingest.get_contract_version("payment.authorized")
    schema = json.loads(current.json_schema)
    schema["properties"]["risk_score"] = {"type": "number"}
    schema["required"] = [*schema["required"], "risk_score"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.create_contract_version("payment.authorized", owner="team-payments", json_schema=schema)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "risk_score" in caught.value.details() and "BACKWARD" in caught.value.details()
    [bad_request] = error_details(caught.value)
    assert "risk_score" in bad_request.field_violations[0].field
    assert (await ingest.get_contract_version("payment.authorized")).version == current.version


async def test_compatible_contract_version_is_registered_and_used(ingest: IngestClient) -> None:
    current = await ingest.get_contract_version("payment.authorized")
    schema = json.loads(current.json_schema)
    schema["properties"]["risk_score"] = {"type": "number"}
    created = await ingest.create_contract_version("payment.authorized", owner="team-payments", json_schema=schema)
    assert created.version == current.version + 1 and created.name.endswith(f"/versions/{created.version}")
    [result] = (await ingest.append([payment_event(payment(risk_score=0.3))])).results
    assert result.WhichOneof("outcome") == "seq"
    [old] = (await ingest.append([payment_event(payment("pay_00000009", risk_score=0.3), schema_version=1)])).results
    assert "risk_score" in old.error.message  # version 1 forbids the new field
    names = [c.name for c in await ingest.list_contract_versions("payment.authorized")]
    assert names == ["contracts/payment.authorized/versions/1", "contracts/payment.authorized/versions/2"]


async def test_redrive_appends_a_fixed_dead_letter_once(ingest: IngestClient) -> None:
    bad = payment_event(payment(amount=-5))
    [refused] = (await ingest.append([bad])).results
    still = await ingest.redrive_dead_letters([refused.dead_letter])
    assert still.redriven_count == 0 and "payload.amount" in still.results[0].error.message
    fixed = json.dumps(payment(amount=5)).encode()
    done = await ingest.redrive_dead_letters([refused.dead_letter], payload=fixed)
    assert done.redriven_count == 1 and done.results[0].event_id == bad.event_id
    assert await ingest.list_dead_letters() == []
    [letter] = await ingest.list_dead_letters(show_redriven=True)
    assert letter.state == letter.REDRIVEN and letter.redriven_seq == done.results[0].seq
    again = await ingest.redrive_dead_letters()
    assert again.redriven_count == 0 and len(again.results) == 0


async def test_nats_intake_commits_before_ack_and_keeps_bad_messages(
    ingest: IngestClient, nats_server: NatsServer, namespace: str
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    good_id = str(uuid.uuid4())
    envelope = {"event_id": good_id, "entity_type": "payment", "entity_id": "pay_00000001",
                "occurred_at": NOW.isoformat(), "payload": payment()}  # fmt: skip
    await js.publish(f"{namespace}.d2d.in.payment.authorized", json.dumps(envelope).encode())
    await js.publish(f"{namespace}.d2d.in.payment.authorized", b"\x00garbage")
    for _ in range(100):
        letters = await ingest.list_dead_letters()
        info = await js.consumer_info(f"{namespace.upper()}_D2D_INGEST", "ingest")
        if letters and info.num_ack_pending == 0 and info.num_pending == 0:
            break
        await asyncio.sleep(0.1)
    [letter] = letters
    assert letter.raw == b"\x00garbage" and letter.source == f"nats:{namespace}.d2d.in.payment.authorized"
    again = await ingest.append([payment_event(payment(), event_id=good_id)])
    assert again.results[0].duplicate  # the NATS event is in the log
    await nc.close()


async def test_health_needs_no_key_and_reflection_is_off_unless_enabled(
    ingest: IngestClient, database_url: str, nats_server: NatsServer, namespace: str
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def services_listed(target: str) -> set[str]:
        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async with grpcserver.channel(target, api_key="") as anonymous:
            reflection = reflection_pb2_grpc.ServerReflectionStub(anonymous)
            async for answer in reflection.ServerReflectionInfo(ask(), timeout=5):
                return {s.name for s in answer.list_services_response.service}
        return set()

    async with grpcserver.channel(ingest.target, api_key="") as anonymous:
        health = health_pb2_grpc.HealthStub(anonymous)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="d2d.v1.IngestService"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as off:
        await services_listed(ingest.target)
    assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED

    port = free_port()
    enabled = dataclasses.replace(settings_for(database_url, nats_server.url, namespace, port), grpc_reflection=True)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(enabled, stop))
    try:
        async with IngestClient(f"127.0.0.1:{port}") as client:
            await client.wait_ready()
        assert {"d2d.v1.IngestService", "grpc.health.v1.Health"} <= await services_listed(f"127.0.0.1:{port}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def cli_env(ingest: IngestClient, database_url: str) -> dict[str, str]:
    return {"D2D_INGEST_ADDR": ingest.target, "D2D_DATABASE_URL": database_url, "D2D_NATS_URL": "nats://unused"}


async def test_dlq_commands_list_and_redrive(ingest: IngestClient, database_url: str, tmp_path: Path) -> None:
    bad = payment_event(payment(currency="USD"))
    [refused] = (await ingest.append([bad])).results
    env = cli_env(ingest, database_url)
    code, listing = await run_cli(env, "dlq", "list")
    assert code == 0 and refused.dead_letter in listing and bad.event_id in listing and "payload.currency" in listing
    code, out = await run_cli(env, "dlq", "redrive", refused.dead_letter)
    assert code == 1 and "still refused" in out
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps(payment(currency="EUR")))
    code, out = await run_cli(
        cli_env(ingest, database_url), "dlq", "redrive", refused.dead_letter, "--payload", str(fixed)
    )
    assert code == 0 and "1 of 1 redriven" in out
    code, head = await run_cli(env, "log", "head", "-n", "1")
    assert code == 0 and "payment.authorized" in head
    code, head = await run_cli(env, "log", "head", "-n", "3", "--type", "contract.registered")
    assert code == 0 and "contract/payment.authorized" in head and "payment/pay_" not in head, head


async def test_unreachable_log_is_unavailable_with_retry_info_and_then_recovers(
    ingest: IngestClient, database_url: str, postgres: EmbeddedPostgres
) -> None:
    database = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres.admin_url())
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ingest.append([payment_event(payment())])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "event log is unreachable" in caught.value.details()
        assert any(isinstance(d, error_details_pb2.RetryInfo) for d in error_details(caught.value))
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    event = payment_event(payment())
    [result] = (await ingest.append([event])).results
    assert result.WhichOneof("outcome") == "seq" and not result.duplicate


# -- the log over gRPC: ListEvents and GetEventLog (what `d2d log head` and `d2d demo` show) --------


def _violated_field(error: grpc.aio.AioRpcError) -> str:
    [bad_request] = [d for d in error_details(error) if isinstance(d, error_details_pb2.BadRequest)]
    return bad_request.field_violations[0].field


async def test_list_events_pages_newest_first_and_filters_by_type_and_entity(ingest: IngestClient) -> None:
    events = [
        make_event("payment.authorized", "payment", f"pay_{i:08d}", payment(f"pay_{i:08d}"), occurred_at=NOW)
        for i in range(1, 8)
    ]
    seqs = [r.seq for r in (await ingest.append(events)).results]
    listed, token = [], ""
    while True:
        page = await ingest.stub.ListEvents(
            ingest_pb2.ListEventsRequest(page_size=3, page_token=token, event_type="payment.authorized")
        )
        assert len(page.events) <= 3 and page.head_seq == seqs[-1]
        listed += page.events
        token = page.next_page_token
        if not token:
            break
    assert [e.seq for e in listed] == seqs[::-1]
    newest = listed[0]
    assert (newest.event_id, newest.type, newest.entity_type, newest.entity_id) == (
        events[-1].event_id, "payment.authorized", "payment", "pay_00000007",
    )  # fmt: skip
    assert json.loads(newest.payload) == payment("pay_00000007")
    assert newest.occurred_at.ToDatetime(tzinfo=UTC) == NOW and newest.recorded_at.seconds > 0

    everything, head = await ingest.list_events(limit=1000)  # the contracts' registrations are events too
    assert head == seqs[-1] and [e.seq for e in everything[:7]] == seqs[::-1]
    assert [e.seq for e in everything] == sorted((e.seq for e in everything), reverse=True)
    assert len(everything) > 7 and {e.type for e in everything[7:]} == {"contract.registered", "api_key.created"}

    [one], _ = await ingest.list_events(entity_type="payment", entity_id="pay_00000004")
    assert one.seq == seqs[3]
    assert (await ingest.list_events(entity_type="customer"))[0] == []
    assert (await ingest.list_events(event_type="payment.captured"))[0] == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [({"page_token": "x"}, "page_token"), ({"page_size": -1}, "page_size"), ({"entity_id": "pay_1"}, "entity_type")],
)
async def test_list_events_refuses_bad_requests_naming_the_field(
    ingest: IngestClient, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.ListEvents(ingest_pb2.ListEventsRequest(**request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and _violated_field(caught.value) == field


async def test_event_log_reports_head_published_position_dead_letters_and_counts(
    ingest: IngestClient, database_url: str, nats_server: NatsServer, namespace: str
) -> None:
    before = await ingest.get_event_log(counts=True)
    good = [payment_event(payment(f"pay_{i:08d}")) for i in range(1, 4)]
    response = await ingest.append([*good, payment_event(payment(currency="USD"))])
    head = max(r.seq for r in response.results if r.WhichOneof("outcome") == "seq")

    after = await ingest.get_event_log(counts=True)
    assert after.name == "eventLog" and after.head_seq == head
    assert after.pending_dead_letters == before.pending_dead_letters + 1
    assert after.event_counts["payment.authorized"] == before.event_counts.get("payment.authorized", 0) + 3
    assert after.event_counts["contract.registered"] == before.event_counts["contract.registered"] > 0
    basic = await ingest.get_event_log()
    assert basic.head_seq == head and not basic.event_counts

    # the relay of this namespace publishes the log; GetEventLog reads its checkpoint
    stop = asyncio.Event()
    relaying = asyncio.create_task(relay(settings_for(database_url, nats_server.url, namespace, 0), stop))
    try:
        for _ in range(600):
            if (await ingest.get_event_log()).published_seq >= head:
                break
            await asyncio.sleep(0.1)
        assert (await ingest.get_event_log()).published_seq == head
    finally:
        stop.set()
        await asyncio.wait_for(relaying, 30)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.GetEventLog(ingest_pb2.GetEventLogRequest(name="eventLogs/1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and _violated_field(caught.value) == "name"
