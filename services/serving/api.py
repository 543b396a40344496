"""`d2d.v1.ServingService` over gRPC: admit, check, route, fetch features, score, decide, log, answer.

Every refusal is a `d2d.errors.Refusal`, answered by `d2d.grpcserver` with its precise status (a BadRequest naming the
field where there is one, RetryInfo where a retry later can succeed); nothing answers UNKNOWN.

- Admission: at most `max_in_flight` rows (Predicts, BatchPredict rows) are being decided at once;
  beyond that a call is refused at once with RESOURCE_EXHAUSTED and RetryInfo instead of queueing,
  so memory stays flat under overload. A row's slot is held until its decision's commit settles,
  also when that outlives the call.
- Checks before deciding: ids (non-empty, bounded, no NUL), the context's size, finite numbers and
  storable strings anywhere in it, `occurred_at` (RFC 3339, within sane bounds), and every context
  field the model's versions read (`Deployment.request_inputs`) of the declared kind. A BatchPredict
  is checked whole before any of its rows is decided.
- Deadlines: the answer is due `margin` before the caller's deadline (max(20 ms, 10 % of the
  budget)), so a call that cannot finish gets UNAVAILABLE with RetryInfo rather than running out.
  The decision goes to the group committer with that deadline: if no transaction has taken it
  by then, it is never committed.
- Withdrawn decisions: a decision whose commit was already under way when its caller was answered
  with an error (or went away) may still commit. With a `request_id` it stands: decision ids are
  derived from request ids, so a retry with the same request_id returns it (the error says so).
  Without one the caller can never obtain it, so once it commits it is followed by a
  `decision.withdrawn` event (entity decision/<id>, payload {decision_id, model, reason}) that
  feedback, metrics and OPE ignore it by; the error says no decision was recorded. The same holds
  for rows of a BatchPredict answered with an error because another row failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import orjson
from google.protobuf import struct_pb2

from d2d import telemetry
from d2d.contracts.upcasting import upcast_event
from d2d.errors import Refusal
from d2d.eventlog import LOG_UNREACHABLE, CommitDeadlineExceeded, EventLog, GroupCommitter, NewEvent
from d2d.features.definitions import NUMBER, SCALAR, TEXT, TIME, resolve_path
from d2d.features.fold import StaleQueryError
from d2d.features.online import MissingEntityKey
from d2d.training.spec import SpecError
from d2d.v1 import serving_pb2
from services.serving.decisions import choose, decision_id, route
from services.serving.features import Features, NotFoldedYet
from services.serving.models import Deployment, NoProductionVersion, plain

log = logging.getLogger(__name__)

SERVICE_NAME = "d2d.v1.ServingService"
MAX_BATCH = 1000
# Rows (Predicts and BatchPredict rows) being decided at once; beyond it, RESOURCE_EXHAUSTED.
DEFAULT_MAX_IN_FLIGHT = 4000
# The request context, serialized (protobuf bytes); it is logged inside the decision.made event.
MAX_CONTEXT_BYTES = 64 << 10
MAX_ID_CHARS = 256  # model, unit, request and entity ids and entity types
# Time kept back from the caller's deadline to answer UNAVAILABLE in time rather than run out.
MIN_DEADLINE_MARGIN = 0.02
DEADLINE_MARGIN_SHARE = 0.1
NO_DEADLINE_SECONDS = 30.0  # the budget of a call that sets no deadline
RETRY_OVERLOADED = 0.2  # RetryInfo when over the in-flight limit
RETRY_UNAVAILABLE = 0.5  # RetryInfo when the log or features did not answer in time
# `context.occurred_at` bounds: features are computed for that time.
EARLIEST_AS_OF = datetime(1970, 1, 1, tzinfo=UTC)
MAX_AS_OF_AHEAD = timedelta(days=1)
WITHDRAW_ATTEMPTS = 5

NOT_RECORDED = "no decision was returned or recorded; retry"
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})?")


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


class InFlight:
    """Rows admitted and not yet settled: a bound instead of a queue."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {limit}")
        self.limit = limit
        self.rows = 0
        self.refused = 0

    def admit(self, rows: int) -> list[Slot]:
        if self.rows + rows > self.limit:
            self.refused += rows
            raise Refusal(
                "RESOURCE_EXHAUSTED",
                f"serving is deciding {self.rows} requests (its limit is {self.limit}); retry shortly",
                retry_after=RETRY_OVERLOADED,
            )
        self.rows += rows
        return [Slot(self) for _ in range(rows)]


