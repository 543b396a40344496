"""Trace context travels from a producer's span through gRPC into the event's metadata and on to
the NATS message the relay publishes, so the whole path is one trace."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import grpc
import nats
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from d2d import bus, telemetry
from d2d.client import IngestClient, make_event
from d2d.eventlog import EventLog
from d2d.outbox import OutboxRelay
from d2d.runtime.servers import NatsServer


def trace_id_of(traceparent: str) -> int:
    return int(traceparent.split("-")[1], 16)


async def test_trace_context_reaches_event_metadata_and_the_bus(
    spans: InMemorySpanExporter, ingest: IngestClient, event_log: EventLog, nats_server: NatsServer, namespace: str
) -> None:
    payload = {"merchant_id": "mer_0001", "name": "Shop", "mcc": "5411", "category": "grocery",
               "country": "DE", "risk_tier": "low"}  # fmt: skip
    event = make_event("merchant.onboarded", "merchant", "mer_0001", payload, occurred_at=datetime.now(UTC))
    with telemetry.tracer("producer").start_as_current_span("produce") as producer:
        [result] = (await ingest.append([event])).results
    trace_id = producer.get_span_context().trace_id

    stored = await event_log.get(uuid.UUID(event.event_id))
    assert stored is not None and trace_id_of(stored.metadata["traceparent"]) == trace_id
    server_spans = [s for s in spans.get_finished_spans() if s.name == "/d2d.v1.IngestService/AppendEvents"]
    assert any(s.context.trace_id == trace_id and s.kind == trace.SpanKind.SERVER for s in server_spans)

    nc = await nats.connect(nats_server.url)
    topology = bus.Topology(namespace)
    relay = OutboxRelay(event_log, nc.jetstream(), name="relay:test", stream=topology.events_stream,
                        subject_prefix=topology.events_prefix)  # fmt: skip
    await bus.ensure_stream(nc.jetstream(), bus.events_stream_config(topology.events_stream, topology.events_prefix))
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    sub = await nc.jetstream().subscribe(f"{topology.events_prefix}.merchant.onboarded", stream=topology.events_stream)
    message = await sub.next_msg(timeout=10)
    stop.set()
    await running
    assert message.headers["Nats-Msg-Id"] == event.event_id
    assert int(message.headers["D2D-Seq"]) == result.seq
    assert trace_id_of(message.headers["traceparent"]) == trace_id
    await nc.close()


async def test_platform_events_carry_the_trace_of_the_call_that_caused_them(
    spans: InMemorySpanExporter, ingest: IngestClient, event_log: EventLog
) -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}
    with telemetry.tracer("operator").start_as_current_span("register") as operator:
        created = await ingest.create_contract_version("widget.spun", owner="team-widgets", json_schema=schema)
    [event] = [
        e for e in await event_log.read(0, 1000, types=["contract.registered"]) if e.seq == created.registered_seq
    ]
    assert trace_id_of(event.metadata["traceparent"]) == operator.get_span_context().trace_id


async def test_grpc_calls_are_client_and_server_spans_of_one_trace_with_their_status(
    spans: InMemorySpanExporter, ingest: IngestClient
) -> None:
    method = "/d2d.v1.IngestService/GetContractVersion"
    spans.clear()
    with telemetry.tracer("caller").start_as_current_span("caller") as caller:
        await ingest.get_contract_version("payment.authorized", 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ingest.get_contract_version("no.such.type", 1)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finished = [s for s in spans.get_finished_spans() if s.name == method]
    clients = [s for s in finished if s.kind == trace.SpanKind.CLIENT]
    servers = [s for s in finished if s.kind == trace.SpanKind.SERVER]
    assert len(clients) == len(servers) == 2
    for client, server, code in zip(clients, servers, (0, 5), strict=True):  # OK, then NOT_FOUND
        assert client.parent.span_id == caller.get_span_context().span_id
        assert server.parent.span_id == client.context.span_id, "the server span is the client span's child"
        assert server.context.trace_id == caller.get_span_context().trace_id
        for span in (client, server):
            assert span.attributes["rpc.grpc.status_code"] == code
            assert span.attributes["rpc.service"] == "d2d.v1.IngestService"
            assert span.attributes["rpc.method"] == "GetContractVersion"
            assert span.status.is_ok == (code == 0)
