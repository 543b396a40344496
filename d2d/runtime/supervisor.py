"""The one way the project starts, restarts and stops its processes: `d2d up`, the test fixtures
and the benchmarks all hold a `Supervisor`.

A supervisor starts children in order (each with its own log file, dying with its parent),
restarts dead ones only when its owner calls `watch_once` (so a test that kills a process sees it
stay dead), and stops them all: plain processes together (they drain in parallel), then the
servers with a stop of their own, last started first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from d2d.private import PRIVATE_UMASK, open_private, private_dir
from d2d.runtime.deathsig import dying_with_parent

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """How long to wait before restarting a child that died: `first`, doubling on each death up to
    `cap`; back to `first` when the child had stayed up `stable_after` seconds. A crash loop slows
    to one attempt per `cap` instead of spinning; a rare crash is restarted at once.

    Pure (the caller supplies the uptime), so the schedule can be pinned without a clock.
    """

    first: float = 0.5
    cap: float = 30.0
    stable_after: float = 60.0
    _next: float = field(init=False)

    def __post_init__(self) -> None:
        self._next = self.first

    def delay_after(self, uptime: float) -> float:
        """The delay before the next start of a child that ran `uptime` seconds and died."""
        if uptime >= self.stable_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay


@dataclass
class Child:
    """One supervised process: how to start it, the running process, and its restart schedule."""

    name: str
    launch: Callable[[], subprocess.Popen[bytes]]  # starts it (servers: until ready) and returns it
    backoff: Backoff = field(default_factory=Backoff)
    log_path: Path | None = None
    stop_server: Callable[[], None] | None = None  # a server's own orderly stop, instead of SIGTERM
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while it is dead and waiting out its backoff
    restarts: int = 0

    def start(self) -> None:
        self.process = self.launch()
        self.started_at = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """Everything it has written to its log file."""
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError, AssertionError):
            return "\n".join(self.log().splitlines()[-lines:])
        return ""

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM, then its exit code once it has drained (TimeoutExpired after `timeout`)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait(10)


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with {returncode}"


class Supervisor:
    """Children started in order, restarted on `watch_once`, stopped together by `stop_all`.

    `spawn` runs `python ARGS` in `cwd` with `env` over this process's environment (`base_env`
    under both), output appended to `log_dir/NAME.log`. With `private`, logs and anything the
    child writes are the owner's only. Its own session keeps Ctrl-C for the supervisor, which
    stops children in order. Use as a context manager to stop everything on exit.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        cwd: Path | None = None,
        base_env: Mapping[str, str] | None = None,
        private: bool = False,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.base_env = dict(base_env or {})
        self.private = private
        self.backoff = backoff
        self.children: list[Child] = []

    def spawn(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        """Start `python ARGS` as the child `name` (a name used again starts one more child)."""
        log_path = (private_dir(self.log_dir) if self.private else self._made(self.log_dir)) / f"{name}.log"
        full_env = {**os.environ, **self.base_env, **(env or {}), "PYTHONUNBUFFERED": "1"}

        def launch() -> subprocess.Popen[bytes]:
            with open_private(log_path) if self.private else open(log_path, "ab") as out:
                return subprocess.Popen(
                    dying_with_parent([sys.executable, *args]), cwd=self.cwd, env=full_env, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, umask=PRIVATE_UMASK if self.private else -1,
                )  # fmt: skip

        return self.adopt(name, launch, log_path=log_path)

    def adopt(
        self,
        name: str,
        launch: Callable[[], subprocess.Popen[bytes]],
        *,
        log_path: Path | None = None,
        stop: Callable[[], None] | None = None,
    ) -> Child:
        """Start a child from any `launch` (a server starts until ready); `stop` is its own stop."""
        child = Child(name, launch, self.backoff(), log_path, stop)
        child.start()
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        """The child last started under `name`."""
        return next(c for c in reversed(self.children) if c.name == name)

    def check_alive(self) -> None:
        """Raise, with the end of its log, if a child has exited."""
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.process.returncode}; end of {child.log_path}:\n{child.log_tail()}"
                )

    def watch_once(self) -> list[str]:
        """One supervision round: reap children that died and schedule their restart after their
        backoff; restart those whose delay is over. Returns one line per death and per restart.

        A child comes back as it was launched (servers: same port, same data); one that fails to
        start counts as dying again (so its next attempt waits longer).
        """
        lines = []
        for child in self.children:
            assert child.process is not None
            now = time.monotonic()
            if child.restart_at is None:
                returncode = child.process.poll()  # reaps it: no zombie
                if returncode is None:
                    continue
                uptime = now - child.started_at
                delay = child.backoff.delay_after(uptime)
                child.restart_at = now + delay
                child.restarts += 1
                lines.append(
                    f"{child.name} {exit_reason(returncode)} after {uptime:.1f} s up; "
                    f"restart {child.restarts} in {delay:g} s"
                )
            elif now >= child.restart_at:
                try:
                    child.start()
                except Exception as exc:  # noqa: BLE001 - any failure to start is retried later
                    delay = child.backoff.delay_after(0.0)
                    child.restart_at = time.monotonic() + delay
                    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    lines.append(f"{child.name} did not start ({first_line}); next attempt in {delay:g} s")
                else:
                    lines.append(f"{child.name} restarted (pid {child.process.pid})")
        for line in lines:
            log.info("%s", line)
        return lines

    def stop_all(self, timeout: float = 20) -> None:
        """Plain processes first, all at once (SIGTERM, killed after `timeout`), then the servers
        by their own stop, last started first."""
        plain = [c for c in self.children if c.stop_server is None and c.process is not None]
        for child in plain:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
        deadline = time.monotonic() + timeout
        for child in plain:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %gs; killing it", child.name, timeout)
                child.kill()
        for child in reversed(self.children):
            if child.stop_server is not None:
                child.stop_server()
        self.children.clear()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    @staticmethod
    def _made(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path