class Slot:
    """One admitted row. Released when the row is settled: by the call, or by a late commit."""

    def __init__(self, gate: InFlight) -> None:
        self.gate = gate
        self.held = True
        self.deferred = False  # the row's commit outlives the call; it releases the slot

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.rows -= 1


@dataclass
class Row:
    """A checked request, ready to decide."""

    request: Any
    where: str  # "" or "requests[3]."
    model: str
    deployment: Deployment
    context: dict[str, Any]
    as_of: datetime


class ServingApi:
    def __init__(
        self, deployments: Any, features: Features, log: EventLog, committer: GroupCommitter,
        *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:  # fmt: skip
        self.deployments = deployments  # services.serving.server.Deployments: loaded(model), get(model)
        self.features = features  # in-process (LocalFeatures) or the features service (RemoteFeatures)
        self.log = log
        self.committer = committer
        self.in_flight = InFlight(max_in_flight)
        self.withdrawn = 0
        self._settling: set[asyncio.Future[Any]] = set()  # late commits and withdrawals not yet done
        self._tracer = telemetry.tracer(__name__)  # a span per step of a decision, in its Predict's trace

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> serving_pb2.PredictResponse:
        answer_by = _answer_by(context)
        try:
            [slot] = self.in_flight.admit(1)
            try:
                row = await self._check(request, "", answer_by)
                return await self._decide(row, answer_by, slot)
            finally:
                if not slot.deferred:
                    slot.release()
        except Refusal:
            raise  # grpcserver answers it with its status
        except Exception as exc:  # a fault of serving itself: still a precise answer, never UNKNOWN
            log.exception("serving: Predict failed")
            raise Refusal("INTERNAL", f"serving failed ({type(exc).__name__}); {NOT_RECORDED}") from exc

    async def BatchPredict(self, request: Any, context: grpc.aio.ServicerContext) -> serving_pb2.BatchPredictResponse:
        most = min(MAX_BATCH, self.in_flight.limit)
        if not request.requests or len(request.requests) > most:
            message = f"requests: {len(request.requests)} given; 1 to {most} per call"
            raise Refusal("INVALID_ARGUMENT", message, "requests")
        answer_by = _answer_by(context)
        try:
            slots = self.in_flight.admit(len(request.requests))
            try:
                rows = [await self._check(r, f"requests[{i}].", answer_by) for i, r in enumerate(request.requests)]
                answers = await asyncio.gather(
                    *(self._decide(row, answer_by, slot) for row, slot in zip(rows, slots, strict=True)),
                    return_exceptions=True,
                )
            finally:
                for slot in slots:
                    if not slot.deferred:
                        slot.release()
            failed = [(row, a) for row, a in zip(rows, answers, strict=True) if isinstance(a, BaseException)]
            if failed:
                self._batch_failed(rows, answers)
                row, first = failed[0]
                if isinstance(first, Refusal):
                    raise Refusal(
                        first.code, f"{first.message} (and {len(failed) - 1} more rows failed; the decisions of the"
                        " other rows were not returned: those with a request_id are returned by a retry with the"
                        " same request_id, the others were withdrawn)", first.field, retry_after=first.retry_after,
                    )  # fmt: skip
                raise first
            return serving_pb2.BatchPredictResponse(responses=answers)
        except Refusal:
            raise
        except Exception as exc:
            log.exception("serving: BatchPredict failed")
            raise Refusal("INTERNAL", f"serving failed ({type(exc).__name__}); {NOT_RECORDED}") from exc

    def _batch_failed(self, rows: list[Row], answers: list[Any]) -> None:
        """The call fails as a whole: rows decided and recorded without a request_id are withdrawn."""
        for row, answer in zip(rows, answers, strict=True):
            if isinstance(answer, serving_pb2.PredictResponse) and not row.request.request_id:
                self._track(self._withdraw(row, answer.decision_id, "another row of its BatchPredict failed"))

    # -- checks ---------------------------------------------------------------------------------

    async def _check(self, request: Any, where: str, answer_by: float) -> Row:
        """The request's ids, context and declared inputs, or Refusal naming the field."""
        model = request.model.removeprefix("models/")
        if not request.model.startswith("models/") or not model:
            raise Refusal("INVALID_ARGUMENT", f"model {request.model!r} must be 'models/{{model}}'", f"{where}model")
        _check_id(model, f"{where}model")
        if not request.unit_id:
            raise Refusal("INVALID_ARGUMENT", "unit_id is required (it decides the arm)", f"{where}unit_id")
        _check_id(request.unit_id, f"{where}unit_id")
        if request.request_id:
            _check_id(request.request_id, f"{where}request_id")
        if request.min_feature_watermark < 0:
            field = f"{where}min_feature_watermark"
            raise Refusal(
                "INVALID_ARGUMENT", f"{field} is {request.min_feature_watermark}; a log position is >= 0", field
            )
        if not request.entities:
            raise Refusal("INVALID_ARGUMENT", "entities: name at least one entity id", f"{where}entities")
        for entity_type, entity_id in request.entities.items():
            _check_id(entity_type, f"{where}entities")
            _check_id(entity_id, f"{where}entities.{entity_type}")
        context: dict[str, Any] = {}
        if request.HasField("context"):
            size = request.context.ByteSize()
            if size > MAX_CONTEXT_BYTES:
                raise Refusal(
                    "INVALID_ARGUMENT", f"context is {size} bytes; the limit is {MAX_CONTEXT_BYTES} bytes",
                    f"{where}context",
                )  # fmt: skip
            context = _plain_struct(request.context, f"{where}context")
        as_of = _as_of(context, f"{where}context.occurred_at")
        deployment = await self._deployment(model, where, answer_by)
        _check_declared(context, deployment, where)
        return Row(request, where, model, deployment, context, as_of)

    async def _deployment(self, model: str, where: str, answer_by: float) -> Deployment:
        loaded = self.deployments.loaded(model)
        if loaded is not None:
            return loaded
        try:
            return await self._within(self.deployments.get(model), answer_by, "loading the model")
        except Refusal:
            raise
        except NoProductionVersion as exc:
            raise Refusal("FAILED_PRECONDITION", str(exc), f"{where}model") from None
        except LookupError as exc:
            raise Refusal("NOT_FOUND", str(exc), f"{where}model") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSIENT:
                message = f"the registry did not answer ({exc.code().name}: {exc.details()}); {NOT_RECORDED}"
                raise Refusal("UNAVAILABLE", message, retry_after=RETRY_UNAVAILABLE) from None
            message = f"models/{model} cannot be loaded: the registry answered {exc.code().name}: {exc.details()}"
            raise Refusal("FAILED_PRECONDITION", message, f"{where}model") from None
        except SpecError as exc:
            raise Refusal("FAILED_PRECONDITION", f"models/{model} cannot be served: {exc}", f"{where}model") from None
        except Exception as exc:  # a view it needs is not registered, an artifact that does not load, ...
            message = f"models/{model} cannot be loaded ({type(exc).__name__}: {exc})"
            raise Refusal("FAILED_PRECONDITION", message, f"{where}model") from None

    # -- deciding -------------------------------------------------------------------------------

    async def _decide(self, row: Row, answer_by: float, slot: Slot) -> serving_pb2.PredictResponse:
        request, deployment = row.request, row.deployment
        decision = decision_id(row.model, request.request_id or None)
        if request.request_id:
            earlier = await self._within(self.log.get(decision), answer_by, "reading the decision log")
            if earlier is not None:
                return response_from_payload(upcast_event(earlier).payload, earlier.seq)
        arm = route(row.model, request.unit_id, deployment.canary_share) if deployment.canary else "production"
        acting = deployment.canary if arm == "canary" else deployment.production
        assert acting is not None
        with self._tracer.start_as_current_span("serving.features"):
            values, unknown, watermark = await self._features(row, answer_by)
        shadows = deployment.shadows
        try:
            inputs = acting.inputs(values, row.context)
            with self._tracer.start_as_current_span("serving.score"):
                scoring = asyncio.gather(
                    acting.batcher.score(inputs), *(s.batcher.score(s.inputs(values, row.context)) for s in shadows)
                )
                scores = await self._within(scoring, answer_by, "scoring")
            choice = choose(scores[0], deployment.policy, decision)
        except Refusal:
            raise
        except Exception as exc:
            raise Refusal(
                "INTERNAL", f"scoring with {acting.name} failed ({type(exc).__name__}); {NOT_RECORDED}"
            ) from None
        payload = {
            "decision_id": str(decision), "model": row.model, "model_version": acting.name, "arm": arm,
            "score": scores[0], "action": choice.action, "propensity": choice.propensity, "explored": choice.explored,
            "greedy_action": choice.greedy_action, "action_scores": choice.action_scores,
            "policy": deployment.logged_policy,
            "features": values, "inputs": [plain(x) for x in inputs], "feature_watermark": watermark,
            "as_of": row.as_of.isoformat(), "unknown_entities": unknown,
            "shadow": [{"model_version": s.name, "score": sc} for s, sc in zip(shadows, scores[1:], strict=True)],
            "entities": dict(request.entities), "context": row.context, "unit_id": request.unit_id,
            "request_id": request.request_id, "trace_id": _trace_id(),
        }  # fmt: skip
        metadata = {"producer": "serving", "model": row.model}
        traceparent = telemetry.current_traceparent()  # the Predict's span, not its commit's or the batch's
        if traceparent:
            metadata["traceparent"] = traceparent
        event = NewEvent(
            decision, "decision.made", 1, "decision", str(decision), datetime.now(UTC),
            orjson.dumps(payload).decode(), metadata,
        )  # fmt: skip
        with self._tracer.start_as_current_span("serving.commit"):
            logged = await self._record(event, row, answer_by, slot)
        if logged.duplicate:  # a concurrent repeat of the same request id got there first
            earlier = await self._within(self.log.get(decision), answer_by, "reading the recorded decision")
            assert earlier is not None
            return response_from_payload(upcast_event(earlier).payload, earlier.seq)
        return response_from_payload(payload, logged.seq)

    async def _features(self, row: Row, answer_by: float) -> tuple[dict[str, Any], list[str], int]:
        refs = tuple(row.deployment.feature_refs())
        try:  # awaited in place (no task): an in-process read mostly does not wait at all
            return await self.features.get(
                refs, dict(row.request.entities), row.as_of, answer_by, row.request.min_feature_watermark
            )
        except Refusal:
            raise
        except TimeoutError:
            message = f"fetching features did not finish within the deadline; {NOT_RECORDED}"
            raise Refusal("UNAVAILABLE", message, retry_after=RETRY_UNAVAILABLE) from None
        except NotFoldedYet as exc:
            message = f"{exc} (min_feature_watermark); {NOT_RECORDED}"
            raise Refusal("UNAVAILABLE", message, retry_after=RETRY_UNAVAILABLE) from None
        except MissingEntityKey as exc:  # read in-process: the same answers as the features service's
            raise Refusal("INVALID_ARGUMENT", f"features: entities has {exc}", f"{row.where}entities") from None
        except StaleQueryError as exc:
            raise Refusal("OUT_OF_RANGE", f"features: {exc}", f"{row.where}context.occurred_at") from None
        except LookupError as exc:
            message = f"features for models/{row.model} cannot be served: {exc}"
            raise Refusal("FAILED_PRECONDITION", message, f"{row.where}model") from None
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details()
            if code in _TRANSIENT:
                raise Refusal(
                    "UNAVAILABLE", f"features: {code.name}: {details}; {NOT_RECORDED}", retry_after=RETRY_UNAVAILABLE
                ) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise Refusal("INVALID_ARGUMENT", f"features: {details}", f"{row.where}entities") from None
            if code == grpc.StatusCode.OUT_OF_RANGE:
                raise Refusal("OUT_OF_RANGE", f"features: {details}", f"{row.where}context.occurred_at") from None
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                message = f"features for models/{row.model} cannot be served: {details}"
                raise Refusal("FAILED_PRECONDITION", message, f"{row.where}model") from None
            raise Refusal("INTERNAL", f"features: {code.name}: {details}; {NOT_RECORDED}") from None
        except Exception as exc:
            raise Refusal(
                "UNAVAILABLE", f"features: {type(exc).__name__}; {NOT_RECORDED}", retry_after=RETRY_UNAVAILABLE
            ) from None

    async def _record(self, event: NewEvent, row: Row, answer_by: float, slot: Slot) -> Any:
        """Commit the decision before answering; see the module's docstring for a late commit."""
        remaining = answer_by - time.monotonic()
        if remaining <= 0:
            raise Refusal(
                "UNAVAILABLE",
                f"the deadline left no time to record the decision; {NOT_RECORDED}",
                retry_after=RETRY_UNAVAILABLE,
            )
        append = asyncio.ensure_future(self.committer.append([event], deadline=answer_by))
        try:
            [logged] = await asyncio.wait_for(asyncio.shield(append), remaining)
            return logged
        except CommitDeadlineExceeded:
            message = f"the decision log did not take the decision before the deadline; {NOT_RECORDED}"
            raise Refusal("UNAVAILABLE", message, retry_after=RETRY_UNAVAILABLE) from None
        except TimeoutError:
            if append.done() and isinstance(append.exception(), CommitDeadlineExceeded):
                message = f"the decision log did not take the decision before the deadline; {NOT_RECORDED}"
                raise Refusal("UNAVAILABLE", message, retry_after=RETRY_UNAVAILABLE) from None
            self._settle_late(append, row, event, slot, "its caller was answered UNAVAILABLE (deadline)")
            if row.request.request_id:
                message = (
                    "recording the decision did not finish within the deadline; no decision was returned: retry"
                    " with the same request_id (it returns the decision if it was recorded, else decides anew)"
                )
            else:
                message = (
                    "recording the decision did not finish within the deadline; no decision was returned or"
                    " recorded (one that commits late is withdrawn); retry (pass a request_id to make retries safe)"
                )
            raise Refusal("UNAVAILABLE", message, retry_after=RETRY_UNAVAILABLE) from None
        except asyncio.CancelledError:  # the caller went away (or its batch was cancelled)
            self._settle_late(append, row, event, slot, "its call was cancelled before the commit finished")
            raise
        except LOG_UNREACHABLE as exc:
            raise _log_unreachable(exc) from None
        except Refusal as r:  # the committer's queue is full (RESOURCE_EXHAUSTED), or an event it cannot store
            raise Refusal(r.code, r.message, _under(row.where, r.field), retry_after=r.retry_after) from None

    def _settle_late(self, append: asyncio.Future[Any], row: Row, event: NewEvent, slot: Slot, reason: str) -> None:
        """The caller got no decision but the commit goes on: hold the row's slot until it settles,
        and withdraw the decision if it commits and the caller cannot claim it (no request_id)."""
        slot.deferred = True

        def settled(future: asyncio.Future[Any]) -> None:
            stored = not future.cancelled() and future.exception() is None
            if stored and not row.request.request_id and not future.result()[0].duplicate:
                withdrawal = self._track(self._withdraw(row, str(event.event_id), reason))
                withdrawal.add_done_callback(lambda _: slot.release())
            else:
                slot.release()

        self._track(append)
        append.add_done_callback(settled)

    async def _withdraw(self, row: Row, decision: str, reason: str) -> None:
        """Append `decision.withdrawn` (its id derived from the decision's: appending it twice stores one)."""
        payload = {"decision_id": decision, "model": row.model, "reason": reason}
        event = NewEvent(
            uuid.uuid5(uuid.UUID(decision), "withdrawn"), "decision.withdrawn", 1, "decision", decision,
            datetime.now(UTC), orjson.dumps(payload).decode(), {"producer": "serving", "model": row.model},
        )  # fmt: skip
        for attempt in range(WITHDRAW_ATTEMPTS):
            try:
                await self.committer.append([event])
                self.withdrawn += 1
                return
            except (Refusal, *LOG_UNREACHABLE) as exc:
                log.warning("serving: withdrawing decision %s failed (%s); attempt %d", decision, exc, attempt + 1)
                await asyncio.sleep(0.5 * 2**attempt)
        log.error(
            "serving: decision %s (%s) committed after its caller got an error and stays unwithdrawn", decision, reason
        )

    def _track(self, awaitable: Any) -> asyncio.Future[Any]:
        future = asyncio.ensure_future(awaitable)
        self._settling.add(future)
        future.add_done_callback(self._settling.discard)
        future.add_done_callback(_retrieve)
        return future

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait for late commits and withdrawals (on shutdown, before the committer closes)."""
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=timeout)

    async def _within(self, awaitable: Any, answer_by: float, what: str) -> Any:
        """Await within the time left to answer; too slow or the log unreachable is UNAVAILABLE
        (with RetryInfo). The awaited work is shielded: a shared lookup goes on for others."""
        remaining = answer_by - time.monotonic()
        future = asyncio.ensure_future(awaitable)
        if remaining <= 0:
            future.cancel()
            raise Refusal(
                "UNAVAILABLE", f"the deadline left no time for {what}; {NOT_RECORDED}", retry_after=RETRY_UNAVAILABLE
            )
        try:
            return await asyncio.wait_for(asyncio.shield(future), remaining)
        except TimeoutError:
            future.add_done_callback(_retrieve)
            raise Refusal(
                "UNAVAILABLE",
                f"{what} did not finish within the deadline; {NOT_RECORDED}",
                retry_after=RETRY_UNAVAILABLE,
            ) from None
        except LOG_UNREACHABLE as exc:
            raise _log_unreachable(exc) from None


def _log_unreachable(exc: BaseException) -> Refusal:
    return Refusal(
        "UNAVAILABLE", f"the decision log is unreachable ({type(exc).__name__}); {NOT_RECORDED}",
        retry_after=RETRY_UNAVAILABLE,
    )  # fmt: skip


_TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
)  # fmt: skip


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a background future's exception as seen (it was answered or logged elsewhere)."""
    if not future.cancelled():
        future.exception()


def _answer_by(context: grpc.aio.ServicerContext) -> float:
    """When the answer is due: the caller's deadline less a margin to send it in."""
    remaining = context.time_remaining()
    budget = remaining if remaining is not None else NO_DEADLINE_SECONDS
    return time.monotonic() + budget - max(MIN_DEADLINE_MARGIN, DEADLINE_MARGIN_SHARE * budget)


def _under(where: str, field: str) -> str:
    """A committer's field (`payload.context.x`) as the request names it (`context.x`); the
    event's size (payload, metadata) is mostly the context's."""
    inner = field.removeprefix("payload.")
    if inner.split(".", 1)[0].split("[", 1)[0] in ("context", "entities", "unit_id", "request_id"):
        return f"{where}{inner}"
    return f"{where}context" if field else ""


def _check_id(value: str, field: str) -> None:
    if not value:
        raise Refusal("INVALID_ARGUMENT", f"{field} must not be empty", field)
    if len(value) > MAX_ID_CHARS:
        raise Refusal("INVALID_ARGUMENT", f"{field} is {len(value)} characters; at most {MAX_ID_CHARS}", field)
    if "\x00" in value:
        raise Refusal("INVALID_ARGUMENT", f"{field} contains a NUL character", field)


def _plain_struct(struct: struct_pb2.Struct, path: str) -> dict[str, Any]:
    """A Struct as JSON values, refusing what the log cannot hold: non-finite numbers, NUL."""
    out: dict[str, Any] = {}
    for key, value in struct.fields.items():
        if "\x00" in key:
            raise Refusal("INVALID_ARGUMENT", f"{path} has a key with a NUL character", path)
        out[key] = _plain_value(value, f"{path}.{key}")
    return out


def _plain_value(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise Refusal("INVALID_ARGUMENT", f"{path} is {number}; numbers must be finite", path)
        return number
    if kind == "string_value":
        if "\x00" in value.string_value:
            raise Refusal("INVALID_ARGUMENT", f"{path} contains a NUL character", path)
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _plain_struct(value.struct_value, path)
    if kind == "list_value":
        return [_plain_value(v, f"{path}[{i}]") for i, v in enumerate(value.list_value.values)]
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float | int):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _parse_time(value: str) -> datetime | None:
    """An RFC 3339 date-time (a missing offset is taken as UTC), or None."""
    if not _RFC3339.fullmatch(value):
        return None
    try:
        parsed = datetime.fromisoformat(value[:10] + "T" + value[11:].upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _as_of(context: dict[str, Any], field: str) -> datetime:
    """The time features are computed for: `context.occurred_at`, else now."""
    value = context.get("occurred_at")
    now = datetime.now(UTC)
    if value is None:
        return now
    parsed = _parse_time(value) if isinstance(value, str) else None
    if parsed is None:
        got = "a string that is not one" if isinstance(value, str) else _json_kind(value)
        raise Refusal("INVALID_ARGUMENT", f"{field} must be an RFC 3339 time; got {got}", field)
    if not EARLIEST_AS_OF <= parsed <= now + MAX_AS_OF_AHEAD:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"{field} {value} is out of range: from {EARLIEST_AS_OF.date()} to {MAX_AS_OF_AHEAD} after now",
            field,
        )
    return parsed


def _fits(value: Any, kind: str) -> bool:
    if kind == NUMBER:
        return isinstance(value, float | int) and not isinstance(value, bool)
    if kind == TEXT:
        return isinstance(value, str)
    if kind == TIME:
        return _fits(value, NUMBER) or (isinstance(value, str) and _parse_time(value) is not None)
    assert kind == SCALAR
    return isinstance(value, str | float | int | bool)


def _check_declared(context: dict[str, Any], deployment: Deployment, where: str) -> None:
    """Every context field the model's versions read is absent, null or of the declared kind."""
    for path, kinds in deployment.request_inputs.items():
        value = resolve_path(context, path)
        if value is None:
            continue
        for kind in sorted(kinds):
            if not _fits(value, kind):
                field = f"{where}context.{'.'.join(path)}"
                message = f"{field} must be {kind} (models/{deployment.model} reads it as one); got {_json_kind(value)}"
                raise Refusal("INVALID_ARGUMENT", message, field)
