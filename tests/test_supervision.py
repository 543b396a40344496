"""`d2d up` supervises everything it starts: Postgres and NATS killed with SIGKILL come back on the
same port and data (a stale postmaster.pid does not stop them), the platform works again
afterwards, no child is left a zombie, restarts back off, and the data directory is private."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import psutil
import pytest

from d2d.bus import EVENTS_STREAM, inbox_prefix
from d2d.runtime.servers import EmbeddedPostgres, free_port, nats_url_as
from d2d.runtime.supervisor import Backoff
from d2d.sim import PaymentsSimulator, SimConfig, write_truth_csv
from tests.conftest import ROOT
from tests.test_up import append_one, command_line, start_up, stop_up, wait_endpoints


def test_backoff_doubles_from_half_a_second_to_a_cap_and_resets_after_a_stable_run() -> None:
    backoff = Backoff()
    crash_loop = [backoff.delay_after(uptime=0.2) for _ in range(9)]
    assert crash_loop == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.delay_after(uptime=60) == 0.5  # it had stayed up: a new crash starts over
    assert backoff.delay_after(uptime=59) == 1  # ... and a quick one after it backs off again


# -- a stale postmaster.pid -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """An initialised, stopped Postgres and the postmaster.pid it wrote while it ran."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("stale"), port=free_port(), fsync=False)
    server.start()
    pid_file_text = (server.pgdata / "postmaster.pid").read_text()
    server.stop()
    yield server, pid_file_text
    server.stop()


def leave_stale_pid_file(server: EmbeddedPostgres, pid_file_text: str, pid: int) -> None:
    """A postmaster.pid as a killed postmaster leaves it, naming `pid`, owned like the pgdata."""
    pid_file = server.pgdata / "postmaster.pid"
    pid_file.write_text("\n".join([str(pid), *pid_file_text.splitlines()[1:]]) + "\n")
    owner = server.pgdata.stat()
    os.chown(pid_file, owner.st_uid, owner.st_gid)


def test_a_supervised_child_dies_with_its_parent_however_the_parent_dies(tmp_path: Path) -> None:
    """A parent that spawns a child and is then killed with SIGKILL (no cleanup runs) leaves no child."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from d2d.runtime.supervisor import Supervisor\n"
        f"child = Supervisor(Path({str(tmp_path)!r})).spawn('sleeper', ['-c', 'import time; time.sleep(120)'])\n"
        "print(child.process.pid, flush=True)\n"
        "time.sleep(120)\n"
    )  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT)
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    deadline = time.monotonic() + 10
    while child.cmdline()[-1] != "import time; time.sleep(120)":  # the launcher execs the program itself
        assert time.monotonic() < deadline, child.cmdline()
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    child.wait(timeout=10)  # psutil.TimeoutExpired if the child outlived its parent


def test_a_stale_postmaster_pid_of_a_dead_process_does_not_block_start(
    stopped_postgres: tuple[EmbeddedPostgres, str],
) -> None:
    server, pid_file_text = stopped_postgres
    gone = subprocess.Popen(["true"])
    gone.wait()
    leave_stale_pid_file(server, pid_file_text, gone.pid)
    try:
        server.start()
        assert asyncio.run(select_one(server.url)) == 1
    finally:
        server.stop()


@pytest.mark.parametrize("state", ["running", "zombie"])
def test_a_stale_postmaster_pid_naming_another_process_of_the_same_user_does_not_block_start(
    stopped_postgres: tuple[EmbeddedPostgres, str], state: str
) -> None:
    """Postgres alone takes such a pid for a running postmaster and refuses to start: the pid of a
    killed postmaster nobody reaped (a zombie), or the same pid given since to another process."""
    server, pid_file_text = stopped_postgres
    same_user = {"user": server.pgdata.stat().st_uid} if os.geteuid() == 0 else {}
    other = subprocess.Popen(["sleep", "120"] if state == "running" else ["true"], **same_user)
    try:
        if state == "zombie":
            eventually(lambda: psutil.Process(other.pid).status() == psutil.STATUS_ZOMBIE, "a zombie")
        leave_stale_pid_file(server, pid_file_text, other.pid)
        server.start()
        assert asyncio.run(select_one(server.url)) == 1
        if state == "running":
            assert other.poll() is None, "the process that has the pid now is left alone"
    finally:
        server.stop()
        other.kill()
        other.wait()


async def select_one(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


# -- under `d2d up` ---------------------------------------------------------------------------


Platform = tuple[subprocess.Popen[bytes], dict[str, str], Path, Path]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One `d2d up` for the tests below: (its process, endpoints, data dir, its output)."""
    root = tmp_path_factory.mktemp("supervised")
    data_dir, log = root / "data", root / "up.log"
    up = start_up(data_dir, log, free_port())
    try:
        yield up, wait_endpoints(data_dir, up, log), data_dir, log
    finally:
        stop_up(up, log)


