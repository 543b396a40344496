"""SQLAlchemy and Alembic plumbing: an async engine on asyncpg (for migrations, and for read paths
that compose filters with SQLAlchemy Core) and the Alembic configuration, built in code. The hot
paths use asyncpg pools (d2d.eventlog)."""

from __future__ import annotations

from typing import Any

import asyncpg
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool


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
