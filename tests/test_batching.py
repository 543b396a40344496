"""The micro-batcher the group committer and serving share: who shares a call, and who fails alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from d2d import telemetry
from d2d.batching import Batcher
from d2d.errors import Refusal


class Stalled:
    """A `run` that records each call's items and holds a call until released (a busy database)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.calls.append(items)
        await self.release.wait()
        return [ValueError(f"{i} is negative") if i < 0 else i * 10 for i in items]


async def stall(batcher: Batcher[int, int], run: Stalled, item: int = 1) -> asyncio.Future[int]:
    """Submit `item` and return once its call runs and holds (later requests queue behind it)."""
    run.release.clear()
    calls = len(run.calls)
    running = asyncio.ensure_future(batcher.submit(item))
    await until(lambda: len(run.calls) == calls + 1)
    return running


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the batcher never got there")


async def test_requests_that_arrive_while_a_call_runs_share_the_next_call() -> None:
    run = Stalled()
    batcher: Batcher[int, int] = Batcher(run, name="the test", max_weight=100)
    first = await stall(batcher, run)
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4)]
    await until(lambda: len(batcher) == 3)
    run.release.set()
    assert await first == 10
    assert await asyncio.gather(*waiting) == [20, 30, 40]
    assert run.calls == [[1], [2, 3, 4]]
    batcher.close()


async def test_a_call_takes_requests_while_their_weight_is_below_the_limit() -> None:
    run = Stalled()
    batcher: Batcher[int, int] = Batcher(run, name="the test", max_weight=5, weight=lambda i: 3)
    first = await stall(batcher, run, 0)
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
    await until(lambda: batcher.queued == 9)
    run.release.set()
    await asyncio.gather(first, *waiting)
    assert run.calls == [[0], [1, 2], [3]]
    batcher.close()


async def test_a_result_that_is_an_error_fails_only_its_caller_and_a_raising_call_fails_all() -> None:
    batcher: Batcher[int, int] = Batcher(Stalled(), name="the test", max_weight=100)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in (1, -2, 3)), return_exceptions=True)
    assert outcomes[0] == 10 and outcomes[2] == 30
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "-2 is negative"
    batcher.close()

    async def broken(items: list[int]) -> list[int]:
        raise RuntimeError("the service is down")

    failing: Batcher[int, int] = Batcher(broken, name="the test", max_weight=100)
    outcomes = await asyncio.gather(*(failing.submit(i) for i in (1, 2)), return_exceptions=True)
    assert [str(o) for o in outcomes] == ["the service is down"] * 2
    failing.close()


async def test_a_request_whose_deadline_passes_in_the_queue_is_never_run() -> None:
    run = Stalled()

    class Late(Exception):
        pass

    batcher: Batcher[int, int] = Batcher(run, name="the test", max_weight=100, expired=Late)
    first = await stall(batcher, run)
    late = asyncio.ensure_future(batcher.submit(2, deadline=time.monotonic() - 1))
    in_time = asyncio.ensure_future(batcher.submit(3, deadline=time.monotonic() + 3600))
    await until(lambda: len(batcher) == 2)
    run.release.set()
    assert await first == 10 and await in_time == 30
    with pytest.raises(Late):
        await late
    assert run.calls == [[1], [3]]
    batcher.close()


async def test_beyond_the_waiting_bound_a_request_is_refused_with_a_retry_delay() -> None:
    run = Stalled()
    batcher: Batcher[int, int] = Batcher(
        run, name="the test service", max_weight=100, weight=lambda i: 10, max_waiting=20, unit="rows"
    )
    first = await stall(batcher, run)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    await until(lambda: batcher.queued == 20)
    with pytest.raises(Refusal) as refused:
        await batcher.submit(4)
    assert refused.value.code == "RESOURCE_EXHAUSTED" and refused.value.retry_after
    assert "20 rows are already waiting for the test service" in refused.value.message
    run.release.set()
    assert await asyncio.gather(first, *queued) == [10, 20, 30]
    assert await batcher.submit(4) == 40, "once the queue drains, requests are taken again"
    batcher.close()


async def test_a_cancelled_caller_is_dropped_and_closing_fails_the_ones_still_waiting() -> None:
    run = Stalled()
    batcher: Batcher[int, int] = Batcher(run, name="the test", max_weight=100)
    first = await stall(batcher, run)
    gone = asyncio.ensure_future(batcher.submit(2))
    kept = asyncio.ensure_future(batcher.submit(3))
    await until(lambda: len(batcher) == 2)
    gone.cancel()
    run.release.set()
    assert await first == 10 and await kept == 30
    assert run.calls == [[1], [3]]

    running = await stall(batcher, run, 5)
    stranded = asyncio.ensure_future(batcher.submit(6))
    await until(lambda: len(batcher) == 1)
    batcher.close(ConnectionError("closed; none was stored"))
    await batcher.wait_closed()
    with pytest.raises(ConnectionError, match="none was stored"):
        await stranded
    with pytest.raises(ConnectionError, match="outcome is unknown"):
        await running


async def test_a_call_is_one_span_linked_to_every_caller_it_served_and_each_caller_to_it(
    spans: InMemorySpanExporter,
) -> None:
    run = Stalled()
    batcher: Batcher[int, int] = Batcher(run, name="the test", max_weight=100, span="test.shared_call")
    tracer = telemetry.tracer("tests")

    async def request(i: int) -> trace.SpanContext:
        with tracer.start_as_current_span(f"request {i}") as own:
            await batcher.submit(i)
            return own.get_span_context()

    shared = await asyncio.gather(*(request(i) for i in (1, 2, 3)))  # submitted together: one call
    assert run.calls == [[1, 2, 3]]
    batcher.close()
    [call] = [s for s in spans.get_finished_spans() if s.name == "test.shared_call"]
    assert [link.context.span_id for link in call.links] == [c.span_id for c in shared]
    assert call.parent is None and call.context.trace_id not in {c.trace_id for c in shared}
    assert call.attributes["d2d.batch.requests"] == 3
    callers = [s for s in spans.get_finished_spans() if s.context in shared]
    assert [[link.context.span_id for link in c.links] for c in callers] == [[call.context.span_id]] * 3
