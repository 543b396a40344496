"""docker-compose.yml runs the platform `d2d up` runs, on many hosts: every registered service with its
command, address variable and port, clients pointed at the other services by name, a NATS JetStream
cluster of three, Postgres and Jaeger; each service with its own Postgres login and NATS user (made by
the one-shot `init`, `d2d migrate --credentials`), and its traces sent to Jaeger over OTLP.

CI has no Docker engine, so the file is checked, not run: against the compose specification's JSON
schema (the copy the check-jsonschema package ships, refreshed by its maintainers from the
compose-spec project) and against d2d/runtime/services.py. What `init` does runs here for real, on the
session's Postgres and a cluster of three nats-servers with the compose file's NATS config.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import nats
import nats.errors
import nats.js.errors
import pytest
import yaml
from nats.errors import Error as NatsError

from d2d import auth, bus, dbroles
from d2d.cli.migrate import NATS_ROUTES_CONF, NATS_USERS_CONF, SERVICE_ENV
from d2d.private import private_dir, write_private_text
from d2d.runtime.deathsig import dying_with_parent
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.runtime.services import APIS, SERVICES, ServiceSpec
from tests.conftest import ROOT, run_cli, wait_for_port

COMPOSE_FILE = ROOT / "docker-compose.yml"
CREDENTIALS = "/run/d2d"  # where init writes them and each service finds its own folder
OTLP_ENDPOINT = "http://jaeger:4317"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def nats_servers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(compose).items() if s.get("image", "").startswith("nats:")}


def flag(command: list[str], name: str) -> str | None:
    """The value after `name` in a command line, if it is there."""
    return command[command.index(name) + 1] if name in command else None


def test_the_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [error.message for error in validator.iter_errors(compose)] == []
    misspelt = {**compose, "services": {**services(compose), "ingest": {**services(compose)["ingest"], "comand": []}}}
    assert not validator.is_valid(misspelt), "the schema would catch a misspelt key"


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_every_registered_service_runs_in_compose_with_its_command(compose: dict[str, Any], spec: ServiceSpec) -> None:
    service = services(compose).get(spec.name)
    assert service is not None, f"docker-compose.yml has no service {spec.name}"
    assert service["command"] == ["python", *spec.args]


@pytest.mark.parametrize("spec", APIS, ids=lambda s: s.name)
def test_a_grpc_service_listens_on_its_default_port_and_publishes_it(
    compose: dict[str, Any], spec: ServiceSpec
) -> None:
    service = services(compose)[spec.name]
    assert service["environment"][spec.addr_env] == f"0.0.0.0:{spec.port}"
    assert service["ports"] == [f"{spec.port}:{spec.port}"]


def test_compose_runs_only_registered_services_and_clients_call_them_by_name(compose: dict[str, Any]) -> None:
    registered = {spec.name: spec for spec in SERVICES}
    for name, service in services(compose).items():
        if any("services." in part for part in service.get("command", [])):
            assert name in registered, f"compose runs {name}, which d2d/runtime/services.py does not register"
    for spec in SERVICES:  # as `d2d up` gives every service every API's address
        environment = services(compose)[spec.name]["environment"]
        for target in APIS:
            if target.name != spec.name:
                addr = environment.get(target.addr_env)
                assert addr == f"{target.name}:{target.port}", f"{spec.name} calls {target.name} at {addr}"


NATS_CLUSTER_LISTEN = 'listen: "0.0.0.0:6222"'


def nats_config(compose: dict[str, Any]) -> str:
    return compose["configs"]["nats_conf"]["content"]


def test_nats_is_a_jetstream_cluster_of_three_routed_to_each_other(compose: dict[str, Any]) -> None:
    servers = nats_servers(compose)
    assert len(servers) == 3
    config = nats_config(compose)
    cluster = re.search(r"cluster \{(.*?)\}", config, re.S)
    assert cluster and NATS_CLUSTER_LISTEN in cluster.group(1) and "name: d2d" in cluster.group(1)
    assert f'include "users/{NATS_ROUTES_CONF.name}"' in cluster.group(1), "the routes are the cluster's"
    init = services(compose)["init"]["command"]
    routes = (flag(init, "--nats-routes") or "").split(",")
    assert sorted(routes) == sorted(f"nats://{name}:6222" for name in servers), "each server routes to all"
    stores = set()
    for name, server in servers.items():
        command = server["command"]
        assert "-js" in command, f"{name} runs without JetStream"
        assert flag(command, "--server_name") == name and flag(command, "-c") == "/etc/nats/d2d.conf"
        [store] = [v for v in server["volumes"] if isinstance(v, str) and v.endswith(f":{flag(command, '-sd')}")]
        stores.add(store.split(":")[0])
        assert "-m" not in command and "8222" not in json.dumps(server), "no monitoring port is opened"
    assert len(stores) == 3 and stores <= set(compose["volumes"]), "each server keeps its own store"


def test_init_gives_every_service_all_cluster_members_and_runs_before_them(compose: dict[str, Any]) -> None:
    init = services(compose)["init"]
    assert init["command"][:4] == ["d2d", "migrate", "--credentials", CREDENTIALS]
    urls = init["environment"]["D2D_NATS_URL"].split(",")
    assert sorted(urls) == sorted(f"nats://{name}:4222" for name in nats_servers(compose))
    for name in [spec.name for spec in SERVICES] + list(nats_servers(compose)):
        assert services(compose)[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}, name


def test_the_nats_servers_include_the_users_and_routes_init_writes(compose: dict[str, Any]) -> None:
    included = set(re.findall(r'include "([^"]+)"', nats_config(compose)))
    for name, server in nats_servers(compose).items():
        [target] = [c["target"] for c in server["configs"] if c["source"] == "nats_conf"]
        [mounted] = [v for v in server["volumes"] if isinstance(v, dict) and v["source"] == "credentials"]
        assert mounted["volume"]["subpath"] == str(NATS_USERS_CONF.parent) and mounted["read_only"], name
        relative = Path(mounted["target"]).relative_to(Path(target).parent)
        assert included == {f"{relative}/{NATS_USERS_CONF.name}", f"{relative}/{NATS_ROUTES_CONF.name}"}, name


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_each_service_runs_with_its_own_credentials_and_sends_traces_to_jaeger(
    compose: dict[str, Any], spec: ServiceSpec
) -> None:
    service = services(compose)[spec.name]
    environment = service["environment"]
    # Nothing shared to fall back on: the owner's URL, an open NATS or a shared key are not given.
    assert not {"D2D_DATABASE_URL", "D2D_NATS_URL", "D2D_API_KEY"} & set(environment)
    [mounted] = [v for v in service["volumes"] if isinstance(v, dict) and v["source"] == "credentials"]
    assert mounted == {"type": "volume", "source": "credentials", "target": CREDENTIALS, "read_only": True,
                       "volume": {"subpath": spec.name}}  # fmt: skip
    entrypoint = service["entrypoint"]
    assert entrypoint[:2] == ["sh", "-c"] and f". {CREDENTIALS}/{SERVICE_ENV} && exec" in entrypoint[2]
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == OTLP_ENDPOINT
    assert environment["D2D_NATS_REPLICAS"] == str(len(nats_servers(compose))), "every stream on every server"
    assert services(compose)["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


# ---------------------------------------------------------------------------------------------
# `d2d migrate --credentials`: what init does, for real


def sourced(path: Path) -> dict[str, str]:
    """The variables an `export NAME=VALUE` file sets, as `sh` reads them."""
    out = subprocess.run(["sh", "-c", f". {shlex.quote(str(path))} && env -0"], capture_output=True, check=True,
                         env={})  # fmt: skip
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


@dataclass
class Cluster:
    """Three nats-servers as compose runs them, on this host: the compose file's config (each
    listening for routes on a port of its own rather than 6222), including the users and routes
    files from the credentials folder as compose mounts it; started once init has written them."""

    directory: Path
    credentials: Path
    client_ports: list[int]
    route_ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{port}" for port in self.client_ports)

    @property
    def routes(self) -> str:
        return ",".join(f"nats://127.0.0.1:{port}" for port in self.route_ports)

    def start(self, config: str) -> None:
        assert NATS_CLUSTER_LISTEN in config
        etc = self.directory / "etc"
        etc.mkdir()
        (etc / "users").symlink_to(self.credentials / NATS_USERS_CONF.parent)
        for n, (port, route_port) in enumerate(zip(self.client_ports, self.route_ports, strict=True), 1):
            conf = etc / f"nats-{n}.conf"
            conf.write_text(config.replace(NATS_CLUSTER_LISTEN, f'listen: "127.0.0.1:{route_port}"'))
            args = [NatsServer.binary(), "-c", str(conf), "-js", "-sd", str(self.directory / f"store-{n}"),
                    "--server_name", f"nats-{n}", "-a", "127.0.0.1", "-p", str(port),
                    "-l", str(self.directory / f"nats-{n}.log")]  # fmt: skip
            self.processes.append(subprocess.Popen(dying_with_parent(args), stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))  # fmt: skip
        for port, process in zip(self.client_ports, self.processes, strict=True):
            wait_for_port(port, process)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    found = Cluster(
        tmp_path, tmp_path / "credentials", [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    )
    yield found
    for process in found.processes:
        process.terminate()
    for process in found.processes:
        process.wait(10)


async def watched(url: str) -> tuple[nats.NATS, list[Exception]]:
    """A connection to `url` (one server) and the asynchronous errors the server sends it."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(url, error_cb=on_error, inbox_prefix=bus.inbox_prefix(url), allow_reconnect=False)
    return nc, errors


