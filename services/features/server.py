"""Assembles the features service: registers its views, restores the last snapshot, folds the
stream, and answers FeatureService calls (health turns SERVING once it has caught up)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging

from grpc_health.v1 import health_pb2

from d2d import auth, bus, eventlog, grpcserver
from d2d.config import Settings
from d2d.eventlog import EventLog
from d2d.features.consumer import Folder
from d2d.features.definitions import FeatureView
from d2d.features.online import restore
from d2d.features.store import register_views
from d2d.runtime.process import stop_on_signals
from d2d.v1 import features_pb2
from services.features.api import SERVICE_NAME, FeatureApi

log = logging.getLogger(__name__)


def load_views(module: str) -> tuple[FeatureView, ...]:
    views = tuple(importlib.import_module(module).VIEWS)
    if not views:
        raise SystemExit(f"features: {module}.VIEWS is empty")
    return views


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the FeatureService on settings.addr("features") until `stop` (or SIGINT/SIGTERM)."""
    stop = stop or stop_on_signals()
    views = load_views(settings.feature_views_module)
    url = settings.require_database_url()
    await eventlog.migrate(url)
    pool = await eventlog.create_pool(url, max_size=4)
    event_log = EventLog(pool)
    await register_views(event_log, views)
    topology = bus.Topology(settings.nats_namespace, settings.nats_replicas)
    consumer = f"{settings.features_consumer}:{topology.events_stream}"
    state = await restore(event_log, views, consumer)

    keys = await auth.KeyRing.open(event_log)
    server, health = grpcserver.new_server([SERVICE_NAME], reflection_enabled=settings.grpc_reflection)
    api = FeatureApi(state, event_log)
    grpcserver.add_service(server, features_pb2.DESCRIPTOR.services_by_name["FeatureService"], api, keys)
    addr = settings.addr("features")
    grpcserver.listen(server, addr, settings.grpc_tls, "features")
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    nc = await bus.connect(settings.require_nats_url(), name="d2d-features")
    folder = Folder(
        nc, event_log, state, consumer=consumer, topology=topology,
        snapshot_every_seconds=settings.features_snapshot_seconds,
    )  # fmt: skip
    folding = asyncio.create_task(folder.run(stop), name="fold")
    caught_up = asyncio.create_task(folder.caught_up.wait())
    await asyncio.wait([folding, caught_up, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if folding.done():
        folding.result()  # a folding failure ends the process (the supervisor restarts it)
    if not stop.is_set():
        await grpcserver.set_serving(health, [SERVICE_NAME])
        log.info("features serving on %s at seq %d", addr, state.watermark)
        await asyncio.wait([folding, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await health.enter_graceful_shutdown()
    await server.stop(grace=5)
    with contextlib.suppress(asyncio.CancelledError):
        await folding  # takes a last snapshot
    with contextlib.suppress(Exception):  # NATS may be away: the consumer is durable
        await nc.flush(timeout=5)  # the last acknowledgement
        await nc.close()
    await keys.close()
    await pool.close()
