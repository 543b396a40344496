"""`d2d.v1.IngestService` over gRPC."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import grpc
import orjson
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import status_pb2

from d2d import auth, bus, grpcserver, outbox, telemetry
from d2d.contracts.compat import CompatibilityMode
from d2d.contracts.registry import Contract, ContractRegistry
from d2d.deadletters import DeadLetter, DeadLetters
from d2d.errors import Refusal
from d2d.eventlog import LOG_UNREACHABLE, CommitDeadlineExceeded, EventLog, StoredEvent
from d2d.v1 import event_pb2, ingest_pb2
from services.ingest.pipeline import Candidate, Ingestor, Outcome, candidate_from_json

SERVICE_NAME = "d2d.v1.IngestService"
# Failures that mean Postgres could not be reached or went away: the transaction did not commit.
MAX_EVENTS_PER_REQUEST = 10_000
MAX_PAGE_SIZE = 1000
# Calls in progress at once; more are refused with RESOURCE_EXHAUSTED. With requests of up to
# 16 MiB this bounds what ingest holds in memory (the commit queue bounds the events waiting).
MAX_CONCURRENT_CALLS = 128
# Time kept back from the caller's deadline, so a refusal reaches it before its deadline does.
DEADLINE_MARGIN = 0.05


def _candidate(event: event_pb2.Event) -> Candidate:
    occurred_at = None
    refusal = None
    if event.HasField("occurred_at"):
        try:
            occurred_at = event.occurred_at.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):  # seconds outside years 1..9999
            refusal = Refusal(
                "INVALID_ARGUMENT",
                f"occurred_at ({event.occurred_at.seconds} s, {event.occurred_at.nanos} ns since 1970)"
                " is not a time between years 1 and 9999",
                "occurred_at",
            )
    return Candidate(
        source="grpc",
        raw=event.SerializeToString(),
        event_id=event.event_id,
        type=event.type,
        schema_version=event.schema_version,
        entity_type=event.entity_type,
        entity_id=event.entity_id,
        occurred_at=occurred_at,
        payload=event.payload,
        metadata=dict(event.metadata),
        refusal=refusal,
    )


def _result(outcome: Outcome, index: int | None = None) -> ingest_pb2.EventResult:
    result = ingest_pb2.EventResult(event_id=outcome.event_id, duplicate=outcome.duplicate)
    if outcome.ok:
        result.seq = outcome.seq
    else:
        field = f"events[{index}].{outcome.field}" if index is not None and outcome.field else outcome.field
        result.error.CopyFrom(grpcserver.status(outcome.code, outcome.message, field=field))
    if outcome.dead_letter_id is not None:
        result.dead_letter = f"deadLetters/{outcome.dead_letter_id}"
    return result


def contract_to_proto(c: Contract) -> ingest_pb2.ContractVersion:
    msg = ingest_pb2.ContractVersion(
        name=c.name,
        event_type=c.event_type,
        version=c.version,
        owner=c.owner,
        description=c.description,
        json_schema=json.dumps(c.json_schema, sort_keys=True),
        pii_fields=list(c.pii_fields),
        compatibility=ingest_pb2.CompatibilityMode.Value(c.compatibility.value),
        allowed_lateness=duration_pb2.Duration(seconds=c.allowed_lateness_seconds),
        null_rate_limits=c.null_rate_limits,
        registered_seq=c.registered_seq,
        max_future_skew=duration_pb2.Duration(seconds=c.max_future_skew_seconds),
        max_age=duration_pb2.Duration(seconds=c.max_age_seconds),
    )
    if c.created_at is not None:
        msg.create_time.FromDatetime(c.created_at)
    return msg


def dead_letter_to_proto(d: DeadLetter) -> ingest_pb2.DeadLetter:
    msg = ingest_pb2.DeadLetter(
        name=d.name,
        source=d.source,
        event_id=d.event_id or "",
        event_type=d.event_type or "",
        raw=d.raw,
        error=grpcserver.status(d.code, d.reason, field=d.field or ""),
        receive_time=timestamp_pb2.Timestamp(),
        state=ingest_pb2.DeadLetter.State.Value(d.state),
        redriven_seq=d.redriven_seq or 0,
        raw_size=d.raw_size,
        raw_sha256=d.raw_sha256,
    )
    msg.receive_time.FromDatetime(d.received_at)
    return msg


def event_to_proto(e: StoredEvent) -> event_pb2.Event:
    msg = event_pb2.Event(
        event_id=str(e.event_id),
        type=e.type,
        schema_version=e.schema_version,
        entity_type=e.entity_type,
        entity_id=e.entity_id,
        payload=orjson.dumps(e.payload),
        metadata=e.metadata,
        seq=e.seq,
    )
    msg.occurred_at.FromDatetime(e.occurred_at)
    msg.recorded_at.FromDatetime(e.recorded_at)
    return msg


def _refused(r: Refusal) -> status_pb2.Status:
    return grpcserver.status(r.code, r.message, field=r.field)


class IngestApi:
    def __init__(
        self, ingestor: Ingestor, registry: ContractRegistry, dead_letters: DeadLetters, log: EventLog,
        *, relay_name: str = outbox.relay_name(bus.EVENTS_STREAM),
    ) -> None:  # fmt: skip
        self.ingestor = ingestor
        self.registry = registry
        self.dead_letters = dead_letters
        self.log = log
        self.relay_name = relay_name  # the relay's checkpoint in log_positions: how far the bus has the log

    # -- appends ----------------------------------------------------------------------------

    async def _check_batch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        count = len(request.events)
        if count == 0:
            await grpcserver.fail(context, "INVALID_ARGUMENT", "events: at least one event is required", field="events")
        if count > MAX_EVENTS_PER_REQUEST:
            await grpcserver.fail(
                context,
                "INVALID_ARGUMENT",
                f"events: {count} events in one request; the limit is {MAX_EVENTS_PER_REQUEST}",
                field="events",
                reason="BATCH_TOO_LARGE",
            )

    async def _ingest(
        self, context: grpc.aio.ServicerContext, candidates: list[Candidate], **kwargs: Any
    ) -> list[Outcome]:
        """Run the pipeline within the caller's deadline. An unreachable log is UNAVAILABLE and a
        full queue RESOURCE_EXHAUSTED, both with RetryInfo (nothing was stored: retry); a deadline
        that passed before the events reached a transaction is DEADLINE_EXCEEDED (nothing stored)."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining - DEADLINE_MARGIN if remaining is not None else None
        try:
            return await self.ingestor.ingest(candidates, deadline=deadline, **kwargs)
        except LOG_UNREACHABLE as exc:
            await grpcserver.abort(
                context, grpcserver.unavailable(f"the event log is unreachable ({type(exc).__name__}); retry", 1.0)
            )
        except CommitDeadlineExceeded:
            await grpcserver.fail(
                context, "DEADLINE_EXCEEDED",
                "the deadline passed while the events waited for the event log; none of them was stored",
            )  # fmt: skip
        raise AssertionError("unreachable")  # abort raises

    async def AppendEvents(self, request: Any, context: grpc.aio.ServicerContext) -> ingest_pb2.AppendEventsResponse:
        await self._check_batch(request, context)
        outcomes = await self._ingest(
            context, [_candidate(e) for e in request.events], traceparent=telemetry.current_traceparent()
        )
        return ingest_pb2.AppendEventsResponse(
            results=[_result(o, i) for i, o in enumerate(outcomes)],
            appended_count=sum(1 for o in outcomes if o.ok and not o.duplicate),
            head_seq=max((o.seq for o in outcomes), default=0),
        )

    async def StreamAppendEvents(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> ingest_pb2.StreamAppendEventsResponse:
        response = ingest_pb2.StreamAppendEventsResponse()
        traceparent = telemetry.current_traceparent()
        offset = 0
        async for request in request_iterator:
            await self._check_batch(request, context)
            outcomes = await self._ingest(context, [_candidate(e) for e in request.events], traceparent=traceparent)
            response.received_count += len(outcomes)
            for i, o in enumerate(outcomes):
                if not o.ok:
                    response.rejected_count += 1
                    response.rejected.append(_result(o, offset + i))
                elif o.duplicate:
                    response.duplicate_count += 1
                else:
                    response.appended_count += 1
                response.head_seq = max(response.head_seq, o.seq)
            offset += len(outcomes)
        return response

    # -- contracts --------------------------------------------------------------------------

    async def CreateContractVersion(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ContractVersion:
        prefix = "contracts/"
        if not request.parent.startswith(prefix) or "/" in request.parent[len(prefix) :]:
            await grpcserver.fail(
                context, "INVALID_ARGUMENT", "parent must be 'contracts/{event_type}'", field="parent"
            )
        cv = request.contract_version
        try:
            schema = orjson.loads(cv.json_schema or "null")
        except orjson.JSONDecodeError as exc:
            await grpcserver.fail(
                context, "INVALID_ARGUMENT", f"json_schema is not JSON: {exc}", field="contract_version.json_schema"
            )
        mode = ingest_pb2.CompatibilityMode.Name(cv.compatibility)
        try:
            contract = await self.registry.register(
                request.parent[len(prefix) :],
                owner=cv.owner,
                json_schema=schema,
                description=cv.description,
                pii_fields=list(cv.pii_fields),
                compatibility=CompatibilityMode.BACKWARD if mode == "COMPATIBILITY_MODE_UNSPECIFIED" else mode,
                allowed_lateness_seconds=int(cv.allowed_lateness.seconds),
                null_rate_limits=dict(cv.null_rate_limits),
                **_time_bounds(cv),
                validate_only=request.validate_only,
            )
        except Refusal as r:
            await grpcserver.abort(context, _refused(r))
        return contract_to_proto(contract)

    async def GetContractVersion(self, request: Any, context: grpc.aio.ServicerContext) -> ingest_pb2.ContractVersion:
        parts = request.name.split("/")
        if len(parts) != 4 or parts[0] != "contracts" or parts[2] != "versions":
            await grpcserver.fail(
                context, "INVALID_ARGUMENT", "name must be 'contracts/{event_type}/versions/{version}'", field="name"
            )
        version = 0 if parts[3] == "latest" else int(parts[3]) if parts[3].isdigit() else -1
        if version < 0:
            await grpcserver.fail(context, "INVALID_ARGUMENT", "version must be a number or 'latest'", field="name")
        contract = await self.registry.get(parts[1], version or None)
        if contract is None:
            await grpcserver.fail(context, "NOT_FOUND", f"{request.name} does not exist", field="name")
        return contract_to_proto(contract)

    async def ListContractVersions(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ListContractVersionsResponse:
        parent = request.parent
        if not parent.startswith("contracts/"):
            await grpcserver.fail(
                context, "INVALID_ARGUMENT", "parent must be 'contracts/{event_type}' or 'contracts/-'", field="parent"
            )
        event_type = parent.split("/", 1)[1]
        after = ("", 0)
        if request.page_token:
            kind, _, number = request.page_token.rpartition(":")
            if not number.isdigit():
                await grpcserver.fail(context, "INVALID_ARGUMENT", "bad page_token", field="page_token")
            after = (kind, int(number))
        size = min(request.page_size or 100, MAX_PAGE_SIZE)
        found = await self.registry.list(None if event_type == "-" else event_type, after=after, limit=size + 1)
        page = found[:size]
        token = f"{page[-1].event_type}:{page[-1].version}" if len(found) > size else ""
        return ingest_pb2.ListContractVersionsResponse(
            contract_versions=[contract_to_proto(c) for c in page], next_page_token=token
        )

    # -- dead letters -----------------------------------------------------------------------

    async def ListDeadLetters(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ListDeadLettersResponse:
        if request.page_token and not request.page_token.isdigit():
            await grpcserver.fail(context, "INVALID_ARGUMENT", "bad page_token", field="page_token")
        size = min(request.page_size or 100, MAX_PAGE_SIZE)
        found = await self.dead_letters.list(
            event_type=request.event_type or None,
            include_redriven=request.show_redriven,
            before_id=int(request.page_token) if request.page_token else None,
            limit=size + 1,
        )
        page = found[:size]
        return ingest_pb2.ListDeadLettersResponse(
            dead_letters=[dead_letter_to_proto(d) for d in page],
            next_page_token=str(page[-1].id) if len(found) > size else "",
        )

    async def RedriveDeadLetters(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.RedriveDeadLettersResponse:
        ids = []
        for i, name in enumerate(request.names):
            number = name.removeprefix("deadLetters/")
            if not name.startswith("deadLetters/") or not number.isdigit():
                await grpcserver.fail(
                    context,
                    "INVALID_ARGUMENT",
                    f"{name!r} is not a dead letter name 'deadLetters/{{id}}'",
                    field=f"names[{i}]",
                )
            ids.append(int(number))
        if request.payload and len(ids) != 1:
            await grpcserver.fail(
                context, "INVALID_ARGUMENT", "a corrected payload needs exactly one name", field="payload"
            )
        if ids:
            letters = await self.dead_letters.get(ids)
            missing = sorted(set(ids) - {d.id for d in letters})
            if missing:
                await grpcserver.fail(context, "NOT_FOUND", f"deadLetters/{missing[0]} does not exist", field="names")
            letters = [d for d in letters if d.state == "PENDING"]
        else:
            letters = await self.dead_letters.list(event_type=request.event_type or None, limit=MAX_EVENTS_PER_REQUEST)
        opened = await self.ingestor.open_kept(letters)  # sealed when personal: None once forgotten
        candidates = [_from_dead_letter(d, request.payload or None, r) for d, r in zip(letters, opened, strict=True)]
        outcomes = await self._ingest(
            context, candidates, traceparent=telemetry.current_traceparent(), keep_rejected=False
        )
        response = ingest_pb2.RedriveDeadLettersResponse()
        for letter, outcome in zip(letters, outcomes, strict=True):
            outcome.dead_letter_id = letter.id
            if outcome.ok:
                await self.dead_letters.mark_redriven(letter.id, outcome.seq)
                response.redriven_count += 1
            else:
                await self.dead_letters.note_new_reason(letter.id, outcome.code, outcome.message, outcome.field)
            response.results.append(_result(outcome))
        return response

    # -- the log ----------------------------------------------------------------------------

    async def ListEvents(self, request: Any, context: grpc.aio.ServicerContext) -> ingest_pb2.ListEventsResponse:
        if request.page_size < 0:
            await grpcserver.fail(
                context, "INVALID_ARGUMENT", f"page_size must not be negative ({request.page_size})", field="page_size"
            )
        if request.page_token and not request.page_token.isdigit():
            await grpcserver.fail(context, "INVALID_ARGUMENT", "bad page_token", field="page_token")
        if request.entity_id and not request.entity_type:
            await grpcserver.fail(
                context,
                "INVALID_ARGUMENT",
                "entity_id needs entity_type (ids are unique per type)",
                field="entity_type",
            )
        size = min(request.page_size or 100, MAX_PAGE_SIZE)
        head = await self.log.head()
        found = await self.log.newest(
            below=int(request.page_token) if request.page_token else None, limit=size + 1,
            event_type=request.event_type, entity_type=request.entity_type, entity_id=request.entity_id,
        )  # fmt: skip
        page = found[:size]
        return ingest_pb2.ListEventsResponse(
            events=[event_to_proto(e) for e in page],
            next_page_token=str(page[-1].seq) if len(found) > size else "",
            head_seq=head,
        )

    async def GetEventLog(self, request: Any, context: grpc.aio.ServicerContext) -> ingest_pb2.EventLog:
        if request.name != "eventLog":
            await grpcserver.fail(
                context, "NOT_FOUND", f"{request.name!r} does not exist (the log is 'eventLog')", "name"
            )
        answer = ingest_pb2.EventLog(
            name="eventLog",
            head_seq=await self.log.head(),
            published_seq=await self.log.position(self.relay_name),
            pending_dead_letters=await self.dead_letters.count(),
        )
        if request.view == ingest_pb2.EVENT_LOG_VIEW_FULL:
            answer.event_counts.update(dict(await self.log.count_by_type()))
        return answer


def _time_bounds(cv: ingest_pb2.ContractVersion) -> dict[str, int]:
    """The contract's event-time bounds that the request sets (unset ones keep their defaults)."""
    bounds = {}
    if cv.HasField("max_future_skew"):
        bounds["max_future_skew_seconds"] = int(cv.max_future_skew.seconds)
    if cv.HasField("max_age"):
        bounds["max_age_seconds"] = int(cv.max_age.seconds)
    return bounds


def _from_dead_letter(d: DeadLetter, payload: bytes | None, raw: bytes | None) -> Candidate:
    """The candidate a dead letter makes from its bytes as received (`raw`: opened where they were
    kept sealed; None once its subject was forgotten)."""
    refused = Candidate(d.source, d.raw, d.event_id or "", d.event_type or "", 0, "", "", None, b"")
    if d.truncated:
        refused.refusal = Refusal(
            "FAILED_PRECONDITION",
            f"{d.name} keeps only the first {len(d.raw)} of the {d.raw_size} bytes received;"
            " the producer must send the event again",
            "names",
        )
        return refused
    if raw is None:
        refused.refusal = Refusal(
            "FAILED_PRECONDITION", f"the subject of {d.name} was forgotten: its bytes are erased", "names"
        )
        return refused
    if d.source == "grpc":
        try:
            candidate = _candidate(event_pb2.Event.FromString(raw))
        except Exception as exc:
            candidate = Candidate(d.source, raw, d.event_id or "", d.event_type or "", 0, "", "", None, b"")
            candidate.refusal = Refusal("INVALID_ARGUMENT", f"stored bytes are not an Event: {exc}", "raw")
    else:
        candidate = candidate_from_json(d.source, d.event_type or "", raw)
    if payload is not None:
        candidate.payload = payload
    return candidate


def add_to_server(api: IngestApi, server: grpc.aio.Server, keys: auth.KeyRing) -> None:
    grpcserver.add_service(server, ingest_pb2.DESCRIPTOR.services_by_name["IngestService"], api, keys)
