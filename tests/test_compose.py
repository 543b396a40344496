"""docker-compose.yml runs the platform `d2d up` runs: every registered service, with its command,
its address variable and port, and clients pointed at the other services by name.

Compose stays YAML; this test reads the file's simple layout (two-space indents, commands and ports
as JSON-style flow lists) so the YAML cannot drift from d2d/runtime/services.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from d2d.runtime.services import APIS, SERVICES, ServiceSpec

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def compose_services() -> dict[str, list[str]]:
    """Each compose service's lines, by name (the keys two spaces in under `services:`)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_services = False
    for line in COMPOSE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            in_services, current = line == "services:", None
        elif in_services and (key := re.fullmatch(r"  ([\w-]+):", line)):
            current = blocks[key.group(1)] = []
        elif current is not None:
            current.append(line.strip())
    return blocks


def value(block: list[str], key: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in block if line.startswith(f"{key}:")), None)


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_every_registered_service_runs_in_compose_with_its_command(spec: ServiceSpec) -> None:
    block = compose_services().get(spec.name)
    assert block is not None, f"docker-compose.yml has no service {spec.name}"
    command = value(block, "command")
    assert command is not None and json.loads(command) == ["python", *spec.args]


@pytest.mark.parametrize("spec", APIS, ids=lambda s: s.name)
def test_a_grpc_service_listens_on_its_default_port_and_publishes_it(spec: ServiceSpec) -> None:
    block = compose_services()[spec.name]
    assert value(block, spec.addr_env) == f"0.0.0.0:{spec.port}"
    assert json.loads(value(block, "ports") or "[]") == [f"{spec.port}:{spec.port}"]


def test_compose_runs_only_registered_services_and_clients_call_them_by_name() -> None:
    registered = {spec.name: spec for spec in SERVICES}
    by_env = {spec.addr_env: spec for spec in APIS}
    for name, block in compose_services().items():
        command = value(block, "command")
        if command and "services." in command:
            assert name in registered, f"compose runs {name}, which d2d/runtime/services.py does not register"
        for line in block:
            variable, _, addr = line.partition(":")
            if variable in by_env and by_env[variable].name != name:
                target = by_env[variable]
                assert addr.strip() == f"{target.name}:{target.port}", f"{name} calls {target.name} at {addr}"
