"""The online feature state: one ViewState per view, folded in log order. The features service
holds one; serving holds one of its models' views (`d2d.features.consumer.Folder` feeds both).

Only events of the views' source types reach `offer()`, each in seq order. Each carries the seq of
the previous event of its type (the relay's `D2D-Prev-Of-Type`), so a missed one shows as a gap
and is refused (the caller fills it from the log). `watermark` is a position W such that every
source event with seq <= W is folded: the last one folded, or further once the stream is known to
hold nothing newer for these types (`advance`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from d2d.eventlog import EventLog
from d2d.features.definitions import FeatureView
from d2d.features.fold import ViewState, fold_event
from d2d.features.store import Snapshot, fold_key, load_snapshot

log = logging.getLogger(__name__)


class GapError(RuntimeError):
    """An event arrived whose type's previous event was not folded: fill (after, through] from the log."""

    def __init__(self, type_: str, after: int, through: int) -> None:
        super().__init__(f"{type_}: last folded seq {after}, but the event after seq {through} arrived")
        self.type, self.after, self.through = type_, after, through


class MissingEntityKey(LookupError):
    """A read names no id for the entity a view is keyed by."""

    def __init__(self, view: str, entity: str) -> None:
        super().__init__(f"no {entity!r} id, which {view} needs")
        self.view, self.entity = view, entity


def event_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


class OnlineState:
    def __init__(self, views: Sequence[FeatureView]) -> None:
        self.views = {v.name: v for v in views}
        self.states = {v.name: ViewState(v) for v in views}
        self.by_source: dict[str, list[ViewState]] = {}
        for view in views:
            self.by_source.setdefault(view.source, []).append(self.states[view.name])
        self.watermark = 0
        self.stream_seq = 0
        self.applied = 0
        self.last_of_type = dict.fromkeys(self.by_source, 0)  # seq of the last folded event per source type

    @property
    def sources(self) -> list[str]:
        return list(self.by_source)

    def offer(self, seq: int, type_: str, body: bytes, stream_seq: int = 0, prev: int | None = None) -> bool:
        """Fold one log event given as its bus envelope (JSON), whose type's previous event is at
        `prev` (None: unknown, not checked). Returns False for a repeat; GapError if one was missed."""
        targets = self.by_source.get(type_)
        if targets is None:
            raise ValueError(f"event seq {seq} is a {type_!r}, which no view folds")
        last = self.last_of_type.get(type_, 0)
        if seq <= last:
            return False
        if prev is not None and prev != last:
            raise GapError(type_, last, prev)
        envelope = orjson.loads(body)
        self._fold(seq, type_, envelope["schema_version"], event_time(envelope["occurred_at"]), envelope["payload"])
        if stream_seq:
            self.stream_seq = stream_seq
        return True

    def offer_event(
        self, seq: int, type_: str, schema_version: int, occurred_at: float, payload: dict[str, Any]
    ) -> None:
        """Fold one event read straight from the log (gap filling), in seq order within its type."""
        if type_ in self.by_source and seq > self.last_of_type.get(type_, 0):
            self._fold(seq, type_, schema_version, occurred_at, payload)

    def _fold(self, seq: int, type_: str, schema_version: int, occurred_at: float, payload: dict[str, Any]) -> None:
        event = fold_event(seq, type_, schema_version, occurred_at, payload)
        for state in self.by_source[type_]:
            if state.apply(event):
                self.applied += 1
        self.last_of_type[type_] = seq
        if seq > self.watermark:
            self.watermark = seq

    def read(
        self, views: Sequence[str], keys: Mapping[str, str], as_of: float
    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Per view (names held here), its features for the entity `keys` names, as of event time
        `as_of`: defaults for an entity never seen, whose type is then listed as unknown.
        MissingEntityKey when `keys` has no id for a view's entity; StaleQueryError (d2d.features.fold)
        when `as_of` is older than a view can answer exactly."""
        values: dict[str, dict[str, Any]] = {}
        unknown: list[str] = []
        for name in views:
            view, state = self.views[name], self.states[name]
            entity_id = keys.get(view.entity)
            if not entity_id:
                raise MissingEntityKey(name, view.entity)
            answer = state.values(entity_id, as_of)
            if answer is None:
                answer = state.defaults()
                if view.entity not in unknown:
                    unknown.append(view.entity)
            values[name] = answer
        return values, unknown

    def host(self, states: Mapping[str, ViewState], last_of_type: Mapping[str, int]) -> None:
        """Add views folded elsewhere exactly up to this state's watermark (`Folder.host` builds
        them), with the last folded seq of each source type new here."""
        for name, state in states.items():
            if name in self.views:
                raise ValueError(f"view {name} is already held")
            if state.watermark > self.watermark:
                raise ValueError(f"view {name} is folded to seq {state.watermark}, past the state's {self.watermark}")
            self.views[name] = state.view
            self.states[name] = state
            self.by_source.setdefault(state.view.source, []).append(state)
        for type_, seq in last_of_type.items():
            self.last_of_type.setdefault(type_, seq)

    def advance(self, seq: int, stream_seq: int) -> None:
        """Every source event up to `seq` (stream position `stream_seq`) is folded: say so."""
        if seq > self.watermark:
            self.watermark = seq
        if stream_seq > self.stream_seq:
            self.stream_seq = stream_seq

    def fold_key(self) -> dict[str, str]:
        """What this state's fold depends on besides the log (see `d2d.features.store.fold_key`)."""
        return fold_key(list(self.views.values()))

    def to_bytes(self) -> bytes:
        snap = {name: state.to_snapshot() for name, state in self.states.items()}
        doc = {"watermark": self.watermark, "applied": self.applied, "last_of_type": self.last_of_type, "views": snap}
        return zlib.compress(orjson.dumps(doc), 1)

    @classmethod
    def from_bytes(cls, views: Sequence[FeatureView], data: bytes, stream_seq: int) -> OnlineState:
        doc = orjson.loads(zlib.decompress(data))
        state = cls(views)
        for name, snap in doc["views"].items():
            state.states[name] = ViewState.from_snapshot(state.views[name], snap)
        state.by_source = {}
        for name, view in state.views.items():
            state.by_source.setdefault(view.source, []).append(state.states[name])
        if "last_of_type" not in doc:
            raise ValueError("the snapshot predates per-type positions (last_of_type)")
        state.watermark = doc["watermark"]
        state.applied = doc["applied"]
        state.last_of_type = {t: doc["last_of_type"].get(t, 0) for t in state.by_source}
        state.stream_seq = stream_seq
        return state


