"""Shared fixtures: a real Postgres and a real NATS JetStream server for the whole session, started
from their wheels in a temp dir on free ports; a fresh database and NATS namespace per test."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from d2d import auth, dbroles, eventlog, telemetry
from d2d.client import AuditClient, FeatureClient, IngestClient, RegistryClient, ServingClient
from d2d.config import Settings
from d2d.eventlog import NewEvent
from d2d.outcomes import outcome_event_id
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.runtime.services import SERVICES, service
from d2d.runtime.supervisor import Child, Supervisor
from d2d.sim import PaymentsSimulator, SimConfig, load_contracts
from d2d.sim.loop import payment_entities as entities_of
from d2d.sim.loop import wait_folded
from d2d.sim.training import default_spec
from services.ingest.server import serve

ROOT = Path(__file__).resolve().parent.parent

# Auth is on in every test: every database a test serves gRPC on holds this admin key (`seed_test_key`,
# run by the fixtures that start services: the log of `database_url` itself starts empty), and every
# client, in this process or in a service process it starts, sends it (D2D_API_KEY).
TEST_API_KEY, TEST_KEY_CREATED = auth.new_key("admin", "tests")
os.environ["D2D_API_KEY"] = TEST_API_KEY


async def seed_test_key(url: str) -> None:
    """Put the tests' admin key in the (migrated) database at `url`; seeding twice stores it once."""
    await auth.add_key(url, TEST_KEY_CREATED)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    # fsync off: tests kill processes, not machines; committed data survives a process kill.
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), port=free_port(), fsync=False)
    server.start()
    _make_service_logins(server)
    yield server
    server.stop()


_LOGIN_PASSWORDS: dict[str, str] = {}  # the session server's service logins (d2d.dbroles)


def _make_service_logins(server: EmbeddedPostgres) -> None:
    """Every service's login role on the session server, once (roles are cluster-wide; the grants
    they inherit come with each test database's migration)."""

    async def make() -> None:
        await eventlog.migrate(server.url)  # the group roles the logins join
        await dbroles.ensure_logins(server.url, passwords)

    passwords = dbroles.load_passwords(server.data_dir / dbroles.LOGINS_FILE)
    asyncio.run(make())
    _LOGIN_PASSWORDS.update(passwords)


def service_url(database_url: str, name: str) -> str:
    """The (migrated) database at `database_url` as the service `name` logs in to it: its own role."""
    return dbroles.login_url(database_url, name, _LOGIN_PASSWORDS[name])


