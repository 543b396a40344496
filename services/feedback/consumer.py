"""The feedback service's log consumer: keeps the decision/outcome join (`decision_outcomes`),
turns domain events into outcomes by the registered rules, and watches for drift, a drop in live
AUC, new labels and contract SLAs.

It reads every event of the log (`EventLog.read`), in seq order. Each batch is one transaction that
appends what the batch gave (`outcome.recorded` from the rule engine, `quality.alert` and
`retrain.requested` from the monitor, each with an id derived from what caused it, so the same
output appended twice is stored once), applies the projectors applied by `feedback`
(`decision.made`, `decision.withdrawn`, `outcome.recorded`, see d2d.projections) and moves the
consumer's position (`log_positions`): a crash applies nothing twice and loses nothing. The position
row is locked in that transaction, and a consumer that finds it moved by another instance starts
over from the stored position.

The rule engine (`rules.RuleEngine`) and the monitor (`monitor.Monitor`) are functions of the log
prefix they were fed: a rule applies from its `outcome_rule.registered` event on, a version's
baseline comes from its `model.registered`, production moves with `model.alias_set`, a contract's
SLA terms come from `contract.registered`. Their state lives in memory: at start (and after a
failed batch) the consumer replays the log up to its position through fresh ones, dropping what
they give (it was appended with the batches that gave it). That replay reads the whole log; a
checkpoint of their state (`to_dict`) with the position would bound it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from opentelemetry import trace

from d2d import projections, telemetry
from d2d.contracts.platform import is_platform_type
from d2d.eventlog import LOG_UNREACHABLE, EventLog, NewEvent, StoredEvent, quality_alert
from d2d.outcomes import OutcomeRule, outcome_event_id
from services.feedback.monitor import Finding, Monitor, MonitorSettings
from services.feedback.rules import RuleEngine

log = logging.getLogger(__name__)

NAME = projections.FEEDBACK


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
        name: str = NAME,
        batch: int = 1000,
        poll_interval: float = 0.5,
        monitor_settings: MonitorSettings | None = None,
    ) -> None:
        self.log = event_log
        self.name = name
        self.batch = batch
        self.poll_interval = poll_interval
        self.monitor_settings = monitor_settings or MonitorSettings()
        self.engine = RuleEngine(())
        self.monitor = Monitor(self.monitor_settings)
        self.position = 0
        self.applied = 0  # events applied by this instance
        self.caught_up = asyncio.Event()
        self._started = False
        self._tracer = telemetry.tracer(__name__)

    async def start(self) -> None:
        """Load the position and bring the engine's and the monitor's state up to it."""
        self.position = await self.log.position(self.name)
        self.engine = RuleEngine(())
        self.monitor = Monitor(self.monitor_settings)
        after = 0
        while after < self.position and (events := await self.log.read(after, self.batch)):
            events = [e for e in events if e.seq <= self.position]
            if not events:
                break
            async with self.log.pool.acquire() as conn:
                self._offer(events, await _decisions_of(conn, events))  # what they gave is in the log
            after = events[-1].seq
        self._started = True
        log.info("feedback: applying the log from seq %d", self.position + 1)

    async def step(self) -> int:
        """Apply one batch in one transaction; the number of events applied (0: caught up)."""
        if not self._started:
            await self.start()
        events = await self.log.read(self.position, self.batch)
        if not events:
            return 0
        with self._tracer.start_as_current_span(
            "feedback.apply", kind=trace.SpanKind.CONSUMER, links=telemetry.links(e.metadata for e in events[:32])
        ) as span:
            span.set_attribute("messaging.batch.message_count", len(events))
            async with self.log.pool.acquire() as conn, conn.transaction():
                await self._claim(conn)
                drafts = self._offer(events, await _decisions_of(conn, events))
                if drafts:
                    await self.log.append(drafts, conn=conn)
                await projections.apply(conn, events, applied_by=NAME)
                await self.log.set_position(self.name, events[-1].seq, conn=conn)
            span.set_attribute("d2d.events_appended", len(drafts))
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
                self._started = False  # the engine and monitor may be ahead of the position: start replays
                await _wait(stop, backoff)
                backoff = min(backoff * 2, 10.0)

    async def _claim(self, conn: asyncpg.Connection) -> None:
        """Lock this consumer's position row for the transaction; refuse if it moved."""
        stored = await self.log.lock_position(self.name, conn)
        if stored != self.position:
            raise PositionMoved(f"{self.name}'s position is {stored}, not {self.position}")

    def _offer(self, events: Sequence[StoredEvent], decisions: dict[str, dict[str, Any]]) -> list[NewEvent]:
        """Each event to the engine and the monitor, in order, then the windows the engine's watermark
        closed: the events to append. `decisions`: what the monitor needs of each decision an
        outcome in `events` is about (`_decisions_of`)."""
        engine, monitor = self.engine, self.monitor
        drafts: list[Any] = []
        findings: list[Finding] = []
        for e in events:
            p = e.payload
            if e.type == "decision.made":
                drafts += engine.on_decision(p["decision_id"], p, projections.decided_at(e), e.seq)
                model, version = _model_version(p["model_version"])
                findings += monitor.on_decision(e.seq, model, version, p.get("inputs") or [], p["score"])
            elif e.type == "decision.withdrawn":
                engine.on_withdrawn(p["decision_id"])
            elif e.type == "outcome.recorded":
                d = decisions.get(p["decision_id"])
                if d is not None:
                    findings += monitor.on_outcome(
                        e.seq, d["model"], d["model_version"], d["score"], p.get("label"), d["propensity"]
                    )
            elif e.type == "outcome_rule.registered":
                engine.add_rule(OutcomeRule.from_dict(p))
            elif e.type == "model.registered":
                if "version" in p:
                    monitor.know_version(
                        p["model"], p["version"], baseline=(p.get("lineage") or {}).get("baseline"),
                        feature_names=p.get("feature_names", []), heldout_auc=(p.get("evaluation") or {}).get("auc"),
                    )  # fmt: skip
            elif e.type == "model.alias_set":
                if p["alias"] == "production":
                    monitor.production_set(p["model"], p["version"])
            elif e.type == "contract.registered":
                monitor.know_contract(
                    p["event_type"], p.get("null_rate_limits", {}), p.get("allowed_lateness_seconds", 0)
                )
            elif not is_platform_type(e.type):
                drafts += engine.on_event(str(e.event_id), e.type, p, e.occurred_at, e.seq)
                findings += monitor.on_event(e.seq, e.type, p, e.occurred_at, e.recorded_at)
        drafts += engine.close_windows()
        return [outcome_event(d) for d in drafts] + [x for f in findings for x in finding_events(f)]


