"""The ingest pipeline shared by the gRPC API, the NATS consumer and redrive.

Each candidate event is checked (envelope, then its contract); the valid ones are committed to the
log by the group committer, the refused ones are kept in dead letters; only then is anyone told.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from d2d.contracts.platform import is_platform_type
from d2d.contracts.registry import EVENT_TYPE_RE, ContractRegistry
from d2d.deadletters import DeadLetter, DeadLetters, Rejected
from d2d.errors import Refusal
from d2d.eventlog import LOG_UNREACHABLE, CommitDeadlineExceeded, GroupCommitter, NewEvent
from d2d.limits import check_event, check_text
from d2d.personal import KeyStore, open_raw, raw_subject, seal_payload, seal_raw, subject_of

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 256


@dataclass(slots=True)
class Candidate:
    """One event as received, before any check."""

    source: str
    raw: bytes
    event_id: str
    type: str
    schema_version: int
    entity_type: str
    entity_id: str
    occurred_at: datetime | None
    payload: bytes
    metadata: dict[str, str] = field(default_factory=dict)
    refusal: Refusal | None = None  # set when the bytes could not even be read as an event


@dataclass(slots=True)
class Outcome:
    event_id: str
    seq: int = 0
    duplicate: bool = False
    code: str = ""
    message: str = ""
    field: str = ""
    dead_letter_id: int | None = None

    @property
    def ok(self) -> bool:
        return not self.code


def check_envelope(c: Candidate) -> uuid.UUID:
    """Refuse an envelope that misses or garbles a required field; returns the parsed event id."""
    if c.refusal is not None:
        raise c.refusal
    try:
        event_id = uuid.UUID(c.event_id)
    except ValueError:
        raise Refusal("INVALID_ARGUMENT", f"event_id {c.event_id[:64]!r} is not a UUID", "event_id") from None
    if is_platform_type(c.type):
        raise Refusal("PERMISSION_DENIED", f"{c.type} is a platform event type: only the platform appends it", "type")
    if not EVENT_TYPE_RE.match(c.type):
        raise Refusal(
            "INVALID_ARGUMENT", f"type {c.type[:64]!r} must be lower-case and dotted, like 'payment.authorized'", "type"
        )
    for name in ("entity_type", "entity_id"):
        value = getattr(c, name)
        if not value or len(value) > MAX_ID_LENGTH:
            raise Refusal("INVALID_ARGUMENT", f"{name} is required (1 to {MAX_ID_LENGTH} characters)", name)
        check_text(value, name)
    if c.occurred_at is None:
        raise Refusal("INVALID_ARGUMENT", "occurred_at is required", "occurred_at")
    if not 0 <= c.schema_version < 2**31:
        raise Refusal("INVALID_ARGUMENT", "schema_version must be 0 (latest) or a version number", "schema_version")
    return event_id


class Ingestor:
    def __init__(self, registry: ContractRegistry, committer: GroupCommitter, dead_letters: DeadLetters) -> None:
        self.registry = registry
        self.committer = committer
        self.dead_letters = dead_letters
        self.keys = KeyStore(committer.log.pool)

    async def ingest(
        self,
        candidates: Sequence[Candidate],
        *,
        traceparent: str | None = None,
        keep_rejected: bool = True,
        deadline: float | None = None,
    ) -> list[Outcome]:
        """Validate, commit the valid events, keep the refused ones; one outcome per candidate.

        `deadline` (time.monotonic()) is passed to the group committer: if it passes before a
        transaction takes the events, none is stored and CommitDeadlineExceeded is raised. Raises
        Refusal(RESOURCE_EXHAUSTED) when the committer's queue is full (nothing stored or kept),
        and LOG_UNREACHABLE errors when Postgres is away.
        """
        outcomes = [Outcome(c.event_id) for c in candidates]
        accepted: list[tuple[int, NewEvent]] = []
        rejected: list[tuple[int, Rejected]] = []
        received_at = datetime.now(UTC)
        personal: list[tuple[int, NewEvent, tuple[str, ...]]] = []  # events with personal fields to seal

        def refuse(i: int, r: Refusal) -> None:
            c = candidates[i]
            outcomes[i].code, outcomes[i].message, outcomes[i].field = r.code, r.message, r.field
            kept = Rejected(c.source, c.raw, r.code, r.message, r.field, c.event_id or None, c.type or None)
            rejected.append((i, kept))

        for i, c in enumerate(candidates):
            try:
                event_id = check_envelope(c)
                version, text = await self.registry.validate(
                    c.type, c.schema_version, c.payload, occurred_at=c.occurred_at, received_at=received_at
                )
                metadata = c.metadata
                if traceparent and "traceparent" not in metadata:
                    metadata = {**metadata, "traceparent": traceparent}
                event = NewEvent(event_id, c.type, version, c.entity_type, c.entity_id, c.occurred_at, text, metadata)  # type: ignore[arg-type]
                contract = await self.registry.get(c.type, version)
                if contract is not None and contract.pii_fields:
                    personal.append((i, event, contract.pii_fields))  # checked once sealed
                    continue
                check_event(event)
            except Refusal as r:
                refuse(i, r)
                continue
            accepted.append((i, event))
        if personal:
            accepted = sorted(accepted + await self._sealed(personal, refuse), key=lambda a: a[0])
        results = await self._commit(accepted, refuse, deadline)
        # Kept after the commit: it may refuse an event the checks above let through.
        dead_ids = await self.dead_letters.keep(await self._sealed_raw(rejected, candidates)) if keep_rejected else []
        for i, result in results:
            outcomes[i].seq, outcomes[i].duplicate = result.seq, result.duplicate
        for (i, _), dead_id in zip(rejected, dead_ids, strict=False):
            outcomes[i].dead_letter_id = dead_id
        return outcomes

    async def _sealed(
        self, personal: list[tuple[int, NewEvent, tuple[str, ...]]], refuse: Any
    ) -> list[tuple[int, NewEvent]]:
        """The events whose contract marks personal fields, validated on their clear values, with
        those fields sealed under their subject's key (d2d.personal): what the log, the stream and
        every projection hold. One look-up makes or finds every subject's key."""
        keys = await self.keys.keys({subject_of(e.entity_type, e.entity_id) for _, e, _ in personal}, create=True)
        sealed = []
        for i, event, pointers in personal:
            key = keys[subject_of(event.entity_type, event.entity_id)]
            event = dataclasses.replace(event, payload=seal_payload(event.payload, event.event_id, pointers, key))
            try:
                check_event(event)
            except Refusal as r:
                refuse(i, r)
                continue
            sealed.append((i, event))
        return sealed

    async def _sealed_raw(
        self, rejected: list[tuple[int, Rejected]], candidates: Sequence[Candidate]
    ) -> list[Rejected]:
        """The refused inputs to keep, those of a type whose contract marks personal fields sealed
        whole under their subject's key when the envelope names one (else kept as received: a
        subject that cannot be read cannot be forgotten either)."""
        personal = []
        for i, _ in rejected:
            c = candidates[i]
            if c.entity_type and c.entity_id and EVENT_TYPE_RE.match(c.type):
                contract = await self.registry.get(c.type)
                if contract is not None and contract.pii_fields:
                    personal.append((i, subject_of(c.entity_type, c.entity_id)))
        if not personal:
            return [r for _, r in rejected]
        keys = await self.keys.keys({s for _, s in personal}, create=True)
        subjects = dict(personal)
        return [
            dataclasses.replace(r, raw=seal_raw(keys[subjects[i]], r.raw)) if i in subjects else r for i, r in rejected
        ]

    async def open_kept(self, letters: Sequence[DeadLetter]) -> list[bytes | None]:
        """Each dead letter's bytes as received, for redrive: opened where they were kept sealed,
        None where their subject has since been forgotten."""
        sealed = {d.id: found for d in letters if not d.truncated and (found := raw_subject(d.raw))}
        keys = await self.keys.keys({subject for subject, _ in sealed.values()}) if sealed else {}
        return [open_raw(keys.get(sealed[d.id][0]), d.raw) if d.id in sealed else d.raw for d in letters]

    async def _commit(self, accepted: list[tuple[int, NewEvent]], refuse: Any, deadline: float | None) -> list[Any]:
        """Commit the accepted events in one group commit. If the log refuses the transaction for
        its data (something `check_event` did not foresee), each event is tried on its own, so
        the culprit is refused alone and every other event is stored."""
        if not accepted:
            return []
        try:
            results = await self.committer.append([e for _, e in accepted], deadline=deadline)
            return [(i, r) for (i, _), r in zip(accepted, results, strict=True)]
        except (Refusal, CommitDeadlineExceeded, *LOG_UNREACHABLE):
            raise
        except Exception as exc:
            log.warning("ingest: the log refused a batch of %d (%s); appending them one by one", len(accepted), exc)
        done = []
        for i, event in accepted:
            try:
                [result] = await self.committer.append([event], deadline=deadline)
            except (Refusal, CommitDeadlineExceeded, *LOG_UNREACHABLE):
                raise
            except Exception as exc:
                refuse(i, Refusal("INVALID_ARGUMENT", f"the event log cannot store this event: {type(exc).__name__}"))
                continue
            done.append((i, result))
        return done


