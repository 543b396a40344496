"""The feedback service's log consumer: keeps the decision/outcome join (`decision_outcomes`) and
offers events to the outcome rule engine.

It reads the log itself (`EventLog.read` with types), in seq order: the projectors applied by
`feedback` (`decision.made`, `decision.withdrawn`, `outcome.recorded`, see d2d.projections) and
the event types of the engine's rules. Each batch is one transaction that appends the engine's
outcomes, applies the projectors and moves the consumer's position (`log_positions`): a crash
applies nothing twice and loses nothing. The position row is locked in that transaction, and a
consumer that finds it moved by another instance starts over from the stored position.

The rule engine hook (`engine=`, None for none): an object with the interface of
`services/feedback/rules.py`'s `RuleEngine` (see `OutcomeEngine`). For each event of a batch, in
seq order, the consumer calls `on_decision` (decision.made), `on_withdrawn` (decision.withdrawn) or
`on_event` (an event of one of `engine.rules`' event types), then `close_windows()` once per
batch; every draft returned becomes an `outcome.recorded` event (id from its outcome id, so a
draft appended twice is stored once) appended in the batch's transaction. The engine's state
lives in memory: at start the consumer replays the log up to its position through the engine,
dropping the drafts (they were appended with the batches that gave them), and after a failed
batch it does the same with a fresh engine (`type(engine)(engine.rules)`). Rules registered after
the start take effect at the next start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import orjson
from opentelemetry import trace

from d2d import projections, telemetry
from d2d.eventlog import LOG_UNREACHABLE, EventLog, NewEvent, StoredEvent
from d2d.outcomes import OutcomeRule, outcome_event_id

log = logging.getLogger(__name__)

NAME = projections.FEEDBACK


class OutcomeEngine(Protocol):
    """What the consumer asks of a rule engine (`services.feedback.rules.RuleEngine`)."""

    rules: Sequence[OutcomeRule]

    def on_decision(self, decision_id: str, payload: dict, decided_at: datetime, seq: int) -> list[Any]: ...
    def on_withdrawn(self, decision_id: str) -> None: ...
    def on_event(self, event_id: str, event_type: str, payload: dict, occurred_at: datetime, seq: int) -> list[Any]: ...
    def close_windows(self) -> list[Any]: ...


class PositionMoved(RuntimeError):
    """Another consumer with the same name moved the position: this one must start over."""


def outcome_event(draft: Any) -> NewEvent:
    """An `outcome.recorded` event of an engine's draft (a dataclass with the event's fields; None
    fields are left out)."""
    payload = {k: v for k, v in dataclasses.asdict(draft).items() if v is not None}
    occurred_at = payload["occurred_at"]
    if isinstance(occurred_at, str):
        occurred_at = datetime.fromisoformat(occurred_at)
    payload["occurred_at"] = occurred_at.isoformat()
    return NewEvent(
        outcome_event_id(payload["outcome_id"]), "outcome.recorded", 1, "decision", payload["decision_id"],
        occurred_at, orjson.dumps(payload).decode(), {"producer": "feedback"},
    )  # fmt: skip


class FeedbackConsumer:
    def __init__(
        self,
        event_log: EventLog,
        *,
        engine: OutcomeEngine | None = None,
        name: str = NAME,
        batch: int = 1000,
        poll_interval: float = 0.5,
    ) -> None:
        self.log = event_log
        self.engine = engine
        self.name = name
        self.batch = batch
        self.poll_interval = poll_interval
        rule_types = {r.event_type for r in engine.rules} if engine is not None else set()
        self.types = tuple(sorted({*projections.types_applied_by(NAME), *rule_types}))
        self.position = 0
        self.applied = 0  # events applied by this instance
        self.caught_up = asyncio.Event()
        self._started = False
        self._tracer = telemetry.tracer(__name__)

    async def start(self) -> None:
        """Load the position and bring the engine's state up to it."""
        self.position = await self.log.position(self.name)
        if self.engine is not None:
            after = 0
            while after < self.position and (events := await self.log.read(after, self.batch, types=self.types)):
                events = [e for e in events if e.seq <= self.position]
                if not events:
                    break
                self._offer(events)  # their drafts are in the log already
                after = events[-1].seq
        self._started = True
        log.info("feedback: applying the log from seq %d", self.position + 1)

    async def step(self) -> int:
        """Apply one batch in one transaction; the number of events applied (0: caught up)."""
        if not self._started:
            await self.start()
        events = await self.log.read(self.position, self.batch, types=self.types)
        if not events:
            return 0
        with self._tracer.start_as_current_span(
            "feedback.apply", kind=trace.SpanKind.CONSUMER, links=_links(events[:32])
        ) as span:
            span.set_attribute("messaging.batch.message_count", len(events))
            drafts = [outcome_event(d) for d in self._offer(events)] if self.engine is not None else []
            async with self.log.pool.acquire() as conn, conn.transaction():
                await self._claim(conn)
                if drafts:
                    await self.log.append(drafts, conn=conn)
                await projections.apply(conn, events, applied_by=NAME)
                await self.log.set_position(self.name, events[-1].seq, conn=conn)
            span.set_attribute("d2d.outcomes_appended", len(drafts))
            span.set_attribute("d2d.position", events[-1].seq)
        self.position = events[-1].seq
        self.applied += len(events)
        return len(events)

    async def catch_up(self) -> None:
        """Apply batches until the log has nothing more for this consumer."""
        while await self.step():
            pass

    async def run(self, stop: asyncio.Event) -> None:
        """Apply the log as it grows until `stop`. A failure (Postgres away, another instance, a
        batch that cannot be applied: logged as an error, and retried, so it stops the join visibly)
        starts over from the stored position, the engine's state rebuilt with it."""
        backoff = 0.5
        while not stop.is_set():
            try:
                if await self.step():
                    backoff = 0.5
                    continue
                self.caught_up.set()
                await _wait(stop, self.poll_interval)
            except Exception as exc:  # Postgres away, another instance, or a batch that fails: retry it
                level = logging.WARNING if isinstance(exc, (*LOG_UNREACHABLE, PositionMoved)) else logging.ERROR
                log.log(level, "feedback: %r; starting over from the stored position in %.1f s", exc, backoff)
                self._started = False
                if self.engine is not None:  # its state may be ahead of the position: a fresh one replays
                    self.engine = type(self.engine)(self.engine.rules)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, 10.0)

    async def _claim(self, conn: asyncpg.Connection) -> None:
        """Lock this consumer's position row for the transaction; refuse if it moved."""
        stored = await self.log.lock_position(self.name, conn)
        if stored != self.position:
            raise PositionMoved(f"{self.name}'s position is {stored}, not {self.position}")

    def _offer(self, events: Sequence[StoredEvent]) -> list[Any]:
        """Each event to the engine, in order, then the windows its watermark closed: the drafts."""
        engine = self.engine
        assert engine is not None
        drafts: list[Any] = []
        for e in events:
            if e.type == "decision.made":
                drafts += engine.on_decision(e.payload["decision_id"], e.payload, projections.decided_at(e), e.seq)
            elif e.type == "decision.withdrawn":
                engine.on_withdrawn(e.payload["decision_id"])
            elif e.type != "outcome.recorded":
                drafts += engine.on_event(str(e.event_id), e.type, e.payload, e.occurred_at, e.seq)
        return drafts + engine.close_windows()


def _links(events: Sequence[StoredEvent]) -> list[trace.Link]:
    links = []
    for e in events:
        ctx = trace.get_current_span(telemetry.extract_context(e.metadata)).get_span_context()
        if ctx.is_valid:
            links.append(trace.Link(ctx))
    return links


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
