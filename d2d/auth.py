"""API keys and roles: who may call which gRPC method.

A key's text is `d2d_<key id>_<secret>`. Keys are facts in the log like every other: an
`api_key.created` event (key id, role, display name, the secret's SHA-256 and who created it; never
the secret) and an `api_key.revoked` event. A `KeyRing` folds them into memory, so checking a call
costs a dict lookup, one SHA-256 and a constant-time comparison (microseconds):

- it re-reads new key events every `REFRESH_SECONDS` (2 s) in the background, so a revoked key
  stops working within about 2 s in every service;
- a key id it does not know makes it read them at once (at most every `UNKNOWN_KEY_REFRESH_SECONDS`,
  so unknown ids sprayed at a service cost at most a few small reads a second), so a new key works
  at once, in every service.

Which roles may call a method is part of the contract: the `allowed_roles` option of every rpc in
protos/d2d/v1 (`roles_of`); ADMIN may call everything. `d2d.grpcserver.add_service` enforces it and
puts the caller's `Principal` in `current_principal` for the handler. A key created with a rate limit
(`d2d.ratelimit`) is held to it by each ring's `limiter`, after its role is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from google.protobuf.descriptor import MethodDescriptor

from d2d.eventlog import EventLog, NewEvent, StoredEvent, create_pool
from d2d.private import write_private_text
from d2d.ratelimit import Rate, RateLimiter
from d2d.v1 import access_pb2

log = logging.getLogger(__name__)

ROLES = ("producer", "app", "operator", "auditor", "admin")
ADMIN = "admin"
KEY_PREFIX = "d2d"
KEY_EVENT_TYPES = ("api_key.created", "api_key.revoked")
REFRESH_SECONDS = 2.0
UNKNOWN_KEY_REFRESH_SECONDS = 0.1
METADATA_KEY = "authorization"  # `authorization: Bearer <key>`
ADMIN_KEY_FILE = "admin.key"  # in the data directory, 0600: the admin key `d2d up` made


def role_name(role: int) -> str:
    """`access_pb2.Role` value -> its name as keys and events spell it (`operator`)."""
    return access_pb2.Role.Name(role).lower()


def role_value(name: str) -> int:
    return access_pb2.Role.Value(name.upper())


def roles_of(method: MethodDescriptor) -> frozenset[str]:
    """The roles the contract lets call `method` (its `allowed_roles` option), ADMIN always among them.
    A method of a d2d service without the option is a mistake: ValueError naming it."""
    declared = method.GetOptions().Extensions[access_pb2.allowed_roles]
    if not declared:
        raise ValueError(
            f"{method.full_name} declares no allowed_roles: every rpc must say who may call it "
            "(option (d2d.v1.allowed_roles) in its proto)"
        )
    return frozenset({ADMIN, *(role_name(r) for r in declared)})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's id and role (never its secret)."""

    key_id: str
    role: str
    rate: Rate | None = None  # how fast it may call (None: not limited)


# The caller of the gRPC call being handled (set by d2d.grpcserver.add_service's handlers).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def actor_metadata() -> dict[str, str]:
    """Event metadata naming who asked for a change: `{"actor": key id}` inside an authenticated call,
    else nothing (the platform acting on its own, e.g. the registry's retraining loop)."""
    principal = current_principal.get()
    return {"actor": principal.key_id} if principal is not None else {}


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    role: str
    display_name: str
    secret_sha256: str
    created_by: str
    create_time: datetime
    revoke_time: datetime | None = None
    revoked_by: str = ""
    rate: Rate | None = None

    @property
    def revoked(self) -> bool:
        return self.revoke_time is not None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(
    role: str, display_name: str = "", *, created_by: str = "", rate: Rate | None = None
) -> tuple[str, NewEvent]:
    """A new key of `role`: its text (to show once, then forget) and its `api_key.created` event."""
    text = f"{KEY_PREFIX}_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
    return text, created_event(text, role, display_name, created_by=created_by, rate=rate)


