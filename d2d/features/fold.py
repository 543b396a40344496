"""Folding a view's source events into per-entity state, and point-in-time queries over it.

The same code serves the online path (a live stream folded in log order) and the offline path
(a training frame recomputed from the log), so for the same events in the same order both give
bit-identical values.

State, per entity: a *buffer* of rows ``(occurred_at, seq, v_0, ..., v_{k-1})`` sorted by
``(occurred_at, seq)`` -- one column per distinct input of the view's aggregates (field, filter and
value kind), None where the event is not an input of that column -- and, for views with lifetime
aggregates, a *prefix*: per lifetime aggregate, an accumulator of the rows pruned from the buffer
(its slots, and how they continue and yield a value, are the aggregation's kind in
`d2d.features.aggregates`).
Once an entity is queried its buffer is also kept column by column (the same values, with a
count of Nones per column; rows appended since the last query join the columns at the next one),
so a window's inputs are a slice of a column rather than a pass over its rows.

Semantics, precisely:

- Lateness. With M the newest event time applied so far (view-wide) and L the view's allowed
  lateness, an event with ``occurred_at < M - L`` is refused (counted in `dropped_late`). The log
  keeps it; features never see it.
- Windows. A finite window w as of t covers ``t - w < occurred_at <= t``; lifetime covers
  ``occurred_at <= t``.
- Order. An aggregate's inputs are taken in ``(occurred_at, seq)`` order: SUM is the left-to-right
  float sum starting at 0.0 in that order (MEAN = that sum / count), MIN/MAX keep the first of equal
  values, LAST is the input with the greatest ``(occurred_at, seq)``. Given the accepted events
  (with their seqs), values therefore do not depend on the order in which they arrived. What an
  input is (filters, missing fields, value types) is defined by `Aggregate`.
- Entities are keyed by the string of the entity key's value (non-strings are stringified).
- Pruning. With W the view's largest finite window, rows with ``occurred_at < horizon = M - W - 2L``
  move from the buffer into the prefix in buffer order, so the prefix is a left fold of an initial
  segment of the order and ``prefix (+) remaining rows`` is the same left fold as over all rows:
  results do not depend on when (or whether) pruning happens. Accepted events have
  ``occurred_at >= M - L >= horizon``, so nothing is ever inserted below the horizon.
- Lifetime totals. A query as of t at or after an entity's newest row takes its lifetime aggregates
  from the entity's *totals*: the same left fold over all its rows (pruned or buffered), kept up to
  date lazily -- each query folds in only the rows appended since the previous one, and a row
  inserted before the newest (an out-of-order event) makes the next query recompute them from the
  prefix and the buffer. Same inputs in the same order, so the same values as the scan, bit for bit;
  a query earlier than the newest row scans as before.
- Staleness. A query as of t is answered only if ``t - W >= horizon`` (that is, ``t >= M - 2L``):
  then no row a window needs can have been pruned. Older queries raise `StaleQueryError` rather
  than answer inexactly -- whether or not pruning actually happened, so the outcome is the same on
  every path.
"""

from __future__ import annotations

import logging
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter, methodcaller
from typing import Any

from d2d.contracts.upcasting import UpcastError, upcast
from d2d.features.aggregates import KINDS, Kind
from d2d.features.definitions import Aggregation, FeatureView, Filter, resolve_path

__all__ = ["FoldEvent", "StaleQueryError", "ViewState", "fold_all", "fold_event", "posix_seconds"]

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1


class StaleQueryError(ValueError):
    """A query as of a time whose answer could need state already pruned."""


@dataclass(frozen=True, slots=True)
class FoldEvent:
    """What the fold needs of a log event. `occurred_at` is POSIX seconds (UTC)."""

    seq: int
    type: str
    occurred_at: float
    payload: dict[str, Any]


def fold_event(seq: int, type_: str, schema_version: int, occurred_at: float, payload: dict[str, Any]) -> FoldEvent:
    """The FoldEvent of a stored event, its payload upcast to its type's newest version.

    Both paths (the online consumer, the offline frame) build their FoldEvents here, so both fold
    the same upcast payloads. An event whose upcaster fails is folded with an empty payload (no
    entity key: it only advances the watermark), on both paths alike, and logged."""
    try:
        payload = upcast(type_, schema_version, payload)[1]
    except UpcastError as exc:
        log.warning("fold: event seq %d skipped: %s", seq, exc)
        payload = {}
    return FoldEvent(seq, type_, occurred_at, payload)


