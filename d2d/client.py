"""Python client for the platform's gRPC APIs (traced, with the platform's message limits).

Every client calls with `api_key`, by default the D2D_API_KEY environment variable's.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2

from d2d import grpcserver
from d2d.policies import Policy, deployment_policy_proto
from d2d.v1 import (
    access_pb2,
    access_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    event_pb2,
    features_pb2,
    features_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    serving_pb2,
    serving_pb2_grpc,
)

if TYPE_CHECKING:
    from d2d.features.definitions import FeatureView
    from d2d.outcomes import OutcomeRule


def make_event(
    type: str,
    entity_type: str,
    entity_id: str,
    payload: dict[str, Any] | bytes,
    *,
    occurred_at: datetime,
    event_id: str | uuid.UUID | None = None,
    schema_version: int = 0,
    metadata: dict[str, str] | None = None,
) -> event_pb2.Event:
    event = event_pb2.Event(
        event_id=str(event_id or uuid.uuid4()),
        type=type,
        schema_version=schema_version,
        entity_type=entity_type,
        entity_id=entity_id,
        payload=payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode(),
        metadata=metadata or {},
    )
    event.occurred_at.FromDatetime(occurred_at)
    return event


class IngestClient:
    """`async with IngestClient("127.0.0.1:50051") as ingest: await ingest.append([...])`."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self.channel = grpcserver.channel(target, api_key)
        self.stub = ingest_pb2_grpc.IngestServiceStub(self.channel)

    async def __aenter__(self) -> IngestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 30) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def append(
        self, events: Sequence[event_pb2.Event], *, timeout: float = 30
    ) -> ingest_pb2.AppendEventsResponse:
        return await self.stub.AppendEvents(ingest_pb2.AppendEventsRequest(events=events), timeout=timeout)

    async def stream_append(
        self,
        batches: Iterable[Sequence[event_pb2.Event]] | AsyncIterator[Sequence[event_pb2.Event]],
        *,
        timeout: float | None = None,
    ) -> ingest_pb2.StreamAppendEventsResponse:
        async def requests() -> AsyncIterator[ingest_pb2.AppendEventsRequest]:
            if hasattr(batches, "__aiter__"):
                async for batch in batches:  # type: ignore[union-attr]
                    yield ingest_pb2.AppendEventsRequest(events=batch)
            else:
                for batch in batches:  # type: ignore[union-attr]
                    yield ingest_pb2.AppendEventsRequest(events=batch)

        return await self.stub.StreamAppendEvents(requests(), timeout=timeout)

    async def create_contract_version(
        self,
        event_type: str,
        *,
        owner: str,
        json_schema: dict[str, Any],
        description: str = "",
        pii_fields: Sequence[str] = (),
        compatibility: str = "BACKWARD",
        allowed_lateness_seconds: int = 0,
        max_future_skew_seconds: int | None = None,
        max_age_seconds: int | None = None,
        validate_only: bool = False,
    ) -> ingest_pb2.ContractVersion:
        """Register the next version of `event_type`'s contract; unset time bounds keep their defaults."""
        bounds = {}
        if max_future_skew_seconds is not None:
            bounds["max_future_skew"] = duration_pb2.Duration(seconds=max_future_skew_seconds)
        if max_age_seconds is not None:
            bounds["max_age"] = duration_pb2.Duration(seconds=max_age_seconds)
        return await self.stub.CreateContractVersion(
            ingest_pb2.CreateContractVersionRequest(
                parent=f"contracts/{event_type}",
                contract_version=ingest_pb2.ContractVersion(
                    owner=owner,
                    description=description,
                    json_schema=json.dumps(json_schema),
                    pii_fields=list(pii_fields),
                    compatibility=ingest_pb2.CompatibilityMode.Value(compatibility),
                    allowed_lateness=duration_pb2.Duration(seconds=allowed_lateness_seconds),
                    **bounds,
                ),
                validate_only=validate_only,
            ),
            timeout=30,
        )

    async def get_contract_version(self, event_type: str, version: int | str = "latest") -> ingest_pb2.ContractVersion:
        name = f"contracts/{event_type}/versions/{version}"
        return await self.stub.GetContractVersion(ingest_pb2.GetContractVersionRequest(name=name), timeout=30)

    async def list_contract_versions(self, event_type: str = "-") -> list[ingest_pb2.ContractVersion]:
        found: list[ingest_pb2.ContractVersion] = []
        token = ""
        while True:
            page = await self.stub.ListContractVersions(
                ingest_pb2.ListContractVersionsRequest(parent=f"contracts/{event_type}", page_token=token), timeout=30
            )
            found.extend(page.contract_versions)
            token = page.next_page_token
            if not token:
                return found

    async def list_dead_letters(
        self, *, event_type: str = "", show_redriven: bool = False, limit: int = 100
    ) -> list[ingest_pb2.DeadLetter]:
        found: list[ingest_pb2.DeadLetter] = []
        token = ""
        while len(found) < limit:
            page = await self.stub.ListDeadLetters(
                ingest_pb2.ListDeadLettersRequest(
                    event_type=event_type, show_redriven=show_redriven, page_token=token,
                    page_size=min(limit - len(found), 1000),
                ),
                timeout=30,
            )  # fmt: skip
            found.extend(page.dead_letters)
            token = page.next_page_token
            if not token:
                break
        return found

    async def redrive_dead_letters(
        self, names: Sequence[str] = (), *, event_type: str = "", payload: bytes = b""
    ) -> ingest_pb2.RedriveDeadLettersResponse:
        return await self.stub.RedriveDeadLetters(
            ingest_pb2.RedriveDeadLettersRequest(names=list(names), event_type=event_type, payload=payload), timeout=60
        )

    async def list_events(
        self, *, limit: int = 100, event_type: str = "", entity_type: str = "", entity_id: str = ""
    ) -> tuple[list[event_pb2.Event], int]:
        """The newest `limit` events matching the filters, newest first, and the log's head seq."""
        found: list[event_pb2.Event] = []
        token, head = "", 0
        while len(found) < limit:
            page = await self.stub.ListEvents(
                ingest_pb2.ListEventsRequest(
                    page_size=min(limit - len(found), 1000), page_token=token, event_type=event_type,
                    entity_type=entity_type, entity_id=entity_id,
                ),
                timeout=30,
            )  # fmt: skip
            found.extend(page.events)
            head = head or page.head_seq
            token = page.next_page_token
            if not token:
                break
        return found, head

    async def get_event_log(self, *, counts: bool = False) -> ingest_pb2.EventLog:
        """Head, published position and pending dead letters; with `counts`, events per type (reads the whole log)."""
        view = ingest_pb2.EVENT_LOG_VIEW_FULL if counts else ingest_pb2.EVENT_LOG_VIEW_BASIC
        return await self.stub.GetEventLog(ingest_pb2.GetEventLogRequest(name="eventLog", view=view), timeout=60)


def error_details(error: grpc.aio.AioRpcError) -> list[Any]:
    """The google.rpc details (BadRequest, ErrorInfo, ...) carried by a failed call."""
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return []
    from google.rpc import error_details_pb2

    details = []
    for any_ in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if any_.Is(kind.DESCRIPTOR):
                message = kind()
                any_.Unpack(message)
                details.append(message)
    return details


@dataclass(frozen=True)
class OnlineFeatures:
    feature_names: list[str]
    rows: list[dict[str, Any]]  # feature name -> value (None when absent)
    unknown_entities: list[list[str]]
    watermark: int
    as_of: datetime


def _plain(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind in (None, "null_value") else getattr(value, kind)


@dataclass
class TrainingFrameFile:
    path: Path
    rows: int
    columns: list[str]
    bytes: int


@dataclass
class SkewCheck:
    checked_rows: int
    checked_values: int
    watermark: int
    as_of: datetime
    mismatches: list[tuple[dict[str, str], str, Any, Any]]  # keys, feature, online, offline: the first 100
    mismatch_count: int  # all of them


class FeatureClient:
    """`async with FeatureClient("127.0.0.1:50052") as features: await features.get_online(...)`."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self.channel = grpcserver.channel(target, api_key)
        self.stub = features_pb2_grpc.FeatureServiceStub(self.channel)

    async def __aenter__(self) -> FeatureClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def get_online(
        self,
        features: Sequence[str],
        rows: Sequence[dict[str, str]],
        *,
        as_of: datetime | None = None,
        row_as_of: Sequence[datetime] | None = None,
        timeout: float = 30,
    ) -> OnlineFeatures:
        """Feature values for each row; `row_as_of` gives each row its own event time."""
        entity_rows = [features_pb2.EntityRow(keys=keys) for keys in rows]
        for row, when in zip(entity_rows, row_as_of or (), strict=False):
            row.as_of.FromDatetime(when)
        request = features_pb2.GetOnlineFeaturesRequest(features=list(features), rows=entity_rows)
        if as_of is not None:
            request.as_of.FromDatetime(as_of)
        response = await self.stub.GetOnlineFeatures(request, timeout=timeout)
        names = list(response.feature_names)
        return OnlineFeatures(
            feature_names=names,
            rows=[dict(zip(names, (_plain(v) for v in row.values), strict=True)) for row in response.rows],
            unknown_entities=[list(row.unknown_entities) for row in response.rows],
            watermark=response.watermark,
            as_of=response.as_of.ToDatetime(tzinfo=UTC),
        )

    async def list_views(self) -> list[features_pb2.FeatureView]:
        """Every view the service serves, all pages."""
        found: list[features_pb2.FeatureView] = []
        token = ""
        while True:
            page = await self.stub.ListFeatureViews(features_pb2.ListFeatureViewsRequest(page_token=token), timeout=30)
            found.extend(page.feature_views)
            token = page.next_page_token
            if not token:
                return found

    async def view_definitions(self) -> list[FeatureView]:
        """The served views as definitions, for offline recomputation of exactly what is served."""
        from d2d.features.definitions import FeatureView  # noqa: PLC0415 - pandas-free clients stay light

        return [FeatureView.from_dict(json.loads(v.definition_json)) for v in await self.list_views()]

    async def export_frame(
        self,
        out: str | Path,
        *,
        views: Sequence[str] = (),
        from_event_type: str = "",
        limit: int | None = None,
        rows: Sequence[tuple[dict[str, str], datetime, int | None]] = (),
        timeout: float = 3600,
    ) -> TrainingFrameFile:
        """Write the service's point-in-time training frame to `out` as Parquet: one row per event of
        `from_event_type`, or one per (keys, as_of, watermark or None) of `rows`. `views` are view
        names (default: all served). The file appears only once it is complete."""
        request = features_pb2.ExportTrainingFrameRequest(
            feature_views=[f"featureViews/{v}" for v in views], from_event_type=from_event_type, limit=limit or 0
        )
        for keys, as_of, watermark in rows:
            row = request.rows.add(keys=keys)
            row.as_of.FromDatetime(as_of)
            if watermark is not None:
                row.watermark = watermark
        path = Path(out)
        partial = path.with_name(path.name + ".partial")
        first: features_pb2.TrainingFrameChunk | None = None
        try:
            with partial.open("wb") as file:
                async for chunk in self.stub.ExportTrainingFrame(request, timeout=timeout):
                    first = first or chunk
                    file.write(chunk.data)
            if first is None:
                raise RuntimeError(f"{self.target} answered ExportTrainingFrame with no data")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return TrainingFrameFile(path, first.rows, list(first.columns), first.total_bytes)

    async def check_skew(
        self,
        *,
        views: Sequence[str] = (),
        sample: int = 0,
        rows: Sequence[dict[str, str]] = (),
        as_of: datetime | None = None,
        seed: int = 0,
        timeout: float = 3600,
    ) -> SkewCheck:
        """The service's online answers against their offline recomputation from the log, for a
        `sample` of entity rows drawn from the log (with `seed`) or for explicit `rows`, as of `as_of`."""
        request = features_pb2.CheckFeatureSkewRequest(
            feature_views=[f"featureViews/{v}" for v in views], sample=sample, seed=seed,
            rows=[features_pb2.EntityRow(keys=keys) for keys in rows],
        )  # fmt: skip
        if as_of is not None:
            request.as_of.FromDatetime(as_of)
        report = await self.stub.CheckFeatureSkew(request, timeout=timeout)
        return SkewCheck(
            checked_rows=report.checked_rows,
            checked_values=report.checked_values,
            watermark=report.watermark,
            as_of=report.as_of.ToDatetime(tzinfo=UTC),
            mismatches=[
                (dict(m.keys), m.feature, _plain(m.online_value), _plain(m.offline_value)) for m in report.mismatches
            ],
            mismatch_count=report.mismatch_count,
        )


async def _last_progress(
    updates: AsyncIterator[registry_pb2.TrainingProgress],
    on_progress: Callable[[registry_pb2.TrainingProgress], None] | None,
) -> registry_pb2.TrainingProgress:
    """The last message of a training stream, each one shown to `on_progress` first."""
    last = registry_pb2.TrainingProgress()
    async for update in updates:
        if on_progress is not None:
            on_progress(update)
        last = update
    return last


class RegistryClient:
    """`async with RegistryClient("127.0.0.1:50053") as registry: ...`."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self.channel = grpcserver.channel(target, api_key)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def create_model(
        self, model_id: str, description: str = "", policy: Policy | Mapping[str, Any] | None = None,
        canary_share: float = 0.0,
    ) -> registry_pb2.Model:  # fmt: skip
        """A new model; `policy` (a d2d.policies Policy, or a deployment policy dict: canary_share and
        the policy's fields) is its whole deployment policy, default the domain's."""
        model = registry_pb2.Model(description=description)
        if policy is not None:
            model.deployment_policy.CopyFrom(deployment_policy_proto(policy, canary_share))
        request = registry_pb2.CreateModelRequest(model_id=model_id, model=model)
        return await self.stub.CreateModel(request, timeout=30)

    async def get_model(self, model: str) -> registry_pb2.Model:
        return await self.stub.GetModel(registry_pb2.GetModelRequest(name=f"models/{model}"), timeout=30)

    async def set_policy(
        self, model: str, policy: Policy | None = None, *, canary_share: float = 0.0, epsilon: float = 0.0,
        threshold: float = 0.5, actions: Sequence[str] = (),
    ) -> registry_pb2.Model:  # fmt: skip
        """Set the model's deployment policy: `policy` (any kind, d2d.policies) with `canary_share`, or
        without one a threshold policy of `epsilon`, `threshold` and `actions` (none: the model's current)."""
        from google.protobuf import field_mask_pb2

        if policy is not None:
            message = deployment_policy_proto(policy, canary_share)
        else:
            message = registry_pb2.DeploymentPolicy(
                canary_share=canary_share, epsilon=epsilon, threshold=threshold, actions=list(actions)
            )
        request = registry_pb2.UpdateModelRequest(
            model=registry_pb2.Model(name=f"models/{model}", deployment_policy=message),
            update_mask=field_mask_pb2.FieldMask(paths=["deployment_policy"]),
        )
        return await self.stub.UpdateModel(request, timeout=30)

    async def set_promotion_policy(
        self, model: str, *, canary_share: float, min_decisions: int, min_labels: int, margin: float,
        max_decisions: int,
    ) -> registry_pb2.Model:  # fmt: skip
        """Set how the registry promotes the model's retrained candidates through canary (whole)."""
        from google.protobuf import field_mask_pb2

        policy = registry_pb2.PromotionPolicy(
            canary_share=canary_share, min_decisions=min_decisions, min_labels=min_labels, margin=margin,
            max_decisions=max_decisions,
        )  # fmt: skip
        request = registry_pb2.UpdateModelRequest(
            model=registry_pb2.Model(name=f"models/{model}", promotion_policy=policy),
            update_mask=field_mask_pb2.FieldMask(paths=["promotion_policy"]),
        )
        return await self.stub.UpdateModel(request, timeout=30)

    async def list_models(self) -> list[registry_pb2.Model]:
        return list((await self.stub.ListModels(registry_pb2.ListModelsRequest(), timeout=30)).models)

    async def train(self, model: str, spec_json: str, on_progress=None) -> registry_pb2.ModelVersion:  # noqa: ANN001
        """Train a version; `on_progress(TrainingProgress)` sees each update. Returns the version."""
        request = registry_pb2.TrainModelVersionRequest(parent=f"models/{model}", spec_json=spec_json)
        last = await _last_progress(self.stub.TrainModelVersion(request, timeout=3600), on_progress)
        assert last.HasField("model_version"), "the registry ended the run without a version"
        return last.model_version

    async def reproduce(self, model: str, version: str | int, on_progress=None) -> registry_pb2.Reproduction:  # noqa: ANN001
        """Retrain a version from its stored spec (the registry keeps nothing of it) and compare the
        bytes; `on_progress(TrainingProgress)` sees each update."""
        request = registry_pb2.ReproduceModelVersionRequest(name=f"models/{model}/versions/{version}")
        last = await _last_progress(self.stub.ReproduceModelVersion(request, timeout=3600), on_progress)
        assert last.HasField("reproduction"), "the registry ended the run without a reproduction"
        return last.reproduction

    async def get_version(self, model: str, version: str | int) -> registry_pb2.ModelVersion:
        name = f"models/{model}/versions/{version}"
        return await self.stub.GetModelVersion(registry_pb2.GetModelVersionRequest(name=name), timeout=30)

    async def list_versions(self, model: str) -> list[registry_pb2.ModelVersion]:
        request = registry_pb2.ListModelVersionsRequest(parent=f"models/{model}")
        return list((await self.stub.ListModelVersions(request, timeout=30)).model_versions)

    async def artifact(self, model: str, version: str | int) -> tuple[bytes, str]:
        """The artifact's bytes and the sha256 the registry states for them."""
        request = registry_pb2.GetArtifactRequest(name=f"models/{model}/versions/{version}")
        chunks, sha = [], ""
        async for chunk in self.stub.GetArtifact(request, timeout=300):
            chunks.append(chunk.data)
            sha = sha or chunk.sha256
        return b"".join(chunks), sha

    async def set_alias(
        self, model: str, alias: str, version: str | int, *, require_improvement: float | None = None, reason: str = ""
    ) -> registry_pb2.Model:
        request = registry_pb2.SetAliasRequest(name=f"models/{model}", alias=alias, version=str(version), reason=reason)
        if require_improvement is not None:
            request.require_improvement = require_improvement
        return await self.stub.SetAlias(request, timeout=600)

    async def delete_alias(self, model: str, alias: str) -> registry_pb2.Model:
        return await self.stub.DeleteAlias(
            registry_pb2.DeleteAliasRequest(name=f"models/{model}", alias=alias), timeout=30
        )


