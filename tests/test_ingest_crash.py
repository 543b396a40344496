"""The ingest service killed with SIGKILL mid-stream, then restarted: no accepted event is lost and
none is stored twice, whether events come over gRPC (the client retries what was not answered) or
over NATS (JetStream redelivers what was not acknowledged)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC

import grpc
import nats

from d2d.client import IngestClient, make_event
from d2d.eventlog import EventLog
from d2d.runtime.servers import NatsServer, free_port
from d2d.sim import PaymentsSimulator, SimConfig, load_contracts
from tests.conftest import settings_env

SERVE = ["-m", "services.ingest", "serve"]


def simulated(days: float = 0.5) -> list:
    return [
        make_event(e.type, e.entity_type, e.entity_id, e.payload_json(), occurred_at=e.occurred_at, event_id=e.event_id)
        for e in PaymentsSimulator(SimConfig(seed=3, days=days, payments_per_day=20_000)).events()
    ]


async def register_contracts(ingest: IngestClient) -> None:
    for spec in load_contracts():
        await ingest.create_contract_version(spec.event_type, owner=spec.owner, json_schema=spec.schema)


async def log_counts(event_log: EventLog) -> tuple[int, int]:
    async with event_log.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT event_id) FROM events"
            " WHERE type NOT IN ('contract.registered', 'api_key.created')"
        )
    return row[0], row[1]


async def test_grpc_client_retrying_after_a_sigkill_gets_every_event_stored_once(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    port = free_port()
    env = settings_env(database_url, nats_server.url, namespace, port)
    service = start_service(SERVE, env, "ingest")
    events = simulated()
    batches = [events[i : i + 200] for i in range(0, len(events), 200)]
    acknowledged: set[str] = set()
    failures = 0

    async with IngestClient(f"127.0.0.1:{port}") as ingest:
        await ingest.wait_ready()
        await register_contracts(ingest)

        async def send(batch: list) -> None:
            nonlocal failures
            while True:  # a producer's retry loop: resend until the batch is answered
                try:
                    response = await ingest.append(batch, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
                    failures += 1
                    await asyncio.sleep(0.2)
                    continue
                assert all(r.WhichOneof("outcome") == "seq" for r in response.results)
                acknowledged.update(r.event_id for r in response.results)
                return

        queue: asyncio.Queue = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(batch)

        async def worker() -> None:
            while not queue.empty():
                await send(queue.get_nowait())

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        while len(acknowledged) < len(events) // 3:
            await asyncio.sleep(0.01)
        service.kill()  # SIGKILL with requests in flight
        killed_at = len(acknowledged)
        start_service(SERVE, env, "ingest")
        await asyncio.gather(*workers)

    assert killed_at < len(events) and failures > 0, "the kill happened mid-stream"
    assert acknowledged == {e.event_id for e in events}
    assert await log_counts(event_log) == (len(events), len(events))


async def test_nats_intake_killed_mid_stream_stores_every_event_once(
    event_log: EventLog, database_url: str, nats_server: NatsServer, namespace: str, start_service
) -> None:
    port = free_port()
    env = settings_env(database_url, nats_server.url, namespace, port)
    service = start_service(SERVE, env, "ingest")
    async with IngestClient(f"127.0.0.1:{port}") as ingest:
        await ingest.wait_ready()
        await register_contracts(ingest)
    events = simulated(days=0.25)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    for e in events:
        body = {"event_id": e.event_id, "entity_type": e.entity_type, "entity_id": e.entity_id,
                "occurred_at": e.occurred_at.ToDatetime(tzinfo=UTC).isoformat(),
                "payload": json.loads(e.payload)}  # fmt: skip
        await js.publish_async(f"{namespace}.d2d.in.{e.type}", json.dumps(body).encode())
    await js.publish_async_completed()
    while (await log_counts(event_log))[0] < len(events) // 4:
        await asyncio.sleep(0.01)
    service.kill()
    stored_at_kill = (await log_counts(event_log))[0]
    assert stored_at_kill < len(events), "the kill happened mid-stream"
    start_service(SERVE, env, "ingest")
    for _ in range(600):
        if (await log_counts(event_log))[0] >= len(events):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # redeliveries of already-stored events would add rows now, if they could
    assert await log_counts(event_log) == (len(events), len(events))
    info = await js.consumer_info(f"{namespace.upper()}_D2D_INGEST", "ingest")
    assert info.num_pending == 0
    await nc.close()
