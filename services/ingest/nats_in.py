"""Events producers publish to NATS subjects `d2d.in.<type>` (stream D2D_INGEST).

A durable pull consumer fetches them in batches; each message is acknowledged only after its
event is committed to the log or kept in dead letters. A crash before the ack means redelivery,
which the log's idempotency by event id makes harmless.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry import trace

from d2d import bus, telemetry
from services.ingest.pipeline import Ingestor, candidate_from_json

log = logging.getLogger(__name__)

DURABLE = "ingest"
# Unacknowledged messages (the process died before committing) come back after this long.
ACK_WAIT_SECONDS = 10


async def consume(
    nc: NATS,
    ingestor: Ingestor,
    stop: asyncio.Event,
    *,
    stream: str = bus.INGEST_STREAM,
    prefix: str = bus.INGEST_SUBJECT_PREFIX,
    batch: int = 500,
) -> None:
    js = nc.jetstream()
    await bus.ensure_stream(js, bus.ingest_stream_config(stream, prefix))
    sub = await js.pull_subscribe(
        f"{prefix}.>",
        durable=DURABLE,
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_SECONDS, max_ack_pending=20_000),
    )
    tracer = telemetry.tracer(__name__)
    cut = len(prefix) + 1
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except NatsTimeout:
            continue
        except Exception as exc:  # NATS reconnecting: wait and fetch again
            log.warning("ingest: fetch from %s failed: %s", stream, exc)
            await asyncio.sleep(0.5)
            continue
        links = [
            trace.Link(span_ctx)
            for m in msgs[:64]
            if (span_ctx := trace.get_current_span(telemetry.extract_context(m.headers)).get_span_context()).is_valid
        ]
        with tracer.start_as_current_span("ingest.consume", links=links, kind=trace.SpanKind.CONSUMER) as span:
            span.set_attribute("messaging.batch.message_count", len(msgs))
            candidates = []
            for m in msgs:
                c = candidate_from_json(f"nats:{m.subject}", m.subject[cut:], m.data)
                if m.headers and "traceparent" in m.headers:
                    c.metadata.setdefault("traceparent", m.headers["traceparent"])
                candidates.append(c)
            try:
                await ingestor.ingest(candidates, traceparent=telemetry.current_traceparent())
            except Exception as exc:  # the log is unreachable: leave them for redelivery
                log.warning("ingest: %d NATS events not committed (%s); they will be redelivered", len(msgs), exc)
                for m in msgs:
                    await m.nak(delay=1.0)
                continue
        for m in msgs:
            await m.ack()
    await sub.unsubscribe()
