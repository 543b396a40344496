"""The outbox relay as its own process against real Postgres and NATS: killed mid-stream, or with
NATS stopped under it, every event of the log ends up on the stream exactly once, in order."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from d2d.eventlog import EventLog
from d2d.outbox import relay_name
from d2d.runtime.servers import NatsServer, free_port
from tests.conftest import settings_env
from tests.test_eventlog import new_event

RELAY = ["-m", "services.ingest", "relay"]


async def stream_contents(nats_url: str, namespace: str) -> list[tuple[int, str]]:
    """(D2D-Seq header, Nats-Msg-Id) of every message on the namespace's events stream."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = f"{namespace.upper()}_D2D_EVENTS"
    total = (await js.stream_info(stream)).state.messages
    sub = await js.pull_subscribe(
        f"{namespace}.d2d.events.>", stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )  # fmt: skip
    found: list[tuple[int, str]] = []
    while len(found) < total:
        for m in await sub.fetch(1000, timeout=5):
            found.append((int(m.headers["D2D-Seq"]), m.headers["Nats-Msg-Id"]))
    await nc.close()
    return found


async def stream_count(nats_url: str, namespace: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        return (await nc.jetstream().stream_info(f"{namespace.upper()}_D2D_EVENTS")).state.messages
    except Exception:
        return 0
    finally:
        await nc.close()


async def wait_until(predicate, timeout: float = 60, interval: float = 0.05) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


async def append_many(
    event_log: EventLog, batches: int, size: int, pause: float = 0.0, first: int = 0
) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    for b in range(batches):
        batch = [new_event(first + b * size + i) for i in range(size)]
        await event_log.append(batch)
        ids.extend(e.event_id for e in batch)
        if pause:
            await asyncio.sleep(pause)
    return ids


def assert_exactly_once_in_order(published: list[tuple[int, str]], ids: list[uuid.UUID]) -> None:
    seqs = [s for s, _ in published]
    assert seqs == list(range(1, len(ids) + 1)), "each position once, in log order"
    assert [m for _, m in published] == [str(i) for i in ids]


async def test_relay_killed_mid_stream_publishes_every_event_exactly_once(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    env = settings_env(database_url, nats_server.url, namespace)
    relay = start_service(RELAY, env, "relay")
    # The writer goes on until the kill, and 30 batches after it (on a loaded machine a fixed number of
    # batches could all be in the log before the relay has published the first 3,000).
    killed = asyncio.Event()

    async def write_until_killed_and_after() -> list[uuid.UUID]:
        ids: list[uuid.UUID] = []
        while not killed.is_set():
            ids += await append_many(event_log, batches=1, size=200, first=len(ids))
            await asyncio.sleep(0.01)
        return ids + await append_many(event_log, batches=30, size=200, pause=0.01, first=len(ids))

    writing = asyncio.create_task(write_until_killed_and_after())
    await wait_until(lambda: _at_least(nats_server.url, namespace, 3000))
    relay.kill()  # SIGKILL, mid-stream: the writer is still appending
    killed.set()
    published_at_kill = await stream_count(nats_server.url, namespace)
    ids_so_far = await event_log.head()
    restarted = start_service(RELAY, env, "relay")
    ids = await writing
    assert 0 < published_at_kill < len(ids)
    assert ids_so_far < len(ids)
    await wait_until(lambda: _at_least(nats_server.url, namespace, len(ids)), timeout=120)
    await asyncio.sleep(1.0)  # anything published twice would show up as extra messages now
    assert_exactly_once_in_order(await stream_contents(nats_server.url, namespace), ids)
    assert await event_log.position(relay_name(f"{namespace.upper()}_D2D_EVENTS")) == len(ids)
    assert restarted.terminate() == 0, restarted.log()


async def test_nats_down_during_appends_loses_nothing(
    event_log: EventLog, database_url: str, tmp_path: Path, namespace: str, start_service
) -> None:
    own_nats = NatsServer(tmp_path / "nats", port=free_port())  # this test stops its NATS
    own_nats.start()
    try:
        relay = start_service(RELAY, settings_env(database_url, own_nats.url, namespace), "relay")
        ids = await append_many(event_log, batches=10, size=100)
        await wait_until(lambda: _at_least(own_nats.url, namespace, 1000))
        own_nats.stop()
        ids += await append_many(event_log, batches=20, size=100, pause=0.02)  # appends go on
        assert await event_log.head() == 3000
        await asyncio.sleep(1.0)
        own_nats.start()  # same data directory and port
        ids += await append_many(event_log, batches=10, size=100)
        await wait_until(lambda: _at_least(own_nats.url, namespace, len(ids)), timeout=120)
        await asyncio.sleep(1.0)
        assert_exactly_once_in_order(await stream_contents(own_nats.url, namespace), ids)
        print(relay.log()[-3000:])
        assert relay.terminate() == 0, relay.log()
    finally:
        own_nats.stop()


async def _at_least(nats_url: str, namespace: str, n: int) -> bool:
    return await stream_count(nats_url, namespace) >= n


async def test_log_positions_is_written_at_most_once_a_second_while_publishing_steadily(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str
) -> None:
    """Every write of the relay's position is recorded by a trigger with the database's clock (the
    test owns its database): while events arrive every few milliseconds for about three seconds,
    the relay publishes many batches but writes its position at most once a second."""
    import asyncpg

    from d2d import bus
    from d2d.outbox import OutboxRelay

    owner = await asyncpg.connect(database_url)
    await owner.execute(
        "CREATE TABLE test_position_writes (seq bigint, at timestamptz);"
        " GRANT INSERT ON test_position_writes TO PUBLIC;"
        " CREATE FUNCTION test_record_position() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO test_position_writes VALUES (NEW.seq, clock_timestamp()); RETURN NULL; END $$;"
        " CREATE TRIGGER test_record_position AFTER INSERT OR UPDATE ON log_positions"
        " FOR EACH ROW EXECUTE FUNCTION test_record_position();"
    )
    topology = bus.Topology(namespace)
    nc = await nats.connect(nats_server.url)
    relay = OutboxRelay(
        event_log, nc.jetstream(), name=f"relay:{topology.events_stream}", stream=topology.events_stream,
        subject_prefix=topology.events_prefix,
    )  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        ids = await append_many(event_log, batches=150, size=3, pause=0.02)  # about three seconds
        await wait_until(lambda: _published(relay, len(ids)))
        writes_while_publishing = await owner.fetch("SELECT seq, at FROM test_position_writes ORDER BY at")
        stop.set()
        await running
        final = await owner.fetch("SELECT seq, at FROM test_position_writes ORDER BY at")
    finally:
        stop.set()
        await nc.close()
        await owner.close()
    assert final[-1]["seq"] == len(ids)  # stopping keeps what is acknowledged
    assert relay.stats.batches >= 20, relay.stats
    assert 3 <= len(writes_while_publishing) <= relay.stats.batches // 5, (len(writes_while_publishing), relay.stats)
    # Between writes while publishing at least a second passed; only the writes on falling idle or
    # stopping (at most the last two) may follow sooner.
    steady = [w["at"] for w in writes_while_publishing[:-1]]
    gaps = [(b - a).total_seconds() for a, b in zip(steady, steady[1:], strict=False)]
    assert gaps and all(g >= 1.0 for g in gaps), gaps


async def _published(relay, count: int) -> bool:  # noqa: ANN001
    return relay.stats.position >= count


async def test_the_relay_outlives_postgres_going_away_and_resumes(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service, postgres
) -> None:
    """Postgres refusing every connection (its backends terminated) does not end the relay's
    process: it waits, takes the leader lock again and publishes what came meanwhile, once each."""
    import asyncpg

    relay = start_service(RELAY, settings_env(database_url, nats_server.url, namespace), "relay")
    ids = await append_many(event_log, batches=5, size=100)
    await wait_until(lambda: _at_least(nats_server.url, namespace, len(ids)))
    database = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres.admin_url())
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = ''"
            " AND pid <> pg_backend_pid()",
            database,
        )
        await asyncio.sleep(2.0)  # the relay notices and backs off
        assert relay.process.poll() is None, relay.log()
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    ids += await append_many(event_log, batches=5, size=100)
    await wait_until(lambda: _at_least(nats_server.url, namespace, len(ids)), timeout=60)
    await asyncio.sleep(1.0)
    assert_exactly_once_in_order(await stream_contents(nats_server.url, namespace), ids)
    assert "the event log is unreachable" in relay.log()
    assert relay.terminate() == 0, relay.log()


