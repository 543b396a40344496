"""Alembic's environment for d2d, configured in code (no alembic.ini at runtime).

`d2d.eventlog.migrate` hands over its connection (an async engine on asyncpg, run through
`run_sync`, holding the migration lock) in `config.attributes["connection"]`. Without one, as from
the `alembic` command line (`[tool.alembic]` in pyproject.toml: `alembic check`, `alembic revision`),
it connects to D2D_DATABASE_URL, without that lock: migrate deployments with `d2d migrate`.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from d2d import schema
from d2d.db import async_engine

config = context.config


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=config.attributes.get("target_metadata", schema.metadata),
        # Each revision in its own transaction, as the numbered SQL files were applied.
        transaction_per_migration=True,
        compare_type=True,
        compare_server_default=True,
        on_version_apply=config.attributes.get("on_version_apply"),
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    engine = async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("d2d's migrations run against a database (no --sql mode): the functions are plpgsql")
if (handed_over := config.attributes.get("connection")) is not None:
    run_migrations(handed_over)
else:
    asyncio.run(run_from_url(os.environ["D2D_DATABASE_URL"]))
