"""Checking a payload against a compiled JSON Schema: what a refusal says, and what it never repeats.

Shared by the contracts registry (producers' events) and the platform's own contracts
(`d2d.contracts.platform`); it needs nothing of the log, so the log can use it too.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from d2d.errors import Refusal
from d2d.limits import check_payload_size

_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def check_payload(
    validator: Any, payload: bytes, pii_fields: tuple[str, ...] = (), *, sealed: tuple[str, ...] = ()
) -> str:
    """Validate payload bytes with a compiled validator; returns the JSON text.

    A refusal names the field; for a field under one of `pii_fields` (JSON pointers), or a value
    holding one (an object whose whole value the validator would quote), it says what rule failed
    without repeating the value. Values at `sealed` pointers are personal fields as the
    log stores them (d2d.personal envelopes, checked on their clear values when ingested): what
    they break is not counted."""
    check_payload_size(len(payload))
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Refusal("INVALID_ARGUMENT", f"payload is not valid UTF-8 JSON: {exc}", "payload") from exc
    if not isinstance(document, dict):
        raise Refusal("INVALID_ARGUMENT", "payload must be a JSON object", "payload")
    if _LONG_NUMBER.search(payload):  # orjson reads integers beyond 64 bits as rounded floats
        document = json.loads(payload)  # exact ints; the syntax was checked above
    if validator.is_valid(document):
        return payload.decode()
    error = next((e for e in validator.iter_errors(document) if not _under(_pointer_of(e), sealed)), None)
    if error is None:
        return payload.decode()
    at = _pointer_of(error)  # the value that failed, which the validator's message may quote whole
    parts = list(error.instance_path)
    kind = type(error.kind).__name__
    if kind == "Required":
        parts.append(error.kind.property)
    elif kind == "AdditionalProperties" and error.kind.unexpected:
        parts.append(error.kind.unexpected[0])
    field_path = "payload" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    pointer = "".join(f"/{p}" for p in parts)
    quotes_value = kind not in ("Required", "AdditionalProperties")  # these name properties only
    if any(
        pointer == f or pointer.startswith(f + "/") or (quotes_value and f.startswith(at + "/")) for f in pii_fields
    ):
        message = f"{field_path} breaks the contract ({kind}); the value is personal data and is not repeated"
    else:
        message = f"{field_path} breaks the contract: {_shortened(error.message)}"
    raise Refusal("INVALID_ARGUMENT", message, field_path)


def _pointer_of(error: Any) -> str:
    return "".join(f"/{p}" for p in error.instance_path)


def _under(pointer: str, prefixes: tuple[str, ...]) -> bool:
    return any(pointer == p or pointer.startswith(p + "/") for p in prefixes)


def _shortened(message: str, limit: int = 300) -> str:
    """A validator's message, which quotes the offending value, cut to a readable length."""
    return message if len(message) <= limit else message[:limit] + f"... ({len(message)} characters)"