def posix_seconds(value: datetime | str) -> float:
    """An event time as the fold's float POSIX seconds, from an aware datetime (naive = UTC) or an
    RFC 3339 string. Online and offline must convert event times the same way; this is that way:
    exact integer microseconds since the epoch, divided once (correctly rounded)."""
    dt = (
        datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00")) if isinstance(value, str) else value
    )
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds) / 1_000_000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_first = itemgetter(0)


def _num(v: Any) -> float | None:
    t = type(v)
    if t is float:
        return v if v - v == 0.0 else None  # finite only
    if t is int:
        try:
            return float(v)
        except OverflowError:
            return None
    return None


# String values held in rows are interned: the same merchant, device or country is then one object
# however many rows hold it (less memory, and a window's values sit in fewer cache lines).
_intern = sys.intern


def _scalar(v: Any) -> Any:
    t = type(v)
    if t is str:
        return _intern(v)
    if t is int or t is bool:
        return v
    if t is float and v - v == 0.0:
        return v
    return None


def _interned(row: Iterable[Any]) -> tuple:
    return tuple(_intern(v) if type(v) is str else v for v in row)


def _build_extractor(columns: list[tuple[str, str | None, Filter | None]]) -> tuple[Callable[..., tuple], str]:
    """A function ``(payload, t, seq) -> row`` computing every column in one expression.

    Generated (like dataclasses' methods) so that folding an event costs one call and one tuple.
    Field names are validated identifiers, inserted with repr().
    """
    ns: dict[str, Any] = {"_num": _num, "_scalar": _scalar, "_intern": _intern, "_get": resolve_path}
    exprs = []
    for i, (kind, field, where) in enumerate(columns):
        if field is None:
            expr = "1"
        else:
            path = tuple(field.split("."))
            if len(path) == 1:
                get = f"p.get({path[0]!r})"
            else:
                ns[f"_path{i}"] = path
                get = f"_get(p, _path{i})"
            # The common types are tested inline (no call); the rest go to the same functions.
            if kind == "count":
                expr = f"(None if {get} is None else 1)"
            elif kind == "num":
                expr = f"(_v if type(_v := {get}) is float and _v - _v == 0.0 else _num(_v))"
            elif kind == "scalar":
                expr = f"(_intern(_v) if type(_v := {get}) is str else _scalar(_v))"
            else:
                expr = f"(_intern(_v) if type(_v := {get}) is str else _v)"
        if where is not None:
            ns[f"_where{i}"] = where.matches
            cond = f"_where{i}(p)"
            where_path = tuple(where.field.split("."))
            if where.op == "==" and where.value is not None and len(where_path) == 1:
                # Filter.matches for "==" on a top-level field: a missing (None) value never equals
                # a non-None one, so the comparison alone is the same test.
                ns[f"_value{i}"] = where.value
                cond = f"p.get({where_path[0]!r}) == _value{i}"
            expr = f"({expr} if {cond} else None)"
        exprs.append(expr)
    src = "def _extract(p, t, seq):\n    return (t, seq, " + "".join(e + ", " for e in exprs) + ")\n"
    exec(src, ns)  # noqa: S102 -- source built above from validated names only
    return ns["_extract"], src


# A view's query plan, one entry per feature: (feature, aggregation, row index, window seconds or
# None for lifetime, prefix slot or -1).
_Plan = list[tuple[str, Aggregation, int, int | None, int]]


