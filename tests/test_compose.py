"""docker-compose.yml runs the platform `d2d up` runs, on many hosts: every registered service with its
command, address variable and port, clients pointed at the other services by name, a NATS JetStream
cluster of three, Postgres and Jaeger; each service with its own Postgres login and NATS user (made by
the one-shot `init`, `d2d migrate --credentials`), and its traces sent to Jaeger over OTLP.

CI has no Docker engine, so the file is checked, not run: against the compose specification's JSON
schema (the copy the check-jsonschema package ships, refreshed by its maintainers from the
compose-spec project) and against d2d/runtime/services.py. What `init` does runs here for real, on the
session's Postgres and a nats-server started with the compose file's NATS config.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import nats
import pytest
import yaml
from nats.errors import Error as NatsError

from d2d import auth, bus, dbroles
from d2d.cli.migrate import NATS_USERS_CONF, SERVICE_ENV
from d2d.private import private_dir, write_private_text
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


def test_nats_is_a_jetstream_cluster_of_three_routed_to_each_other(compose: dict[str, Any]) -> None:
    servers = nats_servers(compose)
    assert len(servers) == 3
    cluster_urls = {f"nats://{name}:6222" for name in servers}
    stores = set()
    for name, server in servers.items():
        command = server["command"]
        assert "-js" in command, f"{name} runs without JetStream"
        assert flag(command, "--server_name") == name and flag(command, "--cluster_name") == "d2d"
        assert flag(command, "--cluster") == "nats://0.0.0.0:6222"
        assert set((flag(command, "--routes") or "").split(",")) == cluster_urls, f"{name} is not routed to all"
        [store] = [v for v in server["volumes"] if isinstance(v, str) and v.endswith(f":{flag(command, '-sd')}")]
        stores.add(store.split(":")[0])
        assert "-m" not in command and "8222" not in json.dumps(server), "no monitoring port is opened"
    assert len(stores) == 3 and stores <= set(compose["volumes"]), "each server keeps its own store"


def test_init_gives_every_service_all_cluster_members_and_runs_before_them(compose: dict[str, Any]) -> None:
    init = services(compose)["init"]
    assert init["command"] == ["d2d", "migrate", "--credentials", CREDENTIALS]
    urls = init["environment"]["D2D_NATS_URL"].split(",")
    assert sorted(urls) == sorted(f"nats://{name}:4222" for name in nats_servers(compose))
    for name in [spec.name for spec in SERVICES] + list(nats_servers(compose)):
        assert services(compose)[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}, name


def test_the_nats_servers_admit_only_the_users_init_writes(compose: dict[str, Any]) -> None:
    config = compose["configs"]["nats_conf"]["content"]
    [included] = re.findall(r'include "([^"]+)"', config)
    for name, server in nats_servers(compose).items():
        [target] = [c["target"] for c in server["configs"] if c["source"] == "nats_conf"]
        [users] = [v for v in server["volumes"] if isinstance(v, dict) and v["source"] == "credentials"]
        assert users["volume"]["subpath"] == str(NATS_USERS_CONF.parent) and users["read_only"], name
        assert f"{users['target']}/{NATS_USERS_CONF.name}" == f"{Path(target).parent}/{included}", name


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
    assert services(compose)["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


# ---------------------------------------------------------------------------------------------
# `d2d migrate --credentials`: what init does, for real


def sourced(path: Path) -> dict[str, str]:
    """The variables an `export NAME=VALUE` file sets, as `sh` reads them."""
    out = subprocess.run(["sh", "-c", f". {shlex.quote(str(path))} && env -0"], capture_output=True, check=True,
                         env={})  # fmt: skip
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


@pytest.fixture
def nats_with_compose_config(tmp_path: Path, compose: dict[str, Any]) -> Iterator[tuple[Path, int, Callable[[], None]]]:
    """(credentials dir, port, start): where init writes, and a nats-server run as compose runs one, with the
    compose file's config, its users file included from the credentials as compose mounts them;
    started once init has written (the test calls `start`)."""
    credentials = tmp_path / "credentials"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "d2d.conf").write_text(compose["configs"]["nats_conf"]["content"])
    (etc / "users").symlink_to(credentials / NATS_USERS_CONF.parent)
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        args = [NatsServer.binary(), "-c", str(etc / "d2d.conf"), "-js", "-sd", str(tmp_path / "store"),
                "-a", "127.0.0.1", "-p", str(port)]  # fmt: skip
        processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(port, processes[-1])

    yield credentials, port, start
    for process in processes:
        process.terminate()
        process.wait(10)


async def test_init_makes_each_services_login_nats_user_and_key_and_a_second_run_changes_nothing(
    postgres: EmbeddedPostgres, database_url: str, nats_with_compose_config: tuple[Path, int, Callable[[], None]]
) -> None:
    credentials, port, start_nats = nats_with_compose_config
    # Login roles are cluster-wide and the session's tests log in with theirs: this init is given the
    # passwords they already have, as a second deployment on a shared server would be.
    private_dir(credentials)
    write_private_text(credentials / dbroles.LOGINS_FILE, (postgres.data_dir / dbroles.LOGINS_FILE).read_text())
    dead = free_port()  # a cluster member that is down: services connect to the others
    env = {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": f"nats://127.0.0.1:{dead},nats://127.0.0.1:{port}"}
    code, out = await run_cli(env, "migrate", "--credentials", str(credentials))
    assert code == 0, out
    written = {path: path.read_bytes() for path in credentials.rglob("*") if path.is_file()}
    code, out = await run_cli(env, "migrate", "--credentials", str(credentials))
    assert code == 0, out
    assert {path: path.read_bytes() for path in credentials.rglob("*") if path.is_file()} == written
    assert all(path.stat().st_mode & 0o077 == 0 for path in written), "credentials are owner-only"

    admin_key = auth.read_key_file(credentials / auth.ADMIN_KEY_FILE)
    assert auth.key_id_of(admin_key)
    await asyncio.to_thread(start_nats)
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
        if spec.name not in bus.SERVICE_USERS:
            assert "D2D_NATS_URL" not in service_env
            continue
        user = bus.SERVICE_USERS[spec.name]
        assert [s.split("@")[1] for s in bus.servers(service_env["D2D_NATS_URL"])] == [
            f"127.0.0.1:{dead}", f"127.0.0.1:{port}",
        ], "every cluster member, in order"  # fmt: skip
        nc = await bus.connect(service_env["D2D_NATS_URL"], name=spec.name, max_reconnect_attempts=0)
        try:
            assert nc.connected_url is not None and nc.connected_url.username == user
        finally:
            await nc.close()

    with pytest.raises(NatsError, match="Authorization Violation"):  # the open NATS is closed
        await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, connect_timeout=5)
    ingest_url = bus.servers(sourced(credentials / "ingest" / SERVICE_ENV)["D2D_NATS_URL"])[1]
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    ingest = await nats.connect(ingest_url, error_cb=on_error, inbox_prefix=bus.inbox_prefix(ingest_url),
                                allow_reconnect=False)  # fmt: skip
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
