"""Helpers shared by the benchmarks in `bench/` (each runs as `python -m bench.<name> [--quick]`).

The project's rule: performance is measured, not asserted. A benchmark starts its own real servers,
prints human-readable lines as it goes, and prints as its LAST line one JSON object holding every
figure together with the baselines measured in the same run (`emit`). This module holds what every
benchmark needs for that: the servers, service processes that cannot outlive the benchmark, CPU
accounting per process tree, percentiles and a description of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import psutil

from d2d import auth, dbroles, eventlog
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.runtime.services import SERVICES
from d2d.runtime.supervisor import Backoff, Child, Supervisor

ROOT = Path(__file__).resolve().parent.parent

# Benchmarks call the services as any client does, with an API key (auth is on, as in production):
# an admin key every database they create holds (`seed_bench_key`), in D2D_API_KEY so the services
# and baseline servers they start inherit it.
if not auth.key_id_of(os.environ.get("D2D_API_KEY", "")):
    os.environ["D2D_API_KEY"] = auth.new_key("admin", "bench")[0]
BENCH_KEY_CREATED = auth.created_event(os.environ["D2D_API_KEY"], "admin", "bench")


async def seed_bench_key(url: str) -> None:
    """Put the benchmarks' admin key in the (migrated) database at `url`."""
    await auth.add_key(url, BENCH_KEY_CREATED)


# ---------------------------------------------------------------------------------------------
# Output


def say(message: str = "") -> None:
    """One human-readable line, flushed at once (benchmarks are watched while they run)."""
    print(message, flush=True)


def emit(result: Mapping[str, Any]) -> None:
    """The benchmark's last line: one JSON object with every figure and its baselines."""
    print(json.dumps(result, separators=(", ", ": ")), flush=True)


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the `--quick` flag every benchmark has."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="a small run that finishes in well under a minute")
    return p


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def filesystem_of(path: Path) -> str:
    """The file system type holding `path` (tmpfs would make fsync meaningless)."""
    path = path.resolve()
    best = ("", "?")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(best[0]):
            best = (mount, part.fstype)
    return best[1]


# ---------------------------------------------------------------------------------------------
# Figures


@contextlib.contextmanager
def bench_dir(name: str, parent: Path | None, keep: bool) -> Iterator[Path]:
    """A temp dir for a run's servers and logs: removed after a clean run, kept (and named) after a
    failure or with --keep."""
    tmp = Path(tempfile.mkdtemp(prefix=f"d2d-bench-{name}-", dir=parent))
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"kept {tmp} (service logs in {tmp / 'logs'})")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.inf


def rounded(value: float, digits: int = 1) -> float:
    return round(value, digits)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.01, what: str = "condition"
) -> None:
    """Await `predicate()` every `interval` seconds until it is true; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:.0f}s")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Servers and processes


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` blocks stop what the benchmark started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


class Servers:
    """Real Postgres and NATS JetStream in `root`, on free ports; stopped on exit even after errors.

    `with Servers(tmp) as servers: url = await servers.new_database("x")`
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.postgres = EmbeddedPostgres(root / "pg", port=free_port(), fsync=fsync)
        self.nats = NatsServer(root / "nats", port=free_port())

    def __enter__(self) -> Servers:
        try:
            self.postgres.start()
            self.nats.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.nats.stop()
        with contextlib.suppress(Exception):
            self.postgres.stop()

    async def new_database(self, name: str) -> str:
        """A new database with the project's schema; returns its owner URL."""
        url = await asyncio.to_thread(self.postgres.create_database, name)
        await eventlog.migrate(url)
        await seed_bench_key(url)
        return url

    def cpu_roots(self) -> dict[str, tuple[int, bool]]:
        """CpuMeter roots for Postgres (with its backends), NATS and this benchmark's own process."""
        assert self.postgres.process is not None and self.nats.process is not None
        return {
            "postgres": (self.postgres.process.pid, True),
            "nats-server": (self.nats.process.pid, False),
            "bench client": (os.getpid(), False),
        }


@dataclass
class Phase:
    """One timed measurement: how many, how long, and the CPU seconds per process meanwhile."""

    count: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return per_second(self.count, self.seconds)


Service = Child  # a started service process: its name, process and log