def route_connect(port: int, credentials: str = "") -> bytes:
    """What a server answers a route connection that logs in with `credentials` (`"user":…,"pass":…,`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as route:
        route.recv(65536)  # INFO
        route.sendall(f'CONNECT {{{credentials}"verbose":false,"name":"rogue","cluster":"d2d"}}\r\nPING\r\n'.encode())
        return route.recv(65536)


async def test_init_makes_each_services_login_nats_user_and_key_and_a_second_run_changes_nothing(
    postgres: EmbeddedPostgres, database_url: str, cluster: Cluster, compose: dict[str, Any]
) -> None:
    credentials = cluster.credentials
    # Login roles are cluster-wide and the session's tests log in with theirs: this init is given the
    # passwords they already have, as a second deployment on a shared server would be.
    private_dir(credentials)
    write_private_text(credentials / dbroles.LOGINS_FILE, (postgres.data_dir / dbroles.LOGINS_FILE).read_text())
    env = {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": cluster.urls}
    init = ["migrate", "--credentials", str(credentials), "--nats-routes", cluster.routes]
    code, out = await run_cli(env, *init)
    assert code == 0, out
    written = {path: path.read_bytes() for path in credentials.rglob("*") if path.is_file()}
    code, out = await run_cli(env, *init)
    assert code == 0, out
    assert {path: path.read_bytes() for path in credentials.rglob("*") if path.is_file()} == written
    assert all(path.stat().st_mode & 0o077 == 0 for path in written), "credentials are owner-only"

    admin_key = auth.read_key_file(credentials / auth.ADMIN_KEY_FILE)
    assert auth.key_id_of(admin_key)
    for spec in SERVICES:
        service_env = sourced(credentials / spec.name / SERVICE_ENV)
        assert service_env["D2D_API_KEY"] == admin_key
        conn = await asyncpg.connect(service_env["D2D_DATABASE_URL"])
        try:
            role = await conn.fetchrow(
                "SELECT current_user AS name, rolsuper FROM pg_roles WHERE rolname = current_user"
            )
            assert (role["name"], role["rolsuper"]) == (dbroles.login_role(spec.name), False)
        finally:
            await conn.close()
        if spec.name in bus.SERVICE_USERS:
            servers = bus.servers(service_env["D2D_NATS_URL"])
            assert [server.split("@")[1] for server in servers] == [f"127.0.0.1:{p}" for p in cluster.client_ports]
        else:
            assert "D2D_NATS_URL" not in service_env

    await asyncio.to_thread(cluster.start, nats_config(compose))
    nats_urls = {name: sourced(credentials / name / SERVICE_ENV)["D2D_NATS_URL"] for name in bus.SERVICE_USERS}
    relay = await bus.connect(nats_urls["ingest-relay"], name="relay", max_reconnect_attempts=0)
    features = await bus.connect(nats_urls["features"], name="features", max_reconnect_attempts=0)
    try:  # JetStream across the cluster: the relay makes the stream, features reads it, each as its user
        replicas = int(compose["x-env"]["D2D_NATS_REPLICAS"])
        events = bus.Topology(replicas=replicas).events_config()
        for _ in range(100):  # until the servers have elected JetStream's leader
            try:
                await bus.ensure_stream(relay.jetstream(timeout=1), events)
                break
            except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
                await asyncio.sleep(0.1)
        await relay.jetstream().publish(f"{bus.EVENTS_SUBJECT_PREFIX}.test.ping", b"{}")
        info = await features.jetstream().stream_info(events.name)
        assert info.state.messages == 1
        # three copies: the leader and two replicas, one on each server
        assert (info.config.num_replicas, len(info.cluster.replicas or [])) == (3, 2)
    finally:
        await relay.close()
        await features.close()

    for port in cluster.client_ports:  # the open NATS is closed
        with pytest.raises(NatsError, match="Authorization Violation"):
            await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, connect_timeout=5)
    assert route_connect(cluster.route_ports[0]).startswith(b"-ERR 'Authorization Violation'"), "a stranger's route"
    ingest, errors = await watched(bus.servers(nats_urls["ingest"])[2])
    try:  # its user's permissions, from bus.permissions: only the relay publishes events
        await ingest.publish(f"{bus.EVENTS_SUBJECT_PREFIX}.forged", b"{}")
        await ingest.flush(timeout=5)
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.05)
        assert [str(e) for e in errors] == ['nats: permissions violation for publish to "d2d.events.forged"']
    finally:
        await ingest.close()


def test_the_cluster_form_of_a_nats_url_keeps_each_servers_credentials() -> None:
    from d2d.cli.migrate import nats_urls_as

    url = nats_urls_as("nats://a:4222, nats://old:pw@b:4222", "serving", "p/w")
    assert bus.servers(url) == ["nats://serving:p%2Fw@a:4222", "nats://serving:p%2Fw@b:4222"]
    assert bus.inbox_prefix(url) == "_INBOX.serving"
