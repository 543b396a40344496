"""SQLAlchemy and Alembic plumbing: an async engine on asyncpg (for migrations, and for read paths
that compose filters with SQLAlchemy Core), Alembic's configuration built in code, and the upgrade
`d2d.eventlog.migrate` runs. The hot paths use asyncpg pools (d2d.eventlog)."""

from __future__ import annotations

from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

__all__ = ["ProgrammingError", "alembic_config", "async_engine", "text", "upgrade_to_head"]


def async_engine(url: str) -> AsyncEngine:
    """An engine whose connections asyncpg opens from `url` itself, so every URL the asyncpg pools
    accept (the same `postgresql://` DSN, its query options) works here too; no pool is kept."""
    return create_async_engine("postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(url), poolclass=NullPool)


def alembic_config(**attributes: Any) -> Config:
    """Alembic's configuration without an alembic.ini: the revisions in d2d/migrations/versions.
    d2d/migrations/env.py reads `connection` (a sync facade of an async connection, from
    `run_sync`) and, optionally, `on_version_apply` and `target_metadata` from `attributes`."""
    config = Config()
    config.set_main_option("script_location", "d2d:migrations")
    config.attributes.update(attributes)
    return config


def upgrade_to_head(conn: Connection) -> list[str]:
    """Alembic `upgrade head` on `conn` (outside a transaction: each revision commits on its own);
    returns the revisions applied, oldest first."""
    _adopt_numbered_sql_history(conn)
    applied: list[str] = []

    def on_version_apply(*, step: Any, **_: Any) -> None:
        if step.is_upgrade:
            applied.append(step.up_revision_id)

    command.upgrade(alembic_config(connection=conn, on_version_apply=on_version_apply), "head")
    _set_append_rights(conn)
    return applied


def _set_append_rights(conn: Connection) -> None:
    """Which event types each service's login may append (migration 0014), as this version's
    platform contracts say, set on every migration by a role owning the rights' function (a
    service's own login migrates nothing and sets nothing)."""
    from d2d.dbroles import append_rights_sql

    owner = "SELECT pg_has_role(proowner, 'USAGE') FROM pg_proc WHERE proname = 'd2d_append_rights'"
    if conn.exec_driver_sql(owner).scalar():
        conn.exec_driver_sql(append_rights_sql())
        conn.commit()


def _adopt_numbered_sql_history(conn: Connection) -> None:
    """A database that the numbered-SQL runner migrated (a `schema_migrations` table, no
    `alembic_version`) already has the schema up to its last file. Upgrading it from nothing would
    fail on the first CREATE TABLE, so it is stamped at the revision of that file and upgraded from
    there; its `schema_migrations` table goes in the same transaction, so one record of what ran
    remains and the schema equals a fresh database's."""
    found = conn.execute(
        text("SELECT to_regclass('schema_migrations') IS NOT NULL, to_regclass('alembic_version') IS NULL")
    ).one()
    if not all(found):
        conn.commit()
        return
    last = conn.execute(text("SELECT max(version) FROM schema_migrations")).scalar_one()
    if last is not None:
        # Revision ids begin with the number of the SQL file they replace (0001_event_log.sql is
        # revision 0001_event_log), and that runner applied its files in order, with no gaps.
        config = alembic_config(connection=conn)
        revisions = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]
        matching = [r for r in revisions if r.startswith(f"{last:04d}_")]
        if len(matching) != 1:
            raise RuntimeError(f"schema_migrations ends at {last}: no single revision in d2d/migrations matches it")
        command.stamp(config, matching[0])
    conn.execute(text("DROP TABLE schema_migrations"))
    conn.commit()