class ServingClient:
    """`async with ServingClient("127.0.0.1:50054") as serving: await serving.predict(...)`."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self.channel = grpcserver.channel(target, api_key)
        self.stub = serving_pb2_grpc.ServingServiceStub(self.channel)

    async def __aenter__(self) -> ServingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    @staticmethod
    def request(
        model: str, entities: dict[str, str], context: dict[str, Any] | None = None, *, unit_id: str,
        request_id: str = "",
    ) -> serving_pb2.PredictRequest:  # fmt: skip
        from google.protobuf import struct_pb2

        message = serving_pb2.PredictRequest(
            model=f"models/{model}", entities=entities, unit_id=unit_id, request_id=request_id
        )
        if context:
            struct = struct_pb2.Struct()
            struct.update(context)
            message.context.CopyFrom(struct)
        return message

    async def predict(
        self, model: str, entities: dict[str, str], context: dict[str, Any] | None = None, *, unit_id: str,
        request_id: str = "", timeout: float = 10,
    ) -> serving_pb2.PredictResponse:  # fmt: skip
        request = self.request(model, entities, context, unit_id=unit_id, request_id=request_id)
        return await self.stub.Predict(request, timeout=timeout)

    async def batch_predict(
        self, requests: Sequence[serving_pb2.PredictRequest], *, timeout: float = 60
    ) -> list[serving_pb2.PredictResponse]:
        response = await self.stub.BatchPredict(serving_pb2.BatchPredictRequest(requests=requests), timeout=timeout)
        return list(response.responses)


def outcome_rule_request(terms: dict[str, Any]) -> feedback_pb2.CreateOutcomeRuleRequest:
    """The request that registers an outcome rule's terms (`OutcomeRule.to_dict()`)."""
    message = feedback_pb2.OutcomeRule(
        event_type=terms["event_type"], event_key=terms["event_key"], decision_key=terms["decision_key"],
        window=duration_pb2.Duration(seconds=terms.get("window_seconds", 0)),
        observed_actions=terms.get("observed_actions", ()),
        allowed_lateness=duration_pb2.Duration(seconds=terms.get("allowed_lateness_seconds", 0)),
    )  # fmt: skip
    for term in ("label", "reward", "otherwise_label", "otherwise_reward"):
        if terms.get(term) is not None:
            setattr(message, term, terms[term])
    return feedback_pb2.CreateOutcomeRuleRequest(outcome_rule_id=terms["name"], outcome_rule=message)


