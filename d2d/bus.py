"""NATS JetStream: connections and the platform's streams.

- `D2D_EVENTS` (subjects `d2d.events.<type>`): every event of the log, published by the outbox
  relay with `Nats-Msg-Id = event_id`, file storage, a 1-hour duplicate window (far longer than the
  relay's worst replay after a crash: one unacknowledged batch).
- `D2D_INGEST` (subjects `d2d.in.<type>`): events producers publish over NATS; ingest consumes
  them with a durable consumer and acknowledges each only after it is committed to the log or kept
  in dead letters.

Who may do what on them is `permissions`: one NATS user per role, each allowed only the subjects
its work needs (only the relay publishes `d2d.events.>`, producers only `d2d.in.>`). A connection
whose URL names a user takes replies on an inbox of that user's own (`_INBOX.<user>.`), so no
other user can read them.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from d2d.config import Settings
from d2d.limits import check_bus

log = logging.getLogger(__name__)

EVENTS_STREAM = "D2D_EVENTS"
EVENTS_SUBJECT_PREFIX = "d2d.events"
INGEST_STREAM = "D2D_INGEST"
INGEST_SUBJECT_PREFIX = "d2d.in"
DUPLICATE_WINDOW_SECONDS = 3600.0
INGEST_DURABLE = "ingest"  # ingest's durable consumer of D2D_INGEST
INBOX_PREFIX = "_INBOX"


@dataclass(frozen=True)
class Topology:
    """Stream names and subject prefixes. A namespace token (tests, several platforms on one
    NATS server) prefixes all of them: `t1_D2D_EVENTS`, `t1.d2d.events.<type>`."""

    namespace: str = ""
    # Copies JetStream keeps of each stream (D2D_NATS_REPLICAS): 1 on a single server; 3 on a cluster
    # of three keeps every stream through the loss of any one server.
    replicas: int = 1

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

    def events_config(self) -> StreamConfig:
        return events_stream_config(self.events_stream, self.events_prefix, self.replicas)

    def ingest_config(self) -> StreamConfig:
        return ingest_stream_config(self.ingest_stream, self.ingest_prefix, self.replicas)


async def connect(url: str, *, name: str, max_reconnect_attempts: int = -1, tls: ssl.SSLContext | None = None) -> NATS:
    """Connect, reconnecting forever by default (the relay and ingest outlive NATS restarts), with
    the credentials `url` carries (`nats://user:password@host:port`; a cluster's servers as a
    comma-separated list of such URLs, each tried in turn), replies on the user's inbox,
    over TLS as `tls` or else the settings say (`D2D_NATS_CA`, `D2D_NATS_CERT`, `D2D_NATS_KEY`).

    Exits (SystemExit, with what to configure) if the server's `max_payload` could not carry an
    event of the largest size the log accepts: the relay would otherwise stall on it."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    nc = await nats.connect(
        servers(url),
        name=name,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        inbox_prefix=inbox_prefix(url),
        tls=tls or Settings().nats_tls(),
    )
    try:
        check_bus(nc.max_payload)
    except SystemExit:
        await nc.close()
        raise
    return nc


def servers(url: str) -> list[str]:
    """The server URLs of `url`: one, or a cluster's as a comma-separated list."""
    return [server.strip() for server in url.split(",") if server.strip()]


