"""Events producers publish to NATS subjects `d2d.in.<type>` (stream D2D_INGEST).

A durable pull consumer fetches them in batches; each message is acknowledged only after its
event is committed to the log or kept in dead letters. A crash before the ack means redelivery,
which the log's idempotency by event id makes harmless.

No message holds back others: when a batch fails for a reason other than the log being away (or
full), its messages are retried one by one, and a message that has failed `MAX_DELIVERIES` times
is kept in dead letters with the reason and acknowledged.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry import trace

from d2d import bus, telemetry
from d2d.deadletters import Rejected
from d2d.errors import Refusal
from d2d.eventlog import LOG_UNREACHABLE
from services.ingest.pipeline import Ingestor, candidate_from_json

log = logging.getLogger(__name__)

DURABLE = bus.INGEST_DURABLE
# Unacknowledged messages (the process died before committing) come back after this long.
ACK_WAIT_SECONDS = 10
# Deliveries of one message that failed before it is kept in dead letters instead.
MAX_DELIVERIES = 5


async def consume(
    nc: NATS,
    ingestor: Ingestor,
    stop: asyncio.Event,
    *,
    topology: bus.Topology | None = None,
    batch: int = 500,
) -> None:
    topology = topology or bus.Topology()
    stream, prefix = topology.ingest_stream, topology.ingest_prefix
    js = nc.jetstream()
    await bus.ensure_stream(js, topology.ingest_config())
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
            try:
                await _ingest_messages(ingestor, msgs, cut)
            except Exception:  # not even dead letters could be written: unacked, they come back
                log.exception("ingest: %d NATS events left for redelivery after %d s", len(msgs), ACK_WAIT_SECONDS)
    await sub.unsubscribe()


async def _ingest_messages(ingestor: Ingestor, msgs: list[Msg], cut: int) -> None:
    """Commit or dead-letter the messages' events, then acknowledge them; see the module's docstring."""
    candidates = []
    for m in msgs:
        c = candidate_from_json(f"nats:{m.subject}", m.subject[cut:], m.data)
        if m.headers and "traceparent" in m.headers:
            c.metadata.setdefault("traceparent", m.headers["traceparent"])
        candidates.append(c)
    try:
        await ingestor.ingest(candidates, traceparent=telemetry.current_traceparent())
    except (*LOG_UNREACHABLE, Refusal) as exc:  # the log is away or full: leave them for redelivery
        log.warning("ingest: %d NATS events not committed (%s); they will be redelivered", len(msgs), exc)
        for m in msgs:
            await m.nak(delay=1.0)
        return
    except Exception as exc:
        if len(msgs) > 1:
            log.warning("ingest: a batch of %d NATS events failed (%r); taking them one by one", len(msgs), exc)
            for m in msgs:
                await _ingest_messages(ingestor, [m], cut)
            return
        [m] = msgs
        deliveries = m.metadata.num_delivered or 1
        if deliveries < MAX_DELIVERIES:
            log.warning("ingest: %s failed on delivery %d (%r); it will be redelivered", m.subject, deliveries, exc)
            await m.nak(delay=1.0)
            return
        c = candidates[0]
        reason = f"ingest failed on this message {deliveries} times ({type(exc).__name__}); kept instead of retried"
        kept = Rejected(c.source, m.data, "INTERNAL", reason, "", c.event_id or None, c.type)
        await ingestor.dead_letters.keep([kept])
        log.error("ingest: %s kept in dead letters after %d failed deliveries", m.subject, deliveries, exc_info=exc)
    for m in msgs:
        await m.ack()
