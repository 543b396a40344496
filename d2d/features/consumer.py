"""Folds the event stream (JetStream D2D_EVENTS) into the online state, and snapshots it.

The durable pull consumer takes only the views' source types (`d2d.events.<type>`), so the rest of
the log (decisions above all) never reaches this process. It is (re)created at every start right
after the stream position of the loaded snapshot, so a restart replays exactly the events the
snapshot lacks, in order. Messages are acknowledged (AckAll) only once a snapshot that includes
them is committed to Postgres. Each message names the previous event of its type
(`D2D-Prev-Of-Type`); one whose predecessor was not folded is a gap, filled from the log itself.
When a fetch finds nothing and the consumer has nothing pending, every source event up to the
stream's last message is folded, so the watermark moves to that message's position.

A message's word alone never moves the watermark past the log's head: a message claiming a
position (`D2D-Seq`) beyond the head as last read (read again, once per batch, when a message goes
past it) is not the relay's (only it may publish there, `bus.permissions`; this holds if someone
else could). It is refused: not folded, its payload never read, logged, a span event, and a
`quality.alert` (kind `forged_message`) in the log; the fold goes on with the next message.

Views can be added while it runs (`host`, how serving follows the views of the models it serves):
a new view is folded from the log up to the state's watermark beside the running fold, then, between
two fetches, caught up to the watermark of that moment and added whole, so no read ever sees a view
that is part built or folded to another position than the others; a new source type re-creates
the consumer with its subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import trace

from d2d import bus, telemetry
from d2d.eventlog import EventLog, quality_alert
from d2d.features.definitions import FeatureView
from d2d.features.fold import ViewState
from d2d.features.offline import fold_pages
from d2d.features.online import GapError, OnlineState
from d2d.features.store import Snapshot, save_snapshot

log = logging.getLogger(__name__)

_ALERT_NAMESPACE = uuid.UUID("5f0a7c2e-2d2d-4b1e-8f0d-f0a9ed0d2d15")


@dataclass
class _Hosting:
    """Views built from the log up to `built_to`, waiting to join the state between two fetches."""

    states: dict[str, ViewState]
    built_to: int
    last_of_type: dict[str, int]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


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
        self._hosting: list[_Hosting] = []
        self._host_lock = asyncio.Lock()  # one build at a time: each starts from the state as it is
        self._arrived = asyncio.Event()
        self._moved = asyncio.Event()  # set (and replaced) whenever the watermark may have moved
        self._ended = False  # run() has returned: nothing will join hosted views any more
        self.head = 0  # the log's head as last read: no message may claim a position past it
        self.refused = 0  # messages refused as not the relay's (forged)

    @property
    def durable(self) -> str:
        return bus.durable_name(self.consumer)

    async def subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        """The durable pull consumer, (re)created right after the state's stream position."""
        stream, prefix = self.topology.events_stream, self.topology.events_prefix
        await bus.ensure_stream(js, self.topology.events_config())
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
        """Fold until `stop`. A NATS outage (or a failed subscribe or acknowledgement) is waited
        out: the state keeps answering at its watermark, and folding resumes where it stopped."""
        js = self.nc.jetstream()
        stream, prefix = self.topology.events_stream, self.topology.events_prefix
        sub = None  # subscribed while the state has source types
        cut = len(prefix) + 1
        last_snapshot_at, folded_since = time.monotonic(), 0
        unacked = None
        changed = False  # views added since the last snapshot
        try:
            while not stop.is_set():
                if self._hosting:
                    new_sources = await self._join_hosted()
                    changed = True
                    self._watermark_moved()
                    if new_sources and sub is not None:  # the consumer needs their subjects: re-create it
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                        sub, unacked = None, None
                if sub is None and self.state.sources:
                    try:  # (re)created at the state's stream position
                        sub = await self.subscribe(js)
                    except Exception as exc:  # NATS away: try again shortly
                        log.warning("features: subscribing failed (%s); will retry", exc)
                        await asyncio.sleep(0.5)
                        continue
                if sub is None:  # no view yet: nothing to fold until one is hosted
                    self.caught_up.set()
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), 0.5)
                    except TimeoutError:
                        pass
                    continue
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
                    await self._fold(msgs, cut)
                    folded_since += len(msgs)
                    unacked = msgs[-1]
                    if len(msgs) < self.batch:
                        self.caught_up.set()
                due = time.monotonic() - last_snapshot_at >= self.snapshot_every_seconds
                if (unacked is not None or changed) and (folded_since >= self.snapshot_every_events or due):
                    try:
                        await self.snapshot()
                        if unacked is not None:
                            await unacked.ack()  # AckAll: everything up to here is in the snapshot
                    except Exception as exc:  # Postgres or NATS away: keep folding and serving, retry later
                        log.warning("features: snapshot or acknowledgement failed (%s); will retry", exc)
                        last_snapshot_at = time.monotonic()
                        continue
                    unacked, folded_since, last_snapshot_at, changed = None, 0, time.monotonic(), False
            if unacked is not None or changed:
                try:
                    await self.snapshot()
                    if unacked is not None:
                        await unacked.ack()
                except Exception as exc:  # the next start folds from the last snapshot saved instead
                    log.warning("features: the last snapshot or acknowledgement failed (%s)", exc)
        finally:
            self._ended = True
            for hosting in self._hosting:  # never joined: their callers must not wait on
                if not hosting.done.done():
                    hosting.done.set_exception(RuntimeError("the fold stopped before the views joined it"))
            if sub is not None:
                with contextlib.suppress(Exception):  # the connection may be gone: the consumer is durable
                    await sub.unsubscribe()

    def _watermark_moved(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    async def folded_to(self, seq: int, timeout: float) -> bool:
        """Wait until the watermark reaches `seq` (at most `timeout` seconds); whether it did.
        A position that is no source event is reached once the stream is idle past it."""
        clock = asyncio.get_running_loop().time
        until = clock() + timeout
        while self.state.watermark < seq:
            left = until - clock()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._moved.wait(), left)
            except TimeoutError:
                return self.state.watermark >= seq
        return True

    async def _fold(self, msgs: list, cut: int) -> None:  # noqa: ANN001 - nats messages
        with self._tracer.start_as_current_span(
            "features.fold", kind=trace.SpanKind.CONSUMER, links=telemetry.links(m.headers for m in msgs[:32])
        ) as span:
            span.set_attribute("messaging.batch.message_count", len(msgs))
            refused: list[tuple[Msg, str]] = []
            head_read = False  # the head is read again at most once per batch
            for m in msgs:
                seq = _claimed_seq(m)
                if seq is None or seq > self.head:
                    if seq is not None and not head_read:
                        self.head, head_read = max(self.head, await self.log.head()), True
                    if seq is None or seq > self.head:
                        refused.append((m, (m.headers or {}).get("D2D-Seq", "")))
                        continue
                type_ = m.subject[cut:]
                prev_of_type = m.headers.get("D2D-Prev-Of-Type")  # absent from older relays' messages
                prev = int(prev_of_type) if prev_of_type is not None else None
                try:
                    self.state.offer(seq, type_, m.data, m.metadata.sequence.stream, prev)
                except GapError as gap:
                    await self._fill_gap(gap)
                    self.state.offer(seq, type_, m.data, m.metadata.sequence.stream, prev)
            if refused:
                await self._refuse(refused, span)
            span.set_attribute("d2d.watermark", self.state.watermark)
        self._watermark_moved()

    async def _refuse(self, refused: list[tuple[Msg, str]], span: trace.Span) -> None:
        """Alert on messages claiming a position past the log's head (see the module's docstring)."""
        self.refused += len(refused)
        span.set_attribute("d2d.refused", len(refused))
        alerts = []
        for m, claimed in refused:
            stream_seq = m.metadata.sequence.stream
            log.error(
                "features: refused the message at stream seq %d on %s: it claims seq %r, past the log's head %d",
                stream_seq, m.subject, claimed, self.head,
            )  # fmt: skip
            found = {
                "kind": "forged_message", "source": self.consumer, "subject": m.subject, "claimed_seq": claimed[:40],
                "head": self.head, "stream": self.topology.events_stream, "stream_seq": stream_seq,
                "msg_id": (m.headers or {}).get("Nats-Msg-Id", "")[:80],
            }  # fmt: skip
            span.add_event("forged_message", {f"d2d.{k}": v for k, v in found.items() if k != "kind"})
            alert_id = uuid.uuid5(_ALERT_NAMESPACE, f"{self.consumer}/{stream_seq}")
            alerts.append(quality_alert(alert_id, "stream", self.topology.events_stream, found, self.consumer))
        try:  # ids derive from the messages' stream positions: one redelivered is recorded once
            await self.log.append(alerts)
        except Exception as exc:  # the log is away: the fold goes on, the refusal stands (and is logged)
            log.warning("features: recording %d forged_message alerts failed (%s)", len(alerts), exc)

    async def host(self, views: Sequence[FeatureView]) -> None:
        """Fold `views` too (those not held yet), from the log; returns once they are part of the
        state, folded exactly to its watermark. A view held at another version is refused
        (ValueError): the state holds one version of a view name."""
        async with self._host_lock:
            new = []
            for view in views:
                held = self.state.views.get(view.name)
                if held is None:
                    new.append(view)
                elif held.version != view.version:
                    raise ValueError(f"feature view {view.name} is held at version {held.version}, not {view.version}")
            if not new:
                return
            if not self.state.views:  # nothing held yet: start at the log's head and the stream's end
                await self._start_at_the_end()
            states = {v.name: ViewState(v) for v in new}
            built_to = self.state.watermark
            started = time.monotonic()
            last_of_type = await self._fold_from_log(states, 0, built_to)
            log.info(
                "features: built %s from the log to seq %d in %.1fs",
                sorted(states),
                built_to,
                time.monotonic() - started,
            )
            if self._ended:
                raise RuntimeError("the fold has stopped: no view can join it")
            hosting = _Hosting(states, built_to, last_of_type)
            self._hosting.append(hosting)
            self._arrived.set()
            await asyncio.shield(hosting.done)
            log.info("features: now folding %s (from seq %d)", sorted(states), self.state.watermark)

    async def _start_at_the_end(self) -> None:
        """Move a state holding no view to the stream's last message and the log's head, read in
        that order: every message up to that one is at or below the head (the relay publishes in
        log order), so the views built from the log up to the head need none of them; a later
        message at or below the head is a repeat (`OnlineState.offer` skips it)."""
        js = self.nc.jetstream()
        stream = self.topology.events_stream
        await bus.ensure_stream(js, self.topology.events_config())
        last = (await js.stream_info(stream)).state.last_seq
        head = self.head = max(self.head, await self.log.head())
        self.state.watermark = max(self.state.watermark, head)
        self.state.stream_seq = max(self.state.stream_seq, last)

    async def _fold_from_log(self, states: dict[str, ViewState], after: int, to_seq: int) -> dict[str, int]:
        """Fold the log's events of the states' sources in (after, to_seq] into them; the last
        seq folded per source type."""
        by_source: dict[str, list[ViewState]] = {}
        for state in states.values():
            by_source.setdefault(state.view.source, []).append(state)
        last = dict.fromkeys(by_source, 0)
        async for page in fold_pages(self.log, list(by_source), to_seq, after=after):
            for event in page:
                for state in by_source[event.type]:
                    state.apply(event)
                last[event.type] = event.seq
            await asyncio.sleep(0)  # a page at a time: the service keeps answering meanwhile
        for state in states.values():  # every event up to to_seq is folded, whatever its type
            state.watermark = max(state.watermark, to_seq)
        return last

    async def _join_hosted(self) -> bool:
        """Catch the built views up to the state's watermark and add them; True if a source type
        is new (the consumer must be re-created). Runs in the fold's loop, between fetches: nothing
        else folds meanwhile, and reads see the views only once they are complete."""
        new_sources = False
        hostings, self._hosting = self._hosting, []
        for hosting in hostings:
            try:
                caught_up = await self._fold_from_log(hosting.states, hosting.built_to, self.state.watermark)
                last_of_type = {t: max(seq, caught_up.get(t, 0)) for t, seq in hosting.last_of_type.items()}
                new_sources |= any(t not in self.state.by_source for t in last_of_type)
                self.state.host(hosting.states, last_of_type)
            except Exception as exc:  # noqa: BLE001 - its caller hears of it
                hosting.done.set_exception(exc)
            else:
                hosting.done.set_result(None)
        return new_sources

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
            seq = _claimed_seq(message) or 0
            if seq > self.head:  # the fold refuses (and alerts) a message past the head
                self.head = max(self.head, await self.log.head())
                if seq > self.head:
                    return
            info = await js.consumer_info(stream, self.durable)
            delivered = info.delivered.stream_seq if info.delivered is not None else 0
            if seq and info.num_pending == 0 and delivered <= self.state.stream_seq:
                self.state.advance(seq, last)
                self._watermark_moved()
        except Exception as exc:  # NATS reconnecting: try at the next idle fetch
            log.debug("features: idle watermark check failed: %s", exc)

    async def snapshot(self) -> None:
        data = await asyncio.to_thread(self.state.to_bytes)
        await save_snapshot(
            self.log.pool,
            Snapshot(self.consumer, self.state.watermark, self.state.stream_seq, self.state.fold_key(), data),
        )
        self.snapshots += 1


def _claimed_seq(message: object) -> int | None:
    """The log position a message (fetched or read from the stream) claims in `D2D-Seq`; None if
    it has none that is a positive integer."""
    value = (getattr(message, "headers", None) or {}).get("D2D-Seq", "")
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None
