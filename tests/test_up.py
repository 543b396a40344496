"""`d2d up` as a user runs it: embedded Postgres and NATS from the wheels, services as their own
processes, endpoints printed, clean stop on SIGTERM, data kept across restarts, dead services restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import psutil
import pytest

from d2d import auth, grpcserver
from d2d.cli.demo import DEMO_DIR
from d2d.client import IngestClient, make_event
from d2d.config import GrpcTls
from d2d.dbroles import LOGINS_FILE
from d2d.private import private_dir, write_private_text
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.runtime.services import APIS
from d2d.runtime.stack import ENDPOINTS_FILE, START_RESTARTS, Endpoints
from d2d.sim import load_contracts
from tests.conftest import ROOT

NOW = datetime(2026, 1, 1, tzinfo=UTC)
# The CLI as a user runs it beside `d2d up`: no D2D_API_KEY, so it reads the data dir's admin key.
CLI_ENV = {**os.environ, "COLUMNS": "200", "D2D_API_KEY": ""}


def start_up(data_dir: Path, log: Path, ingest_port: int, **servers: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("D2D_")}
    env.update({"D2D_INGEST_ADDR": f"127.0.0.1:{ingest_port}", "COLUMNS": "200", **servers})
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "d2d.cli", "--data-dir", str(data_dir), "up"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_endpoints(data_dir: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    path = data_dir / ENDPOINTS_FILE
    while not path.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return json.loads(path.read_text())


def children_of(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def command_line(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited meanwhile (or a zombie not yet reaped)
        return ""


def stop_up(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()


def admin_key(data_dir: Path) -> str:
    """The admin key `d2d up` made for the data dir (the tests' own key is not in its database)."""
    return auth.read_key_file(data_dir / auth.ADMIN_KEY_FILE)


async def append_one(data_dir: Path, target: str, event_id: str) -> int:
    async with IngestClient(target, api_key=admin_key(data_dir)) as ingest:
        await ingest.wait_ready()
        spec = next(c for c in load_contracts() if c.event_type == "merchant.onboarded")
        await ingest.create_contract_version(spec.event_type, owner=spec.owner, json_schema=spec.schema)
        payload = {"merchant_id": "mer_0001", "name": "Shop", "mcc": "5411", "category": "grocery",
                   "country": "DE", "risk_tier": "low"}  # fmt: skip
        event = make_event("merchant.onboarded", "merchant", "mer_0001", payload, occurred_at=NOW, event_id=event_id)
        [result] = (await ingest.append([event])).results
        assert result.WhichOneof("outcome") == "seq", result
        return result.seq


def test_up_serves_stops_cleanly_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    data_dir, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    up = start_up(data_dir, log, port)
    try:
        endpoints = wait_endpoints(data_dir, up, log)
        assert endpoints["ingest"] == f"127.0.0.1:{port}"
        first_seq = asyncio.run(append_one(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-000000000001"))
        names = " ".join(command_line(p) for p in children_of(up.pid))
        assert "postgres" in names and "nats-server" in names and "services.ingest serve" in names
        assert "services.ingest relay" in names and "services.features" in names
        assert "services.registry" in names and "services.serving" in names
        assert endpoints["features"] and f"{endpoints['features']}" in log.read_text()
        children = children_of(up.pid)
        printed = log.read_text()
        assert f"127.0.0.1:{port}" in printed and "postgresql://" in printed and "nats://" in printed
        # the admin key is in a private file whose path is printed, never the key itself
        key_file = data_dir / auth.ADMIN_KEY_FILE
        assert key_file.stat().st_mode & 0o777 == 0o600 and auth.key_id_of(admin_key(data_dir))
        assert auth.ADMIN_KEY_FILE in printed and admin_key(data_dir) not in printed
    finally:
        stop_up(up, log)
    psutil.wait_procs(children, timeout=10)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "all stopped"
    assert not (data_dir / ENDPOINTS_FILE).exists()

    again = start_up(data_dir, log, port)
    try:
        endpoints = wait_endpoints(data_dir, again, log)
        # the same event id answers with its first position: the log survived the restart
        again_seq = asyncio.run(append_one(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-000000000001"))
        assert again_seq == first_seq
    finally:
        stop_up(again, log)


def test_up_restarts_a_service_that_dies(tmp_path: Path) -> None:
    data_dir, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    up = start_up(data_dir, log, port)
    try:
        endpoints = wait_endpoints(data_dir, up, log)
        [ingest] = [p for p in children_of(up.pid) if "services.ingest serve" in command_line(p)]
        ingest.kill()
        deadline = time.monotonic() + 30
        while True:
            serving = [p for p in children_of(up.pid) if "services.ingest serve" in command_line(p)]
            if serving and serving[0].pid != ingest.pid:
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert asyncio.run(append_one(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-000000000002")) >= 1
        assert "restarted" in log.read_text()
    finally:
        stop_up(up, log)


def start_up_on_servers(
    tmp_path: Path, postgres: EmbeddedPostgres, database_url: str, nats_server: NatsServer, **env: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`d2d up` on the session's Postgres and NATS: (its process, data dir, output)."""
    data_dir, log = tmp_path / "data", tmp_path / "up.log"
    # The services' logins are the server's (roles are cluster-wide): this stack is given the
    # passwords they already have, as a second stack on a shared server would be.
    private_dir(data_dir)
    write_private_text(data_dir / LOGINS_FILE, (postgres.data_dir / LOGINS_FILE).read_text())
    servers = {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": nats_server.url, **env}
    return start_up(data_dir, log, free_port(), **servers), data_dir, log


def test_up_uses_the_servers_named_in_the_environment(
    tmp_path: Path, postgres: EmbeddedPostgres, database_url: str, nats_server: NatsServer
) -> None:
    up, data_dir, log = start_up_on_servers(tmp_path, postgres, database_url, nats_server)
    try:
        endpoints = wait_endpoints(data_dir, up, log)
        assert endpoints["database_url"] == database_url and endpoints["nats_url"] == nats_server.url
        names = " ".join(command_line(p) for p in children_of(up.pid))
        assert "services.ingest serve" in names
        assert "nats-server" not in names and "bin/postgres" not in names
        seq = asyncio.run(append_one(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-000000000003"))
    finally:
        stop_up(up, log)
    assert not (data_dir / "postgres").exists()

    async def stored() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchval("SELECT seq FROM events WHERE event_id = '7d9f6c1e-0000-4000-8000-000000000003'")
        finally:
            await conn.close()

    assert asyncio.run(stored()) == seq


def test_up_restarts_a_service_whose_port_was_held_while_it_started(
    tmp_path: Path, postgres: EmbeddedPostgres, database_url: str, nats_server: NatsServer
) -> None:
    """Another process holding a service's port for a moment (an outgoing connection may take any
    port of the kernel's ephemeral range, where 50051-50056 lie) does not stop `d2d up`: the
    service that could not listen says so and is restarted on the same address."""
    holder = socket.create_server(("127.0.0.1", 0))
    addr = f"127.0.0.1:{holder.getsockname()[1]}"
    up, data_dir, log = start_up_on_servers(tmp_path, postgres, database_url, nats_server, D2D_AUDIT_ADDR=addr)
    try:
        audit_log, deadline = data_dir / "logs" / "audit.log", time.monotonic() + 60
        while not (audit_log.exists() and f"audit: cannot listen on {addr}" in audit_log.read_text()):
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        holder.close()
        endpoints = wait_endpoints(data_dir, up, log)
        assert endpoints["audit"] == addr
        assert "while starting: audit exited with 1" in log.read_text(), log.read_text()
    finally:
        holder.close()
        stop_up(up, log)


async def test_a_service_never_shares_a_port_another_server_listens_on() -> None:
    """grpc lets a second server bind a port one already serves (SO_REUSEPORT) and splits the calls
    between them; a second platform's service on a port the first serves says so and exits."""
    first, _ = grpcserver.new_server(["first"])
    port = grpcserver.listen(first, "127.0.0.1:0", GrpcTls(), "first")
    await first.start()
    try:
        second, _ = grpcserver.new_server(["second"])
        with pytest.raises(SystemExit) as stopped:
            grpcserver.listen(second, f"127.0.0.1:{port}", GrpcTls(), "audit")
        assert str(stopped.value.code).startswith(f"audit: cannot listen on 127.0.0.1:{port}"), stopped.value.code
    finally:
        await first.stop(None)


def test_up_fails_naming_a_service_that_cannot_start_with_the_end_of_its_log(
    tmp_path: Path, postgres: EmbeddedPostgres, database_url: str, nats_server: NatsServer
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        addr = f"127.0.0.1:{holder.getsockname()[1]}"
        up, data_dir, log = start_up_on_servers(tmp_path, postgres, database_url, nats_server, D2D_AUDIT_ADDR=addr)
        try:
            code = up.wait(120)
        finally:
            up.kill()
    printed = log.read_text()
    assert code != 0 and f"audit died {START_RESTARTS + 1} times while starting" in printed, printed
    assert f"audit: cannot listen on {addr}" in printed, printed  # the end of its log
    assert not (data_dir / ENDPOINTS_FILE).exists()


def test_demo_leaves_a_platform_running_on_its_directory_alone(tmp_path: Path) -> None:
    """`d2d demo` starts from an empty log in the data dir's `demo/` (its whole story runs in
    tests/test_closed_loop.py): while a platform runs there, it refuses and deletes nothing."""
    demo_dir = tmp_path / "data" / DEMO_DIR
    private_dir(demo_dir)
    addrs = {spec.name: f"127.0.0.1:{free_port()}" for spec in APIS}
    running = Endpoints("postgresql://-", "nats://-", addrs, str(demo_dir), os.getpid())  # this process: alive
    write_private_text(demo_dir / ENDPOINTS_FILE, running.to_json())
    (demo_dir / "kept").write_text("data of the running platform")
    demo = subprocess.run(
        [sys.executable, "-m", "d2d.cli", "--data-dir", str(tmp_path / "data"), "demo"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=CLI_ENV,
    )  # fmt: skip
    assert demo.returncode != 0 and "already running" in demo.stderr, demo.stdout + demo.stderr
    assert (demo_dir / "kept").read_text() == "data of the running platform"
