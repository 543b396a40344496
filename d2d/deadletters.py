"""Dead letters: input that was refused, kept with the bytes received and the reason.

Input larger than `limits.DEAD_LETTER_RAW_BYTES` keeps only that prefix, with the size and sha256
of the whole: a producer sending oversized events cannot fill the database through its refusals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from d2d.limits import DEAD_LETTER_RAW_BYTES


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
    raw_size: int
    raw_sha256: str

    @property
    def name(self) -> str:
        return f"deadLetters/{self.id}"

    @property
    def truncated(self) -> bool:
        """Only a prefix of the input was kept."""
        return self.raw_size > len(self.raw)


_COLUMNS = (
    "id, received_at, source, event_id, event_type, raw, code, reason, field, state, redriven_at, redriven_seq,"
    " raw_size, raw_sha256"
)


class DeadLetters:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def keep(self, rejected: Sequence[Rejected]) -> list[int]:
        """Store refused inputs in one transaction; returns their ids in order."""
        if not rejected:
            return []
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "INSERT INTO dead_letters (source, raw, code, reason, field, event_id, event_type, raw_size,"
                " raw_sha256) SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[],"
                " $6::text[], $7::text[], $8::bigint[], $9::text[]) RETURNING id",
                [r.source for r in rejected], [r.raw[:DEAD_LETTER_RAW_BYTES] for r in rejected],
                [r.code for r in rejected], [_text(r.reason) for r in rejected],
                [_text(r.field) or None for r in rejected], [_text(r.event_id)[:256] or None for r in rejected],
                [_text(r.event_type)[:256] or None for r in rejected], [len(r.raw) for r in rejected],
                [hashlib.sha256(r.raw).hexdigest() for r in rejected],
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


def _text(value: str | None) -> str:
    """Text Postgres can store, whatever the refused input held (NULs, lone surrogates)."""
    if not value:
        return ""
    return value.replace("\x00", "\\0").encode("utf-8", "replace").decode()