async def test_events_committed_one_by_one_close_together_are_published_in_one_batch(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service, tmp_path: Path
) -> None:
    """Idle, the relay lingers (D2D_RELAY_LINGER_MS; long here, so that a busy machine still commits
    the five in time) and publishes the events of five transactions as one batch."""
    env = {**settings_env(database_url, nats_server.url, namespace), "D2D_RELAY_LINGER_MS": "1000"}
    relay = start_service(RELAY, env, "relay")
    ids = await append_many(event_log, batches=1, size=1)
    await wait_until(lambda: _at_least(nats_server.url, namespace, 1))
    await asyncio.sleep(0.5)  # the relay reads once more, finds nothing and waits: idle
    events = [new_event(i) for i in range(5)]
    appended = await asyncio.gather(*(event_log.append([e]) for e in events))  # five transactions
    ids += [e.event_id for _, e in sorted(zip((a.seq for [a] in appended), events, strict=True))]
    await wait_until(lambda: _at_least(nats_server.url, namespace, len(ids)))
    assert_exactly_once_in_order(await stream_contents(nats_server.url, namespace), ids)
    assert relay.terminate() == 0, relay.log()
    spans = [
        orjson.loads(line) for line in (tmp_path / "data" / "traces" / "ingest-relay.jsonl").read_bytes().splitlines()
    ]
    batches = [
        (s["attributes"]["d2d.first_seq"], s["attributes"]["d2d.last_seq"])
        for s in spans
        if s["name"] == "relay.publish"
    ]
    assert batches == [(1, 1), (2, 6)]
