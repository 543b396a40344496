"""The event log on a real Postgres: idempotency, append-only, gap-free tailing."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from d2d.dbroles import login_role
from d2d.eventlog import EventLog, GroupCommitter, NewEvent
from tests.conftest import service_url


def new_event(i: int = 0, **overrides: object) -> NewEvent:
    fields = dict(
        event_id=uuid.uuid4(),
        type="test.happened",
        schema_version=1,
        entity_type="thing",
        entity_id=f"thing_{i}",
        occurred_at=datetime.now(UTC),
        payload=f'{{"i": {i}}}',
    )
    fields.update(overrides)
    return NewEvent(**fields)  # type: ignore[arg-type]


async def count_rows(log: EventLog) -> int:
    async with log.pool.acquire() as conn:
        return await conn.fetchval("SELECT count(*) FROM events")


async def test_repeated_event_id_returns_first_position_and_stores_nothing(event_log: EventLog) -> None:
    first = new_event(1)
    stored = (await event_log.append([first, new_event(2)]))[0]
    again = await event_log.append([new_event(3), dataclasses.replace(first, payload='{"i": 99}')])
    assert again[1].duplicate and again[1].seq == stored.seq
    assert not again[0].duplicate and again[0].seq == 3
    assert await count_rows(event_log) == 3
    kept = await event_log.get(first.event_id)
    assert kept is not None and kept.payload == {"i": 1}


async def test_repeat_inside_one_batch_is_stored_once(event_log: EventLog) -> None:
    e = new_event(1)
    results = await event_log.append([e, new_event(2), e])
    assert [r.seq for r in results] == [1, 2, 1]
    assert [r.duplicate for r in results] == [False, False, True]
    assert await count_rows(event_log) == 2


@pytest.mark.parametrize(
    "statement",
    ["UPDATE events SET type = 'changed'", "DELETE FROM events", "TRUNCATE events"],
)
async def test_a_service_login_cannot_change_the_log(database_url: str, event_log: EventLog, statement: str) -> None:
    await event_log.append([new_event(1)])
    conn = await asyncpg.connect(service_url(database_url, "ingest"))
    try:
        assert await conn.fetchval("SELECT current_user") == login_role("ingest")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.execute(statement)
    finally:
        await conn.close()
    assert await count_rows(event_log) == 1


@pytest.mark.parametrize(
    "statement",
    ["UPDATE events SET type = 'changed'", "DELETE FROM events", "TRUNCATE events CASCADE"],
)
async def test_even_the_owner_cannot_change_the_log(database_url: str, event_log: EventLog, statement: str) -> None:
    await event_log.append([new_event(1)])
    owner = await asyncpg.connect(database_url)
    try:
        assert await owner.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await owner.execute(statement)
    finally:
        await owner.close()
    assert await count_rows(event_log) == 1


async def test_tailing_reader_sees_every_event_once_in_order_under_8_slow_writers(event_log: EventLog) -> None:
    """8 writers whose transactions linger after inserting (slow commits); a reader tails the
    log meanwhile. With positions assigned under the append lock, the reader never skips one."""
    writers, batches_each, batch_size = 8, 25, 4
    expected = writers * batches_each * batch_size
    rng = random.Random(1)
    written: set[uuid.UUID] = set()

    async def writer(w: int) -> None:
        for b in range(batches_each):
            batch = [new_event(w * 10_000 + b * 10 + k) for k in range(batch_size)]
            async with event_log.pool.acquire() as conn, conn.transaction():
                await event_log.append(batch, conn=conn)
                await conn.execute("SELECT pg_sleep($1)", rng.uniform(0, 0.01))
            written.update(e.event_id for e in batch)

    seen: list[tuple[int, uuid.UUID]] = []

    async def reader() -> None:
        async for event in event_log.tail(0, batch=7, poll_interval=0.01):
            seen.append((event.seq, event.event_id))
            if len(seen) == expected:
                return

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    await asyncio.wait_for(reading, 30)
    seqs = [s for s, _ in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert {e for _, e in seen} == written
    assert seqs == list(range(1, expected + 1))


async def test_rolled_back_append_leaves_no_trace_and_positions_stay_dense(event_log: EventLog) -> None:
    await event_log.append([new_event(1)])
    with pytest.raises(RuntimeError):
        async with event_log.pool.acquire() as conn, conn.transaction():
            await event_log.append([new_event(2)], conn=conn)
            raise RuntimeError("abort")
    [later] = await event_log.append([new_event(3)])
    assert later.seq == 2
    assert [e.seq for e in await event_log.read(0)] == [1, 2]


async def test_group_committer_folds_concurrent_appends_and_answers_each(event_log: EventLog) -> None:
    committer = GroupCommitter(event_log)
    batches = [[new_event(i * 100 + k) for k in range(5)] for i in range(40)]
    results = await asyncio.gather(*(committer.append(b) for b in batches))
    await committer.close()
    for batch, result in zip(batches, results, strict=True):
        assert [r.event_id for r in result] == [e.event_id for e in batch]
    all_seqs = sorted(r.seq for result in results for r in result)
    assert all_seqs == list(range(1, 201))
    for result in results:  # a request's events stay contiguous and in order
        assert [r.seq for r in result] == list(range(result[0].seq, result[0].seq + 5))


async def transactions_of(log: EventLog, event_ids: list[uuid.UUID]) -> dict[int, list[uuid.UUID]]:
    """The inserting transaction (`xmin`) of each stored event: rows of one transaction share it."""
    async with log.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT xmin::text::bigint AS tx, event_id FROM events WHERE event_id = ANY($1) ORDER BY seq", event_ids
        )
    by_tx: dict[int, list[uuid.UUID]] = {}
    for row in rows:
        by_tx.setdefault(row["tx"], []).append(row["event_id"])
    return by_tx


async def test_group_committer_commits_concurrent_appends_in_fewer_transactions_than_calls(
    event_log: EventLog,
) -> None:
    committer = GroupCommitter(event_log)
    calls = [[new_event(i * 100 + k) for k in range(3)] for i in range(50)]
    try:
        await asyncio.gather(*(committer.append(batch) for batch in calls))
    finally:
        await committer.close()
    by_tx = await transactions_of(event_log, [e.event_id for batch in calls for e in batch])
    assert sum(len(ids) for ids in by_tx.values()) == 150
    # The first call may commit alone; every call queued behind it joins the next transaction.
    assert len(by_tx) <= 3, {tx: len(ids) for tx, ids in by_tx.items()}
    assert max(len(ids) for ids in by_tx.values()) >= 3 * 40
    for batch in calls:  # one call's events are never split over transactions
        assert len({tx for tx, ids in by_tx.items() if batch[0].event_id in ids or batch[-1].event_id in ids}) == 1


async def test_without_the_committer_each_append_is_its_own_transaction(event_log: EventLog) -> None:
    """The contrast that makes the test above mean something: plain concurrent appends do not share."""
    calls = [[new_event(i)] for i in range(10)]
    await asyncio.gather(*(event_log.append(batch) for batch in calls))
    assert len(await transactions_of(event_log, [b[0].event_id for b in calls])) == 10