class FeedbackClient:
    """`async with FeedbackClient("127.0.0.1:50055") as feedback: await feedback.record_outcome(...)`."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self.channel = grpcserver.channel(target, api_key)
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)

    async def __aenter__(self) -> FeedbackClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def record_outcome(
        self, decision_id: str, *, label: int | None = None, reward: float | None = None,
        occurred_at: datetime | None = None, outcome_id: str = "", timeout: float = 30,
    ) -> feedback_pb2.Outcome:  # fmt: skip
        """Record a decision's outcome (`occurred_at` defaults to now); the same outcome id again
        returns the stored outcome."""
        outcome = feedback_pb2.Outcome(decision=decision_id, outcome_id=outcome_id)
        if label is not None:
            outcome.label = label
        if reward is not None:
            outcome.reward = reward
        outcome.occur_time.FromDatetime(occurred_at or datetime.now(UTC))
        return await self.stub.RecordOutcome(feedback_pb2.RecordOutcomeRequest(outcome=outcome), timeout=timeout)

    async def get_outcome(self, decision_id: str, outcome_id: str, *, timeout: float = 30) -> feedback_pb2.Outcome:
        name = f"decisions/{decision_id}/outcomes/{outcome_id}"
        return await self.stub.GetOutcome(feedback_pb2.GetOutcomeRequest(name=name), timeout=timeout)

    async def create_rule(self, rule: OutcomeRule, *, timeout: float = 30) -> feedback_pb2.OutcomeRule:
        """Register `rule` (the same terms again return the stored rule)."""
        return await self.stub.CreateOutcomeRule(outcome_rule_request(rule.to_dict()), timeout=timeout)

    async def get_rule(self, name: str, *, timeout: float = 30) -> feedback_pb2.OutcomeRule:
        request = feedback_pb2.GetOutcomeRuleRequest(name=f"outcomeRules/{name}")
        return await self.stub.GetOutcomeRule(request, timeout=timeout)

    async def list_rules(self, *, timeout: float = 30) -> list[feedback_pb2.OutcomeRule]:
        response = await self.stub.ListOutcomeRules(feedback_pb2.ListOutcomeRulesRequest(), timeout=timeout)
        return list(response.outcome_rules)

    async def model_metrics(
        self, model: str, *, start: datetime | None = None, end: datetime | None = None, positive_action: str = "",
        timeout: float = 30,
    ) -> feedback_pb2.ModelMetrics:  # fmt: skip
        """Live metrics of `model` per version and arm over decisions with an event time in [start, end)."""
        request = feedback_pb2.GetModelMetricsRequest(name=f"models/{model}", positive_action=positive_action)
        if start is not None:
            request.start_time.FromDatetime(start)
        if end is not None:
            request.end_time.FromDatetime(end)
        return await self.stub.GetModelMetrics(request, timeout=timeout)


class AuditClient:
    """`async with AuditClient("127.0.0.1:50056") as audit: await audit.explain(decision_id)`.

    The streamed operations take `on_progress(stage, done, total)` and return the result document."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self.channel = grpcserver.channel(target, api_key)
        self.stub = audit_pb2_grpc.AuditServiceStub(self.channel)

    async def __aenter__(self) -> AuditClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 60) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    @staticmethod
    async def _result(call: Any, on_progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
        result: dict[str, Any] | None = None
        async for update in call:
            if update.result_json:
                result = json.loads(update.result_json)
            elif on_progress is not None:
                on_progress(update.stage, update.done, update.total)
        if result is None:
            raise RuntimeError("the audit stream ended without a result")
        return result

    async def explain(self, decision_id: str, *, timeout: float = 60) -> audit_pb2.DecisionExplanation:
        request = audit_pb2.ExplainDecisionRequest(name=f"decisions/{decision_id}")
        return await self.stub.ExplainDecision(request, timeout=timeout)

    async def replay_state(
        self, *, seq: int | None = None, time: datetime | None = None, entities: Sequence[str] = (),
        timeout: float = 600,
    ) -> dict[str, Any]:  # fmt: skip
        """The state as of `seq` or `time` (`entities` as `{entity}/{id}`), as the result document."""
        request = audit_pb2.GetReplayStateRequest(entities=list(entities))
        if seq is not None:
            request.seq = seq
        elif time is not None:
            request.time.FromDatetime(time)
        state = await self.stub.GetReplayState(request, timeout=timeout)
        return {"seq": state.seq, **json.loads(state.state_json)}

    async def rescore(
        self, model_version: str, *, model: str = "", after_seq: int = 0, to_seq: int = 0,
        recompute_features: bool = False, on_progress: Callable[[str, int, int], None] | None = None,
        timeout: float = 3600,
    ) -> dict[str, Any]:  # fmt: skip
        request = audit_pb2.RescoreDecisionsRequest(
            model_version=model_version, model=model, after_seq=after_seq, to_seq=to_seq,
            recompute_features=recompute_features,
        )  # fmt: skip
        return await self._result(self.stub.RescoreDecisions(request, timeout=timeout), on_progress)

    async def evaluate_policy(
        self, model_version: str, *, policy: dict[str, Any] | None = None, model: str = "", after_seq: int = 0,
        to_seq: int = 0, clip: float = 0.0, bootstrap: int = 0, reward: dict[str, Any] | None = None, seed: int = 0,
        on_progress: Callable[[str, int, int], None] | None = None, timeout: float = 3600,
    ) -> dict[str, Any]:  # fmt: skip
        request = audit_pb2.EvaluatePolicyRequest(
            model_version=model_version, policy_json=json.dumps(policy) if policy else "", model=model,
            after_seq=after_seq, to_seq=to_seq, clip=clip, bootstrap=bootstrap,
            reward_json=json.dumps(reward) if reward else "", seed=seed,
        )  # fmt: skip
        return await self._result(self.stub.EvaluatePolicy(request, timeout=timeout), on_progress)

    async def verify(
        self, *, workers: int = 0, skip_projections: bool = False,
        on_progress: Callable[[str, int, int], None] | None = None, timeout: float = 7200,
    ) -> dict[str, Any]:  # fmt: skip
        request = audit_pb2.VerifyLogRequest(workers=workers, skip_projections=skip_projections)
        return await self._result(self.stub.VerifyLog(request, timeout=timeout), on_progress)


class AccessClient:
    """API keys, through the AccessService the registry hosts (admin keys only):
    `async with AccessClient(registry_addr) as access: key, text = await access.create_key("app")`."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self.channel = grpcserver.channel(target, api_key)
        self.stub = access_pb2_grpc.AccessServiceStub(self.channel)

    async def __aenter__(self) -> AccessClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def create_key(
        self, role: str, display_name: str = "", *, calls_per_second: float = 0, burst: float = 0
    ) -> tuple[access_pb2.ApiKey, str]:
        """A new key of `role` (producer, app, operator, auditor, admin): its record and its text,
        which is shown this once. With `calls_per_second`, the key is rate limited (`burst` at once;
        0: one second's calls)."""
        key = access_pb2.ApiKey(role=access_pb2.Role.Value(role.upper()), display_name=display_name)
        if calls_per_second:
            key.rate_limit.calls_per_second, key.rate_limit.burst = calls_per_second, burst
        request = access_pb2.CreateApiKeyRequest(api_key=key)
        response = await self.stub.CreateApiKey(request, timeout=30)
        return response.api_key, response.key

    async def list_keys(self) -> list[access_pb2.ApiKey]:
        return list((await self.stub.ListApiKeys(access_pb2.ListApiKeysRequest(), timeout=30)).api_keys)

    async def revoke_key(self, key_id: str) -> access_pb2.ApiKey:
        return await self.stub.RevokeApiKey(access_pb2.RevokeApiKeyRequest(name=f"apiKeys/{key_id}"), timeout=30)
