"""Folds the event stream (JetStream D2D_EVENTS) into the online state, and snapshots it.

The durable pull consumer takes only the views' source types (`d2d.events.<type>`), so the rest of
the log (decisions above all) never reaches this process. It is (re)created at every start right
after the stream position of the loaded snapshot, so a restart replays exactly the events the
snapshot lacks, in order. Messages are acknowledged (AckAll) only once a snapshot that includes
them is committed to Postgres. Each message names the previous event of its type
(`D2D-Prev-Of-Type`); one whose predecessor was not folded is a gap, filled from the log itself.
When a fetch finds nothing and the consumer has nothing pending, every source event up to the
stream's last message is folded, so the watermark moves to that message's position.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import trace

from d2d import bus, telemetry
from d2d.eventlog import EventLog
from d2d.features.store import Snapshot, save_snapshot
from services.features.online import GapError, OnlineState

log = logging.getLogger(__name__)


class Folder:
    def __init__(
        self,
        nc: NATS,
        event_log: EventLog,
        state: OnlineState,
        *,
        consumer: str,
        topology: bus.Topology,
        snapshot_every_events: int = 50_000,
        snapshot_every_seconds: float = 5.0,
        batch: int = 1000,
    ) -> None:
        self.nc = nc
        self.log = event_log
        self.state = state
        self.consumer = consumer
        self.topology = topology
        self.snapshot_every_events = snapshot_every_events
        self.snapshot_every_seconds = snapshot_every_seconds
        self.batch = batch
        self.caught_up = asyncio.Event()
        self.snapshots = 0
        self._tracer = telemetry.tracer(__name__)

    @property
    def durable(self) -> str:
        return self.consumer.replace(".", "_").replace(":", "_")

    async def subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        """The durable pull consumer, (re)created right after the state's stream position."""
        stream, prefix = self.topology.events_stream, self.topology.events_prefix
        await bus.ensure_stream(js, bus.events_stream_config(stream, prefix))
        try:
            await js.delete_consumer(stream, self.durable)
        except NotFoundError:
            pass
        start = self.state.stream_seq + 1
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None,
            ack_policy=AckPolicy.ALL,
            ack_wait=600,
            max_ack_pending=-1,
        )
        config.filter_subjects = [f"{prefix}.{source}" for source in self.state.sources]
        log.info("features: folding from seq %d (stream seq %d)", self.state.watermark + 1, start)
        return await js.pull_subscribe("", durable=self.durable, stream=stream, config=config)

    async def run(self, stop: asyncio.Event) -> None:
        js = self.nc.jetstream()
        stream, prefix = self.topology.events_stream, self.topology.events_prefix
        sub = await self.subscribe(js)
        cut = len(prefix) + 1
        last_snapshot_at, folded_since = time.monotonic(), 0
        unacked = None
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self.batch, timeout=0.5)
            except NatsTimeout:
                msgs = []
                await self._advance_when_idle(js, stream)
                self.caught_up.set()
            except Exception as exc:  # NATS reconnecting
                log.warning("features: fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if msgs:
                with self._tracer.start_as_current_span(
                    "features.fold", kind=trace.SpanKind.CONSUMER, links=telemetry.links(m.headers for m in msgs[:32])
                ) as span:
                    span.set_attribute("messaging.batch.message_count", len(msgs))
                    for m in msgs:
                        seq, type_ = int(m.headers["D2D-Seq"]), m.subject[cut:]
                        prev_of_type = m.headers.get("D2D-Prev-Of-Type")  # absent from older relays' messages
                        prev = int(prev_of_type) if prev_of_type is not None else None
                        try:
                            self.state.offer(seq, type_, m.data, m.metadata.sequence.stream, prev)
                        except GapError as gap:
                            await self._fill_gap(gap)
                            self.state.offer(seq, type_, m.data, m.metadata.sequence.stream, prev)
                    span.set_attribute("d2d.watermark", self.state.watermark)
                folded_since += len(msgs)
                unacked = msgs[-1]
                if len(msgs) < self.batch:
                    self.caught_up.set()
            due = time.monotonic() - last_snapshot_at >= self.snapshot_every_seconds
            if unacked is not None and (folded_since >= self.snapshot_every_events or due):
                try:
                    await self.snapshot()
                except Exception as exc:  # Postgres away: keep folding and serving, snapshot later
                    log.warning("features: snapshot failed (%s); will retry", exc)
                    last_snapshot_at = time.monotonic()
                    continue
                await unacked.ack()  # AckAll: everything up to here is in the snapshot
                unacked, folded_since, last_snapshot_at = None, 0, time.monotonic()
        if unacked is not None:
            await self.snapshot()
            await unacked.ack()
        await sub.unsubscribe()

    async def _fill_gap(self, gap: GapError) -> None:
        """Read the events of one type the stream skipped straight from the log."""
        log.warning("features: %s; reading them from the log", gap)
        after = gap.after
        while after < gap.through:
            events = [e for e in await self.log.read(after, 1000, types=[gap.type]) if e.seq <= gap.through]
            if not events:
                raise RuntimeError(f"features: the log has no {gap.type} event in ({after}, {gap.through}]")
            for e in events:
                self.state.offer_event(e.seq, e.type, e.schema_version, e.occurred_at.timestamp(), e.payload)
            after = events[-1].seq

    async def _advance_when_idle(self, js: JetStreamContext, stream: str) -> None:
        """Nothing came: if the consumer has nothing pending and nothing delivered that is not
        folded, the watermark may move to the position of the stream's last message, whatever its
        type (read before the consumer's counts, so no source event at or below it can still be on
        its way). "Delivered" matters: a pull request that expired client-side can still be served,
        and its messages wait in the client's queue for the next fetch, no longer pending on the
        server; moving past them would claim state this process does not hold yet."""
        try:
            last = (await js.stream_info(stream)).state.last_seq
            if not last or last <= self.state.stream_seq:
                return
            message = await js.get_msg(stream, last)
            seq = int((message.headers or {}).get("D2D-Seq", 0))
            info = await js.consumer_info(stream, self.durable)
            delivered = info.delivered.stream_seq if info.delivered is not None else 0
            if seq and info.num_pending == 0 and delivered <= self.state.stream_seq:
                self.state.advance(seq, last)
        except Exception as exc:  # NATS reconnecting: try at the next idle fetch
            log.debug("features: idle watermark check failed: %s", exc)

    async def snapshot(self) -> None:
        data = await asyncio.to_thread(self.state.to_bytes)
        await save_snapshot(
            self.log.pool,
            Snapshot(self.consumer, self.state.watermark, self.state.stream_seq, self.state.fold_key(), data),
        )
        self.snapshots += 1
