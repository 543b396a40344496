"""Where a Predict's features come from: the online state serving folds itself (the default), or the
features service over gRPC (`D2D_SERVING_FEATURES=remote`).

In-process, serving holds the views of the models it serves, folded by the features service's
own code (`d2d.features.consumer.Folder`: the same fold, its own durable JetStream consumer and its
own snapshots, under the consumer name `D2D_SERVING_CONSUMER`). A read is a dictionary lookup and
a fold query: no call, no batching, no waiting. A model whose versions need a view not held yet is
switched to only after `host` has built that view from the log up to the state's watermark and
added it whole, so no request is answered from a half-built view. Values are given as
GetOnlineFeatures carries them (numbers as floats, NaN as None), so a decision logs the same
features in both modes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from d2d.batching import Batcher
from d2d.features.consumer import Folder
from d2d.features.definitions import FeatureView

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
RECHECK_SECONDS = 0.002  # remote mode: how soon to ask again for a watermark not reached yet
SPARE_SECONDS = 0.001  # a wait for a watermark gives up this long before the answer is due


class NotFoldedYet(Exception):
    """The features did not reach the watermark a Predict asked for in time."""

    def __init__(self, watermark: int, wanted: int) -> None:
        super().__init__(f"the features reflect the log up to seq {watermark}, not yet {wanted}")


class Features(Protocol):
    """A Predict's feature read, in either mode."""

    async def host(self, views: Sequence[FeatureView]) -> None:
        """Be ready to answer for `views` (before a model needing them is switched to)."""

    async def get(
        self, refs: tuple[str, ...], entities: dict[str, str], as_of: datetime, answer_by: float, min_watermark: int = 0
    ) -> tuple[dict[str, Any], list[str], int]:
        """(values by `view.feature`, unknown entity types, watermark) for one row, from a state
        folded at least to `min_watermark` (NotFoldedYet if it is not by `answer_by`, a
        `time.monotonic()` value; TimeoutError if no answer came by then)."""

    def close(self) -> None: ...


def served_value(value: Any) -> Any:
    """A feature value as GetOnlineFeatures carries it: None (also for NaN), a bool, a float, or text."""
    t = type(value)
    if t is float:
        return None if value != value else value
    if value is None or t is bool:
        return value
    if isinstance(value, int | float):
        return float(value)
    return str(value)


class LocalFeatures:
    """Features read from the online state this process folds (see the module docstring)."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder
        self.state = folder.state
        self._names: dict[str, list[str]] = {}  # view -> its feature names, for views held

    async def host(self, views: Sequence[FeatureView]) -> None:
        await self.folder.host(views)

    async def get(
        self, refs: tuple[str, ...], entities: dict[str, str], as_of: datetime, answer_by: float, min_watermark: int = 0
    ) -> tuple[dict[str, Any], list[str], int]:
        """Raises MissingEntityKey, StaleQueryError, LookupError for a view not held, NotFoldedYet."""
        if self.state.watermark < min_watermark:
            wait = answer_by - SPARE_SECONDS - time.monotonic()
            if not await self.folder.folded_to(min_watermark, wait):
                raise NotFoldedYet(self.state.watermark, min_watermark)
        views = [ref.removesuffix(".*") for ref in refs]
        missing = [v for v in views if v not in self.state.views]
        if missing:
            raise LookupError(f"serving holds no feature view {', '.join(missing)}")
        # Exact microseconds, as the features service reads a protobuf Timestamp.
        when = ((as_of - EPOCH) // MICROSECOND) / 1e6
        watermark = self.state.watermark  # read with the values: nothing folds between the two
        per_view, unknown = self.state.read(views, entities, when)
        values: dict[str, Any] = {}
        for view in views:
            answer = per_view[view]
            names = self._names.get(view)
            if names is None:
                names = self._names[view] = self.state.views[view].feature_names()
            for name in names:
                values[f"{view}.{name}"] = served_value(answer[name])
        return values, unknown, watermark

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Lookup:
    """One Predict's feature row: the refs its deployment reads, its entities, as of when, and the
    time its answer is due (a `time.monotonic()` value)."""

    refs: tuple[str, ...]
    entities: dict[str, str]
    as_of: Any
    answer_by: float


class RemoteFeatures:
    """Features from the features service: concurrent lookups folded into one GetOnlineFeatures
    call (rows carry their own time).

    While one call is in flight, new lookups queue; the next call takes all of them (a
    `d2d.batching.Batcher`; one GetOnlineFeatures call per distinct set of refs among them), so under
    load a call answers many Predicts and they reach the scorer together (where they batch again)."""

    def __init__(self, client: Any, *, max_rows: int = 1000) -> None:
        self.client = client
        self.calls = 0
        self.rows = 0
        self._batcher: Batcher[Lookup, Any] = Batcher(
            self._fetch, name="the features service", max_weight=max_rows, span="serving.features_batch"
        )

    async def host(self, views: Sequence[FeatureView]) -> None:
        """Nothing to do: the features service holds every registered view."""

    async def get(
        self, refs: tuple[str, ...], entities: dict[str, str], as_of: datetime, answer_by: float, min_watermark: int = 0
    ) -> tuple[dict[str, Any], list[str], int]:
        """Raises grpc.aio.AioRpcError as the features service answers, NotFoldedYet."""
        while True:
            left = answer_by - time.monotonic()
            if left <= 0:
                raise TimeoutError
            # The call goes on for the other rows it carries if this caller stops waiting.
            answer = await asyncio.wait_for(self._batcher.submit(Lookup(refs, entities, as_of, answer_by)), left)
            if answer[2] >= min_watermark:
                return answer
            if time.monotonic() + RECHECK_SECONDS >= answer_by - SPARE_SECONDS:
                raise NotFoldedYet(answer[2], min_watermark)
            await asyncio.sleep(RECHECK_SECONDS)

    async def _fetch(self, lookups: list[Lookup]) -> list[Any]:
        """One call per set of refs, with the latest of its rows' deadlines; a failed call fails its rows."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for k, lookup in enumerate(lookups):
            groups.setdefault(lookup.refs, []).append(k)
        answers: list[Any] = [None] * len(lookups)
        for refs, indexes in groups.items():
            rows = [lookups[k] for k in indexes]
            timeout = max(0.001, max(r.answer_by for r in rows) - time.monotonic())
            try:
                answer = await self.client.get_online(
                    list(refs), [r.entities for r in rows], row_as_of=[r.as_of for r in rows], timeout=timeout
                )
            except Exception as exc:
                for k in indexes:
                    answers[k] = exc
                continue
            self.calls += 1
            self.rows += len(rows)
            for j, k in enumerate(indexes):
                answers[k] = (answer.rows[j], answer.unknown_entities[j], answer.watermark)
        return answers

    def close(self) -> None:
        self._batcher.close()
