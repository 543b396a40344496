"""Assembles the feedback service: registers the domain's outcome rules, applies the log to the
decision/outcome join (`FeedbackConsumer`), and answers FeedbackService calls."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Sequence

from d2d import auth, eventlog, grpcserver
from d2d.config import Settings
from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.outcomes import OutcomeRule
from d2d.runtime.process import stop_on_signals
from d2d.v1 import feedback_pb2
from services.feedback import freshness
from services.feedback.api import SERVICE_NAME, FeedbackApi
from services.feedback.consumer import FeedbackConsumer
from services.feedback.monitor import MonitorSettings
from services.feedback.store import FeedbackStore

log = logging.getLogger(__name__)
RULES_RETRY_SECONDS = 5.0


def load_rules(module: str) -> tuple[OutcomeRule, ...]:
    """The RULES of the module named by D2D_OUTCOME_RULES."""
    return tuple(importlib.import_module(module).RULES)


async def register_rules(store: FeedbackStore, rules: Sequence[OutcomeRule], stop: asyncio.Event) -> None:
    """Register each rule (unchanged ones store nothing). A rule whose event type has no contract
    yet (a fresh log: the domain's contracts come later) is retried until it has one; one the log
    refuses otherwise (other terms under its name) is logged and left out."""
    pending = list(rules)
    warned: set[str] = set()
    while pending and not stop.is_set():
        for rule in list(pending):
            try:
                await store.register_rule(rule)
                pending.remove(rule)
                log.info("feedback: outcome rule %s on %s is registered", rule.name, rule.event_type)
            except Refusal as refusal:
                if refusal.code != "FAILED_PRECONDITION":  # e.g. other terms under its name: the log's stand
                    log.error("feedback: outcome rule %s is not registered: %s", rule.name, refusal.message)
                    pending.remove(rule)
                elif rule.name not in warned:
                    warned.add(rule.name)
                    log.warning("feedback: outcome rule %s waits: %s", rule.name, refusal.message)
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RULES_RETRY_SECONDS)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the FeedbackService on settings.addr("feedback") until `stop` (or SIGINT/SIGTERM)."""
    stop = stop or stop_on_signals()
    url = settings.require_database_url()
    await eventlog.migrate(url)
    pool = await eventlog.create_pool(url, max_size=6)
    event_log = EventLog(pool)
    api = FeedbackApi(event_log)
    consumer = FeedbackConsumer(event_log, monitor_settings=MonitorSettings.from_json(settings.feedback_monitor_json))
    keys = await auth.KeyRing.open(event_log)
    server, health = grpcserver.new_server([SERVICE_NAME], reflection_enabled=settings.grpc_reflection)
    grpcserver.add_service(server, feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"], api, keys)
    addr = settings.addr("feedback")
    grpcserver.listen(server, addr, settings.grpc_tls, "feedback")
    await server.start()
    tasks = [
        asyncio.create_task(register_rules(api.store, load_rules(settings.outcome_rules_module), stop)),
        asyncio.create_task(consumer.run(stop)),
        asyncio.create_task(freshness.watch(event_log, settings.addr("features"), stop)),
    ]
    try:
        await grpcserver.serve_until(server, health, [SERVICE_NAME], stop, f"feedback serving on {addr}")
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await keys.close()
        await pool.close()