def eventually(check: Callable[[], object], what: str, timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    while True:
        with_result = check()
        if with_result:
            return with_result
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.2)


def server_child(up: subprocess.Popen[bytes], name: str) -> psutil.Process | None:
    """`d2d up`'s direct child running the named server (`postgres` or `nats-server`), if alive."""
    for p in psutil.Process(up.pid).children():
        try:
            if p.name() == name and p.status() != psutil.STATUS_ZOMBIE:
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def zombies_of(up: subprocess.Popen[bytes]) -> list[str]:
    """`d2d up`'s own children left unreaped (a postmaster's exiting backends are its own to reap)."""
    found = []
    for p in psutil.Process(up.pid).children():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            continue
    return found


def test_the_data_dir_and_everything_the_platform_writes_there_is_private(platform: Platform) -> None:
    up, endpoints, data_dir, log = platform
    asyncio.run(append_one(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-0000000000a1"))
    top = data_dir.stat()
    if os.geteuid() == 0:
        # Postgres runs as `embedded_postgres`; its group may pass through (x), nothing more.
        assert stat.S_IMODE(top.st_mode) == 0o710, oct(top.st_mode)
        assert grp.getgrgid(top.st_gid).gr_name == "embedded_postgres"
        assert pwd.getpwuid((data_dir / "postgres").stat().st_uid).pw_name == "embedded_postgres"
    else:
        assert stat.S_IMODE(top.st_mode) == 0o700, oct(top.st_mode)
    for name in ("endpoints.json", "ports.json", "postgres.log", "nats.log", "logs/ingest.log",
                 "traces/ingest.jsonl", "postgres/PG_VERSION"):  # fmt: skip
        assert (data_dir / name).exists(), name
    readable_by_others = []
    for directory, dirs, files in os.walk(data_dir):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            if stat.S_IMODE(path.lstat().st_mode) & 0o077:
                readable_by_others.append(f"{oct(path.lstat().st_mode)} {path.relative_to(data_dir)}")
    assert readable_by_others == []


def test_the_simulators_truth_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    sim = PaymentsSimulator(SimConfig(seed=3, days=0.01))
    list(sim.events())
    previous = os.umask(0o022)
    try:
        write_truth_csv(sim.truth(), tmp_path / "truth.csv")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "truth.csv").stat().st_mode) == 0o600


def kill_postgres_until_it_is_back(up: subprocess.Popen[bytes], endpoints: dict[str, str]) -> psutil.Process:
    """SIGKILL the postmaster `d2d up` runs; returns the new one once it accepts connections."""
    postmaster = server_child(up, "postgres")
    assert postmaster is not None
    postmaster.kill()

    def back() -> psutil.Process | None:
        again = server_child(up, "postgres")
        return again if again is not None and again.pid != postmaster.pid else None

    again = eventually(back, "a new postmaster")
    eventually(lambda: asyncio.run(_accepts(endpoints["database_url"])), "Postgres accepting connections")
    assert isinstance(again, psutil.Process)
    return again


