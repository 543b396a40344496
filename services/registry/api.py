"""`d2d.v1.RegistryService` over gRPC.

Refusals (`d2d.errors.Refusal`, raised here and by the store) propagate: `d2d.grpcserver` answers
each with its status. A `SpecError` is translated here, naming the field that carried the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.features.definitions import FeatureView
from d2d.features.store import registered_views
from d2d.policies import deployment_dict_from_proto, deployment_policy_proto
from d2d.training.pipeline import Progress, TrainedModel, compare_on_rows, train
from d2d.training.spec import SpecError, TrainingSpec
from d2d.v1 import registry_pb2
from services.registry.store import AliasChange, ModelRecord, ModelStore, VersionRecord, stored_lineage

SERVICE_NAME = "d2d.v1.RegistryService"
CHUNK = 1 << 20


def _model_name(name: str) -> str:
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != "models" or not parts[1]:
        raise Refusal("INVALID_ARGUMENT", f"{name!r} is not a model name 'models/{{model}}'", "name")
    return parts[1]


def _version_name(name: str) -> tuple[str, str]:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "models" or parts[2] != "versions" or not parts[1] or not parts[3]:
        raise Refusal("INVALID_ARGUMENT", f"{name!r} is not 'models/{{model}}/versions/{{version}}'", "name")
    return parts[1], parts[3]


@contextlib.contextmanager
def spec_refusals(field: str) -> Iterator[None]:
    """A training spec that cannot be used (`SpecError`) refused with its code, naming `field`."""
    try:
        yield
    except SpecError as e:
        raise Refusal(e.code, str(e), field) from e


def _change(c: AliasChange) -> registry_pb2.AliasChange:
    msg = registry_pb2.AliasChange(
        alias=c.alias,
        version=str(c.version or ""),
        previous_version=str(c.previous_version or ""),
        seq=c.seq,
        reason=c.reason,
    )
    msg.time.FromDatetime(c.time)
    return msg


async def _progress_stream(
    work: Callable[[Progress], Awaitable[registry_pb2.TrainingProgress]],
) -> AsyncIterator[registry_pb2.TrainingProgress]:
    """`work(progress)`'s progress updates as they come, then the last message it returns."""
    updates: asyncio.Queue[registry_pb2.TrainingProgress | None] = asyncio.Queue()

    def progress(stage: str, message: str, fraction: float) -> None:
        updates.put_nowait(registry_pb2.TrainingProgress(stage=stage, message=message, fraction=fraction))

    async def run() -> registry_pb2.TrainingProgress:
        try:
            return await work(progress)
        finally:
            updates.put_nowait(None)

    task = asyncio.create_task(run())
    while (update := await updates.get()) is not None:
        yield update
    yield await task


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def reproduction_to_proto(stored: VersionRecord, again: TrainedModel, seconds: float) -> registry_pb2.Reproduction:
    """Stored and retrained compared; when the bytes differ, every other property that differs too
    (the size, the inputs, what the log gave: rows and held-out examples, the libraries, and the
    evaluation's scalar metrics), so a reader sees whether the data or the training moved."""
    msg = registry_pb2.Reproduction(
        name=stored.name, stored_sha256=stored.sha256, retrained_sha256=again.sha256,
        identical=again.sha256 == stored.sha256,
    )  # fmt: skip
    msg.duration.FromNanoseconds(round(seconds * 1e9))
    if msg.identical:
        return msg
    pairs = [("artifact_bytes", stored.size_bytes, len(again.artifact)),
             ("feature_names", stored.feature_names, again.feature_names)]  # fmt: skip
    lineage, _ = stored_lineage(again.lineage)
    pairs += [(f"lineage.{k}", stored.lineage[k], lineage[k]) for k in sorted(stored.lineage.keys() & lineage.keys())]
    pairs += [
        (f"evaluation.{k}", stored.evaluation[k], again.evaluation[k])
        for k in sorted(stored.evaluation.keys() & again.evaluation.keys())
        if not isinstance(stored.evaluation[k], dict | list)
    ]
    msg.differences.extend(
        registry_pb2.ReproductionDifference(field=field, stored=_as_json(old), retrained=_as_json(new))
        for field, old, new in pairs
        if _as_json(old) != _as_json(new)
    )
    return msg


def version_to_proto(v: VersionRecord) -> registry_pb2.ModelVersion:
    msg = registry_pb2.ModelVersion(
        name=v.name,
        sha256=v.sha256,
        artifact_bytes=v.size_bytes,
        spec_json=json.dumps(v.spec, sort_keys=True),
        evaluation_json=json.dumps(v.evaluation, sort_keys=True),
        lineage_json=json.dumps(v.lineage, sort_keys=True),
        feature_names=v.feature_names,
        registered_seq=v.registered_seq,
    )
    msg.create_time.FromDatetime(v.created_at)
    return msg


