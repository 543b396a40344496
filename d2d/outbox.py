"""The outbox relay: publishes the log to JetStream, in order, resuming where it stopped.

An event is in the log first; the relay then publishes it to `d2d.events.<type>` with
`Nats-Msg-Id = event_id`, `D2D-Seq` (its position) and `D2D-Prev-Of-Type` (the position of the
previous event of the same type, 0 for the first): a consumer that takes only some types can tell
from it that it missed none. Once JetStream has acknowledged a whole batch, the relay moves its position to
the batch's last seq. The position is written to `log_positions` at most once per
`position_interval` (and whenever the relay falls idle or stops): one write per batch would cost a
Postgres commit per event when events come one at a time, as decisions do. After a crash it
republishes what it published since the last write (at most `position_interval` of events), which
JetStream's duplicate window (minutes) drops, so every event is on the stream exactly once. While NATS is
down appends go on; the relay retries the same batch until NATS is back and then catches up.
Only one relay per database publishes at a time (a session advisory lock); others wait.

Idle, the relay waits `linger` (a few milliseconds) before each read (woken by a commit's notice,
or polling), so events committed close together (decisions commit one small transaction after
another) go in one batch: one read and one JetStream round trip instead of one each. Busy, it
never lingers: what arrives while a batch is published is the next batch. A read that returns
less than a full batch has seen every commit before it, so the relay waits for the next notice
instead of reading again (at low rates that halves its reads).

No single event stops the relay. One the bus cannot carry (larger than the server's `max_payload`,
which `limits.check_event` makes impossible for events appended since, or refused by the stream)
is skipped visibly: counted in `RelayStats.skipped` (and on the batch's span, with a span event
per event), logged, and recorded in the log as a `quality.alert` event (kind `event_not_published`,
with its seq, id, size and the reason). Its consumers see the gap in `D2D-Prev-Of-Type` and read it
from the log, which stays the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from dataclasses import dataclass

import asyncpg
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError
from opentelemetry import trace

from d2d import bus, telemetry
from d2d.eventlog import APPEND_LOCK_KEY, LOG_UNREACHABLE, NOTIFY_CHANNEL, EventLog, quality_alert

log = logging.getLogger(__name__)

_LEADER_LOCK_BASE = APPEND_LOCK_KEY + 100
DEFAULT_LINGER = 0.003  # seconds the relay waits, woken from idle, for more events to join a batch
_ALERT_NAMESPACE = uuid.UUID("6a1e7c1d-2d2d-4e0f-9a11-0d2d0d2d0a1e")


@dataclass
class RelayStats:
    published: int = 0
    duplicates: int = 0
    batches: int = 0
    retries: int = 0
    skipped: int = 0  # events the bus could not carry, recorded as quality.alert events
    position: int = 0


def relay_name(stream: str) -> str:
    """The relay's name for `stream`: its leader lock and its position in `log_positions`."""
    return f"relay:{stream}"