def created_event(
    text: str, role: str, display_name: str = "", *, created_by: str = "", rate: Rate | None = None
) -> NewEvent:
    """The `api_key.created` event of the key whose text is `text` (its secret's hash, not the secret)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    key_id = key_id_of(text)
    if not key_id:
        raise ValueError("a key's text is d2d_<key id>_<secret>")
    payload = {
        "key_id": key_id, "role": role, "display_name": display_name,
        "secret_sha256": _sha256(text[len(KEY_PREFIX) + len(key_id) + 2 :]), "created_by": created_by,
    }  # fmt: skip
    if rate is not None:
        payload["rate_limit"] = {"per_second": rate.per_second, "burst": rate.burst}
    return NewEvent(
        uuid.uuid4(), "api_key.created", 1, "api_key", key_id, datetime.now(UTC), orjson.dumps(payload).decode(),
        {"actor": created_by} if created_by else {},
    )  # fmt: skip


def revoke_event(key_id: str, *, revoked_by: str) -> NewEvent:
    payload = {"key_id": key_id, "revoked_by": revoked_by}
    return NewEvent(
        uuid.uuid4(), "api_key.revoked", 1, "api_key", key_id, datetime.now(UTC), orjson.dumps(payload).decode(),
        {"actor": revoked_by},
    )  # fmt: skip


def key_id_of(text: str) -> str:
    """The key id in a key's text ('' if the text is not shaped like a key)."""
    prefix, _, rest = text.partition("_")
    key_id, _, secret = rest.partition("_")
    return key_id if prefix == KEY_PREFIX and key_id and secret else ""


