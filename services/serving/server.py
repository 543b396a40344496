"""Assembles the serving service: deployments loaded from the registry and hot-swapped when an
alias or policy moves (followed on JetStream), features from the online state serving folds
itself (or from the features service), decisions logged through a group committer."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import orjson
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from d2d import auth, bus, eventlog, grpcserver
from d2d.client import FeatureClient, RegistryClient
from d2d.config import Settings
from d2d.eventlog import EventLog, GroupCommitter
from d2d.features.consumer import Folder
from d2d.features.online import restore_snapshot_views
from d2d.features.store import registered_views
from d2d.runtime.process import stop_on_signals
from d2d.v1 import serving_pb2
from services.serving.api import SERVICE_NAME, ServingApi
from services.serving.features import Features, LocalFeatures, RemoteFeatures
from services.serving.models import Deployment, LoadedVersion, load_deployment

log = logging.getLogger(__name__)


class Deployments:
    """The loaded deployment of each model served so far; swapped whole when its aliases move."""

    def __init__(
        self, registry: RegistryClient, event_log: EventLog, features: Features, *, micro_batching: bool = True
    ) -> None:
        self.registry = registry
        self.log = event_log
        self.features = features
        self.micro_batching = micro_batching
        self._loaded: dict[str, Deployment] = {}
        self._loading: dict[str, asyncio.Task[Deployment]] = {}
        self._cache: dict[str, LoadedVersion] = {}
        self.swaps = 0

    def loaded(self, model: str) -> Deployment | None:
        """The model's deployment if it is loaded (no waiting)."""
        return self._loaded.get(model)

    async def get(self, model: str) -> Deployment:
        deployment = self._loaded.get(model)
        if deployment is not None:
            return deployment
        return await self._load(model)

    async def _load(self, model: str) -> Deployment:
        task = self._loading.get(model)
        if task is None:
            task = self._loading[model] = asyncio.create_task(self._fetch(model))
        try:
            deployment = await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(model, None)
        self._loaded[model] = deployment
        return deployment

    async def _fetch(self, model: str) -> Deployment:
        """The model's deployment, with every view it reads held by the features (so switching to it
        never answers from a half-built view)."""
        views = {(v.name, v.version): v for v in await registered_views(self.log.pool)}
        try:
            deployment = await load_deployment(
                self.registry, model, views, self._cache, micro_batching=self.micro_batching
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise LookupError(exc.details()) from None
            raise
        await self.features.host(deployment.views())
        return deployment

    async def reload(self, model: str) -> None:
        """Load the model's current deployment and switch to it; requests in flight finish on the old."""
        if model not in self._loaded:
            return
        log.info("serving: %s changed; loading its deployment", model)
        try:
            fresh = await self._fetch(model)
        except Exception as exc:  # keep serving what is loaded; the next change tries again
            log.warning("serving: reloading %s failed (%s); still serving the loaded versions", model, exc)
            return
        self._loaded[model] = fresh
        self.swaps += 1
        log.info("serving: %s now %s (canary %s)", model, fresh.production.name, fresh.canary and fresh.canary.name)


async def follow_model_changes(nc, deployments: Deployments, topology: bus.Topology, stop: asyncio.Event) -> None:  # noqa: ANN001
    """Reload a model when `model.alias_set` or `model.policy_set` for it appears on the bus."""
    js = nc.jetstream()
    await bus.ensure_stream(js, topology.events_config())
    subscription = await js.subscribe(
        f"{topology.events_prefix}.model.>", stream=topology.events_stream, ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )  # fmt: skip
    try:
        while not stop.is_set():
            try:
                message = await subscription.next_msg(timeout=0.5)
            except TimeoutError:
                continue
            except Exception:  # nats' own timeout type
                continue
            envelope = orjson.loads(message.data)
            if envelope["type"] in ("model.alias_set", "model.policy_set"):
                asyncio.create_task(deployments.reload(envelope["payload"]["model"]))
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


async def serve(settings: Settings, stop: asyncio.Event | None = None, *, micro_batching: bool = True) -> None:
    """Run the ServingService on settings.addr("serving") until `stop` (or SIGINT/SIGTERM).

    `settings.serving_max_in_flight`: rows (Predicts, BatchPredict rows) decided at once; more are
    refused with RESOURCE_EXHAUSTED and RetryInfo."""
    stop = stop or stop_on_signals()
    url = settings.require_database_url()
    await eventlog.migrate(url)
    pool = await eventlog.create_pool(url, max_size=8)
    event_log = EventLog(pool)
    committer = GroupCommitter(event_log)
    registry = RegistryClient(settings.addr("registry"), settings.api_key)
    nc = await bus.connect(settings.require_nats_url(), name="d2d-serving")
    topology = bus.Topology(settings.nats_namespace, settings.nats_replicas)
    features, folding = await _features(settings, event_log, nc, topology, stop)
    deployments = Deployments(registry, event_log, features, micro_batching=micro_batching)
    keys = await auth.KeyRing.open(event_log)
    server, health = grpcserver.new_server([SERVICE_NAME], reflection_enabled=settings.grpc_reflection)
    api = ServingApi(deployments, features, event_log, committer, max_in_flight=settings.serving_max_in_flight)
    grpcserver.add_service(server, serving_pb2.DESCRIPTOR.services_by_name["ServingService"], api, keys)
    addr = settings.addr("serving")
    grpcserver.listen(server, addr, settings.grpc_tls, "serving")
    following = asyncio.create_task(follow_model_changes(nc, deployments, topology, stop))
    await server.start()
    await grpcserver.serve_until(
        server, health, [SERVICE_NAME], stop, f"serving on {addr} ({settings.serving_features} features)"
    )
    with contextlib.suppress(Exception):
        await asyncio.wait_for(following, 5)
    await api.settle()  # late commits and their withdrawals, before the committer closes
    await committer.close()
    features.close()
    if isinstance(features, RemoteFeatures):
        await features.client.channel.close()
    if folding is not None:
        await folding  # takes a last snapshot; a folding failure ends the process (the supervisor restarts it)
    with contextlib.suppress(Exception):  # NATS may be away: the consumer is durable, its acks redone
        await nc.flush(timeout=5)
        await nc.close()
    await registry.channel.close()
    await keys.close()
    await pool.close()


async def _features(
    settings: Settings, event_log: EventLog, nc: NATS, topology: bus.Topology, stop: asyncio.Event
) -> tuple[Features, asyncio.Task[None] | None]:
    """The features in the mode settings name, and the task folding them (in-process mode): it is
    running and caught up with what it restored when this returns. A failing fold stops the service."""
    if settings.serving_features == "remote":
        return RemoteFeatures(FeatureClient(settings.addr("features"), settings.api_key)), None
    if settings.serving_features != "local":
        raise SystemExit(f"D2D_SERVING_FEATURES must be 'local' or 'remote', not {settings.serving_features!r}")
    consumer = f"{settings.serving_consumer}:{topology.events_stream}"
    state = await restore_snapshot_views(event_log, consumer, await registered_views(event_log.pool))
    folder = Folder(
        nc, event_log, state, consumer=consumer, topology=topology,
        snapshot_every_seconds=settings.features_snapshot_seconds,
    )  # fmt: skip
    folding = asyncio.create_task(folder.run(stop), name="fold")
    folding.add_done_callback(lambda task: task.cancelled() or task.exception() is None or stop.set())
    caught_up = asyncio.create_task(folder.caught_up.wait())
    await asyncio.wait([folding, caught_up, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if folding.done():
        folding.result()
    return LocalFeatures(folder), folding
