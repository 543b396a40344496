"""The data directory is private: what the platform writes there (logs, traces, endpoints, the
simulator's truth) is readable by its owner only, whatever umask the process was started with.

Modes are set explicitly, not left to the umask alone: a file or directory made by an earlier,
less careful version keeps its old mode when it is merely opened again.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Collection
from pathlib import Path
from typing import IO, Any

PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) and make it owner-only."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    return path


def open_private(path: Path, mode: str = "ab", **kwargs: Any) -> IO[Any]:
    """`open(path, mode)` for a file only its owner may read: created 0600, an existing one made 0600."""
    flags = os.O_CREAT | (os.O_RDWR if "+" in mode else os.O_WRONLY if "r" not in mode else os.O_RDONLY)
    flags |= os.O_APPEND if "a" in mode else os.O_TRUNC if "w" in mode else 0
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def write_private_text(path: Path, text: str) -> None:
    """Replace the contents of a private file at once: a reader sees the old text or the new one,
    never an empty or half-written file (written beside it, then renamed over it)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open_private(partial, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(partial, path)


def kept_secrets(path: Path, names: Collection[str], *, nbytes: int = 32) -> dict[str, str]:
    """A random secret for each of `names`, kept in the private JSON file `path`: those made before,
    and a new one for each name not there yet (other names in the file stay)."""
    kept = json.loads(path.read_text()) if path.exists() else {}
    missing = [name for name in names if name not in kept]
    if missing:
        kept.update({name: secrets.token_urlsafe(nbytes) for name in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_text(path, json.dumps(kept, indent=2))
    return {name: kept[name] for name in names}
