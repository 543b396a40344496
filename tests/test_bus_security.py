"""The bus admits only the platform's users, each allowed what its role needs (only the relay
publishes `d2d.events.>`, producers only `d2d.in.>`), and a consumer never takes a message's word
for its position: one claiming a seq past the log's head is refused, alerted, and the fold goes on.

TLS: a client trusts NATS and Postgres as the settings say (CA, client certificate, sslmode).

The session's NATS server is open (every other test connects to it without credentials); these
tests start a server of their own with the permissions `d2d up` gives its embedded one.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import orjson
import pytest
from nats.errors import Error as NatsError
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from d2d import bus, eventlog
from d2d.config import Settings
from d2d.eventlog import EventLog, NewEvent
from d2d.features.consumer import Folder
from d2d.features.online import OnlineState
from d2d.outbox import run_relay
from d2d.runtime.servers import NatsServer, NatsTls, free_port
from d2d.sim.views import VIEWS
from tests.conftest import service_url

SOURCE = "payment.authorized"
NAMESPACE = f"t{uuid.uuid4().hex[:10]}"  # the permissions hold under a namespace, as tests use them
TOPOLOGY = bus.Topology(NAMESPACE)


@pytest.fixture(scope="module")
def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A NATS server with the users and permissions `d2d up` configures (d2d.runtime.stack)."""
    server = NatsServer(tmp_path_factory.mktemp("nats-secured"), port=free_port(), users=bus.permissions(TOPOLOGY))
    server.start()
    yield server
    server.stop()