def as_service(args: Sequence[str], env: dict[str, str]) -> dict[str, str]:
    """`env` for the process `python ARGS`: a registered service gets its own login in place of the
    owner's D2D_DATABASE_URL, as `d2d up` gives it."""
    spec = next((spec for spec in SERVICES if tuple(args) == spec.args), None)
    if spec is None or "D2D_DATABASE_URL" not in env:
        return env
    return {**env, "D2D_DATABASE_URL": service_url(env["D2D_DATABASE_URL"], spec.name)}


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The spans this process finishes from now on (the module's tests share it)."""
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("tests").add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def database_url(postgres: EmbeddedPostgres) -> str:
    """A new, migrated database for this test (owner connection)."""
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    asyncio.run(eventlog.migrate(url))
    return url


@pytest.fixture
def namespace() -> str:
    """A NATS namespace of this test's own, so streams and durable consumers don't collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def event_log(database_url: str) -> AsyncIterator[eventlog.EventLog]:
    pool = await eventlog.create_pool(database_url, max_size=20)
    yield eventlog.EventLog(pool)
    await pool.close()


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """start_service(args, env, name) -> the started Child, as `d2d up` starts it (a service with its
    own database login, `as_service`); never restarted (a test that kills one sees it stay dead);
    every process is stopped after the test."""
    supervisor = Supervisor(tmp_path, cwd=ROOT, base_env={"D2D_DATA_DIR": str(tmp_path / "data")})

    def start(args: list[str], settings_env: dict[str, str], name: str = "svc") -> Child:
        if "D2D_DATABASE_URL" in settings_env and "relay" not in args:  # a gRPC service: callers need the key
            with concurrent.futures.ThreadPoolExecutor(1) as seeding:  # the caller may be in a running loop
                seeding.submit(asyncio.run, seed_test_key(settings_env["D2D_DATABASE_URL"])).result()
        return supervisor.spawn(f"{name}-{len(supervisor.children)}", args, as_service(args, settings_env))

    with supervisor:
        yield start


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run `d2d ARGS` as a user would, with `env` over this process's environment: (exit code, output).

    Asynchronous, so services running in this test's event loop keep answering meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "d2d.cli", *args, env={**os.environ, "COLUMNS": "250", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


def rule_outcome(decision_id: str, label: int, at: datetime, outcome_id: str | None = None) -> NewEvent:
    """An `outcome.recorded` event as the chargeback rule's drafts become (the feedback consumer's)."""
    outcome_id = outcome_id or f"rule:chargeback:{decision_id}"
    payload = {
        "outcome_id": outcome_id, "decision_id": decision_id, "label": label, "occurred_at": at.isoformat(),
        "source": "rule", "rule": "chargeback",
    }  # fmt: skip
    return NewEvent(
        outcome_event_id(outcome_id), "outcome.recorded", 1, "decision", decision_id, at, orjson.dumps(payload).decode()
    )


@contextlib.asynccontextmanager
async def audit_service(database_url: str) -> AsyncIterator[str]:
    """The AuditService in this test's event loop on `database_url` (so CLI calls and the test's own
    calls reach it while the test awaits them); its address."""
    from services.audit.server import serve as serve_audit

    addr = f"127.0.0.1:{free_port()}"
    await seed_test_key(database_url)
    stop = asyncio.Event()
    own_login = service_url(database_url, "audit")
    task = asyncio.create_task(serve_audit(Settings(database_url=own_login, addrs={"audit": addr}), stop))
    try:
        async with AuditClient(addr) as client:
            await client.wait_ready()
        yield addr
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# ---------------------------------------------------------------------------------------------
# A platform serving a trained model (tests/test_serving*.py)

SIM = SimConfig(seed=4, days=35, payments_per_day=1200, customers=800, merchants=80)
MODEL = "fraud"
NOW = (SIM.start + timedelta(days=SIM.days)).isoformat()


@dataclass
class Platform:
    database_url: str
    database: str
    serving: str
    features: str
    registry: str
    payments: list
    processes: list[subprocess.Popen[bytes]]
    logs: Path
    namespace: str
    nats_url: str


def serving_platform(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory,
    *, serving_process: bool = True, prepare: Callable[[str], Awaitable[None]] | None = None,
) -> Iterator[Platform]:  # fmt: skip
    """A log of simulated payments, the relay, features and registry (and serving, unless
    `serving_process` is False: then the caller serves on `Platform.serving`) as their own
    processes, with model versions 1 and 2 trained and version 1 in production. `prepare(url)`
    runs on the database once the log is loaded, before any service starts."""
    database = f"srv_{uuid.uuid4().hex[:10]}"
    url = postgres.create_database(database)
    logs = tmp_path_factory.mktemp("serving-logs")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    ports = {name: free_port() for name in ("features", "registry", "serving")}
    env = {
        "D2D_DATABASE_URL": url, "D2D_NATS_URL": nats_server.url, "D2D_NATS_NAMESPACE": namespace,
        "D2D_DATA_DIR": str(logs),
        **{service(name).addr_env: f"127.0.0.1:{port}" for name, port in ports.items()},
    }  # fmt: skip
    simulated = PaymentsSimulator(SIM)
    events = list(simulated.events())

    async def load() -> None:
        await eventlog.migrate(url)
        pool = await eventlog.create_pool(url, max_size=2)
        log = eventlog.EventLog(pool)
        for i in range(0, len(events), 5000):
            await log.append([e.as_new_event() for e in events[i : i + 5000]])
        await pool.close()
        await seed_test_key(url)

    asyncio.run(load())
    if prepare is not None:
        asyncio.run(prepare(url))
    supervisor = Supervisor(logs, cwd=ROOT, base_env=env)
    for name in ("ingest-relay", "features", "registry", *(["serving"] if serving_process else [])):
        supervisor.spawn(name, service(name).args, {"D2D_DATABASE_URL": service_url(url, name)})
    processes = [child.process for child in supervisor.children if child.process is not None]

    async def train_and_deploy() -> None:
        async with RegistryClient(env["D2D_REGISTRY_ADDR"]) as registry, FeatureClient(env["D2D_FEATURES_ADDR"]) as f:
            await registry.wait_ready()
            await f.wait_ready()  # the features service registers its views on start
            await wait_folded(f, len(events))
            spec = default_spec()
            await registry.create_model(MODEL)
            await registry.train(MODEL, json.dumps({**spec.to_dict(), "num_boost_round": 60}))
            await registry.train(MODEL, json.dumps({**spec.to_dict(), "num_boost_round": 30, "seed": 8}))
            await registry.set_alias(MODEL, "production", 1)

    try:
        asyncio.run(train_and_deploy())
        payments = [e for e in events if e.type == "payment.authorized"]
        yield Platform(url, database, env["D2D_SERVING_ADDR"], env["D2D_FEATURES_ADDR"], env["D2D_REGISTRY_ADDR"],
                       payments, processes, logs, namespace, nats_server.url)  # fmt: skip
    finally:
        supervisor.stop_all()


def context_of(payment) -> dict:  # noqa: ANN001
    """The payment's fields, as a new payment arriving now (the end of the simulated period)."""
    return {**payment.payload, "occurred_at": NOW}


