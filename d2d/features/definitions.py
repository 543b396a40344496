"""Feature definitions as data: frozen, hashable, JSON-serialisable and versioned.

A `FeatureView` names an entity, the event type it folds (`source`), the payload field holding the
entity id, and its `Aggregate`s, each computed over one or more `Window`s. A view's `version` is a
hash of its canonical JSON (everything but the description), so any change to what a view computes
changes its version. `RequestTransform`s are computed at request time from the Predict request and
already-fetched feature values.

Field paths are payload keys, dotted for nested objects (``"card.country"``). Throughout, a field
that does not resolve (a key is absent, or an intermediate value is not an object) or resolves to
``None`` (JSON null) is *missing*.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Any

__all__ = [
    "LIFETIME",
    "Aggregate",
    "Aggregation",
    "FeatureView",
    "Filter",
    "RequestTransform",
    "Window",
    "days",
    "hours",
    "minutes",
    "resolve_path",
    "seconds",
    "views_by_name",
]

_SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
_SCALARS = (str, int, float, bool)


def _check_snake(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not _SNAKE.fullmatch(name):
        raise ValueError(f"{kind} {name!r} must be lower_snake_case ([a-z][a-z0-9]*, words joined by single '_')")


def _check_field(kind: str, path: Any) -> None:
    if not isinstance(path, str) or not _FIELD.fullmatch(path):
        raise ValueError(
            f"{kind} {path!r} must be a payload field name, dotted for nested fields (e.g. 'card.country')"
        )


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def resolve_path(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path` (a tuple of keys) in nested mappings, or None when it is missing."""
    v: Any = obj
    for key in path:
        if not isinstance(v, Mapping):
            return None
        v = v.get(key)
        if v is None:
            return None
    return v


# --------------------------------------------------------------------------- aggregations and windows


class Aggregation(StrEnum):
    """What an aggregate computes from its inputs in a window, taken in ``(occurred_at, seq)`` order
    (which values are inputs: `Aggregate`). Each member's fold is its kind in
    `d2d.features.aggregates.KINDS`."""

    COUNT = "count"
    """The number of inputs (int)."""
    SUM = "sum"
    """The left-to-right float sum of the inputs, starting at 0.0."""
    MEAN = "mean"
    """SUM over COUNT; None without inputs."""
    MIN = "min"
    """The least input (the first of equal ones); None without inputs."""
    MAX = "max"
    """The greatest input (the first of equal ones); None without inputs."""
    LAST = "last"
    """The input with the greatest ``(occurred_at, seq)``; None without inputs."""
    DISTINCT_COUNT = "distinct_count"
    """The number of distinct inputs (int), by equality: 1, 1.0 and True are one value."""


@dataclass(frozen=True)
class Window:
    """A trailing event-time window of `seconds` (None: the entity's whole lifetime)."""

    seconds: int | None

    def __post_init__(self) -> None:
        s = self.seconds
        if s is not None and (type(s) is not int or s <= 0):
            raise ValueError(f"window seconds must be a positive integer or None (lifetime), got {s!r}")

    @property
    def name(self) -> str:
        """``"lifetime"``, or the length in its largest exact unit: ``"7d"``, ``"1h"``, ``"10m"``, ``"90s"``."""
        s = self.seconds
        if s is None:
            return "lifetime"
        for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
            if s % size == 0:
                return f"{s // size}{unit}"
        return f"{s}s"


def seconds(n: int) -> Window:
    return Window(n)


def minutes(n: int) -> Window:
    return Window(n * 60)


def hours(n: int) -> Window:
    return Window(n * 3600)


def days(n: int) -> Window:
    return Window(n * 86_400)


LIFETIME = Window(None)


# --------------------------------------------------------------------------- filters


def _lt(a: Any, b: Any) -> bool:
    return a < b


def _le(a: Any, b: Any) -> bool:
    return a <= b


def _gt(a: Any, b: Any) -> bool:
    return a > b


def _ge(a: Any, b: Any) -> bool:
    return a >= b


_ORDERING: dict[str, Callable[[Any, Any], bool]] = {"<": _lt, "<=": _le, ">": _gt, ">=": _ge}
FILTER_OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not_in")


def _is_scalar(v: Any) -> bool:
    return isinstance(v, _SCALARS) and not (isinstance(v, float) and not math.isfinite(v))


