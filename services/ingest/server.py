"""Assembles the ingest service: gRPC API, NATS intake, and (as a separate process) the relay."""

from __future__ import annotations

import asyncio
import contextlib

from d2d import auth, bus, eventlog, grpcserver, outbox
from d2d.config import Settings
from d2d.contracts.platform import register_platform_contracts
from d2d.contracts.registry import ContractRegistry
from d2d.deadletters import DeadLetters
from d2d.eventlog import EventLog, GroupCommitter
from d2d.runtime.process import stop_on_signals
from services.ingest import api, nats_in
from services.ingest.pipeline import Ingestor


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the IngestService on settings.addr("ingest") until `stop` (or SIGINT/SIGTERM)."""
    stop = stop or stop_on_signals()
    url = settings.require_database_url()
    await eventlog.migrate(url)
    pool = await eventlog.create_pool(url, max_size=10)
    log_ = EventLog(pool)
    registry = ContractRegistry(log_)
    await register_platform_contracts(registry)  # `d2d contracts list` shows them beside producers' own
    dead_letters = DeadLetters(pool)
    committer = GroupCommitter(log_)
    ingestor = Ingestor(registry, committer, dead_letters)

    topology = bus.Topology(settings.nats_namespace, settings.nats_replicas)
    keys = await auth.KeyRing.open(log_)
    server, health = grpcserver.new_server(
        [api.SERVICE_NAME], max_concurrent_rpcs=api.MAX_CONCURRENT_CALLS, reflection_enabled=settings.grpc_reflection
    )
    ingest_api = api.IngestApi(
        ingestor, registry, dead_letters, log_, relay_name=outbox.relay_name(topology.events_stream)
    )
    api.add_to_server(ingest_api, server, keys)
    addr = settings.addr("ingest")
    grpcserver.listen(server, addr, settings.grpc_tls, "ingest")
    nc = await bus.connect(settings.require_nats_url(), name="d2d-ingest")
    await server.start()
    consumer = asyncio.create_task(
        nats_in.consume(nc, ingestor, stop, topology=topology),
        name="nats-intake",
    )
    await grpcserver.serve_until(server, health, [api.SERVICE_NAME], stop, f"ingest serving on {addr}")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(consumer, 5)
    await committer.close()
    with contextlib.suppress(Exception):  # NATS may be away (reconnecting): nothing of ours is in flight
        await nc.drain()
    await keys.close()
    await pool.close()


async def relay(settings: Settings, stop: asyncio.Event | None = None) -> None:
    from d2d.outbox import DEFAULT_LINGER, run_relay

    stop = stop or stop_on_signals()
    url = settings.require_database_url()
    await eventlog.migrate(url)
    linger = DEFAULT_LINGER if settings.relay_linger_ms is None else settings.relay_linger_ms / 1000
    await run_relay(
        url, settings.require_nats_url(), stop=stop,
        topology=bus.Topology(settings.nats_namespace, settings.nats_replicas), linger=linger,
    )  # fmt: skip