def requests_for(platform: Platform, n: int, *, offset: int = 0) -> list:
    chosen = platform.payments[-n - offset : len(platform.payments) - offset]
    return [
        ServingClient.request(MODEL, entities_of(p), context_of(p), unit_id=p.payload["customer_id"]) for p in chosen
    ]


def settings_env(database_url: str, nats_url: str, namespace: str, ingest_port: int | None = None) -> dict[str, str]:
    env = {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": nats_url, "D2D_NATS_NAMESPACE": namespace}
    if ingest_port:
        env["D2D_INGEST_ADDR"] = f"127.0.0.1:{ingest_port}"
    return env


def settings_for(database_url: str, nats_url: str, namespace: str, ingest_port: int) -> Settings:
    return Settings(
        database_url=database_url,
        nats_url=nats_url,
        nats_namespace=namespace,
        addrs={"ingest": f"127.0.0.1:{ingest_port}"},
    )


async def register_sim_contracts(ingest: IngestClient) -> None:
    """The simulator's contracts, registered through ingest."""
    for spec in load_contracts():
        await ingest.create_contract_version(
            spec.event_type, owner=spec.owner, json_schema=spec.schema, pii_fields=spec.pii_fields,
            compatibility=spec.compatibility,
        )  # fmt: skip


@pytest.fixture
async def ingest(database_url: str, nats_server: NatsServer, namespace: str) -> AsyncIterator[IngestClient]:
    """The ingest service in this process, with the simulator's contracts registered."""
    port = free_port()
    await seed_test_key(database_url)
    stop = asyncio.Event()
    own_login = service_url(database_url, "ingest")
    task = asyncio.create_task(serve(settings_for(own_login, nats_server.url, namespace, port), stop))
    client = IngestClient(f"127.0.0.1:{port}")
    await client.wait_ready()
    await register_sim_contracts(client)
    yield client
    stop.set()
    await asyncio.wait_for(task, 30)
    await client.close()


async def wait_healthy(addr: str, tasks: Sequence[asyncio.Task[None]]) -> None:
    """Until the service at `addr` (one of `tasks`, run in this process) answers its health check as
    serving; a task that ended first fails the test with its exception."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from d2d import grpcserver

    async with grpcserver.channel(addr, api_key="") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            failed = [t for t in tasks if t.done()]
            assert not failed, failed[0].exception()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{addr} did not become healthy")