def _model_version(name: str) -> tuple[str, int]:
    """`models/{model}/versions/{n}` -> (model, n)."""
    _, model, _, number = name.split("/")
    return model, int(number)


async def _decisions_of(conn: asyncpg.Connection, events: Sequence[StoredEvent]) -> dict[str, dict[str, Any]]:
    """Model, version, score and propensity of the decision of each outcome in `events`: from the
    batch's own decision.made events, else from the join (which holds every decision before the
    batch: a decision precedes its outcomes in the log)."""
    made = {e.payload["decision_id"]: e.payload for e in events if e.type == "decision.made"}
    found: dict[str, dict[str, Any]] = {}
    wanted = []
    for e in events:
        if e.type == "outcome.recorded":
            d = made.get(e.payload["decision_id"])
            if d is None:
                wanted.append(e.payload["decision_id"])
                continue
            model, version = _model_version(d["model_version"])
            found[d["decision_id"]] = {"model": model, "model_version": version, "score": d["score"],
                                       "propensity": d["propensity"]}  # fmt: skip
    if wanted:
        rows = await conn.fetch(
            "SELECT decision_id::text AS decision_id, model, model_version, score, propensity FROM decision_outcomes"
            " WHERE decision_id = ANY($1::uuid[])",
            wanted,
        )
        found.update({r["decision_id"]: dict(r) for r in rows})
    return found


def finding_events(finding: Finding) -> list[NewEvent]:
    """A monitor finding as events: its `quality.alert`, and a `retrain.requested` if it asks one."""
    now = datetime.now(UTC)
    events = [quality_alert(finding.alert_event_id(), "quality", finding.source, finding.alert_payload(), "feedback")]
    if finding.retrain and finding.model:
        events.append(
            NewEvent(finding.retrain_event_id(), "retrain.requested", 1, "model", finding.model, now,
                     orjson.dumps(finding.retrain_payload()).decode(), {"producer": "feedback"})
        )  # fmt: skip
    return events


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
