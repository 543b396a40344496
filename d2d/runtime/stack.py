"""The whole platform on one machine: embedded Postgres and NATS (unless `D2D_DATABASE_URL` /
`D2D_NATS_URL` name existing ones), then each service as its own process.

`d2d up` runs a Stack in the foreground and supervises it (`watch_once`): any child that dies,
server or service, is reaped and restarted in place (same port, same data) after a delay that
grows while it keeps dying (`Backoff`). `d2d demo` starts a Stack when none is running.
The data directory is private (`d2d.private`; see `EmbeddedPostgres._prepare_user` as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from d2d import eventlog
from d2d.config import (
    DEFAULT_FEATURES_PORT,
    DEFAULT_INGEST_PORT,
    DEFAULT_REGISTRY_PORT,
    DEFAULT_SERVING_PORT,
    Settings,
)
from d2d.private import PRIVATE_UMASK, open_private, private_dir, write_private_text
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, _remembered_port, port_is_free

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "endpoints.json"


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    args: tuple[str, ...]
    grpc_service: str | None = None  # health-checked name, for services with a gRPC server
    endpoint: str | None = None  # the Endpoints field holding its address


SERVICES = (
    ServiceSpec("ingest", ("-m", "services.ingest", "serve"), "d2d.v1.IngestService", "ingest"),
    ServiceSpec("ingest-relay", ("-m", "services.ingest", "relay")),
    ServiceSpec("features", ("-m", "services.features"), "d2d.v1.FeatureService", "features"),
    ServiceSpec("registry", ("-m", "services.registry"), "d2d.v1.RegistryService", "registry"),
    ServiceSpec("serving", ("-m", "services.serving"), "d2d.v1.ServingService", "serving"),
)


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    nats_url: str
    ingest: str
    features: str
    registry: str
    serving: str
    data_dir: str
    pid: int

    def env(self) -> dict[str, str]:
        return {
            "D2D_DATABASE_URL": self.database_url,
            "D2D_NATS_URL": self.nats_url,
            "D2D_INGEST_ADDR": self.ingest,
            "D2D_FEATURES_ADDR": self.features,
            "D2D_REGISTRY_ADDR": self.registry,
            "D2D_SERVING_ADDR": self.serving,
            "D2D_DATA_DIR": self.data_dir,
        }


def running_endpoints(data_dir: Path) -> Endpoints | None:
    """The endpoints of a stack `d2d up` is running on this data dir, if its process is alive."""
    path = Path(data_dir) / ENDPOINTS_FILE
    if not path.exists():
        return None
    endpoints = Endpoints(**json.loads(path.read_text()))
    try:
        os.kill(endpoints.pid, 0)
    except OSError:
        return None
    return endpoints


@dataclass
class Backoff:
    """How long to wait before restarting a child that died: `first`, doubling on each death up to
    `cap`; back to `first` when the child had stayed up `stable_after` seconds. A crash loop slows
    to one attempt per `cap` instead of spinning; a rare crash is restarted at once.

    Pure (the caller supplies the uptime), so the schedule can be pinned without a clock.
    """

    first: float = 0.5
    cap: float = 30.0
    stable_after: float = 60.0
    _next: float = field(init=False)

    def __post_init__(self) -> None:
        self._next = self.first

    def delay_after(self, uptime: float) -> float:
        """The delay before the next start of a child that ran `uptime` seconds and died."""
        if uptime >= self.stable_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay


@dataclass
class Child:
    """One supervised process: how to start it, the running process, and its restart schedule."""

    name: str
    launch: Callable[[], subprocess.Popen[bytes]]  # starts it (servers: until ready) and returns it
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while it is dead and waiting out its backoff
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)

    def start(self) -> None:
        self.process = self.launch()
        self.started_at = time.monotonic()
        self.restart_at = None


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with {returncode}"


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir).resolve()
        self.postgres: EmbeddedPostgres | None = None
        self.nats: NatsServer | None = None
        self.children: dict[str, Child] = {}  # servers first, then SERVICES, in start order
        self.endpoints: Endpoints | None = None

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        return {name: child.process for name, child in self.children.items() if child.process is not None}

    def start(self, timeout: float = 60) -> Endpoints:
        private_dir(self.data_dir)
        database_url = self.settings.database_url
        if not database_url:
            postgres = self.postgres = EmbeddedPostgres(self.data_dir)
            self._start_child("postgres", lambda: _started(postgres))
            database_url = postgres.url
        nats_url = self.settings.nats_url
        if not nats_url:
            nats = self.nats = NatsServer(self.data_dir)
            self._start_child("nats", lambda: _started(nats))
            nats_url = nats.url
        asyncio.run(eventlog.migrate(database_url))
        ingest = os.environ.get("D2D_INGEST_ADDR") or self._default_addr("ingest", DEFAULT_INGEST_PORT)
        features = os.environ.get("D2D_FEATURES_ADDR") or self._default_addr("features", DEFAULT_FEATURES_PORT)
        registry = os.environ.get("D2D_REGISTRY_ADDR") or self._default_addr("registry", DEFAULT_REGISTRY_PORT)
        serving = os.environ.get("D2D_SERVING_ADDR") or self._default_addr("serving", DEFAULT_SERVING_PORT)
        self.endpoints = Endpoints(
            database_url, nats_url, ingest, features, registry, serving, str(self.data_dir), os.getpid()
        )
        for spec in SERVICES:
            self._start_child(spec.name, lambda spec=spec: self._spawn(spec))
        deadline = time.monotonic() + timeout
        for spec in SERVICES:
            if spec.grpc_service:
                self._wait_healthy(spec, deadline)
        write_private_text(self.data_dir / ENDPOINTS_FILE, json.dumps(asdict(self.endpoints), indent=2))
        return self.endpoints

    def _start_child(self, name: str, launch: Callable[[], subprocess.Popen[bytes]]) -> None:
        child = self.children[name] = Child(name, launch)
        child.start()

    def _default_addr(self, name: str, port: int) -> str:
        if port_is_free(port):
            return f"127.0.0.1:{port}"
        return f"127.0.0.1:{_remembered_port(self.data_dir / 'ports.json', name)}"

    def _spawn(self, spec: ServiceSpec) -> subprocess.Popen[bytes]:
        assert self.endpoints is not None
        logs = private_dir(self.data_dir / "logs")
        # One OpenMP thread per service: XGBoost's default pool spins on the few cores the services share.
        env = {"OMP_NUM_THREADS": "1", **os.environ, **self.endpoints.env(), "PYTHONUNBUFFERED": "1"}
        with open_private(logs / f"{spec.name}.log") as out:
            return subprocess.Popen(
                [sys.executable, *spec.args], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops them in order
                umask=PRIVATE_UMASK,  # its traces and anything else it writes under the data dir
            )  # fmt: skip

    def _wait_healthy(self, spec: ServiceSpec, deadline: float) -> None:
        assert self.endpoints is not None and spec.endpoint is not None
        target = getattr(self.endpoints, spec.endpoint)
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                process = self.processes[spec.name]
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{spec.name} exited with {process.returncode}; see {self.data_dir / 'logs' / spec.name}.log"
                    )
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=spec.grpc_service), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{spec.name} not healthy in time")
                time.sleep(0.1)

    def watch_once(self) -> list[str]:
        """One supervision round: reap children that died and schedule their restart after their
        backoff; restart those whose delay is over. Returns one line per death and per restart.

        Servers come back on the same port and data directory; a server that fails to start
        counts as dying again (so its next attempt waits longer).
        """
        lines = []
        for child in self.children.values():
            assert child.process is not None
            now = time.monotonic()
            if child.restart_at is None:
                returncode = child.process.poll()  # reaps it: no zombie
                if returncode is None:
                    continue
                uptime = now - child.started_at
                delay = child.backoff.delay_after(uptime)
                child.restart_at = now + delay
                child.restarts += 1
                lines.append(
                    f"{child.name} {exit_reason(returncode)} after {uptime:.1f} s up; "
                    f"restart {child.restarts} in {delay:g} s"
                )
            elif now >= child.restart_at:
                try:
                    child.start()
                except Exception as exc:  # noqa: BLE001 - any failure to start is retried later
                    delay = child.backoff.delay_after(0.0)
                    child.restart_at = time.monotonic() + delay
                    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    lines.append(f"{child.name} did not start ({first_line}); next attempt in {delay:g} s")
                else:
                    lines.append(f"{child.name} restarted (pid {child.process.pid})")
        for line in lines:
            log.info("%s", line)
        return lines

    def stop(self) -> None:
        """Services first (they drain), then NATS, then Postgres."""
        services = [self.children[spec.name] for spec in SERVICES if spec.name in self.children]
        for child in services:
            if child.process is not None and child.process.poll() is None:
                child.process.terminate()
        for child in services:
            if child.process is None:
                continue
            try:
                child.process.wait(20)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 20s; killing it", child.name)
                child.process.kill()
                child.process.wait()
        self.children.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / ENDPOINTS_FILE).unlink()
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()


def _started(server: EmbeddedPostgres | NatsServer) -> subprocess.Popen[bytes]:
    """Start a server (blocking until it is ready) and return its process. A server that fails to
    become ready is stopped, so a later attempt does not find it half-running."""
    try:
        server.start()
    except BaseException:
        server.stop(timeout=10)
        raise
    assert server.process is not None
    return server.process