def candidate_from_json(source: str, event_type: str, raw: bytes) -> Candidate:
    """Read a NATS message body: a JSON envelope {event_id, entity_type, entity_id, occurred_at,
    schema_version?, payload, metadata?}; the type comes from the subject."""
    blank = Candidate(source, raw, "", event_type, 0, "", "", None, b"")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        blank.refusal = Refusal("INVALID_ARGUMENT", f"message body is not valid UTF-8 JSON: {exc}", "body")
        return blank
    if not isinstance(doc, dict):
        blank.refusal = Refusal("INVALID_ARGUMENT", "message body must be a JSON object (the event envelope)", "body")
        return blank
    blank.event_id = str(doc.get("event_id", ""))
    try:
        occurred = doc.get("occurred_at")
        occurred_at = datetime.fromisoformat(occurred) if isinstance(occurred, str) else None
        if occurred_at is not None and occurred_at.tzinfo is None:
            raise ValueError("no time zone")
    except ValueError as exc:
        blank.refusal = Refusal(
            "INVALID_ARGUMENT", f"occurred_at must be RFC 3339 with a time zone: {exc}", "occurred_at"
        )
        return blank
    payload = doc.get("payload")
    metadata = doc.get("metadata") or {}
    version = doc.get("schema_version", 0)
    if not isinstance(version, int) or not isinstance(metadata, dict):
        blank.refusal = Refusal("INVALID_ARGUMENT", "schema_version must be an integer and metadata an object", "body")
        return blank
    return Candidate(
        source=source,
        raw=raw,
        event_id=blank.event_id,
        type=event_type,
        schema_version=version,
        entity_type=str(doc.get("entity_type", "")),
        entity_id=str(doc.get("entity_id", "")),
        occurred_at=occurred_at,
        payload=orjson.dumps(payload) if payload is not None else b"",
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
