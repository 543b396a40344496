"""Personal data on an append-only log: fields encrypted per data subject, forgotten by destroying
the subject's key (crypto-shredding).

A contract marks its personal fields (`pii_fields`, JSON pointers). Ingest validates an event on
its clear values, then stores each personal field present as an envelope

    {"$personal": 1, "subject": "customer/c-1", "kid": "<key id>", "ct": "<base64 nonce + ciphertext>"}

encrypted with AES-256-GCM under the subject's key, a fresh 96-bit nonce per value, and the event
id and the field's pointer as associated data: a ciphertext moved to another event or another field
does not decrypt. The log, the stream (the relay publishes the stored payload) and every
projection so hold ciphertext only. The subject of an event's personal fields is its entity
("<entity_type>/<entity_id>").

Keys live in `personal_keys` (migration 0013), the one table that is not a projection of the log,
on purpose: a key kept in an append-only log could never be destroyed. `forget` deletes the key
(and rewrites the table, so the row does not linger in its heap) and appends `subject.forgotten`,
which says that it happened and who asked, never the data. From then on `reveal` shows each of that
subject's personal fields as erased (None, its pointer listed), while every other field, and every
number derived without them, stays as it was. What `forget` cannot reach: backups and WAL taken
before it still hold the key until they age out.

A later event of a forgotten subject gets a new key (new data, readable until forgotten again); an
event encrypted under the old key by an ingest racing the forget reads as erased, never in clear.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from d2d.errors import Refusal

ENVELOPE = "$personal"
ENVELOPE_VERSION = 1
NONCE_BYTES = 12  # 96 bits, AES-GCM's own nonce size
KEY_BYTES = 32  # AES-256


def subject_of(entity_type: str, entity_id: str) -> str:
    """The data subject an entity's personal fields belong to."""
    return f"{entity_type}/{entity_id}"


@dataclass(frozen=True, slots=True)
class SubjectKey:
    subject: str
    key_id: str
    key: bytes = field(repr=False)


# ---------------------------------------------------------------------------------------------
# JSON pointers (RFC 6901)


def pointer_tokens(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"{pointer!r} is not a JSON pointer")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _pointer(tokens: Iterable[str | int]) -> str:
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


def _locate(document: Any, pointer: str) -> tuple[Any, str | int] | None:
    """The container holding `pointer`'s value and its key in it; None when the value is absent."""
    tokens = pointer_tokens(pointer)
    node = document
    for i, token in enumerate(tokens):
        if isinstance(node, dict):
            key: str | int = token
            if token not in node:
                return None
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            key = int(token)
        else:
            return None
        if i == len(tokens) - 1:
            return node, key
        node = node[key]  # type: ignore[index]
    return None


# ---------------------------------------------------------------------------------------------
# The cipher


def is_envelope(value: Any) -> bool:
    return isinstance(value, dict) and value.get(ENVELOPE) == ENVELOPE_VERSION


def _associated_data(event_id: uuid.UUID, pointer: str) -> bytes:
    return event_id.bytes + pointer.encode()


def seal_value(key: SubjectKey, event_id: uuid.UUID, pointer: str, value: Any) -> dict[str, Any]:
    """`value` (any JSON value) as the envelope stored at `pointer` of event `event_id`."""
    nonce = os.urandom(NONCE_BYTES)
    clear = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    sealed = AESGCM(key.key).encrypt(nonce, clear, _associated_data(event_id, pointer))
    return {
        ENVELOPE: ENVELOPE_VERSION, "subject": key.subject, "kid": key.key_id,
        "ct": base64.b64encode(nonce + sealed).decode(),
    }  # fmt: skip


def open_value(key: SubjectKey, event_id: uuid.UUID, pointer: str, envelope: Mapping[str, Any]) -> Any:
    """The clear value of an envelope; raises InvalidTag when it was made for another event, field
    or key, or was altered."""
    blob = base64.b64decode(envelope["ct"])
    clear = AESGCM(key.key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _associated_data(event_id, pointer))
    return json.loads(clear)