@dataclass(frozen=True)
class Filter:
    """A condition on one payload field.

    A missing field (absent, or null) never matches, except for ``"!="`` and ``"not_in"``, which it
    always matches. Ordering operators (``<``, ``<=``, ``>``, ``>=``) on values that do not compare
    (e.g. a string against a number) do not match.
    """

    field: str
    op: str
    value: Any

    def __post_init__(self) -> None:
        _check_field("filter field", self.field)
        if self.op not in FILTER_OPS:
            raise ValueError(f"filter op {self.op!r} is not one of {', '.join(FILTER_OPS)}")
        if self.op in ("in", "not_in"):
            if not isinstance(self.value, list | tuple | set | frozenset):
                raise ValueError(f"filter {self.field} {self.op}: value must be a tuple of values, got {self.value!r}")
            value = tuple(self.value) if isinstance(self.value, list | tuple) else tuple(sorted(self.value, key=repr))
            if not all(_is_scalar(v) for v in value):
                raise ValueError(f"filter {self.field} {self.op}: values must be strings, numbers or booleans")
            object.__setattr__(self, "value", value)
        elif not _is_scalar(self.value):
            raise ValueError(
                f"filter {self.field} {self.op}: value must be a string, finite number or boolean, got {self.value!r}"
            )
        elif self.op in _ORDERING and isinstance(self.value, bool):
            raise ValueError(f"filter {self.field} {self.op}: ordering a boolean is not meaningful")
        # Precomputed for matches(); not dataclass fields, so equality and hashing ignore them.
        object.__setattr__(self, "_path", _split(self.field))

    def matches(self, payload: Mapping[str, Any]) -> bool:
        v = resolve_path(payload, self._path)  # type: ignore[attr-defined]
        op = self.op
        if v is None:
            return op == "!=" or op == "not_in"
        if op == "==":
            return bool(v == self.value)
        if op == "!=":
            return bool(v != self.value)
        if op == "in":
            return v in self.value
        if op == "not_in":
            return v not in self.value
        try:
            return bool(_ORDERING[op](v, self.value))
        except TypeError:
            return False

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"field": self.field, "op": self.op, "value": value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Filter:
        _check_keys("filter", d, {"field", "op", "value"})
        return cls(field=d["field"], op=d["op"], value=d["value"])


def _check_keys(kind: str, d: Mapping[str, Any], allowed: set[str], required: set[str] | None = None) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{kind}: expected an object, got {type(d).__name__}")
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"{kind}: unknown keys {sorted(unknown)}")
    missing = (allowed if required is None else required) - set(d)
    if missing:
        raise ValueError(f"{kind}: missing keys {sorted(missing)}")


# --------------------------------------------------------------------------- aggregates


