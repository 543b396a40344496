"""The features service's in-memory state: one ViewState per view, folded in log order.

Only events of the views' source types reach `offer()`, each in seq order. Each carries the seq of
the previous event of its type (the relay's `D2D-Prev-Of-Type`), so a missed one shows as a gap
and is refused (the caller fills it from the log). `watermark` is a position W such that every
source event with seq <= W is folded: the last one folded, or further once the stream is known to
hold nothing newer for these types (`advance`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from d2d.features.definitions import FeatureView
from d2d.features.fold import ViewState, fold_event
from d2d.features.store import fold_key


class GapError(RuntimeError):
    """An event arrived whose type's previous event was not folded: fill (after, through] from the log."""

    def __init__(self, type_: str, after: int, through: int) -> None:
        super().__init__(f"{type_}: last folded seq {after}, but the event after seq {through} arrived")
        self.type, self.after, self.through = type_, after, through


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
