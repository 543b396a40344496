"""Limits that hold end to end, and the check that an event can be stored and published.

One size limit per event, `MAX_EVENT_BYTES`, counts the payload, the metadata and the envelope's
strings (UTF-8). The bus must carry any stored event: Postgres re-serialises a JSONB payload with
a space after every `:` and `,` (at most 1.5 x the compact text, for `[0,0,...]`), the relay adds
the envelope and headers, so NATS's `max_payload` is configured to `BUS_MAX_PAYLOAD`, and
services refuse to start against a server whose limit is smaller (`check_bus`).

`check_event` is run on every event before it joins a shared (group-committed) transaction: a
value Postgres cannot store (a NUL character in text or JSON, a time zone-less time) or an event
over the limit is refused on its own, naming the field, instead of failing every other caller's
events in the same transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from d2d.errors import Refusal

if TYPE_CHECKING:
    from d2d.eventlog import NewEvent

MAX_EVENT_BYTES = 1 << 20
BUS_MAX_PAYLOAD = 4 << 20
# How much of a refused input dead letters keep (the rest is described by its size and sha256).
DEAD_LETTER_RAW_BYTES = 64 << 10


def check_bus(max_payload: int) -> None:
    """Refuse to run against a NATS server that could not carry an event of the largest size."""
    if max_payload < BUS_MAX_PAYLOAD:
        raise SystemExit(
            f"the NATS server's max_payload is {max_payload} bytes; Data2Data needs at least {BUS_MAX_PAYLOAD}"
            f" (events may be {MAX_EVENT_BYTES} bytes, and JSON grows when Postgres re-serialises it):"
            f" set `max_payload: {BUS_MAX_PAYLOAD}` in the server's configuration"
        )


def event_size(event: NewEvent) -> int:
    """The bytes an event counts against `MAX_EVENT_BYTES`."""
    return (
        _utf8_len(event.payload)
        + sum(_utf8_len(k) + _utf8_len(v) for k, v in event.metadata.items())
        + _utf8_len(event.type)
        + _utf8_len(event.entity_type)
        + _utf8_len(event.entity_id)
    )


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_event(event: NewEvent) -> None:
    """Raise Refusal (naming the field) unless Postgres can store the event and the bus can carry it."""
    for name in ("type", "entity_type", "entity_id"):
        check_text(getattr(event, name), name)
    for key, value in event.metadata.items():
        check_text(key, "metadata")
        check_text(value, f"metadata.{key}")
    if event.occurred_at.tzinfo is None:
        raise Refusal("INVALID_ARGUMENT", "occurred_at must carry a time zone", "occurred_at")
    payload_bytes = _utf8_len(event.payload)
    check_payload_size(payload_bytes)
    size = event_size(event)
    if size > MAX_EVENT_BYTES:
        rest = size - payload_bytes
        raise Refusal(
            "INVALID_ARGUMENT",
            f"the event is {size} bytes (payload {payload_bytes}, metadata and ids {rest});"
            f" the limit is {MAX_EVENT_BYTES} bytes for all of it",
            "payload" if payload_bytes >= rest else "metadata",
        )
    if "\\u0000" in event.payload:  # maybe an escaped NUL, which JSONB cannot hold: look closer
        where = _nul_path(orjson.loads(event.payload), "payload")
        if where:
            raise Refusal("INVALID_ARGUMENT", f"{where} contains a NUL character, which cannot be stored", where)


def check_payload_size(size: int) -> None:
    """Refuse a payload larger than an event may be (before anything parses it, or stores it)."""
    if size > MAX_EVENT_BYTES:
        raise Refusal("INVALID_ARGUMENT", f"payload is {size} bytes; the limit is {MAX_EVENT_BYTES} bytes", "payload")


def check_text(value: str, field: str) -> None:
    """Text Postgres can store: valid UTF-8 (no lone surrogates) without NUL characters."""
    if "\x00" in value:
        raise Refusal("INVALID_ARGUMENT", f"{field} contains a NUL character, which cannot be stored", field)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Refusal("INVALID_ARGUMENT", f"{field} is not valid UTF-8 (a lone surrogate)", field) from None


def _nul_path(value: Any, path: str) -> str:
    """The path of the first string (key or value) holding a NUL in a JSON document, or ''."""
    if isinstance(value, str):
        return path if "\x00" in value else ""
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                return path
            found = _nul_path(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_path(v, f"{path}[{i}]")
            if found:
                return found
    return ""
