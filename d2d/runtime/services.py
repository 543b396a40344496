"""The platform's deployables, each declared once: how to run it and, for a gRPC service, its API
name, default port and the environment variable holding its address.

Settings, the stack (`d2d up`), its `Endpoints`, the CLI and the test of docker-compose.yml read
this table; adding a service is its folder under `services/` plus one entry here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # process, log file and compose service name
    args: tuple[str, ...]  # after `python`
    api: str | None = None  # the gRPC service it serves (health-checked); None for a worker
    port: int = 0  # default port of its API

    @property
    def addr_env(self) -> str:
        """The variable naming its address, for itself (where to listen) and for its clients."""
        return f"D2D_{self.name.upper().replace('-', '_')}_ADDR"

    @property
    def default_addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def addr_from_env(self) -> str:
        return os.environ.get(self.addr_env) or self.default_addr


# In start order: `d2d up` starts them so, and stops them together.
SERVICES = (
    ServiceSpec("ingest", ("-m", "services.ingest", "serve"), "d2d.v1.IngestService", 50051),
    ServiceSpec("ingest-relay", ("-m", "services.ingest", "relay")),
    ServiceSpec("features", ("-m", "services.features"), "d2d.v1.FeatureService", 50052),
    ServiceSpec("registry", ("-m", "services.registry"), "d2d.v1.RegistryService", 50053),
    ServiceSpec("serving", ("-m", "services.serving"), "d2d.v1.ServingService", 50054),
    ServiceSpec("feedback", ("-m", "services.feedback"), "d2d.v1.FeedbackService", 50055),
    ServiceSpec("audit", ("-m", "services.audit"), "d2d.v1.AuditService", 50056),
)
APIS = tuple(spec for spec in SERVICES if spec.api)


def service(name: str) -> ServiceSpec:
    """The registered service called `name` (KeyError naming it otherwise)."""
    for spec in SERVICES:
        if spec.name == name:
            return spec
    raise KeyError(f"no service {name!r} is registered in d2d.runtime.services")
