"""The simulator in the closed loop: it asks serving to decide each payment, then sends it to ingest,
and sends a fraudulent payment's chargeback at its chargeback time only if the payment was approved (a
declined payment never shows whether it was fraud: selective labels).

A payment is decided before it is in the log, as a payment application decides an authorization, and
on features that hold every earlier payment of its customer, merchant and card: exactly the state a
training row of it reads (the log just before the payment, `d2d.features.offline.rows_from_events`),
so the loop serves the first model the inputs it was trained on. To get there in few round trips,
payments go in windows, and a window in waves: a payment's wave is one after the last wave in its
window that shares an entity with it. A wave is decided in one BatchPredict, then appended; the next
wave's requests carry the log position of the last payment appended (`min_feature_watermark`), so
serving decides them only on features that have folded it (read-your-writes). Payments of a window
(spanning less than the views' allowed lateness) may reach the log out of event-time order, but never
before an earlier payment of one of their entities.

Windows go out in event-time order, and chargebacks that fall due between them in their place: a
window spans less than the simulator's shortest chargeback delay (so no chargeback of a window can fall
due inside it), is cut where a pending chargeback falls due, and spans less than `MAX_BATCH_SPAN` (so
each payment's time is still one the features service answers for).

A library client of the platform's public APIs (`IngestClient`, `ServingClient`; `wait_folded` uses
`FeatureClient`), not of its services.
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

from d2d.client import FeatureClient, IngestClient, ServingClient, make_event
from d2d.sim.payments import PaymentsSimulator, SimEvent
from d2d.sim.views import CUSTOMER_PAYMENTS

MAX_BATCH = 200  # payments in one window (well under serving's BatchPredict limit)
# A window spans at most this much event time: the features service answers only for times within twice
# its views' allowed lateness (the simulator's: 1 h) of the newest event it has seen.
MAX_BATCH_SPAN = timedelta(minutes=30)
FOLD_TIMEOUT = 60.0  # seconds the features service may take to fold a wave
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
    last_payment_seq: int = 0  # the next decisions' min_feature_watermark
    pending: list[tuple[datetime, str, SimEvent]] = field(default_factory=list)  # heap by chargeback time


Progress = Callable[[LoopCounts, datetime], None]


def payment_entities(payment: Any) -> dict[str, str]:
    """The entities a payment's features are read for (a simulated payment or one read from the log)."""
    p = payment.payload
    return {"customer": p["customer_id"], "merchant": p["merchant_id"], "card": p["card_id"]}


def payment_request(model: str, payment: SimEvent) -> Any:
    """Serving's request for a payment: its customer, merchant and card, its fields and time as context
    (with `payment_id`, which the chargeback rule joins on), the customer as the unit, the payment id
    as the request id (a retry returns the same decision)."""
    p = payment.payload
    context = {
        "amount": p["amount"], "channel": p["channel"], "ip_country": p["ip_country"],
        "occurred_at": payment.occurred_at.isoformat(), "payment_id": p["payment_id"],
    }  # fmt: skip
    entities = payment_entities(payment)
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


async def _send(ingest: IngestClient, events: Sequence[SimEvent]) -> int:
    """Append `events`; the newest log position they got (0: none sent)."""
    newest = 0
    for i in range(0, len(events), 1000):
        chunk = [_proto(e) for e in events[i : i + 1000]]
        response = await _retrying(lambda chunk=chunk: ingest.append(chunk))
        newest = max([newest, *(r.seq for r in response.results if r.WhichOneof("outcome") == "seq")])
    return newest


async def wait_folded(features: FeatureClient, seq: int, timeout: float = FOLD_TIMEOUT) -> None:
    """Until the features service's watermark reaches `seq` (through its start-up, when it is not
    answering yet); TimeoutError after `timeout` seconds."""
    clock = asyncio.get_running_loop().time
    deadline = clock() + timeout
    probe = [f"{CUSTOMER_PAYMENTS.name}.count_lifetime"], [{CUSTOMER_PAYMENTS.entity: "-"}]
    while True:
        try:
            if (await features.get_online(*probe)).watermark >= seq:
                return
            pause = 0.002
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRYABLE:
                raise
            pause = 0.1
        if clock() > deadline:
            raise TimeoutError(f"the features service did not fold the log to seq {seq} in {timeout:.0f} s")
        await asyncio.sleep(pause)


def waves(window: Sequence[SimEvent]) -> list[list[SimEvent]]:
    """`window` in waves: each payment one wave after the last earlier payment sharing its customer,
    merchant or card (the entities its features are read for), in the window's order within a wave."""
    level: dict[tuple[str, str], int] = {}
    out: list[list[SimEvent]] = []
    for payment in window:
        keys = list(payment_entities(payment).items())
        wave = max((level.get(key, -1) for key in keys), default=-1) + 1
        for key in keys:
            level[key] = wave
        if wave == len(out):
            out.append([])
        out[wave].append(payment)
    return out


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

    async def decide(window: Sequence[SimEvent]) -> None:
        for wave in waves(window):
            requests = [payment_request(model, p) for p in wave]
            for request in requests:
                request.min_feature_watermark = state.last_payment_seq
            answers = await _retrying(lambda requests=requests: serving.batch_predict(requests))
            state.last_payment_seq = max(state.last_payment_seq, await _send(ingest, wave))
            tally(wave, answers)
        if on_progress is not None:
            on_progress(counts, window[-1].occurred_at)

    def tally(wave: Sequence[SimEvent], answers: Sequence[Any]) -> None:
        for payment, answer in zip(wave, answers, strict=True):
            counts.payments += 1
            counts.explored += int(answer.explored)
            if answer.action == "approve":
                counts.approved += 1
                chargeback = sim.chargeback(payment.payload["payment_id"])
                if chargeback is not None:
                    heapq.heappush(state.pending, (chargeback.occurred_at, chargeback.event_id, chargeback))
            else:
                counts.declined += 1

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
