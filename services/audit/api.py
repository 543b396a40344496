"""`d2d.v1.AuditService` over gRPC: each method is one `d2d.replay` operation.

Long operations stream progress (`ReplayProgress`) and end with one message carrying the result as
JSON. Refusals (`d2d.errors.Refusal`) raised by the operations propagate: `d2d.grpcserver` answers
each with its status and a BadRequest naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC
from typing import Any

import grpc

from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.replay.explain import explain
from d2d.replay.log import Progress
from d2d.replay.ope import DEFAULT_BOOTSTRAP, evaluate_policy
from d2d.replay.rescore import rescore
from d2d.replay.state import replay_state
from d2d.replay.verify import verify
from d2d.v1 import audit_pb2

SERVICE_NAME = "d2d.v1.AuditService"


def as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def optional_json(text: str, field: str) -> Any:
    """A JSON request field (None when empty); INVALID_ARGUMENT naming it when it does not parse."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise Refusal("INVALID_ARGUMENT", f"{field} is not JSON: {exc}", field) from None


async def progress_stream(
    work: Callable[[Progress], Awaitable[dict[str, Any]]],
) -> AsyncIterator[audit_pb2.ReplayProgress]:
    """`work(progress)`'s progress as it comes, then its result as the last message."""
    updates: asyncio.Queue[audit_pb2.ReplayProgress | None] = asyncio.Queue()

    def progress(stage: str, done: int, total: int) -> None:
        updates.put_nowait(audit_pb2.ReplayProgress(stage=stage, done=done, total=total))

    async def run() -> dict[str, Any]:
        try:
            return await work(progress)
        finally:
            updates.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (update := await updates.get()) is not None:
            yield update
        yield audit_pb2.ReplayProgress(stage="done", result_json=as_json(await task))
    finally:
        task.cancel()


class AuditApi:
    def __init__(self, log: EventLog, url: str) -> None:
        self.log = log
        self.url = url  # the runs that spread over worker processes connect on their own

    # -- GetReplayState -------------------------------------------------------------------------

    async def GetReplayState(self, request: Any, context: grpc.aio.ServicerContext) -> audit_pb2.ReplayState:
        which = request.WhichOneof("as_of")
        seq = request.seq if which == "seq" else None
        time = request.time.ToDatetime(tzinfo=UTC) if which == "time" else None
        state = await replay_state(self.log, self.url, seq=seq, time=time, entities=list(request.entities))
        return audit_pb2.ReplayState(
            seq=state["seq"], state_json=as_json({k: v for k, v in state.items() if k != "seq"})
        )

    # -- ExplainDecision ------------------------------------------------------------------------

    async def ExplainDecision(self, request: Any, context: grpc.aio.ServicerContext) -> audit_pb2.DecisionExplanation:
        if not request.name.startswith("decisions/"):
            raise Refusal("INVALID_ARGUMENT", f"{request.name!r} is not 'decisions/{{decision}}'", "name")
        explanation = await explain(self.log, request.name)
        return audit_pb2.DecisionExplanation(
            name=explanation["name"], model_version=explanation["decision"]["model_version"],
            trace_id=explanation["trace_id"], explanation_json=as_json(explanation),
        )  # fmt: skip

    # -- RescoreDecisions -----------------------------------------------------------------------

    def RescoreDecisions(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audit_pb2.ReplayProgress]:
        async def run(progress: Progress) -> dict[str, Any]:
            return await rescore(
                self.log, request.model_version, model=request.model or None, after_seq=request.after_seq,
                to_seq=request.to_seq or None, recompute_features=request.recompute_features, progress=progress,
            )  # fmt: skip

        return progress_stream(run)

    # -- EvaluatePolicy -------------------------------------------------------------------------

    def EvaluatePolicy(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audit_pb2.ReplayProgress]:
        async def run(progress: Progress) -> dict[str, Any]:
            return await evaluate_policy(
                self.log, request.model_version, policy=optional_json(request.policy_json, "policy_json"),
                model=request.model or None, after_seq=request.after_seq, to_seq=request.to_seq or None,
                clip=request.clip, bootstrap=request.bootstrap or DEFAULT_BOOTSTRAP,
                reward=optional_json(request.reward_json, "reward_json"), seed=request.seed, progress=progress,
            )  # fmt: skip

        return progress_stream(run)

    # -- VerifyLog ------------------------------------------------------------------------------

    def VerifyLog(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[audit_pb2.ReplayProgress]:
        async def run(progress: Progress) -> dict[str, Any]:
            if request.workers < 0:
                raise Refusal("INVALID_ARGUMENT", f"workers must not be negative ({request.workers})", "workers")
            return await verify(
                self.url, workers=request.workers or None, skip_projections=request.skip_projections, progress=progress
            )

        return progress_stream(run)
