"""Serving under bad input and faults (issue 10): every bad context is refused naming its field and
decides nothing, a decision that cannot commit in time is answered UNAVAILABLE and never stands
unclaimed (withdrawn, or claimable by its request_id), and beyond its in-flight limit serving
refuses at once with RESOURCE_EXHAUSTED. Real Postgres and NATS; relay, features and registry as
their own processes, serving in this process (to set its in-flight limit)."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from d2d import eventlog
from d2d.client import RegistryClient, ServingClient, error_details
from d2d.config import Settings
from d2d.eventlog import APPEND_LOCK_KEY, EventLog
from d2d.runtime.servers import EmbeddedPostgres, NatsServer
from d2d.v1 import serving_pb2
from services.serving.server import serve
from tests.conftest import MODEL, Platform, context_of, entities_of, serving_platform

MAX_IN_FLIGHT = 32


@pytest.fixture(scope="module")
def trained(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    yield from serving_platform(postgres, nats_server, tmp_path_factory, serving_process=False)


@pytest.fixture(scope="module")
async def platform(trained: Platform) -> AsyncIterator[Platform]:
    """Serving in this process, with a small in-flight limit."""
    settings = Settings(
        database_url=trained.database_url, nats_url=trained.nats_url, nats_namespace=trained.namespace,
        addrs={"features": trained.features, "registry": trained.registry, "serving": trained.serving},
        serving_max_in_flight=MAX_IN_FLIGHT,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    async with ServingClient(trained.serving) as serving:
        await serving.wait_ready()
        payment = trained.payments[-1]
        await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="warm-up")
    yield trained
    stop.set()
    await asyncio.wait_for(task, 30)


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for d in error_details(error) if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations]  # fmt: skip


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    for d in error_details(error):
        if isinstance(d, error_details_pb2.RetryInfo):
            return d.retry_delay.ToNanoseconds() / 1e9
    return None


async def log_rows(platform: Platform, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(platform.database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def decisions_of_units(platform: Platform, units: list[str]) -> dict[str, asyncpg.Record]:
    rows = await log_rows(
        platform,
        "SELECT entity_id, payload->>'unit_id' AS unit_id, payload->>'request_id' AS request_id, seq FROM events"
        " WHERE type = 'decision.made' AND payload->>'unit_id' = ANY($1)",
        units,
    )
    return {r["unit_id"]: r for r in rows}


async def withdrawn_decisions(platform: Platform, decision_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = await log_rows(
        platform,
        "SELECT entity_id, payload FROM events WHERE type = 'decision.withdrawn' AND entity_id = ANY($1)",
        decision_ids,
    )
    return {r["entity_id"]: json.loads(r["payload"]) for r in rows}


def bad_requests(platform: Platform, tag: str) -> list[tuple[Any, str]]:
    """(request, the field it must be refused for); each with its own unit id `{tag}-{i}`."""
    payment = platform.payments[-2]
    good_entities, good_context = entities_of(payment), context_of(payment)
    cases: list[tuple[dict[str, str], dict[str, Any], str]] = [
        (good_entities, {**good_context, "amount": "abc"}, "context.amount"),
        (good_entities, {**good_context, "amount": [1.0, 2.0]}, "context.amount"),
        (good_entities, {**good_context, "amount": {"value": 1.0}}, "context.amount"),
        (good_entities, {**good_context, "amount": True}, "context.amount"),
        (good_entities, {**good_context, "amount": math.nan}, "context.amount"),
        (good_entities, {**good_context, "amount": math.inf}, "context.amount"),
        (good_entities, {**good_context, "amount": -math.inf}, "context.amount"),
        (good_entities, {**good_context, "note": {"deep": [1.0, math.nan]}}, "context.note.deep[1]"),
        (good_entities, {**good_context, "channel": ["ecom"]}, "context.channel"),  # a flag: a string
        (good_entities, {**good_context, "ip_country": {"code": "DE"}}, "context.ip_country"),  # equals
        (good_entities, {**good_context, "occurred_at": "yesterday"}, "context.occurred_at"),
        (good_entities, {**good_context, "occurred_at": "2026-01-01"}, "context.occurred_at"),
        (good_entities, {**good_context, "occurred_at": "9999-12-31T23:59:59Z"}, "context.occurred_at"),
        (good_entities, {**good_context, "occurred_at": "0001-01-01T00:00:00Z"}, "context.occurred_at"),
        (good_entities, {**good_context, "occurred_at": 1767225600.0}, "context.occurred_at"),
        (good_entities, {**good_context, "note": "a\x00b"}, "context.note"),
        (good_entities, {**good_context, "blob": "x" * (70 << 10)}, "context"),
        ({**good_entities, "customer": ""}, good_context, "entities.customer"),
        ({**good_entities, "customer": "c" * 300}, good_context, "entities.customer"),
        ({**good_entities, "customer": "cus\x00"}, good_context, "entities.customer"),
    ]
    requests = [
        (ServingClient.request(MODEL, entities, context, unit_id=f"{tag}-{i}", request_id=f"{tag}-r{i}"), field)
        for i, (entities, context, field) in enumerate(cases)
    ]
    requests.append(
        (ServingClient.request(MODEL, good_entities, good_context, unit_id=f"{tag}-x\x00"), "unit_id"),
    )
    return requests


async def test_each_bad_context_is_refused_naming_its_field_and_decides_nothing(platform: Platform) -> None:
    tag = f"bad-{uuid.uuid4().hex[:8]}"
    cases = bad_requests(platform, tag)
    good = [
        ServingClient.request(MODEL, entities_of(p), context_of(p), unit_id=f"{tag}-good-{i}")
        for i, p in enumerate(platform.payments[-4:])
    ]
    async with ServingClient(platform.serving) as serving:
        answers = await asyncio.gather(
            *(serving.stub.Predict(request, timeout=10) for request, _ in cases),
            *(serving.stub.Predict(request, timeout=10) for request in good),
            return_exceptions=True,
        )
        refused, served = answers[: len(cases)], answers[len(cases) :]
        for (_, field), answer in zip(cases, refused, strict=True):
            assert isinstance(answer, grpc.aio.AioRpcError), (field, answer)
            assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, answer)
            assert violations(answer) == [field], (field, answer.details())
        # the good requests in the same window were decided
        assert all(not isinstance(a, BaseException) and a.decision_id for a in served), served

        # a batch with one bad row is refused whole, naming the row, and decides none of its rows
        batch = [
            ServingClient.request(MODEL, entities_of(p), context_of(p), unit_id=f"{tag}-batch-{i}")
            for i, p in enumerate(platform.payments[-6:])
        ]
        batch[3].context["amount"] = "abc"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await serving.batch_predict(batch)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(caught.value) == ["requests[3].context.amount"]
        # and serving goes on answering
        again = await serving.batch_predict(batch[:3])
        assert len(again) == 3
    units = [r.unit_id for r, _ in cases if "\x00" not in r.unit_id] + [r.unit_id for r in batch]
    logged = await decisions_of_units(platform, units)
    assert sorted(logged) == [f"{tag}-batch-{i}" for i in range(3)]  # only the good batch's rows
    good_logged = await decisions_of_units(platform, [r.unit_id for r in good])
    assert {r["entity_id"] for r in good_logged.values()} == {a.decision_id for a in served}


async def waiting_for_append_lock(platform: Platform) -> bool:
    [row] = await log_rows(
        platform,
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()",
    )
    return row[0] > 0


async def until(condition: Any, what: str, attempts: int = 300) -> None:
    for _ in range(attempts):
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


async def unavailable_while_the_log_is_locked(
    platform: Platform, first: Any, queued: list[Any]
) -> tuple[grpc.aio.AioRpcError, list[grpc.aio.AioRpcError]]:
    """Hold the append lock; `first` is taken by a transaction (it waits for the lock), `queued`
    arrive behind it; every call's deadline passes before the lock is released. Serving answers a
    tenth of each deadline early: 2 s deadlines leave it 200 ms, enough on a loaded machine."""
    holder = await asyncpg.connect(platform.database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        async with ServingClient(platform.serving) as serving:
            first_call = asyncio.ensure_future(serving.stub.Predict(first, timeout=4))
            await until(lambda: waiting_for_append_lock(platform), "a transaction waits for the append lock")
            queued_answers = await asyncio.gather(
                *(serving.stub.Predict(r, timeout=2) for r in queued), return_exceptions=True
            )
            first_answer = (await asyncio.gather(first_call, return_exceptions=True))[0]
        await transaction.rollback()
    finally:
        await holder.close()
    answers = [first_answer, *queued_answers]
    for answer in answers:
        assert isinstance(answer, grpc.aio.AioRpcError), answer
        assert answer.code() == grpc.StatusCode.UNAVAILABLE, answer  # in time, not DEADLINE_EXCEEDED
        assert retry_after(answer) is not None, answer
    return first_answer, queued_answers  # type: ignore[return-value]


async def test_a_decision_committed_after_its_caller_was_answered_is_withdrawn(platform: Platform) -> None:
    tag = f"late-{uuid.uuid4().hex[:8]}"
    payment = platform.payments[-1]

    def request(unit: str, request_id: str = "") -> Any:
        return ServingClient.request(MODEL, entities_of(payment), context_of(payment), unit_id=unit,
                                     request_id=request_id)  # fmt: skip

    first = request(f"{tag}-taken")
    queued = [request(f"{tag}-queued-{i}") for i in range(4)] + [
        request(f"{tag}-queued-r{i}", f"{tag}-queued-r{i}") for i in range(2)
    ]
    taken_error, queued_errors = await unavailable_while_the_log_is_locked(platform, first, queued)
    assert "no decision was returned or recorded" in taken_error.details()
    assert "pass a request_id to make retries safe" in taken_error.details()
    for error, r in zip(queued_errors, queued, strict=True):
        expected = "retry with the same request_id" if r.request_id else "pass a request_id"
        assert expected in error.details(), error.details()

    # The taken decision commits once the lock is released, and is then withdrawn
    async def withdrawn() -> bool:
        made = await decisions_of_units(platform, [first.unit_id])
        return bool(made) and bool(await withdrawn_decisions(platform, [made[first.unit_id]["entity_id"]]))

    await until(withdrawn, "the late decision is withdrawn")
    made = await decisions_of_units(platform, [first.unit_id])
    decision = made[first.unit_id]["entity_id"]
    [payload] = (await withdrawn_decisions(platform, [decision])).values()
    assert payload["decision_id"] == decision and payload["model"] == MODEL and payload["reason"]
    # the queued ones' deadlines passed before a transaction took them: never committed
    assert await decisions_of_units(platform, [r.unit_id for r in queued]) == {}
    # a withdrawn decision is logged once, after its decision
    [withdrawal] = await log_rows(
        platform, "SELECT seq FROM events WHERE type = 'decision.withdrawn' AND entity_id = $1", decision
    )
    assert withdrawal["seq"] > made[first.unit_id]["seq"]


async def test_a_late_decision_with_a_request_id_stands_and_a_retry_returns_it(platform: Platform) -> None:
    tag = f"claim-{uuid.uuid4().hex[:8]}"
    payment = platform.payments[-1]
    first = ServingClient.request(MODEL, entities_of(payment), context_of(payment), unit_id=f"{tag}-taken",
                                  request_id=f"{tag}-r")  # fmt: skip
    queued = [
        ServingClient.request(
            MODEL, entities_of(payment), context_of(payment), unit_id=f"{tag}-queued-{i}", request_id=f"{tag}-q{i}"
        )  # fmt: skip
        for i in range(3)
    ]
    taken_error, _ = await unavailable_while_the_log_is_locked(platform, first, queued)
    assert "retry with the same request_id" in taken_error.details()

    async def committed() -> bool:
        return bool(await decisions_of_units(platform, [first.unit_id]))

    await until(committed, "the late decision commits")
    made = await decisions_of_units(platform, [first.unit_id])
    decision = made[first.unit_id]["entity_id"]
    async with ServingClient(platform.serving) as serving:
        retried = await serving.stub.Predict(first, timeout=10)
        # a decision after it in the log: any withdrawal of the first would have been appended by now
        await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id=f"{tag}-after")
    assert retried.decision_id == decision and retried.seq == made[first.unit_id]["seq"]
    assert await withdrawn_decisions(platform, [decision]) == {}
    assert await decisions_of_units(platform, [r.unit_id for r in queued]) == {}
    # and the queued requests, retried with their request ids, are decided now
    async with ServingClient(platform.serving) as serving:
        answers = await asyncio.gather(*(serving.stub.Predict(r, timeout=10) for r in queued))
    assert len({a.decision_id for a in answers}) == len(queued)


async def test_beyond_the_in_flight_limit_calls_are_refused_at_once_and_serving_goes_on(platform: Platform) -> None:
    tag = f"load-{uuid.uuid4().hex[:8]}"
    payment = platform.payments[-1]
    extra = 16
    requests = [
        ServingClient.request(MODEL, entities_of(payment), context_of(payment), unit_id=f"{tag}-{i}")
        for i in range(MAX_IN_FLIGHT + extra)
    ]
    holder = await asyncpg.connect(platform.database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        async with ServingClient(platform.serving) as serving:
            calls = [asyncio.ensure_future(serving.stub.Predict(r, timeout=60)) for r in requests]

            async def refused_enough() -> bool:
                return sum(c.done() for c in calls) >= extra

            # the admitted ones wait for the log; the rest are answered while it is still locked
            await until(refused_enough, "the calls over the limit are answered")
            refused_calls = [c for c in calls if c.done()]
            refused = [c.exception() for c in refused_calls]
            # a batch does not fit either while the limit is reached
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await serving.batch_predict(requests[:2])
            await transaction.rollback()
            admitted = await asyncio.gather(*(c for c in calls if c not in refused_calls))
    finally:
        await holder.close()
    assert len(refused) == extra
    for error in refused:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert retry_after(error) is not None
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after(caught.value) is not None
    assert len(admitted) == MAX_IN_FLIGHT and all(a.decision_id for a in admitted)
    # serving keeps answering: a Predict, and a batch as large as the limit
    async with ServingClient(platform.serving) as serving:
        assert (await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id=f"{tag}-after")).seq
        assert len(await serving.batch_predict(requests[:MAX_IN_FLIGHT])) == MAX_IN_FLIGHT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await serving.batch_predict(requests[: MAX_IN_FLIGHT + 1])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(caught.value) == ["requests"]


async def test_a_model_that_cannot_be_served_is_a_precise_status_naming_the_model(platform: Platform) -> None:
    async with RegistryClient(platform.registry) as registry:
        await registry.create_model("untrained")
    payment = platform.payments[-1]
    async with ServingClient(platform.serving) as serving:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await serving.predict("untrained", entities_of(payment), context_of(payment), unit_id="u")
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert violations(caught.value) == ["model"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await serving.stub.Predict(serving_pb2.PredictRequest(model="fraud", unit_id="u"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(caught.value) == ["model"]


async def test_min_feature_watermark_waits_for_the_features_or_answers_unavailable(platform: Platform) -> None:
    """Read-your-writes: a Predict asking for features at or past a log position is decided on a state
    that reflects it; one the features cannot reach before the deadline gets UNAVAILABLE, retryable,
    and decides nothing; a negative position is refused naming the field."""
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    try:
        log = EventLog(pool)
        head = await log.head()
        async with ServingClient(platform.serving) as serving:
            payment = platform.payments[-1]
            request = ServingClient.request(MODEL, entities_of(payment), context_of(payment), unit_id="rw")
            request.min_feature_watermark = head
            answer = await serving.stub.Predict(request, timeout=10)
            assert answer.feature_watermark >= head
            before = await log.head()
            request.min_feature_watermark = before + 1_000_000
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await serving.stub.Predict(request, timeout=1)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert f"not yet {before + 1_000_000}" in caught.value.details()
            assert retry_after(caught.value) is not None
            assert await log.head() == before  # nothing decided
            request.min_feature_watermark = -1
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await serving.stub.Predict(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert violations(caught.value) == ["min_feature_watermark"]
    finally:
        await pool.close()