def append_retrying(data_dir: Path, target: str, event_id: str) -> int:
    """append_one, retried while ingest answers UNAVAILABLE (it is told to retry)."""

    def attempt() -> int | None:
        try:
            return asyncio.run(append_one(data_dir, target, event_id))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return None

    seq = eventually(attempt, "an append through ingest", timeout=60)
    assert isinstance(seq, int)
    return seq


def test_postgres_killed_under_up_is_reaped_and_restarted_on_its_port_and_data(platform: Platform) -> None:
    up, endpoints, data_dir, log = platform
    before = append_retrying(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-0000000000b1")
    again = kill_postgres_until_it_is_back(up, endpoints)
    assert zombies_of(up) == []
    assert str(urlsplit(endpoints["database_url"]).port) in again.cmdline()
    # the same data: the same event id answers with the position it was first given
    assert append_retrying(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-0000000000b1") == before
    assert append_retrying(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-0000000000b2") > before
    printed = log.read_text()
    assert re.search(r"postgres was killed by SIGKILL after [\d.]+ s up; restart 1 in 0\.5 s", printed), printed
    # printed once its start returns, which may be a moment after it accepts connections
    eventually(lambda: f"postgres restarted (pid {again.pid})" in log.read_text(), "the restart printed", timeout=30)


def test_the_first_append_after_postgres_is_back_succeeds(platform: Platform) -> None:
    """The group committer's kept connection died with Postgres: the append is retried on a fresh one."""
    up, endpoints, data_dir, _ = platform
    # the committer holds a connection
    append_retrying(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-0000000000b3")
    kill_postgres_until_it_is_back(up, endpoints)
    assert asyncio.run(append_one(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-0000000000b4")) >= 1


async def _accepts(url: str) -> bool:
    try:
        return await select_one(url) == 1
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False


def test_nats_killed_under_up_comes_back_and_the_relay_catches_up(platform: Platform) -> None:
    up, endpoints, data_dir, log = platform
    nats = server_child(up, "nats-server")
    assert nats is not None
    nats.kill()
    eventually(lambda: (p := server_child(up, "nats-server")) is not None and p.pid != nats.pid, "a new nats-server")
    event_id = "7d9f6c1e-0000-4000-8000-0000000000c1"
    asyncio.run(append_one(data_dir, endpoints["ingest"], event_id))
    reader = nats_url_as(endpoints["nats_url"], data_dir, "features")  # a user who may read the stream
    eventually(lambda: asyncio.run(_last_published_id(reader)) == event_id, "the event on the stream")
    assert zombies_of(up) == []
    assert "nats was killed by SIGKILL" in log.read_text()


async def _last_published_id(nats_url: str) -> str | None:
    import nats

    try:
        nc = await nats.connect(
            nats_url, connect_timeout=2, max_reconnect_attempts=0, inbox_prefix=inbox_prefix(nats_url)
        )
    except Exception:  # noqa: BLE001 - not back yet
        return None
    try:
        msg = await nc.jetstream().get_last_msg(EVENTS_STREAM, "d2d.events.merchant.onboarded")
        return (msg.headers or {}).get("Nats-Msg-Id")
    except Exception:  # noqa: BLE001 - stream not recovered yet
        return None
    finally:
        await nc.close()


def test_a_service_that_keeps_dying_is_restarted_later_each_time(platform: Platform) -> None:
    up, endpoints, data_dir, log = platform
    seen: list[int] = []

    def new_ingest() -> psutil.Process | None:
        children = psutil.Process(up.pid).children()
        return next((p for p in children if p.pid not in seen and "services.ingest serve" in command_line(p)), None)

    for _ in range(3):
        ingest = eventually(new_ingest, "a new ingest process")
        assert isinstance(ingest, psutil.Process)
        seen.append(ingest.pid)
        ingest.kill()
    eventually(new_ingest, "ingest restarted a third time")
    delays = re.findall(r"ingest was killed by SIGKILL after [\d.]+ s up; restart \d+ in ([\d.]+) s", log.read_text())
    assert [float(d) for d in delays] == [0.5, 1, 2]
    append_retrying(data_dir, endpoints["ingest"], "7d9f6c1e-0000-4000-8000-0000000000d1")
