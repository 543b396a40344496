"""Assembles the audit service: a read-only AuditService over the log (see d2d.replay)."""

from __future__ import annotations

import asyncio

from d2d import auth, eventlog, grpcserver
from d2d.config import Settings
from d2d.eventlog import EventLog
from d2d.runtime.process import stop_on_signals
from d2d.v1 import audit_pb2
from services.audit.api import SERVICE_NAME, AuditApi


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the AuditService on settings.addr("audit") until `stop` (or SIGINT/SIGTERM)."""
    stop = stop or stop_on_signals()
    url = settings.require_database_url()
    await eventlog.migrate(url)
    pool = await eventlog.create_pool(url, max_size=6)
    event_log = EventLog(pool)
    api = AuditApi(event_log, url)
    keys = await auth.KeyRing.open(event_log)
    server, health = grpcserver.new_server([SERVICE_NAME], reflection_enabled=settings.grpc_reflection)
    grpcserver.add_service(server, audit_pb2.DESCRIPTOR.services_by_name["AuditService"], api, keys)
    addr = settings.addr("audit")
    grpcserver.listen(server, addr, settings.grpc_tls, "audit")
    await server.start()
    try:
        await grpcserver.serve_until(server, health, [SERVICE_NAME], stop, f"audit serving on {addr}")
    finally:
        await keys.close()
        await pool.close()
