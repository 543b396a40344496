"""Upcasting: old payload versions are upgraded when read, never rewritten in the log.

When a contract's version N+1 changes a payload's shape (a field renamed or restructured), its
owner ships an *upcaster*: a pure function from a version-N payload (a dict, which it must not
change) to a version-N+1 payload, declared in code next to the domain's contracts and feature
views (the simulator's in `d2d/sim/upcasters.py`)::

    @upcaster("payment.authorized", from_version=1)
    def payment_authorized_v1_v2(payload: dict) -> dict:
        return {**without(payload, "amount"), "money": {"amount": payload["amount"], "currency": "EUR"}}

Everything that reads payloads for meaning -- the fold (online and offline alike), training's
labels and rows -- reads them through `upcast`, so one version of each type's shape reaches the
code that interprets it. The log keeps the bytes that were written, with their schema_version.

Chaining: `upcast(type, v, payload)` applies the upcasters from v, v+1, ... up to the last one
declared for the type. A version without an upcaster between them is the identity: a compatible
change (the contract registry checked it) needs none. A payload at or after the last upcaster's
target version, or of a type with no upcasters, passes through unchanged, as the same object. So
an upcaster is only ever needed where a version's shape breaks the one before it.

Upcasters are loaded by importing the modules named in `D2D_UPCASTERS` (comma-separated, default
`d2d.sim.upcasters`), once, at the first upcast: a reader cannot forget to load them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol, TypeVar

__all__ = [
    "UPCASTERS",
    "UpcastError",
    "Upcaster",
    "Upcasters",
    "load",
    "upcast",
    "upcast_event",
    "upcaster",
    "upcaster_name",
    "upgraded_by",
    "without",
]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class UpcastError(ValueError):
    """An upcaster failed on a payload, or returned something other than a JSON object."""


class _Versioned(Protocol):
    type: str
    schema_version: int
    payload: dict[str, Any]


E = TypeVar("E", bound=_Versioned)


def upcaster_name(fn: Upcaster) -> str:
    """`module:qualname`, how a contract.registered event names the code that upgrades old payloads."""
    return f"{fn.__module__}:{fn.__qualname__}"


class Upcasters:
    """Upcasters by (event type, from_version)."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}
        self._last_from: dict[str, int] = {}  # per type, the highest from_version with an upcaster

    def register(self, event_type: str, from_version: int, fn: Upcaster) -> Upcaster:
        """Declare `fn` as the upcaster of `event_type` payloads from `from_version` to the next.

        Declaring the same function twice is harmless (a module imported again); a different one
        for the same step is a ValueError: which one the fold used would depend on import order."""
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise ValueError(f"from_version must be an integer >= 1, got {from_version!r}")
        key = (event_type, from_version)
        known = self._steps.get(key)
        if known is not None and upcaster_name(known) != upcaster_name(fn):
            raise ValueError(
                f"{event_type} v{from_version} -> v{from_version + 1} already has upcaster {upcaster_name(known)};"
                f" refusing {upcaster_name(fn)}"
            )
        self._steps[key] = fn
        self._last_from[event_type] = max(self._last_from.get(event_type, 0), from_version)
        return fn

    def unregister(self, event_type: str, from_version: int) -> None:
        """Forget one step (tests declare upcasters for their own event types and take them back)."""
        self._steps.pop((event_type, from_version), None)
        remaining = [v for t, v in self._steps if t == event_type]
        if remaining:
            self._last_from[event_type] = max(remaining)
        else:
            self._last_from.pop(event_type, None)

    def get(self, event_type: str, from_version: int) -> Upcaster | None:
        return self._steps.get((event_type, from_version))

    def name_upgrading_to(self, event_type: str, version: int) -> str | None:
        """The `module:qualname` of the upcaster from `version - 1` to `version`, if one is declared."""
        step = self._steps.get((event_type, version - 1))
        return None if step is None else upcaster_name(step)

    def names(self, event_type: str) -> list[str]:
        """The `module:qualname` of every upcaster of the type, oldest step first."""
        steps = sorted((v, fn) for (t, v), fn in self._steps.items() if t == event_type)
        return [upcaster_name(fn) for _, fn in steps]

    def latest_version(self, event_type: str) -> int | None:
        """The version every older payload of the type is upcast to (None: the type has no upcasters)."""
        last = self._last_from.get(event_type)
        return None if last is None else last + 1

    def upcast(self, event_type: str, schema_version: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(version, payload) upgraded through every upcaster from `schema_version` on; see the module doc.

        Raises UpcastError naming the type, version and upcaster when one fails or returns a
        non-object; the payload given is never changed."""
        last = self._last_from.get(event_type)
        if last is None or schema_version > last:
            return schema_version, payload
        version, current = schema_version, payload
        while version <= last:
            step = self._steps.get((event_type, version))
            if step is not None:
                try:
                    upgraded = step(current)
                except Exception as exc:
                    raise UpcastError(
                        f"{event_type} v{version} -> v{version + 1}: upcaster {upcaster_name(step)} failed: {exc!r}"
                    ) from exc
                if not isinstance(upgraded, dict):
                    raise UpcastError(
                        f"{event_type} v{version} -> v{version + 1}: upcaster {upcaster_name(step)}"
                        f" returned {type(upgraded).__name__}, not a payload object"
                    )
                current = upgraded
            version += 1
        return version, current

    @contextmanager
    def declared(self, event_type: str, from_version: int, fn: Upcaster) -> Iterator[Upcaster]:
        """`register` for the duration of a block (tests)."""
        self.register(event_type, from_version, fn)
        try:
            yield fn
        finally:
            self.unregister(event_type, from_version)


UPCASTERS = Upcasters()
"""The process's upcasters: filled by the modules named in D2D_UPCASTERS, at the first upcast."""

_loaded = False


def load(modules: str | None = None) -> None:
    """Import the upcaster modules (`D2D_UPCASTERS`, comma-separated; default the simulator's), once."""
    global _loaded
    if _loaded and modules is None:
        return
    from d2d.config import Settings

    names = modules if modules is not None else Settings().upcaster_modules
    for name in (n.strip() for n in names.split(",")):
        if name:
            importlib.import_module(name)
    _loaded = True


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Decorator: declare the function as the process's upcaster of `event_type` from `from_version`."""

    def declare(fn: Upcaster) -> Upcaster:
        return UPCASTERS.register(event_type, from_version, fn)

    return declare


def upcast(event_type: str, schema_version: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A stored payload as the newest version its type's upcasters know: (version, payload).

    The one function every reader of payloads goes through (the fold's `fold_event`, `upcast_event`)."""
    if not _loaded:
        load()
    return UPCASTERS.upcast(event_type, schema_version, payload)


def upgraded_by(event_type: str, version: int) -> str | None:
    """What contract.registered records for `version`: the upcaster from the version before, if any."""
    if not _loaded:
        load()
    return UPCASTERS.name_upgrading_to(event_type, version)


def upcaster_names(event_type: str) -> list[str]:
    """The upcasters every reader applies to `event_type` payloads, oldest step first."""
    if not _loaded:
        load()
    return UPCASTERS.names(event_type)


def upcast_event(event: E) -> E:
    """A stored event (anything with `type`, `schema_version`, `payload`; a frozen dataclass) with its
    payload upcast; the same object when nothing changes."""
    version, payload = upcast(event.type, event.schema_version, event.payload)
    if version == event.schema_version:
        return event
    return replace(event, schema_version=version, payload=payload)  # type: ignore[type-var]


def without(payload: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """A copy of `payload` without `keys`: the usual first step of an upcaster that renames fields."""
    return {k: v for k, v in payload.items() if k not in keys}