def _build_query(plan: _Plan, count_all: int) -> tuple[Callable[..., dict], str]:
    """A function ``(cols, nones, times, hi, as_of, pre, totals) -> values`` computing every feature
    of the plan in straight-line code (generated like the extractor; names enter only via repr()).

    Per window, ``lo`` is the first row inside it; per (window, column) the column's non-None
    values in ``[lo, hi)`` are taken once and shared by the aggregates that read them. Lifetime
    aggregates come from `totals` when given (the query is at or after the newest row), else from
    the prefix and a pass over the rows. Each value is its kind's `result` of its inputs, called
    directly (the namespace holds each kind's bound `result` under the aggregation's name).
    """
    ns: dict[str, Any] = {"_bisect_right": bisect_right}
    lines = ["def _compute(cols, nones, times, hi, as_of, pre, totals):", "    out = {}"]
    windows: dict[int | None, str] = {}
    taken: dict[tuple[int | None, int], str] = {}

    def lo_of(w: int | None) -> str:
        if w is None:
            return "0"
        if w not in windows:
            windows[w] = f"lo{len(windows)}"
            lines.append(f"    {windows[w]} = _bisect_right(times, as_of - {float(w)!r}, 0, hi)")
        return windows[w]

    def vals_of(w: int | None, c: int, indent: str) -> str:
        name = f"v{'L' if w is None else windows[w]}_{c}"
        lines.append(f"{indent}{name} = cols[{c}][{lo_of(w)}:hi]")
        lines.append(f"{indent}if nones[{c}]:")
        lines.append(f"{indent}    {name} = [x for x in {name} if x is not None]")
        return name

    for fname, aggregation, c, w, s in plan:
        key = repr(fname)
        result = f"_{aggregation.value}"  # enum values are identifiers
        ns[result] = KINDS[aggregation].result
        if w is None:
            lines.append("    if totals is not None:")
            lines.append(f"        out[{key}] = {result}((), totals, {s})")
            lines.append("    else:")
            if c == count_all:
                lines.append(f"        out[{key}] = hi + (pre[{s}] if pre is not None else 0)")
            else:
                name = vals_of(None, c, "        ")
                lines.append(f"        out[{key}] = {result}({name}, pre, {s}) if pre is not None"
                             f" else {result}({name}, None, -1)")  # fmt: skip
            continue
        lo = lo_of(w)
        if c == count_all:
            lines.append(f"    out[{key}] = hi - {lo}")
            continue
        if KINDS[aggregation].input == "count":  # the column's non-None values in the window, counted in C
            lines.append(f"    out[{key}] = hi - {lo} - (cols[{c}][{lo}:hi].count(None) if nones[{c}] else 0)")
            continue
        name = taken.get((w, c))
        if name is None:
            name = taken[(w, c)] = vals_of(w, c, "    ")
        lines.append(f"    out[{key}] = {result}({name}, None, -1)")
    lines.append("    return out")
    src = "\n".join(lines) + "\n"
    exec(src, ns)  # noqa: S102 -- source built from the plan's ints, enum values and repr()'d names only
    return ns["_compute"], src


def _build_pusher(ncols: int) -> Callable[[list[list[Any]], list[int], tuple], None]:
    """A function ``(cols, nones, row) -> None`` appending a row to the column lists, unrolled."""
    lines = ["def _push(cols, nones, row):", "    cols[0].append(row[0])"]
    for c in range(2, 2 + ncols):
        lines += [f"    v = row[{c}]", f"    cols[{c}].append(v)", "    if v is None:", f"        nones[{c}] += 1"]
    ns: dict[str, Any] = {}
    exec("\n".join(lines) + "\n", ns)  # noqa: S102 -- source built from integers only
    return ns["_push"]


