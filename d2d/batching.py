"""One micro-batcher: concurrent requests folded into one call, each caller handed its part.

Where one call costs far more than any item it carries (a transaction that takes the append lock,
an XGBoost predict, a gRPC round trip), callers queue their items; while one call runs the queue
fills, and the next call takes everything waiting (up to a size). Under load a call serves many
callers; alone, a caller waits for no one. The group committer (d2d.eventlog), serving's scorer
and its feature lookups are this loop with a different `run`.

Each call is one span with a link to the span of every caller it served, and each caller's span
gets a link back to the call's: a request's trace shows the shared work it waited on, though that
work ran in a trace of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from opentelemetry import trace

from d2d import telemetry
from d2d.errors import Refusal

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(slots=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    weight: int
    deadline: float | None  # time.monotonic() after which the item is dropped rather than run
    future: asyncio.Future[Result]
    span: trace.Span  # the caller's span when it submitted (its request's trace)


class Batcher(Generic[Item, Result]):
    """Runs `run(items)` for the items waiting, one call at a time, and answers each caller.

    `run` gets the items in the order they were submitted and returns one result per item, in
    the same order. A result that is an exception fails that caller alone (how a run isolates a
    bad item); an exception raised by `run` fails every caller of that call.

    - `max_weight`: a call takes items while their total weight is below it (so at least one);
      `weight(item)` is 1 unless given (the group committer weighs a request by its events).
    - `max_waiting`: a bound on the total weight queued; `submit` beyond it is refused with
      RESOURCE_EXHAUSTED and a retry delay, so a stalled call cannot grow the queue without end.
    - `deadline` (per item, a `time.monotonic()` value): an item whose deadline has passed when a
      call would take it is dropped, its caller failed with `expired()`: no work is done for a
      caller who stopped waiting. A caller who was cancelled is dropped the same way.

    The calls run in a task of their own with an empty context: a call is no part of the trace of
    whichever request happened to start the batcher. Each call is one span (named `span`, a root
    of its own trace, the parent of what `run` traces) linked to every caller's span at `submit`,
    and each caller's span is linked to it; a caller keeps its own steps in its own trace.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[Sequence[Result | BaseException]]],
        *,
        name: str,
        max_weight: int,
        weight: Callable[[Item], int] | None = None,
        max_waiting: int | None = None,
        unit: str = "requests",
        expired: Callable[[], BaseException] | None = None,
        span: str | None = None,
    ) -> None:
        self.name = name  # what the items wait for, as a refusal names it ("the event log")
        self.max_weight = max_weight
        self.max_waiting = max_waiting
        self.unit = unit  # what weight counts, as a refusal names it ("events")
        self._run_items = run
        self._weight = weight
        self.span_name = span or f"batch: {name}"
        self._tracer = telemetry.tracer(__name__)
        self._expired = expired or (lambda: TimeoutError(f"the deadline passed before {name} took the request"))
        self._queue: collections.deque[_Waiting[Item, Result]] = collections.deque()
        self._queued = 0  # total weight in the queue
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed_with: BaseException | None = None

    def __len__(self) -> int:
        """Requests waiting for a call (not those a call has taken)."""
        return len(self._queue)

    @property
    def queued(self) -> int:
        """Total weight waiting for a call."""
        return self._queued

    def submit(self, item: Item, *, deadline: float | None = None) -> asyncio.Future[Result]:
        """Queue `item`; the future returned holds its result once a call has run it.

        The future fails with what `run` raised or returned for the item, or `expired()` if
        `deadline` passes first. Raises Refusal (RESOURCE_EXHAUSTED) at once when `max_waiting` is
        already reached. (A plain function, not a coroutine: one frame less per item on hot paths.)"""
        weight = 1 if self._weight is None else self._weight(item)
        if self.max_waiting is not None and self._queued and self._queued + weight > self.max_waiting:
            raise Refusal(
                "RESOURCE_EXHAUSTED",
                f"{self._queued} {self.unit} are already waiting for {self.name} (the limit is"
                f" {self.max_waiting}); retry shortly",
                retry_after=1.0,
            )
        if self._task is None or self._task.done():
            # an empty context: the shared loop is no part of the trace of the caller who starts it
            self._task = asyncio.create_task(self._loop(), name=f"batcher: {self.name}", context=contextvars.Context())
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(item, weight, deadline, future, trace.get_current_span()))
        self._queued += weight
        self._wake.set()
        return future

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(0)  # let requests already on their way join this call
            taken = self._take()
            if taken:
                await self._call(taken)

    def _take(self) -> list[_Waiting[Item, Result]]:
        """The next call's requests: live ones, in order, while their weight is below `max_weight`."""
        taken: list[_Waiting[Item, Result]] = []
        size = 0
        now = time.monotonic()
        queue = self._queue
        while queue and size < self.max_weight:
            waiting = queue.popleft()
            self._queued -= waiting.weight
            if waiting.future.done():  # the caller was cancelled
                continue
            if waiting.deadline is not None and now >= waiting.deadline:
                waiting.future.set_exception(self._expired())
                continue
            taken.append(waiting)
            size += waiting.weight
        return taken

    async def _call(self, taken: list[_Waiting[Item, Result]]) -> None:
        served = [trace.Link(c) for c in (w.span.get_span_context() for w in taken) if c.is_valid]
        attributes = {"d2d.batch.requests": len(taken), "d2d.batch.weight": sum(w.weight for w in taken)}
        try:
            with self._tracer.start_as_current_span(self.span_name, links=served, attributes=attributes) as span:
                _link_back(taken, span.get_span_context())
                results = await self._run_items([w.item for w in taken])
                if len(results) != len(taken):
                    raise RuntimeError(f"{self.name}: a call returned {len(results)} results for {len(taken)} requests")
                failed = sum(1 for r in results if isinstance(r, BaseException))
                if failed:
                    span.set_attribute("d2d.batch.failed", failed)
        except asyncio.CancelledError:
            outcome_unknown = ConnectionError(f"{self.name} closed while a call ran; its outcome is unknown")
            _fail(taken, self._closed_with and outcome_unknown)
            raise
        except Exception as exc:
            _fail(taken, exc)
            return
        for waiting, result in zip(taken, results, strict=True):
            if waiting.future.done():
                continue
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)

    def close(self, error: BaseException | None = None) -> None:
        """Stop: the call running is cancelled and every waiting caller fails with `error`."""
        self._closed_with = error or ConnectionError(f"{self.name} closed; the request was not run")
        if self._task is not None:
            self._task.cancel()
        waiting, self._queue = list(self._queue), collections.deque()
        self._queued = 0
        _fail(waiting, self._closed_with)

    async def wait_closed(self) -> None:
        """Return once the call that `close` cancelled has stopped (its resources are free)."""
        task, self._task = self._task, None
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._closed_with = None


def _link_back(taken: Sequence[_Waiting[Item, Result]], call: trace.SpanContext) -> None:
    """Link each caller's span (still open: its caller awaits the call) to the call's span."""
    if not call.is_valid:
        return
    for waiting in taken:
        if waiting.span.is_recording():
            waiting.span.add_link(call)


def _fail(waiting: Sequence[_Waiting[Item, Result]], error: BaseException | None) -> None:
    for w in waiting:
        if not w.future.done():
            if error is None:
                w.future.cancel()
            else:
                w.future.set_exception(error)