class Unauthenticated(Exception):
    """The call carries no usable key; the message says what is wrong, never the secret. `reason`:
    the ErrorInfo reason a caller can act on (API_KEY_MISSING, API_KEY_MALFORMED, API_KEY_UNKNOWN,
    API_KEY_WRONG_SECRET, API_KEY_REVOKED)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownKey(Unauthenticated):
    pass


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The key in a call's `authorization: Bearer <key>` metadata, None if there is none."""
    for name, value in metadata or ():
        if name == METADATA_KEY:
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class KeyRing:
    """The platform's API keys, folded from the log's key events and kept in memory (see the module's
    docstring: a created key works at once, a revoked one stops within about REFRESH_SECONDS)."""

    def __init__(self, event_log: EventLog | None, keys: Sequence[ApiKey] = ()) -> None:
        self._log = event_log
        self._keys: dict[str, ApiKey] = {k.key_id: k for k in keys}
        # Read position per event type: each type is read alone, an ordered scan of its (type, seq)
        # index, whatever else the log holds after it.
        self._after = dict.fromkeys(KEY_EVENT_TYPES, 0)
        self._early_revocations: dict[str, StoredEvent] = {}  # read before their key's creation
        self._lock = asyncio.Lock()
        self._last_read_started = float("-inf")
        self._follower: asyncio.Task[None] | None = None
        self.limiter = RateLimiter()  # the keys' rate limits, counted in this process

    @classmethod
    async def open(cls, event_log: EventLog, *, refresh_seconds: float = REFRESH_SECONDS) -> KeyRing:
        """A ring holding every key in the log, kept up to date in the background until `close()`."""
        ring = cls(event_log)
        await ring.refresh()
        ring._follower = asyncio.create_task(ring._follow(refresh_seconds), name="key-ring")
        return ring

    @classmethod
    def of(cls, *created: NewEvent) -> KeyRing:
        """A ring of fixed keys (their `api_key.created` events), following no log: for a server
        without a log, such as a benchmark's empty baseline."""
        ring = cls(None)
        for e in created:
            payload = orjson.loads(e.payload)
            ring.fold(StoredEvent(0, e.event_id, e.type, 1, e.entity_type, e.entity_id, e.occurred_at, e.occurred_at,
                                  payload, e.metadata))  # fmt: skip
        return ring

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower

    async def _follow(self, refresh_seconds: float) -> None:
        while True:
            await asyncio.sleep(refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # the log away for a moment: keep the keys known, try again
                log.warning("key ring: reading key events failed (%s); retrying", exc)

    async def refresh(self) -> None:
        """Fold the key events appended since the last read."""
        if self._log is None:
            return
        async with self._lock:
            self._last_read_started = time.monotonic()
            for event_type in KEY_EVENT_TYPES:
                while True:
                    events = await self._log.read(self._after[event_type], 1000, types=[event_type])
                    for event in events:
                        self.fold(event)
                        self._after[event_type] = event.seq
                    if len(events) < 1000:
                        break

    async def _refresh_for(self, arrived: float) -> None:
        """Make sure the keys were read after `arrived`, at most one read per UNKNOWN_KEY_REFRESH_SECONDS."""
        if self._log is None:
            return
        async with self._lock:
            if self._last_read_started >= arrived:
                return  # another call's read, started after this one arrived, already looked
            wait = self._last_read_started + UNKNOWN_KEY_REFRESH_SECONDS - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        async with self._lock:
            if self._last_read_started >= arrived:
                return
        await self.refresh()

    def fold(self, event: StoredEvent) -> None:
        """Apply one key event. A revocation read before its key's creation (created and revoked
        between the reads of the two types) is kept and applied when the creation comes."""
        p = event.payload
        if event.type == "api_key.created":
            limit = p.get("rate_limit")
            self._keys[p["key_id"]] = ApiKey(
                p["key_id"], p["role"], p.get("display_name", ""), p["secret_sha256"], p["created_by"],
                event.recorded_at, rate=Rate(limit["per_second"], limit["burst"]) if limit else None,
            )  # fmt: skip
            if (early := self._early_revocations.pop(p["key_id"], None)) is not None:
                self.fold(early)
        elif event.type == "api_key.revoked":
            key = self._keys.get(p["key_id"])
            if key is None:
                self._early_revocations[p["key_id"]] = event
            elif not key.revoked:
                self._keys[key.key_id] = replace(key, revoke_time=event.recorded_at, revoked_by=p["revoked_by"])

    def get(self, key_id: str) -> ApiKey | None:
        return self._keys.get(key_id)

    def keys(self) -> list[ApiKey]:
        """Every key known, newest first."""
        return sorted(self._keys.values(), key=lambda k: k.create_time, reverse=True)

    def check(self, token: str | None) -> Principal:
        """The principal of a key's text; Unauthenticated (UnknownKey for a key id not known) if none."""
        if token is None:
            raise Unauthenticated(
                "this call needs an API key: send metadata `authorization: Bearer <key>` "
                "(clients read D2D_API_KEY; `d2d keys create` makes one)",
                "API_KEY_MISSING",
            )
        key_id = key_id_of(token)
        if not key_id:
            raise Unauthenticated(
                "the `authorization` metadata is not `Bearer d2d_<key id>_<secret>`", "API_KEY_MALFORMED"
            )
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKey(f"API key {key_id} is not known", "API_KEY_UNKNOWN")
        if not hmac.compare_digest(_sha256(token[len(KEY_PREFIX) + len(key_id) + 2 :]), key.secret_sha256):
            raise Unauthenticated(f"the secret of API key {key_id} is wrong", "API_KEY_WRONG_SECRET")
        if key.revoke_time is not None:
            raise Unauthenticated(f"API key {key_id} was revoked", "API_KEY_REVOKED")
        return Principal(key_id, key.role, key.rate)

    async def authenticate(self, token: str | None) -> Principal:
        """`check`, reading the log's new keys first when the key id is not known yet."""
        try:
            return self.check(token)
        except UnknownKey:
            await self._refresh_for(time.monotonic())
            return self.check(token)


def api_key_proto(key: ApiKey) -> access_pb2.ApiKey:
    message = access_pb2.ApiKey(
        name=f"apiKeys/{key.key_id}", role=role_value(key.role), display_name=key.display_name,
        creator=f"apiKeys/{key.created_by}" if key.created_by else "",
        revoker=f"apiKeys/{key.revoked_by}" if key.revoked_by else "",
    )  # fmt: skip
    message.create_time.FromDatetime(key.create_time)
    if key.rate is not None:
        message.rate_limit.calls_per_second = key.rate.per_second
        message.rate_limit.burst = key.rate.burst
    if key.revoke_time is not None:
        message.revoke_time.FromDatetime(key.revoke_time)
    return message


def read_key_file(path: Path) -> str:
    """The key text in a key file ('' if there is none)."""
    return path.read_text().strip() if path.exists() else ""


async def ensure_admin_key(event_log: EventLog, path: Path) -> str:
    """The text of the admin key in `path` (a private file), made and appended to the log the first
    time; a key in the file the log does not know (the data directory pointed at another database) is
    added to it. A revoked one stays revoked: delete the file to get a new one."""
    text = read_key_file(path)
    if not key_id_of(text):
        text, created = new_key(ADMIN, "d2d up")
        await event_log.append([created])
        write_private_text(path, text + "\n")
        return text
    ring = KeyRing(event_log)
    await ring.refresh()
    if ring.get(key_id_of(text)) is None:
        await event_log.append([created_event(text, ADMIN, "d2d up")])
    return text


async def ensure_admin_key_at(database_url: str, path: Path) -> str:
    """`ensure_admin_key` on the log at `database_url`, through a connection of its own (the owner's)."""
    pool = await create_pool(database_url, max_size=1)
    try:
        return await ensure_admin_key(EventLog(pool), path)
    finally:
        await pool.close()


async def add_key(database_url: str, created: NewEvent) -> None:
    """Append a key's `api_key.created` event to the log at `database_url` (twice stores it once)."""
    pool = await create_pool(database_url, max_size=1)
    try:
        await EventLog(pool).append([created])
    finally:
        await pool.close()