def seal_payload(payload: str, event_id: uuid.UUID, pointers: Sequence[str], key: SubjectKey) -> str:
    """The JSON text of `payload` with the value at each of `pointers` present in it sealed."""
    document = json.loads(payload)  # exact: integers beyond 64 bits stay as they were
    for pointer in sorted(pointers, key=len):  # an object marked personal is sealed whole, once
        found = _locate(document, pointer)
        if found is not None:
            container, at = found
            container[at] = seal_value(key, event_id, pointer, container[at])
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


_RAW_AAD = b"dead letter"  # the whole input as received, refused: it has no event id or pointer to bind
_RAW_PREFIX = b'{"$personal":1,'


def seal_raw(key: SubjectKey, raw: bytes) -> bytes:
    """The bytes of a refused input as a dead letter keeps them when its subject is known: sealed
    whole (an envelope's JSON), so its personal fields are erased with the subject's key."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key.key).encrypt(nonce, raw, _RAW_AAD)
    envelope = {"subject": key.subject, "kid": key.key_id, "ct": base64.b64encode(nonce + sealed).decode()}
    return _RAW_PREFIX + orjson.dumps(envelope)[1:]


def raw_subject(raw: bytes) -> tuple[str, str] | None:
    """(subject, key id) of bytes `seal_raw` made; None for bytes kept as received."""
    if not raw.startswith(_RAW_PREFIX):
        return None
    try:
        envelope = orjson.loads(raw)
        return str(envelope["subject"]), str(envelope["kid"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def open_raw(key: SubjectKey | None, raw: bytes) -> bytes | None:
    """The bytes `seal_raw` sealed (None when the key is gone or they do not open)."""
    envelope = orjson.loads(raw)
    if key is None or key.key_id != envelope.get("kid"):
        return None
    blob = base64.b64decode(envelope["ct"])
    try:
        return AESGCM(key.key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _RAW_AAD)
    except InvalidTag:
        return None


def envelopes(document: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """(pointer, envelope) of every sealed value in a payload."""
    if is_envelope(document):
        yield _pointer(path), document
    elif isinstance(document, dict):
        for k, v in document.items():
            yield from envelopes(v, (*path, k))
    elif isinstance(document, list):
        for i, v in enumerate(document):
            yield from envelopes(v, (*path, i))


# ---------------------------------------------------------------------------------------------
# Readers


@dataclass(frozen=True, slots=True)
class Revealed:
    """A payload with its personal fields opened. An erased field (its subject was forgotten) and an
    unreadable one (an envelope not made for this event and field) are None, their pointers listed."""

    payload: dict[str, Any]
    erased: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = ()
    pointers: tuple[str, ...] = ()  # every personal field the stored payload held

    @property
    def personal(self) -> dict[str, Any]:
        """Pointer -> clear value (None when erased or unreadable) of each personal field."""
        return {p: _value_at(self.payload, p) for p in self.pointers}


def _value_at(document: Any, pointer: str) -> Any:
    container, at = _locate(document, pointer)  # type: ignore[misc]
    return container[at]


def reveal(payload: Mapping[str, Any], event_id: uuid.UUID, keys: Mapping[str, SubjectKey]) -> Revealed:
    """`payload` (as stored) with every envelope opened by its subject's key in `keys`, or None
    where the key is gone (erased) or the envelope does not open here (unreadable)."""
    found = list(envelopes(payload))
    if not found:
        return Revealed(dict(payload))
    document = json.loads(json.dumps(payload))  # a copy; the stored payload is left as it is
    erased: list[str] = []
    unreadable: list[str] = []
    for pointer, envelope in found:
        key = keys.get(str(envelope.get("subject")))
        container, at = _locate(document, pointer)  # type: ignore[misc]
        if key is None or key.key_id != envelope.get("kid"):
            erased.append(pointer)
            container[at] = None
            continue
        try:
            container[at] = open_value(key, event_id, pointer, envelope)
        except (InvalidTag, ValueError, KeyError, TypeError):
            unreadable.append(pointer)
            container[at] = None
    return Revealed(document, tuple(erased), tuple(unreadable), tuple(p for p, _ in found))


class KeyStore:
    """The subjects' keys in `personal_keys`."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def keys(self, subjects: Iterable[str], *, create: bool = False) -> dict[str, SubjectKey]:
        """The keys of `subjects` that exist; with `create`, a new random key for each that has none
        (ingest). One round trip, subjects in sorted order so concurrent creators never deadlock."""
        wanted = sorted(set(subjects))
        if not wanted:
            return {}
        found: dict[str, SubjectKey] = {}
        async with self.pool.acquire() as conn:
            for _ in range(3):  # a concurrent creator's key is not in this statement's snapshot: ask again
                missing = [s for s in wanted if s not in found]
                if create:
                    rows = await conn.fetch(
                        "WITH made AS (INSERT INTO personal_keys (subject, key)"
                        " SELECT * FROM unnest($1::text[], $2::bytea[]) ON CONFLICT (subject) DO NOTHING"
                        " RETURNING subject, key_id, key)"
                        " SELECT subject, key_id, key FROM made"
                        " UNION ALL SELECT subject, key_id, key FROM personal_keys WHERE subject = ANY($1::text[])",
                        missing, [AESGCM.generate_key(KEY_BYTES * 8) for _ in missing],
                    )  # fmt: skip
                else:
                    rows = await conn.fetch(
                        "SELECT subject, key_id, key FROM personal_keys WHERE subject = ANY($1::text[])", missing
                    )
                found.update({r["subject"]: SubjectKey(r["subject"], str(r["key_id"]), bytes(r["key"])) for r in rows})
                if not create or len(found) == len(wanted):
                    break
        if create and len(found) < len(wanted):
            raise Refusal("UNAVAILABLE", "a personal data key could not be made; retry", "entity_id")
        return found

    async def reveal(self, stored: Sequence[tuple[uuid.UUID, Mapping[str, Any]]]) -> list[Revealed]:
        """(event id, stored payload) pairs, revealed with one look-up of every subject they name."""
        subjects = {str(e.get("subject")) for _, payload in stored for _, e in envelopes(payload)}
        keys = await self.keys(subjects) if subjects else {}
        return [reveal(payload, event_id, keys) for event_id, payload in stored]


