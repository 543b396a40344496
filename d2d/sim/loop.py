"""The simulator in the closed loop: it sends payments to ingest, asks serving to decide each one, and
sends a fraudulent payment's chargeback at its chargeback time only if the payment was approved (a
declined payment never shows whether it was fraud: selective labels).

Everything goes out in event-time order: payments and the chargebacks that fall due between them are
interleaved by occurred_at. Payments are sent and decided in batches that span less than the
simulator's shortest chargeback delay (so no chargeback of a batch can fall due inside it) and less
than `MAX_BATCH_SPAN` (so each payment's time is still one the features service answers for).

A library client of the platform's public APIs (`IngestClient`, `ServingClient`), not of its services.
"""

from __future__ import annotations

import asyncio
import heapq
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import grpc

from d2d.client import IngestClient, ServingClient, make_event
from d2d.sim.payments import PaymentsSimulator, SimEvent

MAX_BATCH = 200  # payments sent and decided together (well under serving's BatchPredict limit)
# A batch spans at most this much event time: the features service answers only for times within twice
# its views' allowed lateness (the simulator's: 1 h) of the newest event it has seen.
MAX_BATCH_SPAN = timedelta(minutes=30)
RETRIES = 6  # a batch refused as overloaded or unavailable is retried (same request ids: same decisions)
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class LoopCounts:
    """What one run sent and what serving decided."""

    payments: int = 0
    approved: int = 0
    declined: int = 0
    explored: int = 0
    chargebacks: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class LoopState:
    """Carried from one run to the next (e.g. days 0-10, then the drift days): the chargebacks of approved
    fraudulent payments not due yet, and whether the reference events went out."""

    reference_sent: bool = False
    pending: list[tuple[datetime, str, SimEvent]] = field(default_factory=list)  # heap by chargeback time


Progress = Callable[[LoopCounts, datetime], None]


def payment_request(model: str, payment: SimEvent) -> Any:
    """Serving's request for a payment: its customer, merchant and card, its fields and time as context
    (with `payment_id`, which the chargeback rule joins on), the customer as the unit, the payment id
    as the request id (a retry returns the same decision)."""
    p = payment.payload
    context = {
        "amount": p["amount"], "channel": p["channel"], "ip_country": p["ip_country"],
        "occurred_at": payment.occurred_at.isoformat(), "payment_id": p["payment_id"],
    }  # fmt: skip
    entities = {"customer": p["customer_id"], "merchant": p["merchant_id"], "card": p["card_id"]}
    return ServingClient.request(model, entities, context, unit_id=p["customer_id"], request_id=p["payment_id"])


def _proto(event: SimEvent) -> Any:
    return make_event(
        event.type, event.entity_type, event.entity_id, event.payload_json(), occurred_at=event.occurred_at,
        event_id=uuid.UUID(event.event_id), schema_version=event.schema_version,
    )  # fmt: skip


async def _retrying(call: Callable[[], Any]) -> Any:
    for attempt in range(RETRIES):
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRYABLE or attempt == RETRIES - 1:
                raise
            await asyncio.sleep(0.2 * 2**attempt)


async def _send(ingest: IngestClient, events: Sequence[SimEvent]) -> None:
    for i in range(0, len(events), 1000):
        chunk = [_proto(e) for e in events[i : i + 1000]]
        await _retrying(lambda chunk=chunk: ingest.append(chunk))


async def run_loop(
    sim: PaymentsSimulator,
    ingest: IngestClient,
    serving: ServingClient,
    model: str,
    *,
    start_day: float,
    days: float,
    on_progress: Progress | None = None,
    state: LoopState | None = None,
) -> dict[str, int]:
    """Run the payments of [start + start_day, start + start_day + days) through the platform.

    Returns counts: payments, approved, declined, explored (decisions serving explored) and chargebacks
    sent. Chargebacks due after the window stay in `state` for the next run (pass the same state to go
    on; without one, those are dropped). Reference events are sent first on a fresh state (ingest stores
    a repeat of an event id once, so sending them again is harmless)."""
    state = state if state is not None else LoopState()
    counts = LoopCounts()
    cfg = sim.config
    begin = cfg.start + timedelta(days=start_day)
    end = begin + timedelta(days=days)
    span = min(timedelta(days=cfg.chargeback_delay_days[0]), MAX_BATCH_SPAN)
    if not state.reference_sent:
        await _send(ingest, sim.reference_events())
        state.reference_sent = True

    async def send_chargebacks(until: datetime, *, inclusive: bool) -> None:
        due: list[SimEvent] = []
        while state.pending and (state.pending[0][0] < until or (inclusive and state.pending[0][0] == until)):
            due.append(heapq.heappop(state.pending)[2])
        await _send(ingest, due)
        counts.chargebacks += len(due)

    async def decide(batch: Sequence[SimEvent]) -> None:
        await _send(ingest, batch)
        requests = [payment_request(model, p) for p in batch]
        answers = await _retrying(lambda: serving.batch_predict(requests))
        for payment, answer in zip(batch, answers, strict=True):
            counts.payments += 1
            counts.explored += int(answer.explored)
            if answer.action == "approve":
                counts.approved += 1
                chargeback = sim.chargeback(payment.payload["payment_id"])
                if chargeback is not None:
                    heapq.heappush(state.pending, (chargeback.occurred_at, chargeback.event_id, chargeback))
            else:
                counts.declined += 1
        if on_progress is not None:
            on_progress(counts, batch[-1].occurred_at)

    batch: list[SimEvent] = []
    for payment in sim.payment_events():
        if not begin <= payment.occurred_at < end:
            continue  # (not break: with out-of-order arrival a later payment may still be inside)
        due_first = bool(state.pending) and state.pending[0][0] <= payment.occurred_at
        if batch and (len(batch) >= MAX_BATCH or due_first or payment.occurred_at - batch[0].occurred_at >= span):
            await decide(batch)
            batch = []
        if not batch:
            await send_chargebacks(payment.occurred_at, inclusive=True)
        batch.append(payment)
    if batch:
        await decide(batch)
    await send_chargebacks(end, inclusive=False)
    return counts.to_dict()