class RegistryApi:
    def __init__(
        self,
        log: EventLog,
        *,
        default_policy: dict[str, Any] | None = None,
        default_promotion_policy: dict[str, Any] | None = None,
    ) -> None:
        """`default_policy`: a new model's deployment policy; `default_promotion_policy`: that of a
        model without its own (both the domain's, from D2D_TRAINING_DEFAULTS)."""
        self.log = log
        self.store = ModelStore(log, default_policy=default_policy, default_promotion_policy=default_promotion_policy)
        self._training = asyncio.Lock()  # one run at a time: XGBoost has the machine

    async def _model_proto(self, record: ModelRecord) -> registry_pb2.Model:
        msg = registry_pb2.Model(
            name=f"models/{record.name}",
            description=record.description,
            aliases={k: str(v) for k, v in record.aliases.items()},
            alias_history=[_change(c) for c in await self.store.alias_history(record.name)],
            deployment_policy=deployment_policy_proto(record.deployment_policy),
            promotion_policy_is_default=record.promotion_policy is None,
        )
        if (promotion := self.store.promotion_policy(record)) is not None:
            msg.promotion_policy.CopyFrom(registry_pb2.PromotionPolicy(**promotion))
        msg.create_time.FromDatetime(record.created_at)
        return msg

    async def views_for(
        self, spec: TrainingSpec, *, unknown: str = "NOT_FOUND", field: str = "spec_json"
    ) -> list[FeatureView]:
        """Every registered definition the spec names (any version ever registered); one that is not
        registered is refused with the code `unknown`, naming `field`."""
        known = {(v.name, v.version): v for v in await registered_views(self.log.pool)}
        views = []
        for name, version in spec.views:
            view = known.get((name, version))
            if view is None:
                versions = sorted(v for n, v in known if n == name)
                detail = f"registered versions: {', '.join(versions)}" if versions else "no version is registered"
                raise Refusal(unknown, f"feature view {name!r} version {version!r} is unknown ({detail})", field)
            views.append(view)
        return views

    async def CreateModel(self, request: Any, context: grpc.aio.ServicerContext) -> registry_pb2.Model:
        given = request.model.HasField("deployment_policy")
        policy = deployment_dict_from_proto(request.model.deployment_policy) if given else None
        return await self._model_proto(
            await self.store.create_model(request.model_id, request.model.description, policy)
        )

    async def GetModel(self, request: Any, context: grpc.aio.ServicerContext) -> registry_pb2.Model:
        return await self._model_proto(await self.store.get_model(_model_name(request.name)))

    async def UpdateModel(self, request: Any, context: grpc.aio.ServicerContext) -> registry_pb2.Model:
        model = _model_name(request.model.name)
        paths = set(request.update_mask.paths)
        unknown = sorted(paths - {"description", "deployment_policy", "promotion_policy"})
        if not paths or unknown:
            raise Refusal(
                "INVALID_ARGUMENT",
                "update_mask must name description, deployment_policy and/or promotion_policy"
                f" (got {sorted(paths) or 'nothing'})",
                "update_mask",
            )
        policy = None
        if "deployment_policy" in paths:
            policy = deployment_dict_from_proto(request.model.deployment_policy)
        promotion = None
        if "promotion_policy" in paths:
            p = request.model.promotion_policy
            promotion = {"canary_share": p.canary_share, "min_decisions": p.min_decisions, "min_labels": p.min_labels,
                         "margin": p.margin, "max_decisions": p.max_decisions}  # fmt: skip
        description = request.model.description if "description" in paths else None
        record = await self.store.update_model(
            model, description=description, policy=policy, promotion_policy=promotion
        )
        return await self._model_proto(record)

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> registry_pb2.ListModelsResponse:
        return registry_pb2.ListModelsResponse(
            models=[await self._model_proto(m) for m in await self.store.list_models()]
        )

    async def _train(
        self, spec: TrainingSpec, views: list[FeatureView], progress: Progress
    ) -> tuple[TrainedModel, float]:
        """One run at a time (XGBoost has the machine); also the seconds the run took, waiting aside."""
        async with self._training:
            started = time.perf_counter()
            return await train(self.log, spec, views, progress), time.perf_counter() - started

    async def train_version(
        self, model: str, spec: TrainingSpec, progress: Progress, *, lineage: dict[str, Any] | None = None
    ) -> VersionRecord:
        """Train `spec` against the log and register the result as the model's next version, with
        `lineage` added to the training's (e.g. the retrain request it answers). A spec naming an
        unregistered view is NOT_FOUND; one the log cannot train on raises `SpecError`."""
        trained, _ = await self._train(spec, await self.views_for(spec), progress)
        return await self.store.add_version(
            model, trained.artifact, trained.spec.to_dict(), trained.feature_names, trained.evaluation,
            {**trained.lineage, **(lineage or {})},
        )  # fmt: skip

    def TrainModelVersion(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.TrainingProgress]:
        async def run(progress: Progress) -> registry_pb2.TrainingProgress:
            model = _model_name(request.parent)
            await self.store.get_model(model)
            with spec_refusals("spec_json"):
                version = await self.train_version(model, TrainingSpec.from_json(request.spec_json), progress)
            return registry_pb2.TrainingProgress(
                stage="stored", message=f"registered {version.name} ({version.sha256[:12]})", fraction=1.0,
                model_version=version_to_proto(version),
            )  # fmt: skip

        return _progress_stream(run)

    def ReproduceModelVersion(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.TrainingProgress]:
        """Retrain from the stored spec and compare; the retrained artifact is not kept (nothing is appended)."""

        async def run(progress: Progress) -> registry_pb2.TrainingProgress:
            stored = await self.store.get_version(*_version_name(request.name))
            with spec_refusals("name"):  # a stored spec this code can no longer read, or a range it cannot train on
                spec = TrainingSpec.from_dict(stored.spec)
                # The log registered every view version the spec names when the version was stored.
                views = await self.views_for(spec, unknown="FAILED_PRECONDITION", field="name")
                again, seconds = await self._train(spec, views, progress)
            reproduction = reproduction_to_proto(stored, again, seconds)
            verdict = "identical" if reproduction.identical else "DIFFERENT"
            return registry_pb2.TrainingProgress(
                stage="compared", message=f"{stored.name}: {verdict} ({again.sha256[:12]})", fraction=1.0,
                reproduction=reproduction,
            )  # fmt: skip

        return _progress_stream(run)

    async def RegisterModelVersion(self, request: Any, context: grpc.aio.ServicerContext) -> registry_pb2.ModelVersion:
        model = _model_name(request.parent)
        with spec_refusals("spec_json"):
            spec = TrainingSpec.from_json(request.spec_json)
        await self.views_for(spec)
        if not request.artifact:
            raise Refusal("INVALID_ARGUMENT", "artifact is required", "artifact")
        if not request.feature_names:
            raise Refusal("INVALID_ARGUMENT", "feature_names are required", "feature_names")
        evaluation = json.loads(request.evaluation_json) if request.evaluation_json else {}
        record = await self.store.add_version(
            model, request.artifact, spec.to_dict(), list(request.feature_names), evaluation, {"external": True}
        )
        return version_to_proto(record)

    async def GetModelVersion(self, request: Any, context: grpc.aio.ServicerContext) -> registry_pb2.ModelVersion:
        return version_to_proto(await self.store.get_version(*_version_name(request.name)))

    async def ListModelVersions(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelVersionsResponse:
        versions = await self.store.list_versions(_model_name(request.parent))
        return registry_pb2.ListModelVersionsResponse(model_versions=[version_to_proto(v) for v in versions])

    async def GetArtifact(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.ArtifactChunk]:
        sha256, data = await self.store.artifact_of(*_version_name(request.name))
        for offset in range(0, len(data), CHUNK):
            chunk = registry_pb2.ArtifactChunk(data=data[offset : offset + CHUNK])
            if offset == 0:
                chunk.sha256, chunk.total_bytes = sha256, len(data)
            yield chunk

    async def SetAlias(self, request: Any, context: grpc.aio.ServicerContext) -> registry_pb2.Model:
        model = _model_name(request.name)
        if not request.version.isdigit():
            raise Refusal("INVALID_ARGUMENT", "version must be a version number", "version")
        candidate = await self.store.get_version(model, request.version)
        current = (await self.store.get_model(model)).aliases.get(request.alias)
        if request.HasField("require_improvement") and current is not None and current != candidate.version:
            with spec_refusals("version"):  # a stored spec this code can no longer read
                await self._gate(candidate, await self.store.get_version(model, str(current)), request)
        await self.store.set_alias(model, request.alias, candidate.version, request.reason)
        return await self._model_proto(await self.store.get_model(model))

    async def _gate(self, candidate: VersionRecord, incumbent: VersionRecord, request: Any) -> None:
        rows = await self.store.test_examples(candidate)
        if not rows:
            raise Refusal(
                "FAILED_PRECONDITION", f"{candidate.name} has no held-out rows to compare on (registered externally)"
            )
        sides = []
        for record in (candidate, incumbent):
            spec = TrainingSpec.from_dict(record.spec)
            sides.append((spec, await self.views_for(spec), await self.store.artifact(record.sha256)))
        auc_new, auc_old, n = await compare_on_rows(self.log, [tuple(r) for r in rows], sides[0], sides[1])
        margin = request.require_improvement
        if auc_new < auc_old + margin:
            raise Refusal(
                "FAILED_PRECONDITION",
                f"promotion refused: version {candidate.version} has AUC {auc_new:.4f} on its {n} held-out rows, "
                f"{request.alias} version {incumbent.version} has {auc_old:.4f} on the same rows; the gate asks for "
                f"+{margin:.4f}, so it falls short by {auc_old + margin - auc_new:.4f}",
                "require_improvement",
            )

    async def DeleteAlias(self, request: Any, context: grpc.aio.ServicerContext) -> registry_pb2.Model:
        model = _model_name(request.name)
        if request.alias not in (await self.store.get_model(model)).aliases:
            raise Refusal("NOT_FOUND", f"models/{model} has no alias {request.alias!r}", "alias")
        await self.store.set_alias(model, request.alias, None)
        return await self._model_proto(await self.store.get_model(model))
