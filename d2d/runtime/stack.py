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
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from d2d import auth, bus, dbroles, eventlog
from d2d.config import Settings
from d2d.private import private_dir, write_private_text
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, _remembered_port, port_is_free
from d2d.runtime.services import APIS, SERVICES, ServiceSpec
from d2d.runtime.supervisor import Supervisor

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "endpoints.json"
START_RESTARTS = 2  # restarts a child may need while the platform starts (see Stack.start)


class StartFailed(RuntimeError):
    """The platform could not start: which child, why, and the end of its log (the CLI prints it)."""


@dataclass(frozen=True)
class Endpoints:
    """Where a running platform is: its servers and each gRPC service's address (by service name)."""

    database_url: str
    nats_url: str
    addrs: Mapping[str, str]
    data_dir: str
    pid: int

    def addr(self, name: str) -> str:
        return self.addrs[name]

    def env(self) -> dict[str, str]:
        return {
            "D2D_DATABASE_URL": self.database_url,
            "D2D_NATS_URL": self.nats_url,
            **{spec.addr_env: self.addrs[spec.name] for spec in APIS},
            "D2D_DATA_DIR": self.data_dir,
        }

    def to_json(self) -> str:
        """Flat: each service's address under its name, beside the servers' URLs."""
        fields = {"database_url": self.database_url, "nats_url": self.nats_url, **self.addrs}
        return json.dumps({**fields, "data_dir": self.data_dir, "pid": self.pid}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Endpoints:
        found = json.loads(text)
        addrs = {spec.name: found[spec.name] for spec in APIS}
        return cls(found["database_url"], found["nats_url"], addrs, found["data_dir"], found["pid"])


def running_endpoints(data_dir: Path) -> Endpoints | None:
    """The endpoints of a stack `d2d up` is running on this data dir, if its process is alive."""
    path = Path(data_dir) / ENDPOINTS_FILE
    if not path.exists():
        return None
    endpoints = Endpoints.from_json(path.read_text())
    try:
        os.kill(endpoints.pid, 0)
    except OSError:
        return None
    return endpoints


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir).resolve()
        self.postgres: EmbeddedPostgres | None = None
        self.nats: NatsServer | None = None
        # Servers first, then SERVICES, in start order; logs and files under the data dir are private.
        self.supervisor = Supervisor(self.data_dir / "logs", private=True)
        self.endpoints: Endpoints | None = None
        self.database_urls: dict[str, str] = {}  # each service's own login (d2d.dbroles), by service name
        # The admin key `start` makes (once per data dir), for the CLI and the services: never printed.
        self.admin_key_path = self.data_dir / auth.ADMIN_KEY_FILE
        self.admin_key = ""

    def start(self, timeout: float = 60) -> Endpoints:
        """Servers, then every service; returns once each API answers its health check. A child
        that dies meanwhile is restarted (up to START_RESTARTS times); StartFailed otherwise."""
        private_dir(self.data_dir)
        database_url = self.settings.database_url
        if not database_url:
            postgres = self.postgres = EmbeddedPostgres(self.data_dir)
            self.supervisor.adopt("postgres", lambda: _started(postgres), stop=postgres.stop)
            database_url = postgres.url
        nats_url = self.settings.nats_url
        if not nats_url:
            nats = self.nats = NatsServer(self.data_dir, users=self._bus_permissions())
            self.supervisor.adopt("nats", lambda: _started(nats), stop=nats.stop)
            nats_url = nats.url
        asyncio.run(eventlog.migrate(database_url))
        self.database_urls = self._service_logins(database_url)
        self.admin_key = asyncio.run(auth.ensure_admin_key_at(database_url, self.admin_key_path))
        addrs = {spec.name: os.environ.get(spec.addr_env) or self._default_addr(spec) for spec in APIS}
        self.endpoints = Endpoints(database_url, nats_url, addrs, str(self.data_dir), os.getpid())
        # One OpenMP thread per service: XGBoost's default pool spins on the few cores the services share.
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **self.endpoints.env()}
        env["D2D_API_KEY"] = self.admin_key  # what the services call each other with
        for spec in SERVICES:
            self.supervisor.spawn(spec.name, spec.args, {**env, **self._service_env(spec)})
        deadline = time.monotonic() + timeout
        for spec in APIS:
            self._wait_healthy(spec, deadline)
        write_private_text(self.data_dir / ENDPOINTS_FILE, self.endpoints.to_json())
        return self.endpoints

    def _service_env(self, spec: ServiceSpec) -> dict[str, str]:
        """What only this service is given (its own credentials), over the environment all share."""
        env: dict[str, str] = {}
        if spec.name in self.database_urls:  # its own database login
            env["D2D_DATABASE_URL"] = self.database_urls[spec.name]
        if self.nats is not None and spec.name in bus.SERVICE_USERS:  # its own NATS user
            env["D2D_NATS_URL"] = self.nats.url_for(bus.SERVICE_USERS[spec.name])
        return env

    def _service_logins(self, owner_url: str) -> dict[str, str]:
        """Each service's database URL as its own login role, made or updated with the owner's
        connection (passwords generated once into a private file of the data dir). On a server
        whose given role may not create roles, services share its URL (with a warning)."""
        passwords = dbroles.load_passwords(self.data_dir / dbroles.LOGINS_FILE)
        try:
            asyncio.run(dbroles.ensure_logins(owner_url, passwords))
        except asyncpg.InsufficientPrivilegeError as exc:
            log.warning("services log in as the role of D2D_DATABASE_URL: it cannot create their own (%s)", exc)
            return {}
        return {name: dbroles.login_url(owner_url, name, passwords[name]) for name in dbroles.SERVICE_GROUPS}

    def _bus_permissions(self) -> dict[str, dict]:
        """The embedded NATS server's users: each service's, and `producer` for applications."""
        return bus.permissions(
            bus.Topology(self.settings.nats_namespace),
            features_consumer=self.settings.features_consumer, serving_consumer=self.settings.serving_consumer,
        )  # fmt: skip

    def _default_addr(self, spec: ServiceSpec) -> str:
        if port_is_free(spec.port):
            return spec.default_addr
        return f"127.0.0.1:{_remembered_port(self.data_dir / 'ports.json', spec.name)}"

    def _wait_healthy(self, spec: ServiceSpec, deadline: float) -> None:
        assert self.endpoints is not None
        addr = self.endpoints.addr(spec.name)
        credentials = self.settings.grpc_tls.channel_credentials()  # as the services' clients will call them
        with grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._restart_the_dead_while_starting()
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=spec.api), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    child = self.supervisor.child(spec.name)
                    raise StartFailed(f"{spec.name} not healthy in time; end of {child.log_path}:\n{child.log_tail()}")
                time.sleep(0.1)

    def _restart_the_dead_while_starting(self) -> None:
        """While the platform starts, a child that dies is restarted after its backoff, as `d2d up`
        does later (a port held for a moment by another process, a server slow to come back); one
        that dies more than START_RESTARTS times fails the start with its exit and end of log."""
        for line in self.supervisor.watch_once():
            log.warning("while starting: %s", line)
        for child in self.supervisor.children:
            if child.restarts > START_RESTARTS:
                raise StartFailed(
                    f"{child.name} died {child.restarts} times while starting; end of {child.log_path}:\n"
                    f"{child.log_tail()}"
                )

    def watch_once(self) -> list[str]:
        """One supervision round (`Supervisor.watch_once`): dead children, servers included, are
        restarted in place (same port, same data) after their backoff."""
        return self.supervisor.watch_once()

    def stop(self) -> None:
        """Services first (they drain), then NATS, then Postgres."""
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / ENDPOINTS_FILE).unlink()
        self.supervisor.stop_all()


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