class Services(Supervisor):
    """Python processes of the project (`python -m services.<x> <role>`), as `d2d up` starts them:
    each dies with the benchmark however it dies, and all are stopped on exit. A dead one is
    restarted only by `watch_once`, after `backoff()`'s delay (bench/faults.py's restart policy).
    """

    def __init__(self, log_dir: Path, backoff: Callable[[], Backoff] = Backoff) -> None:
        super().__init__(log_dir, cwd=ROOT, backoff=backoff)
        self._logins_on: set[str] = set()  # servers (host:port) whose service logins are made

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> Service:
        return self.spawn(name, args, self._own_login(args, env))

    def _own_login(self, args: Sequence[str], env: Mapping[str, str]) -> Mapping[str, str]:
        """`env` with a registered service's own database login in place of the owner's URL, as
        `d2d up` gives it (the logins are made on the first service started on a server)."""
        spec = next((s for s in SERVICES if tuple(args[-len(s.args) :]) == s.args), None)
        url = env.get("D2D_DATABASE_URL")
        if spec is None or not url:
            return env
        return {**env, "D2D_DATABASE_URL": self.login_url(url, spec.name)}

    def login_url(self, url: str, service: str) -> str:
        """The database at the owner's `url` as `service`'s own login (made on first use per server)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        passwords = dbroles.load_passwords(self.log_dir / dbroles.LOGINS_FILE)
        server = url.partition("://")[2].partition("/")[0].rpartition("@")[2]
        if server not in self._logins_on:
            with concurrent.futures.ThreadPoolExecutor(1) as thread:  # callers may be inside an event loop
                thread.submit(asyncio.run, dbroles.ensure_logins(url, passwords)).result()
            self._logins_on.add(server)
        return dbroles.login_url(url, service, passwords[service])


# ---------------------------------------------------------------------------------------------
# Where the CPU goes


REAPED = -1  # CpuMeter's key for the CPU of a root's reaped children


class CpuMeter:
    """CPU seconds (user + system) spent by labelled process trees between `start()` and `stop()`.

    `roots` maps a label to (pid, with_children). With children, the CPU of children the root
    started and reaped meanwhile counts too (a worker pool's processes, Postgres backends of
    connections opened and closed during the phase): the root's `children_user + children_system`
    grow by a reaped child's whole lifetime, less what it had used at `start()` if it was already
    there. (A grandchild that exits meanwhile is counted only up to the last sample before.)
    """

    def __init__(self, roots: Mapping[str, tuple[int, bool]]) -> None:
        self.roots = dict(roots)
        self._started: dict[str, dict[int, float]] = {}
        self._direct: dict[str, set[int]] = {}  # each root's own children at the last sample
        self._direct_at_start: dict[str, set[int]] = {}
        self._t0 = 0.0
        self.wall = 0.0

    def _sample(self) -> dict[str, dict[int, float]]:
        """Per label, CPU seconds by pid, and under the key REAPED the root's reaped children's."""
        found: dict[str, dict[int, float]] = {}
        for label, (pid, with_children) in self.roots.items():
            seconds: dict[int, float] = {}
            try:
                root = psutil.Process(pid)
                procs = [root, *(root.children(recursive=True) if with_children else [])]
                self._direct[label] = {c.pid for c in root.children()} if with_children else set()
            except psutil.Error:
                procs = []
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    seconds[p.pid] = t.user + t.system
                    if p is procs[0] and with_children:
                        seconds[REAPED] = t.children_user + t.children_system
            found[label] = seconds
        return found

    def start(self) -> None:
        self._started = self._sample()
        self._direct_at_start = {label: set(pids) for label, pids in self._direct.items()}
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """CPU seconds per label since `start()`."""
        self.wall = time.perf_counter() - self._t0
        now = self._sample()
        cpu: dict[str, float] = {}
        for label, pids in now.items():
            before = self._started.get(label, {})
            seconds = sum(t - before.get(pid, 0.0) for pid, t in pids.items())
            if REAPED in pids:  # the root's children gone since start() are in REAPED's growth from 0
                direct = self._direct_at_start.get(label, set())
                seconds -= sum(t for pid, t in before.items() if pid in direct and pid not in pids)
            cpu[label] = round(seconds, 2)
        return cpu

    @staticmethod
    def describe(cpu: Mapping[str, float], wall: float) -> str:
        """'label 1.2s (60%)' per label (percent of one core), busiest first, then the total."""
        parts = [
            f"{label} {sec:.2f}s ({100 * sec / wall:.0f}%)" for label, sec in sorted(cpu.items(), key=lambda kv: -kv[1])
        ]
        total = sum(cpu.values())
        summary = f"total {total:.2f} CPU-s in {wall:.2f}s wall ({100 * total / wall:.0f}% of one core)"
        return ", ".join(parts) + "; " + summary


# ---------------------------------------------------------------------------------------------
# The empty-handler baseline of the latency benchmarks


class AdmitAll(auth.KeyRing):
    """Admits every call as admin without looking at its key: the platform's plumbing less the key
    check, so a benchmark can price the check. Only the benchmarks' baseline servers build one
    (`serve_empty`, bench.ingest's keyless ingest server); services cannot."""

    def __init__(self) -> None:
        super().__init__(None)

    async def authenticate(self, token: str | None) -> auth.Principal:
        return auth.Principal("unchecked", auth.ADMIN)


async def serve_empty(
    service: Any, method: str, bare_port: int, platform_port: int, keyless_port: int | None = None
) -> None:
    """The baseline servers of a latency benchmark, run in a process of their own until SIGTERM.

    On `bare_port`: a bare `grpc.aio.server()` answering `/{service}/{method}` with b"" (an empty
    response message) without decoding the request: no (de)serializers, bytes in, bytes out. On
    `platform_port`: every method of `service` (a ServiceDescriptor) answering an empty response,
    served the platform's way (`grpcserver.new_server` + `add_service`: a traced span per call,
    exported as JSON lines under D2D_DATA_DIR; requests decoded; the API key checked), as a service's
    __main__ runs it. On `keyless_port`, if given: the same, except that no key is checked (every call
    admitted as admin), to price the check.
    """
    import grpc
    from google.protobuf import message_factory

    from d2d import grpcserver, telemetry
    from d2d.config import GrpcTls
    from d2d.runtime.process import stop_on_signals

    stop = stop_on_signals()
    options = [
        ("grpc.max_receive_message_length", grpcserver.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", grpcserver.MAX_MESSAGE_BYTES),
    ]

    async def empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    bare = grpc.aio.server(options=options)
    handler = grpc.unary_unary_rpc_method_handler(empty)
    bare.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service.full_name, {method: handler})])
    bare.add_insecure_port(f"127.0.0.1:{bare_port}")  # grpc raises if it cannot bind

    def empty_answer(response_type: Any) -> Callable[[Any, Any], Awaitable[Any]]:
        async def answer(request: Any, context: Any) -> Any:
            return response_type()

        return answer

    # Each method answers an empty message of its response type.
    responses = {m.name: message_factory.GetMessageClass(m.output_type) for m in service.methods}
    empty_api = type("EmptyApi", (), {name: staticmethod(empty_answer(t)) for name, t in responses.items()})
    telemetry.setup_tracing("bench-empty", Path(os.environ.get("D2D_DATA_DIR", ".d2d")))
    platform_server, health = grpcserver.new_server([service.full_name])
    grpcserver.add_service(platform_server, service, empty_api(), auth.KeyRing.of(BENCH_KEY_CREATED))
    grpcserver.listen(platform_server, f"127.0.0.1:{platform_port}", GrpcTls(), "empty server")
    keyless = None
    if keyless_port is not None:
        keyless, keyless_health = grpcserver.new_server([service.full_name])
        grpcserver.add_service(keyless, service, empty_api(), AdmitAll())
        grpcserver.listen(keyless, f"127.0.0.1:{keyless_port}", GrpcTls(), "empty server, no key check")
        await keyless.start()
        await grpcserver.set_serving(keyless_health, [service.full_name])
    await bare.start()
    await platform_server.start()
    await grpcserver.set_serving(health, [service.full_name])
    try:
        await stop.wait()
    finally:
        await bare.stop(1)
        await platform_server.stop(1)
        if keyless is not None:
            await keyless.stop(1)
        telemetry.shutdown_tracing()


@contextlib.contextmanager
def postgres_server(root: Path) -> Iterator[EmbeddedPostgres]:
    """Postgres alone (fsync on), stopped on exit even after errors."""
    postgres = EmbeddedPostgres(root / "pg", port=free_port(), fsync=True)
    try:
        postgres.start()
        yield postgres
    finally:
        with contextlib.suppress(Exception):
            postgres.stop()
