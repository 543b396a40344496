"""`d2d.v1.FeatureService` over gRPC: online answers from the in-memory state, and the offline side
(training frames, skew checks) recomputed from the log in this process, which has the log's pool."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc

from d2d import grpcserver
from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.features.definitions import FeatureView
from d2d.features.fold import StaleQueryError
from d2d.features.offline import FrameRow, rows_from_events
from d2d.features.online import MissingEntityKey, OnlineState
from d2d.features.skew import verify
from d2d.replay.partition import training_frame_on_every_core
from d2d.v1 import features_pb2

SERVICE_NAME = "d2d.v1.FeatureService"
MAX_ROWS = 1000
MAX_FRAME_ROWS = 100_000  # explicit rows of one ExportTrainingFrame (about 12 MiB of request)
MAX_SKEW_ROWS = 10_000
MAX_REPORTED_MISMATCHES = 100
FRAME_CHUNK_BYTES = 1 << 20


def view_to_proto(view: FeatureView) -> features_pb2.FeatureView:
    return features_pb2.FeatureView(
        name=f"featureViews/{view.name}",
        version=view.version,
        entity=view.entity,
        source=view.source,
        features=view.feature_names(),
        allowed_lateness_seconds=view.allowed_lateness_seconds,
        definition_json=json.dumps(view.to_dict(), sort_keys=True),
        description=view.description,
    )


def add_values(row: features_pb2.FeatureRow, values: Iterable[Any]) -> None:
    """Append each value to `row.values`: None and NaN as null, numbers as doubles, bools, else strings."""
    add = row.values.add  # in place: building messages first and copying them in costs twice as much
    for v in values:
        t = type(v)
        if t is float:
            if v != v:  # NaN
                add(null_value=True)
            else:
                add(number_value=v)
        elif v is None:
            add(null_value=True)
        elif t is bool:
            add(bool_value=v)
        elif isinstance(v, int | float):
            add(number_value=float(v))
        else:
            add(string_value=str(v))


def _plain(value: Any) -> Any:
    """A numpy scalar (as pandas frames hold) as the Python value it stands for."""
    return value.item() if hasattr(value, "item") else value


def _feature_value(value: Any) -> features_pb2.FeatureValue:
    row = features_pb2.FeatureRow()
    add_values(row, [_plain(value)])
    return row.values[0]


def _utc(timestamp: Any) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)


def _check_rows(rows: Sequence[Any], views: Sequence[FeatureView], most: int) -> None:
    """Refuse more than `most` rows, or a row that names no entity of `views`."""
    if len(rows) > most:
        raise Refusal("INVALID_ARGUMENT", f"rows: {len(rows)} given, at most {most}", "rows")
    entities = {v.entity for v in views}
    for i, row in enumerate(rows):
        if not any(row.keys.get(e) for e in entities):
            raise Refusal("INVALID_ARGUMENT", f"rows[{i}].keys names none of {sorted(entities)}", f"rows[{i}].keys")


class FeatureApi:
    def __init__(self, state: OnlineState, event_log: EventLog) -> None:
        self.state = state
        self.event_log = event_log
        self._names = {name: view.feature_names() for name, view in state.views.items()}
        self._resolved: dict[tuple[str, ...], list[tuple[str, str]] | tuple[str, str, str]] = {}

    def _resolve(self, requested: list[str]) -> list[tuple[str, str]] | tuple[str, str, str]:
        """(view, feature) pairs, or (code, message, field) for the first name that does not resolve."""
        key = tuple(requested)
        cached = self._resolved.get(key)
        if cached is None:
            cached = self._resolve_names(requested)
            if len(self._resolved) < 10_000:  # bounded: callers name few distinct feature lists
                self._resolved[key] = cached
        return cached

    def _resolve_names(self, requested: list[str]) -> list[tuple[str, str]] | tuple[str, str, str]:
        resolved: list[tuple[str, str]] = []
        for i, name in enumerate(requested):
            view_name, dot, feature = name.partition(".")
            view = self.state.views.get(view_name)
            if not dot or not feature:
                return (
                    "INVALID_ARGUMENT",
                    f"feature {name!r} must be '{{view}}.{{feature}}' or '{{view}}.*'",
                    f"features[{i}]",
                )
            if view is None:
                return "NOT_FOUND", f"feature view {view_name!r} does not exist", f"features[{i}]"
            if feature == "*":
                resolved.extend((view_name, f) for f in self._names[view_name])
            elif feature in self._names[view_name]:
                resolved.append((view_name, feature))
            else:
                return "NOT_FOUND", f"feature view {view_name!r} has no feature {feature!r}", f"features[{i}]"
        return resolved

    async def GetOnlineFeatures(
        self, request: features_pb2.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.GetOnlineFeaturesResponse:
        if not request.features:
            await grpcserver.fail(context, "INVALID_ARGUMENT", "features: name at least one", "features")
        if not request.rows or len(request.rows) > MAX_ROWS:
            await grpcserver.fail(
                context, "INVALID_ARGUMENT", f"rows: {len(request.rows)} given; 1 to {MAX_ROWS} per request", "rows"
            )
        resolved = self._resolve(list(request.features))
        if isinstance(resolved, tuple):
            await grpcserver.fail(context, *resolved)
        as_of = request.as_of.ToMicroseconds() / 1e6 if request.HasField("as_of") else time.time()
        views = list(dict.fromkeys(v for v, _ in resolved))
        response = features_pb2.GetOnlineFeaturesResponse(
            feature_names=[f"{v}.{f}" for v, f in resolved], watermark=self.state.watermark
        )
        response.as_of.FromMicroseconds(round(as_of * 1e6))
        for view_name in views:
            response.dropped_late[view_name] = self.state.states[view_name].dropped_late
        for i, row in enumerate(request.rows):
            row_as_of = row.as_of.ToMicroseconds() / 1e6 if row.HasField("as_of") else as_of
            try:
                per_view, unknown = self.state.read(views, row.keys, row_as_of)
            except MissingEntityKey as exc:
                await grpcserver.fail(context, "INVALID_ARGUMENT", f"rows[{i}].keys has {exc}", f"rows[{i}].keys")
            except StaleQueryError as exc:
                await grpcserver.fail(
                    context, "OUT_OF_RANGE", str(exc), f"rows[{i}].as_of" if row.HasField("as_of") else "as_of"
                )
            answer = response.rows.add(unknown_entities=unknown)
            add_values(answer, [per_view[v][f] for v, f in resolved])
            answer.as_of.FromMicroseconds(round(row_as_of * 1e6))
        return response

    async def GetFeatureView(
        self, request: features_pb2.GetFeatureViewRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.FeatureView:
        view = self.state.views.get(request.name.removeprefix("featureViews/"))
        if not request.name.startswith("featureViews/") or view is None:
            await grpcserver.fail(
                context, "NOT_FOUND", f"{request.name!r} does not exist (names are 'featureViews/{{view}}')", "name"
            )
        return view_to_proto(view)

    async def ListFeatureViews(
        self, request: features_pb2.ListFeatureViewsRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.ListFeatureViewsResponse:
        names = list(self.state.views)  # declaration order: offline frames keep the module's column order
        if request.page_token and request.page_token not in names:
            await grpcserver.fail(context, "INVALID_ARGUMENT", "bad page_token", "page_token")
        if request.page_size < 0:
            await grpcserver.fail(
                context, "INVALID_ARGUMENT", f"page_size must not be negative ({request.page_size})", "page_size"
            )
        start = names.index(request.page_token) + 1 if request.page_token else 0
        size = request.page_size or 100
        page = names[start : start + size]
        token = page[-1] if start + size < len(names) else ""
        return features_pb2.ListFeatureViewsResponse(
            feature_views=[view_to_proto(self.state.views[n]) for n in page], next_page_token=token
        )

    def _views_named(self, names: Sequence[str]) -> list[FeatureView]:
        """The views `feature_views` names (`featureViews/{view}`), in request order; all served if none."""
        if not names:
            return list(self.state.views.values())
        chosen: list[FeatureView] = []
        for i, name in enumerate(names):
            field = f"feature_views[{i}]"
            if not name.startswith("featureViews/"):
                raise Refusal("INVALID_ARGUMENT", f"{name!r} is not a view name ('featureViews/{{view}}')", field)
            view = self.state.views.get(name.removeprefix("featureViews/"))
            if view is None:
                raise Refusal("NOT_FOUND", f"{name!r} is not served here", field)
            if view in chosen:
                raise Refusal("INVALID_ARGUMENT", f"{name!r} is named twice", field)
            chosen.append(view)
        return chosen

    async def ExportTrainingFrame(
        self, request: features_pb2.ExportTrainingFrameRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[features_pb2.TrainingFrameChunk]:
        views = self._views_named(request.feature_views)
        rows = await self._frame_rows(request, views)
        frame = await training_frame_on_every_core(self.event_log, views, rows)
        buffer = io.BytesIO()
        await asyncio.to_thread(frame.to_parquet, buffer, index=False)  # pyarrow encodes without the GIL
        data = buffer.getvalue()
        for offset in range(0, len(data), FRAME_CHUNK_BYTES):
            chunk = features_pb2.TrainingFrameChunk(data=data[offset : offset + FRAME_CHUNK_BYTES])
            if offset == 0:
                chunk.rows, chunk.total_bytes = len(frame), len(data)
                chunk.columns.extend(str(c) for c in frame.columns)
            yield chunk

    async def _frame_rows(
        self, request: features_pb2.ExportTrainingFrameRequest, views: Sequence[FeatureView]
    ) -> list[FrameRow]:
        if bool(request.from_event_type) == bool(request.rows):
            raise Refusal("INVALID_ARGUMENT", "give exactly one of from_event_type and rows", "from_event_type")
        if request.limit < 0:
            raise Refusal("INVALID_ARGUMENT", f"limit must not be negative ({request.limit})", "limit")
        if request.from_event_type:
            sources = list(dict.fromkeys(v.source for v in views))
            if request.from_event_type not in sources:
                raise Refusal(
                    "INVALID_ARGUMENT",
                    f"from_event_type {request.from_event_type!r} is folded by none of the views; they fold {sources}",
                    "from_event_type",
                )
            return await rows_from_events(self.event_log, request.from_event_type, views, limit=request.limit or None)
        if request.limit:
            raise Refusal("INVALID_ARGUMENT", "limit applies to from_event_type only", "limit")
        _check_rows(request.rows, views, MAX_FRAME_ROWS)
        rows = []
        for i, row in enumerate(request.rows):
            if not row.HasField("as_of"):
                raise Refusal("INVALID_ARGUMENT", f"rows[{i}].as_of is required", f"rows[{i}].as_of")
            if row.HasField("watermark") and row.watermark < 0:
                raise Refusal(
                    "INVALID_ARGUMENT", f"rows[{i}].watermark must not be negative ({row.watermark})",
                    f"rows[{i}].watermark",
                )  # fmt: skip
            watermark = row.watermark if row.HasField("watermark") else None
            rows.append(FrameRow(dict(row.keys), _utc(row.as_of), watermark))
        return rows

    async def CheckFeatureSkew(
        self, request: features_pb2.CheckFeatureSkewRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.FeatureSkewReport:
        views = self._views_named(request.feature_views)
        rows, as_of = await self._skew_rows(request, views)
        report = await verify(self.event_log, self._online_answers, views, rows)
        response = features_pb2.FeatureSkewReport(
            checked_rows=report.checked_rows, checked_values=report.checked_values, watermark=report.watermark,
            mismatch_count=len(report.mismatches),
        )  # fmt: skip
        response.as_of.FromDatetime(as_of)
        for keys, name, online_value, offline_value in report.mismatches[:MAX_REPORTED_MISMATCHES]:
            response.mismatches.add(
                keys=keys, feature=name, online_value=_feature_value(online_value),
                offline_value=_feature_value(offline_value),
            )  # fmt: skip
        return response

    async def _skew_rows(
        self, request: features_pb2.CheckFeatureSkewRequest, views: Sequence[FeatureView]
    ) -> tuple[list[FrameRow], datetime]:
        """The rows to check, each with its event time, and the request's event time."""
        given_as_of = _utc(request.as_of) if request.HasField("as_of") else None
        if request.rows:
            if request.sample:
                raise Refusal("INVALID_ARGUMENT", "give exactly one of sample and rows", "sample")
            _check_rows(request.rows, views, MAX_SKEW_ROWS)
            rows = []
            for i, row in enumerate(request.rows):
                row_as_of = _utc(row.as_of) if row.HasField("as_of") else given_as_of
                if row_as_of is None:
                    raise Refusal("INVALID_ARGUMENT", f"rows[{i}] has no as_of and neither has the request", "as_of")
                rows.append(FrameRow(dict(row.keys), row_as_of))
            return rows, given_as_of or rows[0].as_of
        if not 0 < request.sample <= MAX_SKEW_ROWS:
            raise Refusal("INVALID_ARGUMENT", f"sample must be 1 to {MAX_SKEW_ROWS} ({request.sample})", "sample")
        candidates = await rows_from_events(self.event_log, views[0].source, views)
        if not candidates:
            raise Refusal("FAILED_PRECONDITION", f"the log has no {views[0].source} events to sample yet", "sample")
        chosen = random.Random(request.seed).sample(candidates, min(request.sample, len(candidates)))
        as_of = given_as_of or max(r.as_of for r in candidates)
        return [FrameRow(r.keys, as_of) for r in chosen], as_of

    async def _online_answers(
        self, views: Sequence[FeatureView], rows: Sequence[FrameRow]
    ) -> tuple[int, list[dict[str, Any]]]:
        """What GetOnlineFeatures would answer for each row (a view only where the row has its
        entity's id), all read without yielding, so every value reflects the one watermark returned."""
        answers: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            answer: dict[str, Any] = {}
            for view in views:
                entity_id = row.keys.get(view.entity)
                if not entity_id:
                    continue
                state = self.state.states[view.name]
                try:
                    values = state.values(entity_id, row.as_of.timestamp())
                except StaleQueryError as exc:
                    raise Refusal("OUT_OF_RANGE", str(exc), f"rows[{i}].as_of") from exc
                if values is None:
                    values = state.defaults()
                answer.update((f"{view.name}.{f}", values[f]) for f in self._names[view.name])
            answers.append(answer)
        return self.state.watermark, answers