def inbox_prefix(url: str) -> str:
    """Where a connection to `url` takes its replies: `_INBOX.<user>` when the URL names a user
    (whose permissions allow it that inbox only), else the shared `_INBOX`."""
    user = urlsplit(servers(url)[0]).username
    return f"{INBOX_PREFIX}.{user}" if user else INBOX_PREFIX


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it to this configuration if it differs. A reader of a stream
    that exists as configured needs the right to read its info only (`permissions`)."""
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    held = info.config
    if (
        sorted(held.subjects or []) != sorted(config.subjects or [])
        or held.storage != config.storage
        or held.retention != config.retention
        or (config.discard is not None and held.discard != config.discard)
        or held.duplicate_window != config.duplicate_window
        or (held.num_replicas or 1) != (config.num_replicas or 1)
    ):
        await js.update_stream(config)


def events_stream_config(
    name: str = EVENTS_STREAM, prefix: str = EVENTS_SUBJECT_PREFIX, replicas: int = 1
) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[f"{prefix}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        num_replicas=replicas,
    )


def ingest_stream_config(
    name: str = INGEST_STREAM, prefix: str = INGEST_SUBJECT_PREFIX, replicas: int = 1
) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[f"{prefix}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.WORK_QUEUE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        num_replicas=replicas,
    )


def durable_name(consumer: str) -> str:
    """The JetStream name of a consumer called `consumer` (dots and colons are not allowed)."""
    return consumer.replace(".", "_").replace(":", "_")


# The NATS user each of the platform's processes connects as (d2d.runtime.services names them).
SERVICE_USERS = {"ingest": "ingest", "ingest-relay": "relay", "features": "features", "serving": "serving"}
PRODUCER = "producer"  # applications publishing events to `d2d.in.>`


def permissions(
    topology: Topology, *, features_consumer: str = "features", serving_consumer: str = "serving"
) -> dict[str, dict[str, Any]]:
    """Each user's publish and subscribe permissions (nats-server's `authorization` block).

    - relay: publish `d2d.events.>`; owns D2D_EVENTS (create, update, info).
    - ingest: consumes D2D_INGEST through its durable consumer; owns that stream.
    - features, serving: read D2D_EVENTS through their durable consumers (their names follow
      `*_consumer` as the services derive them) and read its info and messages; serving also
      follows model changes through an ephemeral ordered consumer.
    - producer: publish `d2d.in.>`, with replies (JetStream's publish acknowledgements) on the
      shared inbox except the services' private ones.

    Stream creation is allowed to readers too (a reader may start before the stream's owner):
    a stream that exists cannot be changed by them, and its owner puts back its configuration.
    """
    events, ingest = topology.events_stream, topology.ingest_stream
    api = "$JS.API"

    def stream(name: str, *, owner: bool) -> list[str]:
        rights = [f"{api}.STREAM.INFO.{name}", f"{api}.STREAM.CREATE.{name}"]
        return [*rights, f"{api}.STREAM.UPDATE.{name}"] if owner else rights

    def durable(name: str, consumer: str) -> list[str]:
        return [
            f"{api}.CONSUMER.INFO.{name}.{consumer}", f"{api}.CONSUMER.DELETE.{name}.{consumer}",
            f"{api}.CONSUMER.CREATE.{name}.{consumer}", f"{api}.CONSUMER.CREATE.{name}.{consumer}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{name}.{consumer}", f"{api}.CONSUMER.MSG.NEXT.{name}.{consumer}",
            f"$JS.ACK.{name}.{consumer}.>",
        ]  # fmt: skip

    def user(name: str, publish: list[str]) -> dict[str, Any]:
        return {"publish": {"allow": publish}, "subscribe": {"allow": [f"{INBOX_PREFIX}.{name}.>"]}}

    def reader(name: str, consumer: str) -> list[str]:
        return [*stream(events, owner=False), f"{api}.STREAM.MSG.GET.{events}", *durable(events, consumer)]

    services = {
        "relay": user("relay", [f"{topology.events_prefix}.>", *stream(events, owner=True)]),
        "ingest": user("ingest", [*stream(ingest, owner=True), *durable(ingest, INGEST_DURABLE)]),
        "features": user("features", reader("features", durable_name(f"{features_consumer}:{events}"))),
        "serving": user(
            "serving",
            [
                *reader("serving", durable_name(f"{serving_consumer}:{events}")),
                f"{api}.CONSUMER.CREATE.{events}",  # the ordered consumer following model changes
                f"$JS.FC.{events}.>",  # its flow control replies
            ],
        ),
    }
    producer = {
        "publish": {"allow": [f"{topology.ingest_prefix}.>"]},
        "subscribe": {"allow": [f"{INBOX_PREFIX}.>"], "deny": [f"{INBOX_PREFIX}.{name}.>" for name in services]},
    }
    return {**services, PRODUCER: producer}
