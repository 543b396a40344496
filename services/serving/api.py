"""`d2d.v1.ServingService` over gRPC: route, fetch features, score, decide, log, answer."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
from google.protobuf import json_format

from d2d import grpcserver
from d2d.client import FeatureClient
from d2d.decisions import choose, decision_id, route
from d2d.eventlog import LOG_UNREACHABLE, EventLog, GroupCommitter, NewEvent
from d2d.v1 import serving_pb2
from services.serving.models import Deployment, FeatureLookups, NoProductionVersion, plain

SERVICE_NAME = "d2d.v1.ServingService"
MAX_BATCH = 1000
# Time kept back from the caller's deadline to answer UNAVAILABLE in time, rather than run out.
DEADLINE_MARGIN = 0.005


class Refused(Exception):
    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


def _trace_id() -> str:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def response_from_payload(payload: dict[str, Any], seq: int) -> serving_pb2.PredictResponse:
    return serving_pb2.PredictResponse(
        decision_id=payload["decision_id"],
        score=payload["score"],
        action=payload["action"],
        propensity=payload["propensity"],
        model_version=payload["model_version"],
        arm=payload["arm"],
        feature_watermark=payload["feature_watermark"],
        unknown_entities=payload["unknown_entities"],
        shadow_scores=[
            serving_pb2.ShadowScore(model_version=s["model_version"], score=s["score"]) for s in payload["shadow"]
        ],
        explored=payload["explored"],
        seq=seq,
    )


class ServingApi:
    def __init__(self, deployments: Any, features: FeatureClient, log: EventLog, committer: GroupCommitter) -> None:
        self.deployments = deployments  # services.serving.server.Deployments: get(model) -> Deployment
        self.features = features
        self.lookups = FeatureLookups(features)
        self.log = log
        self.committer = committer

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> serving_pb2.PredictResponse:
        deadline = _deadline(context)
        try:
            return await self._decide(request, deadline, "")
        except Refused as r:
            await grpcserver.abort(context, _status(r))

    async def BatchPredict(self, request: Any, context: grpc.aio.ServicerContext) -> serving_pb2.BatchPredictResponse:
        if not request.requests or len(request.requests) > MAX_BATCH:
            message = f"requests: {len(request.requests)} given; 1 to {MAX_BATCH} per call"
            await grpcserver.abort(context, grpcserver.status("INVALID_ARGUMENT", message, field="requests"))
        deadline = _deadline(context)
        try:
            answers = await asyncio.gather(
                *(self._decide(r, deadline, f"requests[{i}].") for i, r in enumerate(request.requests))
            )
        except Refused as r:
            await grpcserver.abort(context, _status(r))
        return serving_pb2.BatchPredictResponse(responses=answers)

    async def _decide(self, request: Any, deadline: float, where: str) -> serving_pb2.PredictResponse:
        model = request.model.removeprefix("models/")
        if not request.model.startswith("models/") or not model:
            raise Refused("INVALID_ARGUMENT", f"model {request.model!r} must be 'models/{{model}}'", f"{where}model")
        if not request.unit_id:
            raise Refused("INVALID_ARGUMENT", "unit_id is required (it decides the arm)", f"{where}unit_id")
        if not request.entities:
            raise Refused("INVALID_ARGUMENT", "entities: name at least one entity id", f"{where}entities")
        try:
            deployment: Deployment = await self.deployments.get(model)
        except NoProductionVersion as exc:
            raise Refused("FAILED_PRECONDITION", str(exc), f"{where}model") from None
        except LookupError as exc:
            raise Refused("NOT_FOUND", str(exc), f"{where}model") from None
        decision = decision_id(model, request.request_id or None)
        if request.request_id:
            earlier = await self._within(self.log.get(decision), deadline, "reading the decision log")
            if earlier is not None:
                return response_from_payload(earlier.payload, earlier.seq)

        context = json_format.MessageToDict(request.context) if request.HasField("context") else {}
        as_of = _as_of(context)
        arm = route(model, request.unit_id, deployment.policy["canary_share"]) if deployment.canary else "production"
        acting = deployment.canary if arm == "canary" else deployment.production
        assert acting is not None
        try:
            values, unknown, watermark = await self.lookups.get(
                tuple(deployment.feature_refs()), dict(request.entities), as_of, deadline
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise Refused(code.name, f"features: {exc.details()}") from None
            raise Refused(code.name, f"features: {exc.details()}", f"{where}entities") from None
        inputs = acting.inputs(values, context)
        shadows = deployment.shadows
        scores = await asyncio.gather(
            acting.batcher.score(inputs), *(s.batcher.score(s.inputs(values, context)) for s in shadows)
        )
        choice = choose(scores[0], deployment.policy, decision)
        payload = {
            "decision_id": str(decision), "model": model, "model_version": acting.name, "arm": arm,
            "score": scores[0], "action": choice.action, "propensity": choice.propensity, "explored": choice.explored,
            "greedy_action": choice.greedy_action, "action_scores": choice.action_scores, "policy": deployment.policy,
            "features": values, "inputs": [plain(x) for x in inputs], "feature_watermark": watermark,
            "as_of": as_of.isoformat(), "unknown_entities": unknown,
            "shadow": [{"model_version": s.name, "score": sc} for s, sc in zip(shadows, scores[1:], strict=True)],
            "entities": dict(request.entities), "context": context, "unit_id": request.unit_id,
            "request_id": request.request_id, "trace_id": _trace_id(),
        }  # fmt: skip
        event = NewEvent(
            decision, "decision.made", 1, "decision", str(decision), datetime.now(UTC),
            orjson.dumps(payload).decode(), {"producer": "serving", "model": model},
        )  # fmt: skip
        [logged] = await self._within(self.committer.append([event]), deadline, "recording the decision")
        if logged.duplicate:  # a concurrent repeat of the same request id got there first
            earlier = await self.log.get(decision)
            assert earlier is not None
            return response_from_payload(earlier.payload, earlier.seq)
        return response_from_payload(payload, logged.seq)

    async def _within(self, awaitable: Any, deadline: float, what: str) -> Any:
        """Await within the caller's deadline; the log unreachable or too slow is UNAVAILABLE."""
        remaining = deadline - time.monotonic() - DEADLINE_MARGIN
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(awaitable)), remaining)
        except TimeoutError:
            raise Refused(
                "UNAVAILABLE", f"{what} did not complete within the deadline; no decision was returned"
            ) from None
        except LOG_UNREACHABLE as exc:
            raise Refused("UNAVAILABLE", f"the decision log is unreachable ({exc}); no decision was returned") from None


def _deadline(context: grpc.aio.ServicerContext) -> float:
    remaining = context.time_remaining()
    return time.monotonic() + (remaining if remaining is not None else 30.0)


def _as_of(context: dict[str, Any]) -> datetime:
    value = context.get("occurred_at")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            raise Refused(
                "INVALID_ARGUMENT", f"context.occurred_at {value!r} is not RFC 3339", "context.occurred_at"
            ) from None
    return datetime.now(UTC)


def _status(r: Refused) -> Any:
    if r.code == "UNAVAILABLE":
        return grpcserver.unavailable(r.message, 0.5)
    return grpcserver.status(r.code, r.message, field=r.field)