# ---------------------------------------------------------------------------------------------
# Forgetting


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What `forget` did: `seq` of the `subject.forgotten` it appended (0 when nothing was left to
    forget), or `earlier_seq` of the one that already had, or neither for a subject never seen."""

    subject: str
    seq: int = 0
    earlier_seq: int = 0


async def forget(pool: asyncpg.Pool, subject: str, *, requested_by: str, reason: str = "") -> Forgotten:
    """Destroy `subject`'s key and record `subject.forgotten`, in one transaction (the owner's pool:
    no service may delete a key); then rewrite the key table so the key's bytes leave its heap.
    Idempotent: a subject already forgotten, or never seen, changes nothing."""
    from d2d.eventlog import EventLog, NewEvent

    if not subject or "/" not in subject:
        raise Refusal("INVALID_ARGUMENT", f"subject {subject[:64]!r} must be '<entity_type>/<entity_id>'", "subject")
    log = EventLog(pool)
    async with log.recording() as tx:
        key_id = await tx.conn.fetchval("DELETE FROM personal_keys WHERE subject = $1 RETURNING key_id", subject)
        if key_id is None:
            earlier = await log.entity_events("subject", subject, types=["subject.forgotten"], conn=tx.conn)
            return Forgotten(subject, earlier_seq=earlier[-1].seq if earlier else 0)
        payload = {"subject": subject, "key_id": str(key_id), "requested_by": requested_by}
        if reason:
            payload["reason"] = reason
        [event] = await tx.append(
            NewEvent(uuid.uuid4(), "subject.forgotten", 1, "subject", subject, datetime.now(UTC),
                     orjson.dumps(payload).decode())
        )  # fmt: skip
    async with pool.acquire() as conn:
        # A plain VACUUM leaves the dead row's bytes in the page until overwritten; FULL rewrites
        # the (small) table into a new file and drops the old one.
        await conn.execute("VACUUM FULL personal_keys")
    return Forgotten(subject, seq=event.seq)