async def restore(event_log: EventLog, views: Sequence[FeatureView], consumer: str) -> OnlineState:
    """The last snapshot of `consumer` if it was folded with these view versions and upcasters,
    else an empty state of `views`."""
    return _restored(await load_snapshot(event_log.pool, consumer), views, consumer)


def _restored(snapshot: Snapshot | None, views: Sequence[FeatureView], consumer: str) -> OnlineState:
    wanted = fold_key(views)
    if snapshot is None:
        return OnlineState(views)
    if snapshot.views != wanted:
        log.warning("%s: snapshot has views %s, wanted %s: rebuilding from the log", consumer, snapshot.views, wanted)
        return OnlineState(views)
    try:
        state = OnlineState.from_bytes(views, snapshot.state, snapshot.stream_seq)
    except ValueError as exc:
        log.warning("%s: snapshot not usable (%s): rebuilding from the log", consumer, exc)
        return OnlineState(views)
    log.info("%s: restored snapshot at seq %d", consumer, state.watermark)
    return state


async def restore_snapshot_views(event_log: EventLog, consumer: str, definitions: Sequence[FeatureView]) -> OnlineState:
    """The last snapshot of `consumer` with whichever views it holds (looked up by name and
    version in `definitions`, the registered views), or an empty state holding no view: for a
    holder whose views follow what it serves (serving's)."""
    snapshot = await load_snapshot(event_log.pool, consumer)
    if snapshot is None:
        return OnlineState([])
    by_name = {}
    for view in definitions:
        if fold_key([view])[view.name] == snapshot.views.get(view.name):
            by_name[view.name] = view
    if set(by_name) != set(snapshot.views):
        log.warning("%s: snapshot views %s are not all registered now: starting empty", consumer, snapshot.views)
        return OnlineState([])
    return _restored(snapshot, [by_name[name] for name in snapshot.views], consumer)