class ViewState:
    """One view's folded state over all its entities.

    `watermark` is the seq of the last event offered to `apply()`; `max_event_time` the newest
    `occurred_at` applied (None before the first); `dropped_late` the events refused for lateness.

    With `prune_on_apply` (the default) the entity an event touches is pruned once its oldest row is
    more than ``span / 8`` below the horizon (``span = max_window + 2 * lateness``), so each prune
    moves a batch of rows. Idle entities keep their rows until touched or `prune()` is called.
    `prune_on_apply=False` never prunes on its own (memory grows without bound; for tests proving
    that pruning does not change results).
    """

    def __init__(self, view: FeatureView, *, prune_on_apply: bool = True) -> None:
        self.view = view
        self.watermark = 0
        self.max_event_time: float | None = None
        self.dropped_late = 0
        self.prune_on_apply = prune_on_apply
        self._horizon: float | None = None
        self._prune_below: float | None = None  # auto-prune an entity once its oldest row is below this
        self._source = view.source
        self._lateness = view.allowed_lateness_seconds
        self._max_window = view.max_window_seconds
        self._span = self._max_window + 2 * self._lateness
        # Hysteresis: let an entity's rows fall this far below the horizon before pruning it, so a
        # prune moves many rows at once instead of one row per event (memory: about span / 8 more).
        self._slack = max(1.0, self._span / 8)
        key = tuple(view.entity_key.split("."))
        self._key: Callable[[dict[str, Any]], Any]
        if len(key) == 1:
            self._key = methodcaller("get", key[0])
        else:
            self._key = lambda p: resolve_path(p, key)

        columns: list[tuple[str, str | None, Filter | None]] = []
        col_index: dict[tuple[str, str | None, Filter | None], int] = {}
        plan: _Plan = []
        life: list[tuple[Kind, int, int]] = []  # (kind, row index, prefix slot) per lifetime aggregate
        template: list[Any] = []  # a new prefix: the lifetime aggregates' initial slot values
        for agg in view.aggregates:
            kind = KINDS[agg.aggregation]
            col = (kind.input, agg.field, agg.where)
            if col not in col_index:
                col_index[col] = len(columns)
                columns.append(col)
            c = 2 + col_index[col]
            slot = -1
            if any(w.seconds is None for w in agg.windows):
                slot = len(template)
                life.append((kind, c, slot))
                template += kind.initial
            for w in agg.windows:
                plan.append((f"{agg.name}_{w.name}", agg.aggregation, c, w.seconds, slot if w.seconds is None else -1))
        self._columns = columns
        self._ncols = len(columns)
        # A row always has a value when some column counts every event unconditionally.
        self._always = ("count", None, None) in col_index
        self._count_all = 2 + col_index[("count", None, None)] if self._always else -1
        self._plan = plan
        self._life = life
        # The lifetime aggregates by the row position they read (SUM, MEAN and MAX of one field
        # share one), so a batch of rows is read once per position: (row position, its getter, counts
        # every row, ((accumulate, prefix slot), ...)).
        by_position: dict[int, list[tuple[Callable[..., None], int]]] = {}
        for kind, c, s in life:
            by_position.setdefault(c, []).append((kind.accumulate, s))
        self._accumulators = [(c, itemgetter(c), c == self._count_all, tuple(f)) for c, f in by_position.items()]
        self._prefix_template = tuple(template)
        self._extract, self._extract_source = _build_extractor(columns)
        self._compute, self._compute_source = _build_query(plan, self._count_all)
        self._push = _build_pusher(len(columns))
        self._buffers: dict[str, list[tuple]] = {}
        # The first len(cols[0]) rows of an entity's buffer by column, for entities queried so far:
        # cols[0] the times, cols[c] row position c's values (cols[1], the seqs, stays empty);
        # nones[c] how many of cols[c] are None. Rows appended later join at the next query.
        self._cols: dict[str, list[list[Any]]] = {}
        self._nones: dict[str, list[int]] = {}
        self._prefixes: dict[str, list[Any]] = {}
        # Lifetime totals per entity (derived, not snapshotted): [the fold over the entity's pruned
        # rows and its buffer's rows before index i, laid out like a prefix; i].
        self._totals: dict[str, list[Any]] = {}

    # ---- folding

    @property
    def horizon(self) -> float | None:
        """Rows older than this may have been pruned: ``max_event_time - max_window - 2 * lateness``."""
        return self._horizon

    def apply(self, event: FoldEvent) -> bool:
        """Offer one event, in log (seq) order; True if it was folded.

        A redelivery (seq <= watermark) changes nothing. Events of other types or without the entity
        key only advance the watermark. An event older than ``max_event_time - allowed_lateness`` is
        refused (``dropped_late += 1``). Otherwise the event is folded into every aggregate whose
        filter it matches (the entity becomes known even if it matches none).
        """
        seq = event.seq
        if seq <= self.watermark:
            return False
        if event.type != self._source:
            self.watermark = seq
            return False
        return self.apply_payload(seq, event.occurred_at, event.payload)

    def apply_payload(self, seq: int, occurred_at: float, payload: dict[str, Any]) -> bool:
        """`apply` of an event of the view's source type, given by its parts rather than a FoldEvent
        (the partitioned fold reads the parts from its cursor): the same checks and the same fold."""
        if seq <= self.watermark:
            return False
        eid = self._key(payload)
        if eid is None:
            self.watermark = seq
            return False
        if type(eid) is not str:
            eid = str(eid)
        t = occurred_at
        if type(t) is not float:
            t = float(t)
        if t - t != 0.0:  # raised before any change, so the state stays consistent
            raise ValueError(f"event seq {seq}: occurred_at must be finite, got {t!r}")
        self.watermark = seq
        m = self.max_event_time
        if m is None or t > m:
            self.max_event_time = t
            self._horizon = t - self._span
            self._prune_below = self._horizon - self._slack
        elif t < m - self._lateness:
            self.dropped_late += 1
            return False
        row = self._extract(payload, t, seq)
        buf = self._buffers.get(eid)
        if buf is None:
            buf = self._buffers[eid] = []
        if self._always or row.count(None) < self._ncols:
            if not buf or t >= buf[-1][0]:
                buf.append(row)  # seq grows, so (t, seq) is the largest key
            else:
                i = bisect_left(buf, row)  # (t, seq) is unique: comparisons never reach the values
                buf.insert(i, row)
                cols = self._cols.get(eid)
                if cols is not None and i < len(cols[0]):  # inside the columned rows: insert there too
                    nones = self._nones[eid]
                    cols[0].insert(i, t)
                    for c in range(2, len(row)):
                        v = row[c]
                        cols[c].insert(i, v)
                        if v is None:
                            nones[c] += 1
                self._totals.pop(eid, None)  # folded in another order now: recompute when asked
        if self.prune_on_apply and buf and buf[0][0] < self._prune_below:
            self._prune(eid, buf)
        return True

    def apply_elsewhere(self, seq: int, occurred_at: float) -> None:
        """Take note of a source event carrying the entity key whose entity another partition folds
        (`d2d.replay.partition`): it moves the watermark and, if newer, the view-wide newest event
        time (so lateness, pruning and staleness here stay exactly those of the whole view), and
        stores nothing. A late one changes nothing here (its own partition counts it dropped)."""
        if seq <= self.watermark:
            return
        self.watermark = seq
        m = self.max_event_time
        if m is None or occurred_at > m:
            self.max_event_time = occurred_at
            self._horizon = occurred_at - self._span
            self._prune_below = self._horizon - self._slack

    def prune(self, entity_id: str | None = None) -> int:
        """Move rows below the horizon into the prefix (one entity, or all); returns rows moved.

        Results never depend on pruning; this only reclaims memory of entities not touched lately.
        """
        if self._horizon is None:
            return 0
        if entity_id is not None:
            buf = self._buffers.get(entity_id)
            return self._prune(entity_id, buf) if buf else 0
        return sum(self._prune(eid, buf) for eid, buf in self._buffers.items() if buf)

    def _prune(self, eid: str, buf: list[tuple]) -> int:
        k = bisect_left(buf, (self._horizon,))  # rows with occurred_at < horizon
        if not k:
            return 0
        cols = self._cols.get(eid)
        if self._life:
            pre = self._prefixes.get(eid)
            if pre is None:
                pre = self._prefixes[eid] = self._new_prefix()
            self._accumulate(pre, buf, cols, 0, k)
            entry = self._totals.get(eid)
            if entry is not None:  # the buffer's rows shift down by k
                if entry[1] < k:  # rows leaving the buffer not yet in the totals
                    self._accumulate(entry[0], buf, cols, entry[1], k)
                entry[1] = max(0, entry[1] - k)
        del buf[:k]
        if cols is not None:
            nones, m = self._nones[eid], min(k, len(cols[0]))
            del cols[0][:m]
            for c in range(2, len(cols)):
                col = cols[c]
                if nones[c]:
                    nones[c] -= col[:m].count(None)
                del col[:m]
        return k

    def _by_column(self, eid: str, buf: list[tuple]) -> tuple[list[list[Any]], list[int]]:
        """The entity's buffer by column, brought up to date (see `_cols`)."""
        cols = self._cols.get(eid)
        if cols is None:
            cols = self._cols[eid] = [[] for _ in range(2 + self._ncols)]
            self._nones[eid] = [0] * (2 + self._ncols)
        nones = self._nones[eid]
        done = len(cols[0])
        if done < len(buf):  # rows appended since the last query
            if done + 8 > len(buf):  # a few: row by row
                push = self._push
                for row in buf[done:]:
                    push(cols, nones, row)
            else:  # several: column by column, each taken from the new rows in one pass
                new = buf[done:]
                cols[0] += map(_first, new)
                for c in range(2, len(cols)):
                    values = list(map(itemgetter(c), new))
                    if None in values:  # (None compares by identity first)
                        nones[c] += values.count(None)
                    cols[c] += values
        return cols, nones

    def _accumulate(self, pre: list[Any], buf: list[tuple], cols: list[list[Any]] | None, lo: int, hi: int) -> None:
        """Continue the lifetime aggregates' left fold `pre` with the rows ``buf[lo:hi]`` (in
        (occurred_at, seq) order): each position's values are a slice of the entity's column where
        its columns (`cols`, see `_by_column`) hold those rows, else read from the rows."""
        columned = cols is not None and hi <= len(cols[0])
        rows = buf[lo:hi] if not columned else []
        for c, get, every_row, folds in self._accumulators:
            if every_row:  # the column that counts every event: 1 in every row
                vals = [1] * (hi - lo)
            else:
                vals = cols[c][lo:hi] if cols is not None and columned else list(map(get, rows))
                if None in vals:
                    vals = [v for v in vals if v is not None]
            if vals:
                for accumulate, s in folds:
                    accumulate(pre, s, vals)

    def _new_prefix(self) -> list[Any]:
        return self._copy_prefix(self._prefix_template)

    def _copy_prefix(self, pre: list[Any] | tuple[Any, ...]) -> list[Any]:
        copy = list(pre)
        for kind, _, s in self._life:
            kind.copy_prefix(copy, s)
        return copy

    # ---- queries

    def _check_fresh(self, as_of: float) -> None:
        h = self._horizon
        if h is not None and as_of - self._max_window < h:
            raise StaleQueryError(
                f"feature view {self.view.name}: as_of {as_of!r} is older than the queryable range "
                f"(as_of must be >= max_event_time - 2 * allowed_lateness = {h + self._max_window!r}; "
                f"pruning horizon {h!r})"
            )

    def values(self, entity_id: str, as_of: float) -> dict[str, Any] | None:
        """Feature values of one entity as of event time `as_of` (POSIX seconds).

        Over the applied events with ``occurred_at <= as_of`` (and ``> as_of - w`` for a window w):
        COUNT and DISTINCT_COUNT -> int; SUM -> float (0.0 if none); MEAN, MIN, MAX -> float or
        None; LAST -> the value of the latest ``(occurred_at, seq)`` input, or None. Returns None if
        the entity never had an event applied; raises `StaleQueryError` for an as_of too old.
        """
        if type(as_of) is not float:
            as_of = float(as_of)
        if as_of - as_of != 0.0:
            raise ValueError(f"as_of must be finite, got {as_of!r}")
        self._check_fresh(as_of)
        buf = self._buffers.get(entity_id)
        if buf is None:
            return None
        pre = self._prefixes.get(entity_id)
        cols, nones = self._by_column(entity_id, buf)
        times = cols[0]
        hi = bisect_right(times, as_of)
        totals = self._lifetime_totals(entity_id, buf, cols) if hi == len(buf) and self._life else None
        return self._compute(cols, nones, times, hi, as_of, pre, totals)

    def _lifetime_totals(self, eid: str, buf: list[tuple], cols: list[list[Any]]) -> list[Any]:
        """The lifetime aggregates' fold over all the entity's rows, brought up to date."""
        entry = self._totals.get(eid)
        if entry is None:
            pre = self._prefixes.get(eid)
            totals = self._copy_prefix(self._prefix_template if pre is None else pre)
            entry = self._totals[eid] = [totals, 0]
        totals, start = entry  # start: buffer index of the first row not yet in the totals
        if start < len(buf):
            self._accumulate(totals, buf, cols, start, len(buf))
            entry[1] = len(buf)
        return totals

    def inputs_of(self, entity_id: str, as_of: float) -> dict[str, list[int]]:
        """Per feature, the seqs of the events a query as of `as_of` takes as inputs (for explaining
        a value): the rows the extractor made of each event (None where an event is not an
        aggregate's input, e.g. filtered out) inside the query's window ``as_of - w < t <= as_of``.
        Exact only while the entity's rows are unpruned (`prune_on_apply=False`)."""
        rows = self._buffers.get(entity_id, [])
        times = [row[0] for row in rows]
        hi = bisect_right(times, as_of)
        inputs: dict[str, list[int]] = {}
        for feature, _aggregation, column, window, _slot in self._plan:
            lo = 0 if window is None else bisect_right(times, as_of - float(window), 0, hi)
            inputs[feature] = [row[1] for row in rows[lo:hi] if row[column] is not None]
        return inputs

    def defaults(self) -> dict[str, Any]:
        """Values for an unknown entity: counts 0, sums 0.0, everything else None."""
        return {fname: KINDS[aggregation].result([], None, -1) for fname, aggregation, _, _, _ in self._plan}

    def entities(self) -> int:
        return len(self._buffers)

    def entity_ids(self) -> list[str]:
        return list(self._buffers)

    def rows(self) -> int:
        """Rows held in buffers (memory gauge)."""
        return sum(len(b) for b in self._buffers.values())

    # ---- snapshots

    def to_snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable (orjson or json) copy of the state; `from_snapshot` restores it exactly."""
        prefixes = {}
        for eid, pre in self._prefixes.items():
            p = list(pre)
            for kind, _, s in self._life:
                kind.encode(p, s)
            prefixes[eid] = p
        return {
            "format": SNAPSHOT_FORMAT,
            "view": self.view.name,
            "version": self.view.version,
            "watermark": self.watermark,
            "max_event_time": self.max_event_time,
            "dropped_late": self.dropped_late,
            "columns": self._ncols,
            "buffers": {eid: [list(r) for r in buf] for eid, buf in self._buffers.items()},
            "prefixes": prefixes,
        }

    @classmethod
    def from_snapshot(cls, view: FeatureView, snap: dict[str, Any], *, prune_on_apply: bool = True) -> ViewState:
        """Restore a state; refuses a snapshot of another view or view version."""
        if snap.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"feature view {view.name}: unsupported snapshot format {snap.get('format')!r}")
        if snap.get("view") != view.name or snap.get("version") != view.version:
            raise ValueError(
                f"feature view {view.name}: snapshot is of {snap.get('view')!r} version {snap.get('version')!r}, "
                f"not version {view.version}"
            )
        state = cls(view, prune_on_apply=prune_on_apply)
        if snap["columns"] != state._ncols:
            raise ValueError(
                f"feature view {view.name}: snapshot has {snap['columns']} columns, expected {state._ncols}"
            )
        state.watermark = int(snap["watermark"])
        m = snap["max_event_time"]
        state.max_event_time = None if m is None else float(m)
        if m is not None:
            state._horizon = state.max_event_time - state._span
            state._prune_below = state._horizon - state._slack
        state.dropped_late = int(snap["dropped_late"])
        width = 2 + state._ncols
        for eid, rows in snap["buffers"].items():
            buf = [_interned(r) for r in rows]
            if any(len(r) != width for r in buf):
                raise ValueError(f"feature view {view.name}: snapshot rows of {eid!r} are not {width} wide")
            state._buffers[eid] = buf
        for eid, p in snap["prefixes"].items():
            pre = list(p)
            if len(pre) != len(state._prefix_template):
                raise ValueError(f"feature view {view.name}: snapshot prefix of {eid!r} has the wrong size")
            for kind, _, s in state._life:
                kind.decode(pre, s)
            state._prefixes[eid] = pre
        return state


def fold_all(view: FeatureView, events: Iterable[FoldEvent]) -> ViewState:
    """A fresh state with every event applied in order."""
    state = ViewState(view)
    for event in events:
        state.apply(event)
    return state
