"""Children that die with their parent, with no Python code run between fork and exec.

subprocess's `preexec_fn` runs Python in the forked child, which is unsafe when the parent has other
threads (gRPC's, above all): such a child crashed before it could exec ("Fatal Python error:
Segmentation fault" in `subprocess._execute_child`, seen in the test suite while a test started a
service). Instead the child is a fresh interpreter that asks the kernel for SIGTERM when its parent
dies (PR_SET_PDEATHSIG), checks that the parent is still there (it may have died before the request),
and execs the real program in the same process, which keeps both the request and the pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Sequence

_LAUNCHER = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except OSError:  # not Linux: the child outlives a parent that is killed
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("the parent exited before the child started")
os.execv(sys.argv[2], sys.argv[2:])
"""


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """The command that runs `argv` (its first item a path) as a child that gets SIGTERM when this
    process dies, however it dies."""
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]


def die_with_parent() -> None:
    """As a `preexec_fn`, for a child that runs as a user who cannot run this interpreter (so no
    launcher: Postgres): the same request, made in the forked child, with the risk the launcher
    avoids when this process has other threads."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
