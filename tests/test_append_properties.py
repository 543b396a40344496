"""Property-based tests of the append path (real ingest, Postgres and NATS): whatever a producer
sends — random bytes, deep JSON, NUL characters and lone surrogates, huge strings, extreme numbers
and timestamps — every event is answered, with a stored position or a precise refusal naming a
field, never UNKNOWN or INTERNAL, and exactly the events answered with a new position are in the log.
And a grpc handler that fails anyway never answers UNKNOWN."""

from __future__ import annotations

import json

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2d import auth, grpcserver
from d2d.client import IngestClient, error_details
from d2d.errors import Refusal
from d2d.runtime.servers import free_port
from d2d.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc
from tests.conftest import TEST_KEY_CREATED

PRECISE = {grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0]}
FREE_FORM = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}

odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20).map(lambda s: s + "\x00" + s),
    st.just("x" * 5000),
    st.sampled_from(["", " ", "\u202e", "\ufeff", "thing_1", "é" * 300]),
)
numbers = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0, 2**63, -(2**63) - 1]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, odd_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)),
    max_leaves=30,
)


def deep(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"1" + b"]" * depth + b"}"


payloads = st.one_of(
    st.dictionaries(odd_text, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=3000).map(deep),
    st.sampled_from(
        [
            b'{"s": "\\ud800"}',
            b'{"n": NaN}',
            b'{"n": Infinity}',
            b'{"n": 1e400}',
            b"[]",
            b"null",
            b'{"a":1,"a":2}',
            b'{"s": "\\u0000"}',
            b"\xff\xfe",
            b'{"k": "' + b"z" * 70_000 + b'"}',
        ]
    ),  # fmt: skip
)
seconds = st.one_of(
    st.integers(min_value=-62_135_596_800 - 10**6, max_value=253_402_300_799 + 10**6),  # around years 1..9999
    st.integers(min_value=-(2**62), max_value=2**62),
    st.just(None),
)


@st.composite
def events(draw: st.DrawFn) -> event_pb2.Event:
    event = event_pb2.Event(
        event_id=draw(st.one_of(st.uuids().map(str), odd_text)),
        type=draw(st.sampled_from(["test.anything", "payment.authorized", "no.contract"]) | odd_text),
        schema_version=draw(st.sampled_from([0, 0, 1, 2, 2**31 - 1])),
        entity_type=draw(odd_text),
        entity_id=draw(odd_text),
        payload=draw(payloads),
        metadata=draw(st.dictionaries(odd_text, odd_text, max_size=3)),
    )
    when = draw(seconds)
    if when is not None:
        event.occurred_at.seconds = when
        event.occurred_at.nanos = draw(st.integers(min_value=0, max_value=999_999_999))
    return event


async def count_events(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM events")
    finally:
        await conn.close()


@pytest.fixture
async def anything_contract(ingest: IngestClient) -> None:
    await ingest.create_contract_version("test.anything", owner="tests", json_schema=FREE_FORM)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(events(), min_size=1, max_size=8))
async def test_every_event_is_answered_precisely_and_only_answered_ones_are_stored(
    ingest: IngestClient, anything_contract: None, database_url: str, batch: list[event_pb2.Event]
) -> None:
    before = await count_events(database_url)
    answer = await ingest.append(batch, timeout=60)
    assert len(answer.results) == len(batch)
    fresh = 0
    for i, result in enumerate(answer.results):
        if result.WhichOneof("outcome") == "seq":
            fresh += not result.duplicate
            continue
        assert result.error.code in PRECISE, result.error
        bad = error_details_pb2.BadRequest()
        assert result.error.details[0].Unpack(bad), result.error  # a BadRequest naming the field
        assert bad.field_violations[0].field.startswith(f"events[{i}]")
        assert result.dead_letter  # kept, with what was received
    assert await count_events(database_url) - before == fresh == answer.appended_count


# -- what grpcserver does with a handler that fails anyway ----------------------------------


class Failing:
    """An IngestService every method of which raises what the test says."""

    def __init__(self) -> None:
        self.error: BaseException = ValueError("boom")

    def __getattr__(self, method: str) -> object:
        async def fail(request: object, context: object) -> object:
            raise self.error

        return fail


@pytest.fixture
async def failing() -> tuple[Failing, ingest_pb2_grpc.IngestServiceStub]:
    servicer = Failing()
    server, _ = grpcserver.new_server(["d2d.v1.IngestService"])
    keys = auth.KeyRing.of(TEST_KEY_CREATED)
    grpcserver.add_service(server, ingest_pb2.DESCRIPTOR.services_by_name["IngestService"], servicer, keys)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channel = grpcserver.channel(f"127.0.0.1:{port}")
    yield servicer, ingest_pb2_grpc.IngestServiceStub(channel)
    await channel.close()
    await server.stop(0)


async def test_a_handler_error_is_internal_with_a_trace_id_never_unknown(failing: tuple) -> None:
    servicer, stub = failing
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(ingest_pb2.AppendEventsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "ValueError" in caught.value.details() and "trace id" in caught.value.details()


async def test_a_refusal_escaping_a_handler_keeps_its_code_field_and_retry_delay(failing: tuple) -> None:
    servicer, stub = failing
    servicer.error = Refusal("RESOURCE_EXHAUSTED", "queue full; retry shortly", "events", retry_after=2.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(ingest_pb2.AppendEventsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(caught.value)
    [retry] = [d for d in details if isinstance(d, error_details_pb2.RetryInfo)]
    assert retry.retry_delay.seconds == 2
    assert [v.field for d in details if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations] == [
        "events"
    ]


async def test_postgres_away_escaping_a_handler_is_unavailable(failing: tuple) -> None:
    servicer, stub = failing
    servicer.error = asyncpg.CannotConnectNowError("the database system is starting up")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AppendEvents(ingest_pb2.AppendEventsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
