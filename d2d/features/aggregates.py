"""Aggregate kinds: how each `Aggregation` folds its inputs, one definition per kind.

The fold (`d2d.features.fold`) reads `KINDS` and never branches on the aggregation. A kind sees an
aggregate's inputs as `vals`: the non-None values of its column (what `input` takes of a field's
value, see `Kind.input`), in ``(occurred_at, seq)`` order. A lifetime aggregate also keeps a
*prefix*: its fold of the rows pruned from the buffer, in ``len(initial)`` consecutive slots of the
entity's prefix list, starting at slot `s`. ``result(vals, pre, s)`` must equal ``result(all, None,
-1)`` whenever ``pre`` is `initial` continued by `accumulate` with the inputs before `vals` (the
randomized brute-force tests in tests/test_feature_fold.py hold every kind to this, bit for bit).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import reduce
from operator import add
from typing import Any

from d2d.features.definitions import Aggregation

__all__ = ["KINDS", "Kind"]


def _left_fold_sum(vals: Any, start: float) -> float:
    return reduce(add, vals, start)


# The left-to-right float sum of `vals` from `start`. CPython 3.11's built-in sum() is exactly that
# for floats (a C loop of double additions in order; every input here is a float), several times
# faster than reduce(add); from 3.12 on sum() compensates rounding, so it is not used there.
_float_sum: Callable[[Any, float], float] = sum if sys.version_info < (3, 12) else _left_fold_sum


class Kind:
    """How one aggregation folds its inputs (the base holds the defaults of a kind whose prefix
    slots hold immutable values)."""

    input: str
    """What of a field's value the aggregation takes: "count" (1: the event counts), "num" (a finite
    int or float, as float), "scalar" (a string, int, bool or finite float) or "any" (any non-null)."""
    initial: tuple[Any, ...]
    """The prefix slots' values before any input (immutable: shared by every new prefix)."""

    def copy_prefix(self, pre: list[Any], s: int) -> None:
        """Make the slots in `pre`, a shallow copy of `initial` or of another prefix, its own."""

    def encode(self, pre: list[Any], s: int) -> None:
        """Make the slots in `pre` (a copy) JSON-serialisable, in a canonical form, for a snapshot."""

    def decode(self, pre: list[Any], s: int) -> None:
        """Undo `encode` on the slots of `pre`, loaded from a snapshot."""

    def accumulate(self, pre: list[Any], s: int, vals: list[Any]) -> None:
        """Continue the prefix slots with `vals` (not empty), the inputs after those already in it.
        `vals` is read, never changed: the aggregates reading one column share it."""
        raise NotImplementedError

    def result(self, vals: list[Any] | tuple[()], pre: list[Any] | None, s: int) -> Any:
        """The value over `vals`, continuing the prefix slots if `pre` is given (else `s` is -1)."""
        raise NotImplementedError


class _Count(Kind):
    input = "count"
    initial = (0,)

    def accumulate(self, pre: list[Any], s: int, vals: list[Any]) -> None:
        pre[s] += len(vals)

    def result(self, vals: list[Any] | tuple[()], pre: list[Any] | None, s: int) -> Any:
        return len(vals) + (pre[s] if pre is not None else 0)


class _Sum(Kind):
    """Left-to-right float sum from 0.0, in input order."""

    input = "num"
    initial = (0.0,)

    def accumulate(self, pre: list[Any], s: int, vals: list[Any]) -> None:
        pre[s] = _float_sum(vals, pre[s])

    def result(self, vals: list[Any] | tuple[()], pre: list[Any] | None, s: int) -> Any:
        return _float_sum(vals, pre[s] if pre is not None else 0.0)


class _Mean(Kind):
    """The SUM's sum over the count; slots: count, sum."""

    input = "num"
    initial = (0, 0.0)

    def accumulate(self, pre: list[Any], s: int, vals: list[Any]) -> None:
        pre[s] += len(vals)
        pre[s + 1] = _float_sum(vals, pre[s + 1])

    def result(self, vals: list[Any] | tuple[()], pre: list[Any] | None, s: int) -> Any:
        n = len(vals)
        total = 0.0
        if pre is not None:
            n += pre[s]
            total = pre[s + 1]
        return _float_sum(vals, total) / n if n else None


class _Extreme(Kind):
    """MIN or MAX (`pick`): the first of equal values is kept."""

    input = "num"
    initial = (None,)

    def __init__(self, pick: Any) -> None:
        self.pick = pick

    def accumulate(self, pre: list[Any], s: int, vals: list[Any]) -> None:
        mv = self.pick(vals)
        pre[s] = mv if pre[s] is None else self.pick(pre[s], mv)

    def result(self, vals: list[Any] | tuple[()], pre: list[Any] | None, s: int) -> Any:
        m = pre[s] if pre is not None else None
        if vals:
            mv = self.pick(vals)
            m = mv if m is None else self.pick(m, mv)
        return m


class _Last(Kind):
    input = "any"
    initial = (None,)

    def accumulate(self, pre: list[Any], s: int, vals: list[Any]) -> None:
        pre[s] = vals[-1]

    def result(self, vals: list[Any] | tuple[()], pre: list[Any] | None, s: int) -> Any:
        if vals:
            return vals[-1]
        return pre[s] if pre is not None else None


class _DistinctCount(Kind):
    """The prefix slot holds the set of values seen; a snapshot stores it as a sorted list."""

    input = "scalar"
    initial = (frozenset(),)

    def copy_prefix(self, pre: list[Any], s: int) -> None:
        pre[s] = set(pre[s])

    def encode(self, pre: list[Any], s: int) -> None:
        pre[s] = sorted(pre[s], key=_type_then_value)

    def decode(self, pre: list[Any], s: int) -> None:
        pre[s] = set(pre[s])

    def accumulate(self, pre: list[Any], s: int, vals: list[Any]) -> None:
        pre[s].update(vals)

    def result(self, vals: list[Any] | tuple[()], pre: list[Any] | None, s: int) -> Any:
        if pre is not None:
            return len(pre[s].union(vals)) if vals else len(pre[s])
        return len(set(vals))


def _type_then_value(v: Any) -> tuple[str, Any]:
    return (type(v).__name__, v)


KINDS: dict[Aggregation, Kind] = {
    Aggregation.COUNT: _Count(),
    Aggregation.SUM: _Sum(),
    Aggregation.MEAN: _Mean(),
    Aggregation.MIN: _Extreme(min),
    Aggregation.MAX: _Extreme(max),
    Aggregation.LAST: _Last(),
    Aggregation.DISTINCT_COUNT: _DistinctCount(),
}