async def connect_as(server: NatsServer, user: str) -> tuple[nats.NATS, list[Exception]]:
    """A connection as `user` and the asynchronous errors the server sends it (permission violations)."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        server.url_for(user), error_cb=on_error, inbox_prefix=bus.inbox_prefix(server.url_for(user)),
        max_reconnect_attempts=0,
    )  # fmt: skip
    return nc, errors


def payment(customer: str, at: datetime) -> NewEvent:
    payload = {"customer_id": customer, "merchant_id": "m1", "card_id": "k1", "amount": 10.0, "channel": "ecom",
               "ip_country": "DE", "device_id": "d1"}  # fmt: skip
    return NewEvent(uuid.uuid4(), SOURCE, 1, "payment", uuid.uuid4().hex, at, orjson.dumps(payload).decode())


async def test_a_producer_cannot_publish_events_but_the_relay_can(secured_nats: NatsServer) -> None:
    relay, relay_errors = await connect_as(secured_nats, "relay")
    producer, producer_errors = await connect_as(secured_nats, bus.PRODUCER)
    try:
        js = relay.jetstream()
        await bus.ensure_stream(js, bus.events_stream_config(TOPOLOGY.events_stream, TOPOLOGY.events_prefix))
        before = (await js.stream_info(TOPOLOGY.events_stream)).state.messages

        await producer.publish(f"{TOPOLOGY.events_prefix}.{SOURCE}", b"{}", headers={"D2D-Seq": "999999"})
        await producer.publish(f"{TOPOLOGY.ingest_prefix}.{SOURCE}", b"{}")  # its own subjects
        await producer.flush(timeout=5)
        for _ in range(100):
            if producer_errors:
                break
            await asyncio.sleep(0.05)
        assert [str(e) for e in producer_errors] == [
            f'nats: permissions violation for publish to "{TOPOLOGY.events_prefix}.{SOURCE}"'
        ]
        assert (await js.stream_info(TOPOLOGY.events_stream)).state.messages == before

        ack = await js.publish(f"{TOPOLOGY.events_prefix}.test.ping", b"{}", headers={"Nats-Msg-Id": uuid.uuid4().hex})
        assert ack.stream == TOPOLOGY.events_stream and not relay_errors
        assert (await js.stream_info(TOPOLOGY.events_stream)).state.messages == before + 1
    finally:
        await producer.close()
        await relay.close()


async def test_a_producer_cannot_read_the_services_replies(secured_nats: NatsServer) -> None:
    """Replies (JetStream's answers, fetched messages) go to each service's own inbox; a producer
    may not listen there, or it would read every event the features service fetches."""
    producer, errors = await connect_as(secured_nats, bus.PRODUCER)
    try:
        await producer.subscribe("_INBOX.features.>")
        await producer.flush(timeout=5)
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.05)
        assert [str(e) for e in errors] == ['nats: permissions violation for subscription to "_inbox.features.>"']
    finally:
        await producer.close()


@pytest.mark.parametrize("credentials", ["", "producer:wrong@"], ids=["none", "a wrong password"])
async def test_a_client_without_credentials_cannot_connect(secured_nats: NatsServer, credentials: str) -> None:
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(
            f"nats://{credentials}127.0.0.1:{secured_nats.port}", max_reconnect_attempts=0, allow_reconnect=False,
            connect_timeout=5,
        )  # fmt: skip


async def test_a_forged_message_past_the_head_is_refused_alerted_and_the_fold_goes_on(
    secured_nats: NatsServer, database_url: str, event_log: EventLog, spans: InMemorySpanExporter
) -> None:
    """Worst case: published with the relay's own rights. The relay and the fold run as `d2d up`
    runs them, each as its own user."""
    now = datetime.now(UTC)
    await event_log.append([payment("c-before", now) for _ in range(3)])
    stop = asyncio.Event()
    relay = asyncio.create_task(
        run_relay(
            service_url(database_url, "ingest-relay"), secured_nats.url_for("relay"), stop=stop, topology=TOPOLOGY
        )
    )
    features = await bus.connect(secured_nats.url_for("features"), name="test-features")
    forger, _ = await connect_as(secured_nats, "relay")
    consumer = f"features:{TOPOLOGY.events_stream}"  # the durable the features user may read through
    folder = Folder(features, event_log, OnlineState(VIEWS), consumer=consumer, topology=TOPOLOGY, batch=10)
    folding = asyncio.create_task(folder.run(stop))
    try:
        assert await folder.folded_to(await event_log.head(), 30)
        head = await event_log.head()

        forged = {"seq": 10**9, "type": SOURCE, "schema_version": 1, "occurred_at": now.isoformat(),
                  "payload": orjson.loads(payment("c-forged", now).payload)}  # fmt: skip
        await forger.jetstream().publish(
            f"{TOPOLOGY.events_prefix}.{SOURCE}", orjson.dumps(forged),
            headers={"D2D-Seq": str(10**9), "D2D-Prev-Of-Type": str(head), "Nats-Msg-Id": "forged-1"},
        )  # fmt: skip
        for _ in range(300):
            if folder.refused:
                break
            await asyncio.sleep(0.05)
        assert folder.refused == 1
        await folder._advance_when_idle(features.jetstream(), TOPOLOGY.events_stream)  # the forgery is the last
        assert folder.state.watermark <= await event_log.head(), "a message's word moved the watermark past the head"
        customers = folder.state.states["customer_payments"]
        assert customers.values("c-forged", now.timestamp() + 1) is None, "the forged payload was folded"

        alerts = [e for e in await event_log.read(0, 100) if e.type == "quality.alert"]
        assert [a.payload["kind"] for a in alerts] == ["forged_message"]
        found = alerts[0].payload
        assert (found["claimed_seq"], found["subject"], found["head"], found["msg_id"], found["source"]) == (
            str(10**9),
            f"{TOPOLOGY.events_prefix}.{SOURCE}",
            head,
            "forged-1",
            consumer,
        )
        assert "c-forged" not in orjson.dumps(found).decode()
        fold_events = [e for s in spans.get_finished_spans() if s.name == "features.fold" for e in s.events]
        assert [e.attributes["d2d.claimed_seq"] for e in fold_events if e.name == "forged_message"] == [str(10**9)]

        await event_log.append([payment("c-after", now) for _ in range(2)])
        assert await folder.folded_to(await event_log.head(), 30), "the fold stopped after the forgery"
        assert folder.state.watermark == await event_log.head()
        assert customers.values("c-after", now.timestamp() + 1)["count_lifetime"] == 2
        assert customers.values("c-before", now.timestamp() + 1)["count_lifetime"] == 3
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(folding, relay), 30)
        await forger.close()
        await features.close()


# ---------------------------------------------------------------------------------------------
# TLS to NATS and to Postgres, as the settings name it


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, and a server (127.0.0.1) and a client certificate it signed, in one directory."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    where = tmp_path_factory.mktemp("certificates")
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=d2d test CA",
             cwd=where)  # fmt: skip
    (where / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (where / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=d2d {name}", cwd=where)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=where)  # fmt: skip
    return where


async def test_nats_over_tls_takes_the_ca_and_client_certificate_from_the_settings(
    certificates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = NatsTls(certificates / "server.pem", certificates / "server.key", client_ca=certificates / "ca.pem")
    server = NatsServer(tmp_path / "nats", port=free_port(), tls=tls)
    server.start()
    try:
        with pytest.raises(ssl.SSLCertVerificationError):  # no CA: the server's certificate is not trusted
            await nats.connect(server.url, allow_reconnect=False, connect_timeout=5)
        monkeypatch.setenv("D2D_NATS_CA", str(certificates / "ca.pem"))
        # Trusted, but the server refuses a client without a certificate (a TLS alert, or a reset if it comes first).
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await nats.connect(server.url, tls=Settings().nats_tls(), allow_reconnect=False, connect_timeout=5)
        monkeypatch.setenv("D2D_NATS_CERT", str(certificates / "client.pem"))
        monkeypatch.setenv("D2D_NATS_KEY", str(certificates / "client.key"))
        nc = await bus.connect(server.url, name="test-mutual-tls", max_reconnect_attempts=0)
        try:
            reply = await nc.request("$JS.API.INFO", b"", timeout=5)
            assert b"io.nats.jetstream.api.v1.account_info_response" in reply.data
        finally:
            await nc.close()
    finally:
        server.stop()


async def test_the_database_tls_settings_reach_every_connection(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's Postgres speaks no TLS: asking for it must fail the connection, not be ignored."""
    monkeypatch.setenv("D2D_DATABASE_URL", database_url)
    monkeypatch.setenv("D2D_DATABASE_SSLMODE", "require")
    with pytest.raises(ConnectionError, match="SSL"):
        await eventlog.migrate(Settings().require_database_url())
    monkeypatch.setenv("D2D_DATABASE_SSLMODE", "disable")
    await eventlog.migrate(Settings().require_database_url())
