"""The features service's in-memory state: one ViewState per view, folded in log order.

Every event of the log passes through `offer()` in seq order (the log is dense, so a gap means
something was missed and is refused); only events of a view's source type are decoded and folded.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from d2d.features.definitions import FeatureView
from d2d.features.fold import FoldEvent, ViewState


class GapError(RuntimeError):
    """An event arrived whose seq is not the next one: the caller must fill the gap from the log."""


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

    def offer(self, seq: int, type_: str, body: bytes | None, stream_seq: int = 0) -> bool:
        """Fold one log event given as its bus envelope (JSON). Returns False for a repeat."""
        if seq <= self.watermark:
            return False
        if seq != self.watermark + 1:
            raise GapError(f"expected seq {self.watermark + 1}, got {seq}")
        targets = self.by_source.get(type_)
        if targets and body is not None:
            envelope = orjson.loads(body)
            event = FoldEvent(seq, type_, event_time(envelope["occurred_at"]), envelope["payload"])
            for state in targets:
                if state.apply(event):
                    self.applied += 1
        self.watermark = seq
        if stream_seq:
            self.stream_seq = stream_seq
        return True

    def offer_event(self, seq: int, type_: str, occurred_at: float, payload: dict[str, Any]) -> None:
        """Fold one event read straight from the log (gap filling, catch-up)."""
        if seq <= self.watermark:
            return
        if seq != self.watermark + 1:
            raise GapError(f"expected seq {self.watermark + 1}, got {seq}")
        for state in self.by_source.get(type_, ()):
            if state.apply(FoldEvent(seq, type_, occurred_at, payload)):
                self.applied += 1
        self.watermark = seq

    def versions(self) -> dict[str, str]:
        return {name: view.version for name, view in self.views.items()}

    def to_bytes(self) -> bytes:
        snap = {name: state.to_snapshot() for name, state in self.states.items()}
        return zlib.compress(orjson.dumps({"watermark": self.watermark, "applied": self.applied, "views": snap}), 1)

    @classmethod
    def from_bytes(cls, views: Sequence[FeatureView], data: bytes, stream_seq: int) -> OnlineState:
        doc = orjson.loads(zlib.decompress(data))
        state = cls(views)
        for name, snap in doc["views"].items():
            state.states[name] = ViewState.from_snapshot(state.views[name], snap)
        state.by_source = {}
        for name, view in state.views.items():
            state.by_source.setdefault(view.source, []).append(state.states[name])
        state.watermark = doc["watermark"]
        state.applied = doc["applied"]
        state.stream_seq = stream_seq
        return state
