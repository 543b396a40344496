"""The whole platform on one machine: embedded Postgres and NATS (unless `D2D_DATABASE_URL` /
`D2D_NATS_URL` name existing ones), then each service as its own process, restarted if it dies.

`d2d up` runs a Stack in the foreground; `d2d demo` starts one when none is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
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


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir).resolve()
        self.postgres: EmbeddedPostgres | None = None
        self.nats: NatsServer | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoints: Endpoints | None = None
        self.restarts: dict[str, int] = {}

    def start(self, timeout: float = 60) -> Endpoints:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        database_url = self.settings.database_url
        if not database_url:
            self.postgres = EmbeddedPostgres(self.data_dir)
            database_url = self.postgres.start()
        nats_url = self.settings.nats_url
        if not nats_url:
            self.nats = NatsServer(self.data_dir)
            nats_url = self.nats.start()
        asyncio.run(eventlog.migrate(database_url))
        ingest = os.environ.get("D2D_INGEST_ADDR") or self._default_addr("ingest", DEFAULT_INGEST_PORT)
        features = os.environ.get("D2D_FEATURES_ADDR") or self._default_addr("features", DEFAULT_FEATURES_PORT)
        registry = os.environ.get("D2D_REGISTRY_ADDR") or self._default_addr("registry", DEFAULT_REGISTRY_PORT)
        serving = os.environ.get("D2D_SERVING_ADDR") or self._default_addr("serving", DEFAULT_SERVING_PORT)
        self.endpoints = Endpoints(
            database_url, nats_url, ingest, features, registry, serving, str(self.data_dir), os.getpid()
        )
        for spec in SERVICES:
            self._spawn(spec)
        deadline = time.monotonic() + timeout
        for spec in SERVICES:
            if spec.grpc_service:
                self._wait_healthy(spec, deadline)
        (self.data_dir / ENDPOINTS_FILE).write_text(json.dumps(asdict(self.endpoints), indent=2))
        return self.endpoints

    def _default_addr(self, name: str, port: int) -> str:
        if port_is_free(port):
            return f"127.0.0.1:{port}"
        return f"127.0.0.1:{_remembered_port(self.data_dir / 'ports.json', name)}"

    def _spawn(self, spec: ServiceSpec) -> None:
        assert self.endpoints is not None
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        # One OpenMP thread per service: XGBoost's default pool spins on the few cores the services share.
        env = {"OMP_NUM_THREADS": "1", **os.environ, **self.endpoints.env(), "PYTHONUNBUFFERED": "1"}
        with open(logs / f"{spec.name}.log", "ab") as out:
            self.processes[spec.name] = subprocess.Popen(
                [sys.executable, *spec.args], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops them in order
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
        """Restart services that died; returns their names."""
        restarted = []
        for spec in SERVICES:
            process = self.processes.get(spec.name)
            if process is not None and process.poll() is not None:
                self.restarts[spec.name] = self.restarts.get(spec.name, 0) + 1
                log.warning("%s exited with %s; restarting", spec.name, process.returncode)
                self._spawn(spec)
                restarted.append(spec.name)
        return restarted

    def stop(self) -> None:
        """Services first (they drain), then NATS, then Postgres."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for name, process in self.processes.items():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 20s; killing it", name)
                process.kill()
                process.wait()
        self.processes.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / ENDPOINTS_FILE).unlink()
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
