"""Dead letters: input that was refused, kept with the exact bytes received and the reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused input to keep."""

    source: str
    raw: bytes
    code: str
    reason: str
    field: str = ""
    event_id: str | None = None
    event_type: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    received_at: datetime
    source: str
    event_id: str | None
    event_type: str | None
    raw: bytes
    code: str
    reason: str
    field: str | None
    state: str
    redriven_at: datetime | None
    redriven_seq: int | None

    @property
    def name(self) -> str:
        return f"deadLetters/{self.id}"


_COLUMNS = "id, received_at, source, event_id, event_type, raw, code, reason, field, state, redriven_at, redriven_seq"


class DeadLetters:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def keep(self, rejected: Sequence[Rejected]) -> list[int]:
        """Store refused inputs in one transaction; returns their ids in order."""
        if not rejected:
            return []
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "INSERT INTO dead_letters (source, raw, code, reason, field, event_id, event_type)"
                " SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[],"
                " $6::text[], $7::text[]) RETURNING id",
                [r.source for r in rejected], [r.raw for r in rejected], [r.code for r in rejected],
                [r.reason for r in rejected], [r.field or None for r in rejected],
                [r.event_id for r in rejected], [r.event_type for r in rejected],
            )  # fmt: skip
        return [r["id"] for r in rows]

    async def list(
        self,
        *,
        event_type: str | None = None,
        include_redriven: bool = False,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[DeadLetter]:
        """Newest first."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM dead_letters WHERE ($1::text IS NULL OR event_type = $1)"
                " AND ($2 OR state = 'PENDING') AND ($3::bigint IS NULL OR id < $3)"
                " ORDER BY id DESC LIMIT $4",
                event_type, include_redriven, before_id, limit,
            )  # fmt: skip
        return [DeadLetter(*r.values()) for r in rows]

    async def get(self, ids: Sequence[int]) -> list[DeadLetter]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM dead_letters WHERE id = ANY($1::bigint[]) ORDER BY id", list(ids)
            )
        return [DeadLetter(*r.values()) for r in rows]

    async def count(self, *, pending_only: bool = True) -> int:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                "SELECT count(*) FROM dead_letters WHERE NOT $1 OR state = 'PENDING'", pending_only
            )

    async def mark_redriven(self, id_: int, seq: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE dead_letters SET state = 'REDRIVEN', redriven_at = now(), redriven_seq = $2"
                " WHERE id = $1",
                id_, seq,
            )  # fmt: skip

    async def note_new_reason(self, id_: int, code: str, reason: str, field: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE dead_letters SET code = $2, reason = $3, field = $4 WHERE id = $1",
                id_, code, reason, field or None,
            )  # fmt: skip