@dataclass(frozen=True)
class Aggregate:
    """One aggregation of a payload field, over one or more windows.

    Its features are named ``f"{name}_{window.name}"``. An event is an input of the aggregate when it
    matches `where` (if any) and its `field` is present (COUNT without a field counts every matching
    event; COUNT with a field counts those where the field is present). SUM, MEAN, MIN and MAX take
    finite numbers only (other values count as missing); DISTINCT_COUNT takes strings, finite numbers
    and booleans; LAST takes any value.
    """

    name: str
    aggregation: Aggregation
    field: str | None = None
    windows: tuple[Window, ...] = (LIFETIME,)
    where: Filter | None = None

    def __post_init__(self) -> None:
        _check_snake("aggregate name", self.name)
        try:
            object.__setattr__(self, "aggregation", Aggregation(self.aggregation))
        except ValueError:
            raise ValueError(
                f"aggregate {self.name}: aggregation {self.aggregation!r} is not one of "
                f"{', '.join(a.value for a in Aggregation)}"
            ) from None
        if self.field is None:
            if self.aggregation is not Aggregation.COUNT:
                raise ValueError(f"aggregate {self.name}: {self.aggregation.value} needs a field")
        else:
            _check_field(f"aggregate {self.name}: field", self.field)
        windows = self.windows
        if isinstance(windows, Window) or not isinstance(windows, Iterable):
            raise ValueError(f"aggregate {self.name}: windows must be a tuple of Window")
        windows = tuple(windows)
        if not windows:
            raise ValueError(f"aggregate {self.name}: needs at least one window")
        for w in windows:
            if not isinstance(w, Window):
                raise ValueError(f"aggregate {self.name}: windows must be Window objects, got {w!r}")
        if len(set(windows)) != len(windows):
            raise ValueError(f"aggregate {self.name}: duplicate window in {[w.name for w in windows]}")
        object.__setattr__(self, "windows", windows)
        if self.where is not None and not isinstance(self.where, Filter):
            raise ValueError(f"aggregate {self.name}: where must be a Filter or None")

    def feature_names(self) -> list[str]:
        return [f"{self.name}_{w.name}" for w in self.windows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aggregation": self.aggregation.value,
            "field": self.field,
            "windows": [w.seconds for w in self.windows],
            "where": self.where.to_dict() if self.where is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Aggregate:
        _check_keys("aggregate", d, {"name", "aggregation", "field", "windows", "where"})
        where = d["where"]
        return cls(
            name=d["name"],
            aggregation=d["aggregation"],
            field=d["field"],
            windows=tuple(Window(s) for s in d["windows"]),
            where=Filter.from_dict(where) if where is not None else None,
        )


# --------------------------------------------------------------------------- request transforms

_TRANSFORM_ARITY = {"ratio": 2, "difference": 2, "equals": 2, "log1p": 1, "hour_of_day": 1, "is_missing": 1}

# What a request value read by each transform must be (absent or null is always allowed: missing).
# Serving checks a Predict's context against these before deciding.
NUMBER = "a number"
TIME = "an RFC 3339 time or POSIX seconds"
TEXT = "a string"
SCALAR = "a string, number or boolean"
TRANSFORM_INPUT_KIND = {
    "ratio": NUMBER, "difference": NUMBER, "log1p": NUMBER, "hour_of_day": TIME, "equals": SCALAR, "is_missing": SCALAR,
}  # fmt: skip


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _hour_of_day(v: Any) -> float | None:
    """The UTC hour (0-23) of an RFC 3339 string, a datetime (naive = UTC) or POSIX seconds."""
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, str):
        s = v.strip()
        if len(s) > 10 and s[10] in "t ":
            s = s[:10] + "T" + s[11:]
        if s[-1:] in ("z", "Z"):
            s = s[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            return None
    else:
        n = _number(v)
        if n is None:
            return None
        try:
            dt = datetime.fromtimestamp(n, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    return float(dt.hour)


@dataclass(frozen=True)
class RequestTransform:
    """A feature computed at request time from the Predict request's context and fetched feature values.

    Inputs are references: ``"request.<field>"`` (a dotted path into the request context) or
    ``"<view>.<feature>"`` (a fetched feature value). A missing input is None. Ops:

    - ``ratio`` (a, b): a / b; None if either is None or not a number, or b == 0.
    - ``difference`` (a, b): a - b; None if either is None or not a number.
    - ``equals`` (a, b): 1.0 if a == b else 0.0; None if either is None.
    - ``log1p`` (a): log(1 + a); None if a is None, not a number, or a <= -1.
    - ``hour_of_day`` (a): the UTC hour 0-23 as a float of an RFC 3339 string, a datetime (naive is
      taken as UTC) or POSIX seconds; None if missing or unparseable.
    - ``is_missing`` (a): 1.0 if a is None else 0.0.

    Numbers are ints or floats (not booleans), taken as floats; non-finite results are None.
    """

    name: str
    op: str
    inputs: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_snake("transform name", self.name)
        if self.op not in _TRANSFORM_ARITY:
            raise ValueError(f"transform {self.name}: op {self.op!r} is not one of {', '.join(_TRANSFORM_ARITY)}")
        if isinstance(self.inputs, str) or not isinstance(self.inputs, Iterable):
            raise ValueError(f"transform {self.name}: inputs must be a tuple of references")
        inputs = tuple(self.inputs)
        arity = _TRANSFORM_ARITY[self.op]
        if len(inputs) != arity:
            raise ValueError(f"transform {self.name}: {self.op} takes {arity} input(s), got {len(inputs)}")
        refs = []
        for ref in inputs:
            head, dot, rest = ref.partition(".") if isinstance(ref, str) else ("", "", "")
            if head == "request" and dot and _FIELD.fullmatch(rest):
                refs.append((True, _split(rest)))
            elif dot and _SNAKE.fullmatch(head) and _SNAKE.fullmatch(rest):
                refs.append((False, ref))
            else:
                raise ValueError(
                    f"transform {self.name}: input {ref!r} must be 'request.<field>' or '<view>.<feature>'"
                )
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "_refs", tuple(refs))

    def compute(self, request: Mapping[str, Any], features: Mapping[str, Any]) -> float | None:
        """The transform's value; `features` is keyed ``"<view>.<feature>"``."""
        args = [
            resolve_path(request, ref) if from_request else features.get(ref)
            for from_request, ref in self._refs  # type: ignore[attr-defined]
        ]
        op = self.op
        if op == "is_missing":
            return 1.0 if args[0] is None else 0.0
        if op == "equals":
            a, b = args
            if a is None or b is None:
                return None
            return 1.0 if a == b else 0.0
        if op == "hour_of_day":
            return None if args[0] is None else _hour_of_day(args[0])
        nums = [_number(a) for a in args]
        if any(n is None for n in nums):
            return None
        if op == "ratio":
            a, b = nums
            out = None if b == 0.0 else a / b  # type: ignore[operator]
        elif op == "difference":
            out = nums[0] - nums[1]  # type: ignore[operator]
        else:  # log1p
            a = nums[0]
            out = None if a <= -1.0 else math.log1p(a)  # type: ignore[operator]
        return out if out is not None and math.isfinite(out) else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestTransform:
        _check_keys("transform", d, {"name", "op", "inputs"})
        return cls(name=d["name"], op=d["op"], inputs=tuple(d["inputs"]))


# --------------------------------------------------------------------------- feature views


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class FeatureView:
    """Aggregates of one entity's events of one type.

    `allowed_lateness_seconds` bounds how far behind the newest event time seen so far an event may
    occur and still be folded; later ones are dropped (online and offline alike).
    """

    name: str
    entity: str
    entity_key: str
    source: str
    aggregates: tuple[Aggregate, ...]
    allowed_lateness_seconds: int = 3600
    description: str = ""

    def __post_init__(self) -> None:
        _check_snake("view name", self.name)
        _check_snake(f"view {self.name}: entity", self.entity)
        _check_field(f"view {self.name}: entity_key", self.entity_key)
        if not isinstance(self.source, str) or not _EVENT_TYPE.fullmatch(self.source):
            raise ValueError(
                f"view {self.name}: source {self.source!r} must be an event type like 'payment.authorized'"
            )
        aggs = self.aggregates
        if isinstance(aggs, Aggregate) or not isinstance(aggs, Iterable):
            raise ValueError(f"view {self.name}: aggregates must be a tuple of Aggregate")
        aggs = tuple(aggs)
        if not aggs:
            raise ValueError(f"view {self.name}: needs at least one aggregate")
        for a in aggs:
            if not isinstance(a, Aggregate):
                raise ValueError(f"view {self.name}: aggregates must be Aggregate objects, got {a!r}")
        object.__setattr__(self, "aggregates", aggs)
        seen_aggs: set[str] = set()
        seen: set[str] = set()
        for a in aggs:
            if a.name in seen_aggs:
                raise ValueError(f"view {self.name}: duplicate aggregate name {a.name!r}")
            seen_aggs.add(a.name)
            for f in a.feature_names():
                if f in seen:
                    raise ValueError(f"view {self.name}: duplicate feature name {f!r} (from aggregate {a.name!r})")
                seen.add(f)
        lateness = self.allowed_lateness_seconds
        if type(lateness) is not int or lateness < 0:
            raise ValueError(
                f"view {self.name}: allowed_lateness_seconds must be a non-negative integer, got {lateness!r}"
            )
        if not isinstance(self.description, str):
            raise ValueError(f"view {self.name}: description must be a string")

    def feature_names(self) -> list[str]:
        return [f for a in self.aggregates for f in a.feature_names()]

    def qualified_feature_names(self) -> list[str]:
        """Feature names as ``"<view>.<feature>"``."""
        return [f"{self.name}.{f}" for f in self.feature_names()]

    @property
    def max_window_seconds(self) -> int:
        """The largest finite window of any aggregate (0 if all are lifetime)."""
        return max((w.seconds for a in self.aggregates for w in a.windows if w.seconds is not None), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "entity": self.entity,
            "entity_key": self.entity_key,
            "source": self.source,
            "aggregates": [a.to_dict() for a in self.aggregates],
            "allowed_lateness_seconds": self.allowed_lateness_seconds,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureView:
        _check_keys(
            "feature view",
            d,
            {"name", "entity", "entity_key", "source", "aggregates", "allowed_lateness_seconds", "description"},
            {"name", "entity", "entity_key", "source", "aggregates"},
        )
        return cls(
            name=d["name"],
            entity=d["entity"],
            entity_key=d["entity_key"],
            source=d["source"],
            aggregates=tuple(Aggregate.from_dict(a) for a in d["aggregates"]),
            allowed_lateness_seconds=d.get("allowed_lateness_seconds", 3600),
            description=d.get("description", ""),
        )

    @cached_property
    def version(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of `to_dict()` without the description."""
        d = self.to_dict()
        del d["description"]
        return hashlib.sha256(_canonical_json(d)).hexdigest()[:16]


def views_by_name(views: Iterable[FeatureView]) -> dict[str, FeatureView]:
    """Views keyed by name; duplicate names are an error."""
    out: dict[str, FeatureView] = {}
    for v in views:
        if v.name in out:
            raise ValueError(f"duplicate feature view name {v.name!r}")
        out[v.name] = v
    return out