class OutboxRelay:
    def __init__(
        self,
        event_log: EventLog,
        js: JetStreamContext,
        *,
        name: str = relay_name(bus.EVENTS_STREAM),
        stream: str = bus.EVENTS_STREAM,
        subject_prefix: str = bus.EVENTS_SUBJECT_PREFIX,
        replicas: int = 1,
        batch_size: int = 2000,
        ack_timeout: float = 5.0,
        idle_poll: float = 0.5,
        position_interval: float = 1.0,
        linger: float = DEFAULT_LINGER,
        max_payload: int | None = None,
    ) -> None:
        if linger < 0:
            raise ValueError(f"the relay's linger must be 0 (none) or more seconds, not {linger}")
        self.log = event_log
        self.js = js
        self.name = name
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.replicas = replicas
        self.batch_size = batch_size
        self.ack_timeout = ack_timeout
        self.idle_poll = idle_poll
        self.position_interval = position_interval
        self.linger = linger
        self.stats = RelayStats()
        # What the server accepts per message (headers included): by default what it said at connect.
        self.max_payload: int = max_payload or js._nc.max_payload
        self._last_of_type: dict[str, int] = {}  # position of the last published event of each type
        self._tracer = telemetry.tracer(__name__)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Publish until `stop` is set (or forever). Returns only when stopped.

        Postgres going away does not end it: the relay waits (backing off to 10 s), takes the
        leader lock again and resumes from the recorded position (JetStream drops what it repeats)."""
        stop = stop or asyncio.Event()
        await bus.ensure_stream(self.js, bus.events_stream_config(self.stream, self.subject_prefix, self.replicas))
        backoff = 0.5
        while not stop.is_set():
            try:
                await self._run_once(stop)
                return
            except LOG_UNREACHABLE as exc:
                log.warning("relay: the event log is unreachable (%s); resuming in %.1f s", exc, backoff)
                await _wait_any(stop, asyncio.Event(), backoff)
                backoff = min(backoff * 2, 10.0)

    async def _run_once(self, stop: asyncio.Event) -> None:
        async with self.log.pool.acquire() as leader:
            await self._lead(leader, stop)
            if stop.is_set():
                return
            wake = asyncio.Event()

            def on_notify(*_: object) -> None:
                wake.set()

            await leader.add_listener(NOTIFY_CHANNEL, on_notify)
            try:
                await self._publish_until(stop, wake, leader)
            finally:
                with contextlib.suppress(*LOG_UNREACHABLE):  # a dead connection holds no lock or listener
                    await leader.remove_listener(NOTIFY_CHANNEL, on_notify)
                    await leader.execute("SELECT pg_advisory_unlock_all()")

    async def _publish_until(self, stop: asyncio.Event, wake: asyncio.Event, conn: asyncpg.Connection) -> None:
        """Publish from the recorded position on; reads go through `conn`, the connection that
        holds the leader lock and listens (one from the pool per read costs a reset round trip)."""
        position = await self.log.position(self.name)
        self._last_of_type = await self.log.last_seq_by_type(position, conn=conn)
        self.stats.position = position
        log.info("relay %s publishing from seq %d", self.name, position)
        backoff = 0.1
        saved, saved_at = position, time.monotonic()
        caught_up = False  # the last read found everything committed before it: wait for a notice
        try:
            while not stop.is_set():
                if caught_up:
                    if not await _wait_any(stop, wake, self.idle_poll) and position != saved:  # idle
                        await self.log.set_position(self.name, position)
                        saved, saved_at = position, time.monotonic()
                    if self.linger and not stop.is_set():  # let events that follow close behind join
                        await asyncio.sleep(self.linger)
                    if stop.is_set():
                        break
                # Cleared before the read: a commit the read does not see notifies after this point.
                wake.clear()
                batch = await self.log.read_envelopes(position, self.batch_size, conn=conn)
                caught_up = len(batch) < self.batch_size
                if not batch:
                    continue
                try:
                    await self._publish(batch)
                except Exception as exc:  # NATS down, slow, or refusing: retry the same batch
                    caught_up = False
                    self.stats.retries += 1
                    log.warning("relay: publishing seq %d.. failed (%s); retrying", batch[0][0], exc)
                    await _wait_any(stop, asyncio.Event(), backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.1
                position = batch[-1][0]
                self.stats.position = position
                self.stats.batches += 1
                if time.monotonic() - saved_at >= self.position_interval:
                    await self.log.set_position(self.name, position)
                    saved, saved_at = position, time.monotonic()
        finally:
            if position != saved:  # stopping (or failing): keep what is acknowledged
                with contextlib.suppress(Exception):
                    await self.log.set_position(self.name, position)

    async def _lead(self, leader: asyncpg.Connection, stop: asyncio.Event) -> None:
        key = _LEADER_LOCK_BASE + (zlib.crc32(self.name.encode()) & 0xFFFF)  # stable across processes
        while not stop.is_set():
            if await leader.fetchval("SELECT pg_try_advisory_lock($1)", key):
                return
            await _wait_any(stop, asyncio.Event(), 1.0)

    async def _publish(self, batch: list[tuple[int, object, str, bytes, str | None]]) -> None:
        with self._tracer.start_as_current_span(
            "relay.publish",
            attributes={"d2d.first_seq": batch[0][0], "d2d.last_seq": batch[-1][0], "d2d.count": len(batch)},
        ):
            futures = []
            sent = []
            skipped: list[tuple[int, object, str, int, str]] = []
            last_of_type = dict(self._last_of_type)  # kept only once the whole batch is acknowledged
            try:
                for seq, event_id, type_, body, traceparent in batch:
                    headers = {
                        "Nats-Msg-Id": str(event_id), "D2D-Seq": str(seq),
                        "D2D-Prev-Of-Type": str(last_of_type.get(type_, 0)),
                    }  # fmt: skip
                    last_of_type[type_] = seq
                    if traceparent:
                        headers["traceparent"] = traceparent
                    size = len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
                    if size > self.max_payload:
                        skipped.append((seq, event_id, type_, size, f"larger than max_payload {self.max_payload}"))
                        continue
                    # No wait_stall: with it nats-py wraps every publish in a task and flushes once
                    # per message (5.4k msgs/s instead of 30k here). A batch stays inside the
                    # in-flight window, and wait_for below bounds the wait for acks.
                    subject = f"{self.subject_prefix}.{type_}"
                    futures.append(await self.js.publish_async(subject, body, headers=headers))
                    sent.append((seq, event_id, type_, size))
                acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), self.ack_timeout)
            except BaseException:
                for f in futures:  # frees their slots in nats-py's in-flight window
                    f.cancel()
                raise
            for (seq, event_id, type_, size), ack in zip(sent, acks, strict=True):
                if isinstance(ack, BadRequestError):  # the stream refuses this message: retrying cannot help
                    skipped.append((seq, event_id, type_, size, f"refused by the stream: {ack.description}"))
                elif isinstance(ack, BaseException):  # NATS away or slow: retry the whole batch
                    raise ack
            if skipped:
                await self._record_skipped(skipped)
        self._last_of_type = last_of_type
        published = [a for a in acks if not isinstance(a, BaseException)]
        duplicates = sum(1 for a in published if a.duplicate)
        self.stats.duplicates += duplicates
        self.stats.published += len(published) - duplicates

    async def _record_skipped(self, skipped: list[tuple[int, object, str, int, str]]) -> None:
        """Append a quality.alert per event the bus cannot carry (before moving past them)."""
        alerts = []
        for seq, event_id, type_, size, reason in skipped:
            log.error("relay: seq %d (%s, %d bytes) cannot be published (%s); skipped", seq, type_, size, reason)
            payload = {
                "kind": "event_not_published", "source": self.name, "seq": seq, "event_id": str(event_id),
                "event_type": type_, "size": size, "max_payload": self.max_payload, "reason": reason,
            }  # fmt: skip
            alert_id = uuid.uuid5(_ALERT_NAMESPACE, f"{self.name}/{event_id}")
            alerts.append(quality_alert(alert_id, "event", str(event_id), payload, "relay"))
        await self.log.append(alerts)  # ids derive from the skipped events: a replay appends none twice
        self.stats.skipped += len(skipped)
        span = trace.get_current_span()  # the batch's relay.publish span
        span.set_attribute("d2d.skipped", len(skipped))
        for seq, event_id, type_, size, reason in skipped:
            span.add_event(
                "event_not_published",
                {"d2d.seq": seq, "d2d.event_id": str(event_id), "d2d.type": type_, "d2d.size": size, "reason": reason},
            )


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> bool:
    """Wait until `stop` or `wake` is set or `timeout` passes; False if the time ran out."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for w in waiters:
            w.cancel()


async def run_relay(
    database_url: str, nats_url: str, *, stop: asyncio.Event, topology: bus.Topology | None = None,
    linger: float = DEFAULT_LINGER,
) -> None:  # fmt: skip
    """Entry point used by `python -m services.ingest relay` and `d2d relay`."""
    from d2d.eventlog import create_pool

    topology = topology or bus.Topology()
    pool = await create_pool(database_url, max_size=3)
    nc = await bus.connect(nats_url, name="d2d-relay")
    try:
        relay = OutboxRelay(
            EventLog(pool), nc.jetstream(publish_async_max_pending=4000),
            name=relay_name(topology.events_stream), stream=topology.events_stream,
            subject_prefix=topology.events_prefix, replicas=topology.replicas, linger=linger,
        )  # fmt: skip
        started = time.monotonic()
        await relay.run(stop)
        log.info(
            "relay stopped at seq %d after %.0fs: %d published, %d duplicates dropped by JetStream",
            relay.stats.position, time.monotonic() - started, relay.stats.published, relay.stats.duplicates,
        )  # fmt: skip
    finally:
        await nc.drain()
        await pool.close()
