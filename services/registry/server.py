"""Assembles the registry service."""

from __future__ import annotations

import asyncio
import contextlib
import importlib

from d2d import auth, eventlog, grpcserver
from d2d.config import Settings
from d2d.eventlog import EventLog
from d2d.runtime.process import stop_on_signals
from d2d.v1 import access_pb2, registry_pb2
from services.registry.access import SERVICE_NAME as ACCESS_SERVICE_NAME
from services.registry.access import AccessApi
from services.registry.api import SERVICE_NAME, RegistryApi
from services.registry.loop import DecisionOutcomesJudge, RetrainLoop


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the RegistryService on settings.addr("registry") until `stop` (or SIGINT/SIGTERM), and
    beside it the closed loop that acts on `retrain.requested` (unless settings turn it off)."""
    stop = stop or stop_on_signals()
    url = settings.require_database_url()
    await eventlog.migrate(url)
    pool = await eventlog.create_pool(url, max_size=6)
    event_log = EventLog(pool)
    keys = await auth.KeyRing.open(event_log)
    names = [SERVICE_NAME, ACCESS_SERVICE_NAME]
    server, health = grpcserver.new_server(names, reflection_enabled=settings.grpc_reflection)
    defaults = importlib.import_module(settings.training_defaults_module)
    api = RegistryApi(
        event_log,
        default_policy=getattr(defaults, "default_policy", lambda: None)(),
        default_promotion_policy=getattr(defaults, "default_promotion_policy", lambda: None)(),
    )
    grpcserver.add_service(server, registry_pb2.DESCRIPTOR.services_by_name["RegistryService"], api, keys)
    access = AccessApi(event_log, keys)
    grpcserver.add_service(server, access_pb2.DESCRIPTOR.services_by_name["AccessService"], access, keys)
    addr = settings.addr("registry")
    grpcserver.listen(server, addr, settings.grpc_tls, "registry")
    await server.start()
    loop = None
    if settings.registry_retrain_loop:
        retrain = RetrainLoop(
            api, DecisionOutcomesJudge(pool), check_seconds=settings.registry_canary_check_seconds,
            min_training_labels=settings.registry_retrain_min_labels,
        )  # fmt: skip
        loop = asyncio.create_task(retrain.run(), name="registry-retrain")
    try:
        await grpcserver.serve_until(server, health, names, stop, f"registry serving on {addr}")
    finally:
        if loop is not None:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await keys.close()
        await pool.close()
