"""`d2d.v1.FeatureService` over gRPC."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import grpc

from d2d import grpcserver
from d2d.features.definitions import FeatureView
from d2d.features.fold import StaleQueryError
from d2d.v1 import features_pb2
from services.features.online import OnlineState

SERVICE_NAME = "d2d.v1.FeatureService"
MAX_ROWS = 1000


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


class FeatureApi:
    def __init__(self, state: OnlineState) -> None:
        self.state = state
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
            per_view: dict[str, dict[str, Any]] = {}
            unknown: list[str] = []
            for view_name in views:
                view = self.state.views[view_name]
                entity_id = row.keys.get(view.entity)
                if not entity_id:
                    await grpcserver.fail(
                        context, "INVALID_ARGUMENT",
                        f"rows[{i}].keys has no {view.entity!r} id, which {view_name} needs", f"rows[{i}].keys",
                    )  # fmt: skip
                state = self.state.states[view_name]
                try:
                    values = state.values(entity_id, row_as_of)
                except StaleQueryError as exc:
                    await grpcserver.fail(
                        context, "OUT_OF_RANGE", str(exc), f"rows[{i}].as_of" if row.HasField("as_of") else "as_of"
                    )
                if values is None:
                    values = state.defaults()
                    if view.entity not in unknown:
                        unknown.append(view.entity)
                per_view[view_name] = values
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
