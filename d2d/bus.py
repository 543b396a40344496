"""NATS JetStream: connections and the platform's streams.

- `D2D_EVENTS` (subjects `d2d.events.<type>`): every event of the log, published by the outbox
  relay with `Nats-Msg-Id = event_id`, file storage, a 1-hour duplicate window (far longer than the
  relay's worst replay after a crash: one unacknowledged batch).
- `D2D_INGEST` (subjects `d2d.in.<type>`): events producers publish over NATS; ingest consumes
  them with a durable consumer and acknowledges each only after it is committed to the log or kept
  in dead letters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from d2d.limits import check_bus

log = logging.getLogger(__name__)

EVENTS_STREAM = "D2D_EVENTS"
EVENTS_SUBJECT_PREFIX = "d2d.events"
INGEST_STREAM = "D2D_INGEST"
INGEST_SUBJECT_PREFIX = "d2d.in"
DUPLICATE_WINDOW_SECONDS = 3600.0


@dataclass(frozen=True)
class Topology:
    """Stream names and subject prefixes. A namespace token (tests, several platforms on one
    NATS server) prefixes all of them: `t1_D2D_EVENTS`, `t1.d2d.events.<type>`."""

    namespace: str = ""

    @property
    def events_stream(self) -> str:
        return f"{self.namespace.upper()}_{EVENTS_STREAM}" if self.namespace else EVENTS_STREAM

    @property
    def events_prefix(self) -> str:
        return f"{self.namespace}.{EVENTS_SUBJECT_PREFIX}" if self.namespace else EVENTS_SUBJECT_PREFIX

    @property
    def ingest_stream(self) -> str:
        return f"{self.namespace.upper()}_{INGEST_STREAM}" if self.namespace else INGEST_STREAM

    @property
    def ingest_prefix(self) -> str:
        return f"{self.namespace}.{INGEST_SUBJECT_PREFIX}" if self.namespace else INGEST_SUBJECT_PREFIX


async def connect(url: str, *, name: str, max_reconnect_attempts: int = -1) -> NATS:
    """Connect, reconnecting forever by default (the relay and ingest outlive NATS restarts).

    Exits (SystemExit, with what to configure) if the server's `max_payload` could not carry an
    event of the largest size the log accepts: the relay would otherwise stall on it."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    nc = await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
    )
    try:
        check_bus(nc.max_payload)
    except SystemExit:
        await nc.close()
        raise
    return nc


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it to this configuration."""
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)


def events_stream_config(name: str = EVENTS_STREAM, prefix: str = EVENTS_SUBJECT_PREFIX) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[f"{prefix}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


def ingest_stream_config(name: str = INGEST_STREAM, prefix: str = INGEST_SUBJECT_PREFIX) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[f"{prefix}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.WORK_QUEUE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )
