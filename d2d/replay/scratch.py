"""A scratch database next to the log's, for state rebuilt from the log (projections at a point,
verify's rebuild): created, migrated, handed out, and dropped afterwards whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg

from d2d import eventlog


def _with_database(url: str, database: str) -> str:
    base, _, query = url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{database}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def scratch_database(url: str, purpose: str = "replay") -> AsyncIterator[str]:
    """The URL of a fresh, migrated database on the server of `url` (whose role must be allowed to
    create databases: the owner's), dropped on exit."""
    name = f"d2d_{purpose}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    scratch = _with_database(url, name)
    try:
        await eventlog.migrate(scratch)
        yield scratch
    finally:
        await _drop(url, name)


async def _drop(url: str, name: str, attempts: int = 5) -> None:
    """Drop the scratch database. Plainly first: Postgres stops an autovacuum worker on it by itself,
    while WITH (FORCE) would have to signal it, which a role that is not a superuser may not do.
    FORCE only for a connection still open on it."""
    admin = await asyncpg.connect(url)
    try:
        for attempt in range(attempts):
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
                return
            except asyncpg.ObjectInUseError:
                with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
