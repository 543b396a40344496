"""No single input stops the platform (real Postgres and NATS): events Postgres cannot store, events
the bus cannot carry, event times out of bounds, oversized refusals and personal data in them. Each
case is refused alone, with a precise status naming the field, while every other caller's events in
the same window are stored, and the relay and the NATS intake keep going."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import nats
import orjson
import pytest
from google.protobuf import timestamp_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from d2d import bus
from d2d.client import IngestClient, make_event
from d2d.errors import Refusal
from d2d.eventlog import APPEND_LOCK_KEY, CommitDeadlineExceeded, EventLog, GroupCommitter
from d2d.limits import DEAD_LETTER_RAW_BYTES, MAX_EVENT_BYTES
from d2d.outbox import OutboxRelay
from d2d.runtime.servers import NatsServer
from d2d.v1 import ingest_pb2
from tests.test_eventlog import new_event
from tests.test_relay import wait_until

FREE_FORM = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}


@pytest.fixture
async def poison_contract(ingest: IngestClient) -> str:
    """A contract that accepts any JSON object, so only the platform's own limits refuse events."""
    await ingest.create_contract_version("test.poison", owner="tests", json_schema=FREE_FORM)
    return "test.poison"


def event(payload: dict | bytes | None = None, *, occurred_at: datetime | None = None, **kwargs: object) -> object:
    return make_event(
        "test.poison", "thing", kwargs.pop("entity_id", "thing_1"), payload if payload is not None else {"n": 1},  # type: ignore[arg-type]
        occurred_at=occurred_at or datetime.now(UTC), **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def violation_fields(status: object) -> list[str]:
    from google.rpc import error_details_pb2

    fields = []
    for detail in status.details:  # type: ignore[attr-defined]
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def log_count(database_url: str, event_type: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM events WHERE type = $1", event_type)
    finally:
        await conn.close()


# -- the group commit ------------------------------------------------------------------------


async def test_an_event_postgres_cannot_store_fails_only_its_own_caller(event_log: EventLog) -> None:
    committer = GroupCommitter(event_log)
    good = [[new_event(i)] for i in range(40)]
    not_json = [new_event(100, payload="{not json")]  # passes the checks; Postgres refuses it
    nul_id = [new_event(101, entity_id="a\x00b")]
    nul_metadata = [new_event(102, metadata={"producer": "x\x00"})]
    nul_payload = [new_event(103, payload='{"name": "a\\u0000b"}')]
    calls = [*good[:20], not_json, nul_id, *good[20:], nul_metadata, nul_payload]
    outcomes = await asyncio.gather(*(committer.append(c) for c in calls), return_exceptions=True)
    await committer.close()
    by_call = {id(c): o for c, o in zip(calls, outcomes, strict=True)}
    assert isinstance(by_call[id(not_json)], asyncpg.PostgresError)
    for bad, field in ((nul_id, "entity_id"), (nul_metadata, "metadata.producer"), (nul_payload, "payload.name")):
        refusal = by_call[id(bad)]
        assert isinstance(refusal, Refusal) and refusal.code == "INVALID_ARGUMENT" and refusal.field == field
    stored = {e.event_id for e in await event_log.read(0, 1000)}
    assert stored == {c[0].event_id for c in good}
    assert all(not isinstance(by_call[id(c)], BaseException) for c in good)


async def test_the_commit_queue_is_bounded_with_a_retry_delay(event_log: EventLog, database_url: str) -> None:
    committer = GroupCommitter(event_log, max_queued_events=100)
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)  # appends wait for it
    first = asyncio.create_task(committer.append([new_event(i) for i in range(50)]))
    await wait_until(lambda: _true(committer.transactions == 1))  # taken: blocked on the lock
    queued = [asyncio.create_task(committer.append([new_event(100 + i) for i in range(50)])) for _ in range(2)]
    await wait_until(lambda: _true(len(committer.batcher) == 2))
    with pytest.raises(Refusal) as refused:
        await committer.append([new_event(999)])
    assert refused.value.code == "RESOURCE_EXHAUSTED" and refused.value.retry_after
    await transaction.rollback()
    await blocker.close()
    results = await asyncio.gather(first, *queued)
    await committer.close()
    assert [len(r) for r in results] == [50, 50, 50]
    assert len(await event_log.read(0, 1000)) == 150


async def test_events_whose_deadline_passes_in_the_queue_are_not_stored(event_log: EventLog, database_url: str) -> None:
    import time

    committer = GroupCommitter(event_log)
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
    taken = asyncio.create_task(committer.append([new_event(1)]))
    await wait_until(lambda: _true(committer.transactions == 1))
    late = asyncio.create_task(committer.append([new_event(2)], deadline=time.monotonic() + 0.2))
    await asyncio.sleep(0.5)  # its deadline passes while the first transaction waits for the lock
    await transaction.rollback()
    await blocker.close()
    [stored] = await taken
    with pytest.raises(CommitDeadlineExceeded):
        await late
    await committer.close()
    assert [e.seq for e in await event_log.read(0, 10)] == [stored.seq]


async def _true(value: bool) -> bool:
    return value


# -- ingest over gRPC ------------------------------------------------------------------------


async def test_nul_characters_are_refused_naming_the_field_while_the_others_are_stored(
    ingest: IngestClient, poison_contract: str, database_url: str
) -> None:
    poisons = [
        (event(entity_id="a\x00b"), "events[1].entity_id"),
        (event(metadata={"note": "x\x00y"}), "events[1].metadata.note"),
        (event(b'{"name": "a\\u0000b"}'), "events[1].payload.name"),
        (event(b'{"list": [1, {"k": "\\u0000"}]}'), "events[1].payload.list[1].k"),
    ]
    requests = []
    for i in range(120):  # all at once, within the calls ingest holds at once (MAX_CONCURRENT_CALLS)
        poison, field = poisons[i % len(poisons)] if i % 3 == 0 else (None, "")
        batch = [event({"n": i}), *([poison] if poison else []), event({"n": i, "after": True})]
        requests.append((batch, field))
    answers = await asyncio.gather(*(ingest.append(batch) for batch, _ in requests))
    good = 0
    for (_, field), answer in zip(requests, answers, strict=True):
        assert answer.results[0].WhichOneof("outcome") == "seq" and answer.results[-1].WhichOneof("outcome") == "seq"
        good += 2
        if field:
            refused = answer.results[1]
            assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert violation_fields(refused.error) == [field] and "NUL" in refused.error.message
            assert refused.dead_letter
    assert await log_count(database_url, poison_contract) == good


async def test_event_times_out_of_bounds_are_refused_naming_occurred_at(ingest: IngestClient) -> None:
    await ingest.create_contract_version(
        "test.timed", owner="tests", json_schema=FREE_FORM, max_future_skew_seconds=60, max_age_seconds=86_400
    )
    contract = await ingest.get_contract_version("test.timed")
    assert contract.max_future_skew.seconds == 60 and contract.max_age.seconds == 86_400
    now = datetime.now(UTC)

    def timed(at: datetime) -> object:
        return make_event("test.timed", "thing", "t1", {"n": 1}, occurred_at=at)

    far_future = make_event("test.poison", "thing", "t1", {"n": 1}, occurred_at=datetime(9999, 12, 31, tzinfo=UTC))
    past_9999 = make_event("test.poison", "thing", "t1", {"n": 1}, occurred_at=now)
    past_9999.occurred_at.CopyFrom(timestamp_pb2.Timestamp(seconds=253_402_300_800 + 86_400))
    await ingest.create_contract_version("test.poison", owner="tests", json_schema=FREE_FORM)
    answer = await ingest.append(
        [timed(now + timedelta(minutes=2)), timed(now + timedelta(seconds=30)), timed(now - timedelta(days=2)),
         timed(now - timedelta(hours=1)), far_future, past_9999]
    )  # fmt: skip
    outcomes = [r.WhichOneof("outcome") for r in answer.results]
    assert outcomes == ["error", "seq", "error", "seq", "error", "error"]
    for i in (0, 2, 4, 5):
        error = answer.results[i].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert violation_fields(error) == [f"events[{i}].occurred_at"]
        assert answer.results[i].dead_letter


async def test_an_event_over_the_size_limit_is_refused_naming_the_part_that_is_too_big(
    ingest: IngestClient, poison_contract: str
) -> None:
    big_metadata = event(metadata={"blob": "m" * (2 << 20)})
    exactly = event(b'{"s": "' + b"x" * (MAX_EVENT_BYTES - 8) + b'"}')  # payload at the limit, ids over it
    answer = await ingest.append([event(), big_metadata, exactly, event()], timeout=60)
    assert [r.WhichOneof("outcome") for r in answer.results] == ["seq", "error", "error", "seq"]
    assert violation_fields(answer.results[1].error) == ["events[1].metadata"]
    assert violation_fields(answer.results[2].error) == ["events[2].payload"]
    assert str(MAX_EVENT_BYTES) in answer.results[2].error.message


async def test_dead_letters_keep_a_bounded_prefix_of_oversized_input(
    ingest: IngestClient, poison_contract: str
) -> None:
    huge = event(b'{"s": "' + b"x" * (15 << 20) + b'"}')
    raw = huge.SerializeToString()
    answer = await ingest.append([huge], timeout=60)
    assert violation_fields(answer.results[0].error) == ["events[0].payload"]
    [letter] = await ingest.list_dead_letters()
    assert len(letter.raw) == DEAD_LETTER_RAW_BYTES and letter.raw == raw[:DEAD_LETTER_RAW_BYTES]
    assert letter.raw_size == len(raw) and letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
    redriven = await ingest.stub.RedriveDeadLetters(
        ingest_pb2.RedriveDeadLettersRequest(names=[letter.name]), timeout=30
    )
    [result] = redriven.results
    assert result.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "send the event again" in (
        result.error.message
    )


async def test_refusals_never_repeat_a_personal_data_value(ingest: IngestClient) -> None:
    schema = {
        **FREE_FORM,
        "properties": {"email": {"type": "string", "pattern": "^[^@]+@[^@]+$"}, "age": {"type": "integer"}},
    }
    await ingest.create_contract_version("test.person", owner="tests", json_schema=schema, pii_fields=["/email"])
    secret = "jane.doe-secret-without-at-sign"
    bad_email = make_event("test.person", "person", "p1", {"email": secret}, occurred_at=datetime.now(UTC))
    bad_age = make_event("test.person", "person", "p1", {"age": "forty-two"}, occurred_at=datetime.now(UTC))
    answer = await ingest.append([bad_email, bad_age])
    email_error, age_error = (r.error for r in answer.results)
    assert violation_fields(email_error) == ["events[0].payload.email"] and secret not in email_error.message
    assert "forty-two" in age_error.message  # not personal data: the value helps the producer
    letters = await ingest.list_dead_letters(event_type="test.person")
    assert len(letters) == 2 and all(secret not in letter.error.message for letter in letters)


async def test_nats_intake_dead_letters_a_nul_event_and_commits_the_rest(
    ingest: IngestClient, poison_contract: str, nats_server: NatsServer, namespace: str, database_url: str
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    subject = f"{namespace}.d2d.in.test.poison"

    def envelope(entity_id: str, **payload: object) -> bytes:
        return orjson.dumps(
            {"event_id": str(uuid.uuid4()), "entity_type": "thing", "entity_id": entity_id,
             "occurred_at": datetime.now(UTC).isoformat(), "payload": payload or {"n": 1}}
        )  # fmt: skip

    await js.publish(subject, envelope("good_1"))
    await js.publish(subject, envelope("bad\u0000id"))
    await js.publish(subject, envelope("good_2", text="nul \u0000 inside"))
    await js.publish(subject, envelope("good_3"))

    async def settled() -> bool:
        info = await js.consumer_info(f"{namespace.upper()}_D2D_INGEST", "ingest")
        return (
            info.num_ack_pending == 0 and info.num_pending == 0 and await log_count(database_url, poison_contract) == 2
        )

    await wait_until(settled, timeout=30)
    letters = await ingest.list_dead_letters(event_type="test.poison")
    assert sorted(json.loads(d.raw)["entity_id"] for d in letters) == ["bad\x00id", "good_2"]
    assert {d.error.message.split(" contains")[0] for d in letters} == {"entity_id", "payload.text"}
    await nc.close()


# -- the relay -------------------------------------------------------------------------------


async def test_the_relay_skips_an_event_the_bus_cannot_carry_and_records_an_alert(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, spans: InMemorySpanExporter
) -> None:
    """An event stored before the limits held (appended here through the SQL function itself, as
    the owner) is larger than NATS's max_payload: the relay records it and goes on."""
    before, after = new_event(1), new_event(3)
    biggest_allowed = new_event(4, payload="[" + ",".join(["0"] * (MAX_EVENT_BYTES // 2 - 100)) + "]")  # grows 1.5x
    await event_log.append([before])
    owner = await asyncpg.connect(database_url)
    too_big_id = uuid.uuid4()
    await owner.execute(
        "SELECT * FROM append_events($1, ARRAY[$2::uuid], ARRAY['test.happened'], ARRAY[1], ARRAY['thing'],"
        " ARRAY['thing_2'], ARRAY[now()], ARRAY[$3::text], ARRAY['{}'])",
        APPEND_LOCK_KEY, too_big_id, json.dumps({"blob": "b" * (5 << 20)}),
    )  # fmt: skip
    await owner.close()
    await event_log.append([after, biggest_allowed])
    topology = bus.Topology(namespace)
    nc = await bus.connect(nats_server.url, name="test-relay")
    relay = OutboxRelay(
        event_log, nc.jetstream(), name="relay:test", stream=topology.events_stream,
        subject_prefix=topology.events_prefix,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    js = nc.jetstream()

    async def published() -> bool:
        try:
            return (await js.stream_info(topology.events_stream)).state.messages >= 4  # 3 events + the alert
        except Exception:
            return False

    await wait_until(published, timeout=30)
    stop.set()
    await task
    assert relay.stats.skipped == 1
    stored = await event_log.read(0, 100)
    [alert] = [e for e in stored if e.type == "quality.alert"]
    assert alert.payload["kind"] == "event_not_published" and alert.payload["event_id"] == str(too_big_id)
    assert alert.payload["size"] > nc.max_payload
    sub = await js.pull_subscribe(f"{topology.events_prefix}.>", stream=topology.events_stream)
    ids = [m.headers["Nats-Msg-Id"] for m in await sub.fetch(10, timeout=5)]
    assert ids == [str(before.event_id), str(after.event_id), str(biggest_allowed.event_id), str(alert.event_id)]
    await nc.close()
    [noted] = [e for s in spans.get_finished_spans() if s.name == "relay.publish" for e in s.events]
    assert noted.name == "event_not_published" and noted.attributes["d2d.event_id"] == str(too_big_id)


async def test_calls_beyond_the_concurrency_bound_are_refused_at_once_and_the_rest_are_stored(
    ingest: IngestClient, poison_contract: str, database_url: str
) -> None:
    """While the log is blocked, ingest holds about MAX_CONCURRENT_CALLS calls (grpc's count is not
    exact); more are refused (RESOURCE_EXHAUSTED, nothing stored) instead of piling up in memory."""
    from services.ingest.api import MAX_CONCURRENT_CALLS

    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
    calls = [
        asyncio.create_task(ingest.append([event({"n": i})], timeout=60)) for i in range(MAX_CONCURRENT_CALLS + 100)
    ]
    done, _ = await asyncio.wait(calls, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    refused = [c for c in done if isinstance(c.exception(), grpc.aio.AioRpcError)]
    assert refused and all(c.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused)
    await transaction.rollback()
    await blocker.close()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    stored = [o for o in outcomes if not isinstance(o, BaseException)]
    assert all(isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
               for o in outcomes if isinstance(o, BaseException))  # fmt: skip
    assert len(stored) < len(calls) and await log_count(database_url, poison_contract) == len(stored)
