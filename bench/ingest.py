"""Ingest benchmark: how fast events become durable, beside what the raw parts can do.

`python -m bench.ingest [--quick] [--inflight 4] [--batch 500] [--trickle-rate 200]`

What is measured, in one run, on real servers started in a temp dir (Postgres with fsync ON, so a
commit waits for the WAL to reach the disk, and NATS JetStream with file storage):

1. Durable ingest throughput. The ingest service runs as `d2d up` runs it: two OS processes,
   `python -m services.ingest serve` (gRPC API: validation against the contracts, group commit to
   the Postgres event log) and `python -m services.ingest relay` (outbox relay: log -> JetStream).
   One client sends N simulator events (built as `d2d.v1.Event` protos before timing) in
   AppendEvents requests of `--batch` events, `--inflight` requests at a time. The clock runs
   from the first request until every response has returned (all committed in Postgres) AND the
   namespace's events stream holds all N (acknowledged by JetStream, polled every 10 ms). An event
   counts as durable only then: committed in Postgres and stored by JetStream.
2. Baseline A: nats-py `js.publish_async` of the same N JSON envelopes (the bodies the relay
   would publish, built in Python, similar size) with `Nats-Msg-Id` headers, to a fresh stream with
   the events stream's configuration, until every ack has arrived. The ceiling for the relay's
   half of the work with this client library on this NATS server.
3. Baseline B: asyncpg `copy_records_to_table` of the same N rows into a fresh migrated
   database, into `events_copy (LIKE events INCLUDING DEFAULTS)`: the events columns without
   primary key, unique constraint, indexes or triggers. Also reported: the same COPY into
   `events_copy_indexed (LIKE events INCLUDING ALL)`, which has the primary key, the unique
   event_id and the three indexes of `events` (still no triggers). The ceiling for the log's half.
4. One-event append latency: sequential AppendEvents calls of one event each, with the service
   up and idle otherwise; time until the response, i.e. committed in Postgres. It does NOT include
   the JetStream ack (the relay publishes after the commit).

5. Bus latency at a low rate, with and without the relay's linger (`D2D_RELAY_LINGER_MS`): one-event
   AppendEvents calls sent at random (Poisson) times, `--trickle-rate` a second on average, without
   waiting for each other (as decisions commit); time from sending each until a subscriber on the
   events subjects receives it from the relay. The relay is restarted with the linger off (0) and
   with its default, in turn for `TRICKLE_ROUNDS` rounds (so a busy moment of the machine falls on
   both alike); the batches it published (its `relay.publish` spans) are counted for each.
6. What the API key check costs ingest: the ingest API (assembled as `services/ingest/server.py`
   assembles it) served twice by one process (`python -m bench.ingest --serve-keyed-and-keyless`),
   both servers appending through the same Ingestor to a fresh database: one checks each call's key
   as a service does, the other admits every call unchecked (`AdmitAll`, built only by benchmarks).
   The same N events, in the same batches and `--inflight` as in 3, go to each, a quarter at a time
   in the order checked, unchecked, unchecked, checked, then unchecked, checked, checked, unchecked
   (so a drift of the machine or of the table falls on both alike; an event sent to both has a fresh
   id the second time); timed until every response (committed in Postgres; no relay runs). Issue 15
   asks the two to be within 10 %.
7. What the append rights cost (migration 0014: a trigger holds each service's login to its own
   event types): one-event `append_events` calls straight to Postgres as serving's login, appending
   its own `decision.made`, with the trigger on and disabled by the owner, in rounds of
   `RIGHTS_CALLS` calls in the order on, off, off, on (a fresh database; no service in the way).

Why: ingest is the front door of the platform, and "durable" means both stores have the event.
The ratio durable ingest / raw publish_async says how much of the bus's speed the whole path keeps
(target: 0.5). CPU seconds per process (service, relay, Postgres, NATS, this client) are printed
for each phase, which shows where the time goes.

The last line printed is one JSON object with every figure and its baselines (see bench/_common).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import nats
import orjson
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bench._common import (
    AdmitAll,
    CpuMeter,
    Phase,
    Servers,
    Services,
    bench_dir,
    emit,
    filesystem_of,
    machine,
    parser,
    per_second,
    percentile,
    rounded,
    say,
    stop_on_sigterm,
    wait_until,
)
from d2d import auth, bus, grpcserver, outbox
from d2d.client import IngestClient, make_event
from d2d.config import GrpcTls, Settings
from d2d.contracts.platform import register_platform_contracts
from d2d.contracts.registry import ContractRegistry
from d2d.deadletters import DeadLetters
from d2d.eventlog import _APPEND_SQL, APPEND_LOCK_KEY, EventLog, GroupCommitter, create_pool
from d2d.outbox import DEFAULT_LINGER
from d2d.runtime.process import run_service, stop_on_signals
from d2d.runtime.servers import free_port
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.payments import ContractSpec
from d2d.v1 import event_pb2
from services.ingest import api
from services.ingest.pipeline import Ingestor

TARGET_RATIO = 0.5
POLL_INTERVAL = 0.01  # seconds between looks at the stream's message count
PUBLISH_ASYNC_MAX_PENDING = 4000  # as the relay configures nats-py
# The events table's columns but recorded_at, which takes its default (clock_timestamp()) as in the log.
COPY_COLUMNS = (
    "seq", "event_id", "type", "schema_version", "entity_type", "entity_id", "occurred_at",
    "payload", "metadata",
)  # fmt: skip
QUICK_DAYS, FULL_DAYS = 0.75, 5.0
QUICK_SINGLES, FULL_SINGLES = 100, 300
QUICK_TRICKLE, FULL_TRICKLE = 300, 2000  # one-event appends per linger setting in the bus latency phase
TRICKLE_ROUNDS = 3  # the linger off, then on, this many times
TRICKLE_RATE = 200.0  # their mean rate, events/s: low, events arrive one by one
# The key check's phase: (key checked?, which quarter of the N events), in this order (ABBA BAAB: a
# drift of the machine or of the table's size falls on both alike).
AUTH_ROUNDS = ((True, 0), (False, 0), (False, 1), (True, 1), (False, 2), (True, 2), (True, 3), (False, 3))
AUTH_PARTS = 4


# ---------------------------------------------------------------------------------------------
# The workload, built before any clock starts


@dataclass(frozen=True)
class Workload:
    """The same N simulator events in the three shapes the measurements need."""

    days: float
    contracts: list[ContractSpec]
    events: list[event_pb2.Event]  # for AppendEvents
    envelopes: list[tuple[str, str, bytes]]  # (type, event_id, JSON envelope) for publish_async
    rows: list[tuple[Any, ...]]  # COPY_COLUMNS of the events table
    singles: list[event_pb2.Event]  # fresh events (new ids) for the one-event latency calls
    trickles: list[list[event_pb2.Event]]  # fresh ones for the bus latency: per round, per linger setting
    renamed: list[event_pb2.Event]  # `events` again with fresh ids: the key check's phase sends both

    @property
    def n(self) -> int:
        return len(self.events)


def build_workload(days: float, singles: int, trickle: int) -> Workload:
    simulator = PaymentsSimulator(SimConfig(days=days))
    sim_events = list(simulator.events())
    recorded_at = datetime.now(UTC)
    events: list[event_pb2.Event] = []
    envelopes: list[tuple[str, str, bytes]] = []
    rows: list[tuple[Any, ...]] = []
    for seq, e in enumerate(sim_events, start=1):
        payload = e.payload_json()
        events.append(
            make_event(
                e.type, e.entity_type, e.entity_id, payload, occurred_at=e.occurred_at,
                event_id=e.event_id, schema_version=e.schema_version,
            )
        )  # fmt: skip
        # The fields and order of the envelope the relay publishes (EventLog.read_envelopes).
        envelope = {
            "seq": seq, "event_id": e.event_id, "type": e.type, "schema_version": e.schema_version,
            "entity_type": e.entity_type, "entity_id": e.entity_id, "occurred_at": e.occurred_at,
            "recorded_at": recorded_at, "payload": e.payload, "metadata": {},
        }  # fmt: skip
        envelopes.append((e.type, e.event_id, orjson.dumps(envelope)))
        rows.append(
            (seq, uuid.UUID(e.event_id), e.type, e.schema_version, e.entity_type, e.entity_id,
             e.occurred_at, payload.decode(), "{}")
        )  # fmt: skip
    payments = [e for e in sim_events if e.type == "payment.authorized"]

    def fresh(count: int) -> list[event_pb2.Event]:
        """`count` payments as new events (new ids)."""
        return [
            make_event(
                p.type, p.entity_type, p.entity_id, p.payload_json(), occurred_at=p.occurred_at,
                event_id=uuid.uuid4(), schema_version=p.schema_version,
            )
            for p in (payments[i % len(payments)] for i in range(count))
        ]  # fmt: skip

    per_round = -(-trickle // TRICKLE_ROUNDS)
    trickles = [fresh(per_round + 1) for _ in range(2 * TRICKLE_ROUNDS)]  # the first of each warms the relay up
    renamed = []
    for event in events:
        copy = event_pb2.Event()
        copy.CopyFrom(event)
        copy.event_id = str(uuid.uuid4())
        renamed.append(copy)
    return Workload(days, simulator.contracts(), events, envelopes, rows, fresh(singles), trickles, renamed)


# ---------------------------------------------------------------------------------------------
# Measurements


async def stream_messages(js: JetStreamContext, stream: str) -> int:
    try:
        return (await js.stream_info(stream)).state.messages
    except NotFoundError:
        return 0


async def measure_publish_async(servers: Servers, workload: Workload, namespace: str) -> Phase:
    """Baseline A: publish_async of every envelope to a fresh file-storage stream, until all acked."""
    topology = bus.Topology(namespace)
    nc = await nats.connect(servers.nats.url, name="bench-publish-async")
    try:
        js = nc.jetstream(publish_async_max_pending=PUBLISH_ASYNC_MAX_PENDING)
        config = bus.events_stream_config(topology.events_stream, topology.events_prefix)
        await js.add_stream(config)
        prefix = topology.events_prefix
        meter = CpuMeter(servers.cpu_roots())
        meter.start()
        started = time.perf_counter()
        futures = [
            await js.publish_async(f"{prefix}.{type_}", body, headers={"Nats-Msg-Id": event_id})
            for type_, event_id, body in workload.envelopes
        ]
        acks = await asyncio.gather(*futures)
        seconds = time.perf_counter() - started
        cpu = meter.stop()
        duplicates = sum(1 for a in acks if a.duplicate)
        stored = await stream_messages(js, topology.events_stream)
        if duplicates or stored != workload.n:
            raise RuntimeError(f"publish_async: {stored} stored, {duplicates} duplicates of {workload.n}")
        await js.delete_stream(topology.events_stream)  # its files are not needed any more
    finally:
        await nc.close()
    return Phase(workload.n, seconds, cpu)


async def measure_copy(servers: Servers, url: str, rows: Sequence[tuple[Any, ...]]) -> tuple[Phase, Phase]:
    """Baseline B: COPY of every row, into a plain copy of the events table, then an indexed one."""
    conn = await asyncpg.connect(url)
    phases: list[Phase] = []
    try:
        for table, like in (("events_copy", "INCLUDING DEFAULTS"), ("events_copy_indexed", "INCLUDING ALL")):
            await conn.execute(f"CREATE TABLE {table} (LIKE events {like})")
            meter = CpuMeter(servers.cpu_roots())
            meter.start()
            started = time.perf_counter()
            await conn.copy_records_to_table(table, records=rows, columns=COPY_COLUMNS)
            seconds = time.perf_counter() - started
            phases.append(Phase(len(rows), seconds, meter.stop()))
            count = await conn.fetchval(f"SELECT count(*) FROM {table}")
            if count != len(rows):
                raise RuntimeError(f"COPY into {table}: {count} rows of {len(rows)}")
    finally:
        await conn.close()
    return phases[0], phases[1]


@dataclass
class Ingest:
    phase: Phase  # until durable: every response back and every event on the stream
    committed_seconds: float  # until the last response
    on_stream_at_last_response: int  # of the N, how many JetStream held when the last response came


async def start_ingest(
    servers: Servers, services: Services, url: str, namespace: str, tmp: Path, profile_dir: Path | None
) -> tuple[str, dict[str, tuple[int, bool]]]:
    """Start `serve` and `relay` as their own processes; returns the gRPC address and CPU roots."""
    addr = f"127.0.0.1:{free_port()}"
    env = ingest_env(servers, url, namespace, tmp) | {"D2D_INGEST_ADDR": addr}
    roots: dict[str, tuple[int, bool]] = {}
    for role in ("serve", "relay"):
        args = ["-m", "services.ingest", role]
        if profile_dir is not None:
            args = ["-m", "cProfile", "-o", str(profile_dir / f"ingest-{role}.prof"), *args]
        service = services.start(f"ingest-{role}", args, env)
        roots[f"ingest {role}"] = (service.process.pid, False)
    return addr, roots


def ingest_env(servers: Servers, url: str, namespace: str, tmp: Path) -> dict[str, str]:
    return {
        "D2D_DATABASE_URL": url,
        "D2D_NATS_URL": servers.nats.url,
        "D2D_DATA_DIR": str(tmp / "data"),
        "D2D_NATS_NAMESPACE": namespace,
    }


async def wait_ready(client: IngestClient, services: Services, timeout: float = 60) -> None:
    """Wait for the gRPC channel, failing fast (with its log) if a service process exits."""
    ready = asyncio.ensure_future(client.wait_ready(timeout))
    try:
        while not ready.done():
            services.check_alive()
            await asyncio.wait({ready}, timeout=0.1)
        ready.result()
    finally:
        ready.cancel()


async def register_contracts(client: IngestClient, contracts: Sequence[ContractSpec]) -> None:
    for spec in contracts:
        await client.create_contract_version(
            spec.event_type, owner=spec.owner, json_schema=spec.schema, pii_fields=spec.pii_fields,
            compatibility=spec.compatibility, allowed_lateness_seconds=spec.allowed_lateness_seconds,
            description=spec.description,
        )  # fmt: skip


async def measure_durable_ingest(
    client: IngestClient, js: JetStreamContext, stream: str, workload: Workload, *,
    already: int, batch: int, inflight: int, meter: CpuMeter,
) -> Ingest:  # fmt: skip
    """N events through AppendEvents until committed in Postgres and stored by JetStream."""
    target = already + workload.n
    samples: list[tuple[float, int]] = []  # (time, messages on the stream)

    async def watch_stream() -> float:
        while True:
            messages = await stream_messages(js, stream)
            now = time.perf_counter()
            samples.append((now, messages))
            if messages >= target:
                return now
            await asyncio.sleep(POLL_INTERVAL)

    meter.start()
    started = time.perf_counter()
    watcher = asyncio.create_task(watch_stream())
    try:
        await append_all(client, workload.events, batch=batch, inflight=inflight)
        committed = time.perf_counter()
        stored = await asyncio.wait_for(watcher, 300)
    finally:
        watcher.cancel()
    durable = max(committed, stored)
    cpu = meter.stop()
    seen = max((m for t, m in samples if t <= committed), default=already)
    return Ingest(Phase(workload.n, durable - started, cpu), committed - started, seen - already)


async def append_all(client: IngestClient, events: Sequence[event_pb2.Event], *, batch: int, inflight: int) -> None:
    """`events` through AppendEvents in requests of `batch`, `inflight` at a time, until every
    response is back (all committed); an event not appended is a RuntimeError."""
    pending = iter([events[i : i + batch] for i in range(0, len(events), batch)])

    async def sender() -> None:
        for chunk in pending:  # the workers share one iterator: `inflight` requests at a time
            response = await client.append(chunk, timeout=120)
            if response.appended_count != len(chunk):
                refused = next((r for r in response.results if r.WhichOneof("outcome") != "seq"), None)
                raise RuntimeError(
                    f"{len(chunk) - response.appended_count} of {len(chunk)} events not appended; first: {refused}"
                )

    await asyncio.gather(*(sender() for _ in range(inflight)))


async def serve_keyed_and_keyless(settings: Settings, keyed_port: int, keyless_port: int) -> None:
    """The ingest API on two servers in this process until SIGTERM, both appending through one
    Ingestor to D2D_DATABASE_URL: on `keyed_port` each call's key is checked against the ring a
    service opens, on `keyless_port` none is (AdmitAll). The rest is as services/ingest/server.py
    assembles it (no NATS intake, which AppendEvents does not use)."""
    stop = stop_on_signals()
    pool = await create_pool(settings.require_database_url(), max_size=10)
    log_ = EventLog(pool)
    registry = ContractRegistry(log_)
    await register_platform_contracts(registry)
    dead_letters = DeadLetters(pool)
    committer = GroupCommitter(log_)
    relay_name = outbox.relay_name(bus.Topology(settings.nats_namespace).events_stream)
    ingest_api = api.IngestApi(Ingestor(registry, committer, dead_letters), registry, dead_letters, log_,
                               relay_name=relay_name)  # fmt: skip
    keys = await auth.KeyRing.open(log_)
    servers = []
    for port, ring in ((keyed_port, keys), (keyless_port, AdmitAll())):
        server, health = grpcserver.new_server([api.SERVICE_NAME], max_concurrent_rpcs=api.MAX_CONCURRENT_CALLS)
        api.add_to_server(ingest_api, server, ring)
        grpcserver.listen(server, f"127.0.0.1:{port}", GrpcTls(), "ingest (key check priced)")
        await server.start()
        await grpcserver.set_serving(health, [api.SERVICE_NAME])
        servers.append(server)
    try:
        await stop.wait()
    finally:
        for server in servers:
            await server.stop(1)
        await committer.close()
        await keys.close()
        await pool.close()


@dataclass
class KeyCheck:
    checked: Phase  # AppendEvents with the key checked: every response back
    unchecked: Phase  # the same without the check
    calls: int  # AppendEvents requests each made

    @property
    def ratio(self) -> float:
        return self.checked.rate / self.unchecked.rate


class KeyedAndKeyless:
    """The `--serve-keyed-and-keyless` process (see the module's docstring, 6) and a client of each
    of its servers. Started beside the ingest service, before any clock runs: it then idles until
    `measure`."""

    def __init__(self, services: Services, env: dict[str, str]) -> None:
        keyed_port, keyless_port = free_port(), free_port()
        args = ["-m", "bench.ingest", "--serve-keyed-and-keyless", f"{keyed_port},{keyless_port}"]
        self.services = services
        services.start("ingest-keyed-and-keyless", args, env)
        self.checked = IngestClient(f"127.0.0.1:{keyed_port}")
        self.unchecked = IngestClient(f"127.0.0.1:{keyless_port}")

    async def ready(self, contracts: Sequence[ContractSpec]) -> None:
        for client in (self.checked, self.unchecked):
            await wait_ready(client, self.services)
        await register_contracts(self.checked, contracts)  # one registry serves both

    async def measure(self, workload: Workload, *, batch: int, inflight: int) -> KeyCheck:
        """The same events through the ingest API with the key checked and without, a quarter at a
        time in AUTH_ROUNDS' order: each setting's time summed over its rounds."""
        bounds = [workload.n * i // AUTH_PARTS for i in range(AUTH_PARTS + 1)]
        parts = {
            key_checked: [
                (workload.events if (i % 2 == 0) == key_checked else workload.renamed)[bounds[i] : bounds[i + 1]]
                for i in range(AUTH_PARTS)
            ]
            for key_checked in (True, False)
        }  # each setting sends every event once, a part under its own id, the next under a fresh one
        seconds = {True: 0.0, False: 0.0}
        for key_checked, which in AUTH_ROUNDS:
            started = time.perf_counter()
            client = self.checked if key_checked else self.unchecked
            await append_all(client, parts[key_checked][which], batch=batch, inflight=inflight)
            seconds[key_checked] += time.perf_counter() - started
        calls = sum(-(-len(part) // batch) for part in parts[True])
        return KeyCheck(Phase(workload.n, seconds[True]), Phase(workload.n, seconds[False]), calls)

    async def close(self) -> None:
        await self.checked.close()
        await self.unchecked.close()


async def measure_append_one(client: IngestClient, singles: Sequence[event_pb2.Event]) -> list[float]:
    """Sequential one-event AppendEvents calls; seconds until each response (committed)."""
    latencies: list[float] = []
    for event in singles:
        started = time.perf_counter()
        response = await client.append([event])
        latencies.append(time.perf_counter() - started)
        if response.appended_count != 1:
            raise RuntimeError(f"one-event append not appended: {response.results[0]}")
    return latencies


@dataclass
class BusLatency:
    linger_ms: float
    latencies_ms: list[float]  # from sending each one-event append until a subscriber received it
    batches: int  # the relay's publish calls (JetStream round trips) that carried them
    relay_cpu: float  # CPU seconds the relay spent meanwhile

    def p(self, q: float) -> float:
        return round(percentile(self.latencies_ms, q), 3)


def restart_relay(services: Services, env: dict[str, str], linger_ms: float) -> int:
    """Stop the relay (it records its position) and start one with `linger_ms`, which resumes
    there; returns its pid."""
    old = services.child("ingest-relay")
    code = old.terminate()
    if code != 0:
        raise RuntimeError(f"the relay exited with {code}; end of its log:\n{old.log_tail()}")
    services.children.remove(old)  # stopped on purpose: no longer checked as alive
    args, linger = ["-m", "services.ingest", "relay"], {"D2D_RELAY_LINGER_MS": f"{linger_ms:g}"}
    return services.start("ingest-relay", args, {**env, **linger}).process.pid


def relay_batches(traces: Path, after: int, through: int) -> int:
    """The relay's `relay.publish` spans (flushed when it stops) that published positions in (after, through]."""
    spans = [orjson.loads(line) for line in traces.read_bytes().splitlines()]
    return sum(
        1 for s in spans
        if s["name"] == "relay.publish" and after < s["attributes"]["d2d.first_seq"] <= through
    )  # fmt: skip


async def measure_bus_latency(
    client: IngestClient, nc: nats.NATS, prefix: str, events: Sequence[event_pb2.Event], rate: float,
    meter: CpuMeter,
) -> tuple[list[float], float]:  # fmt: skip
    """One-event appends at random times (`rate` a second on average, none waiting for another):
    seconds from sending each until a subscriber on `prefix.>` received it, and the CPU seconds of
    `meter`'s processes meanwhile. The first event only warms the relay up (it is not measured)."""
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    arrived = asyncio.Event()

    async def on_message(msg: Any) -> None:
        received[msg.headers["Nats-Msg-Id"]] = time.perf_counter()
        arrived.set()

    async def append(event: event_pb2.Event) -> None:
        response = await client.append([event])
        if response.appended_count != 1:
            raise RuntimeError(f"one-event append not appended: {response.results[0]}")

    async def until_received(event_ids: Sequence[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(i in received for i in event_ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sum(i not in received for i in event_ids)} events never reached the bus")
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), 0.1)

    subscription = await nc.subscribe(f"{prefix}.>", cb=on_message)
    try:
        warm_up, *measured = events
        await append(warm_up)
        await until_received([warm_up.event_id])
        rng = random.Random(7)
        meter.start()
        calls = []
        for event in measured:
            sent[event.event_id] = time.perf_counter()
            calls.append(asyncio.ensure_future(append(event)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*calls)
        await until_received(list(sent))
        cpu = sum(meter.stop().values())
    finally:
        await subscription.unsubscribe()
    return [received[i] - t for i, t in sent.items()], cpu


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Options:
    quick: bool
    batch: int
    inflight: int
    profile_dir: Path | None
    trickle_rate: float


RIGHTS_TRIGGER = "events_appended_by_their_service"
RIGHTS_CALLS = 500  # one-event appends per round of [G]


async def measure_append_rights(owner_url: str, login_url: str, rounds: int) -> dict[bool, list[float]]:
    """[G]: seconds per one-event `append_events` call as serving's login, by whether the append
    rights trigger was on; rounds in the order on, off, off, on, ..."""
    owner, login = await asyncpg.connect(owner_url), await asyncpg.connect(login_url)
    timings: dict[bool, list[float]] = {True: [], False: []}

    async def append_one() -> float:
        args = ([uuid.uuid4()], ["decision.made"], [1], ["decision"], ["d"], [datetime.now(UTC)], ["{}"], ["{}"])
        started = time.perf_counter()
        await login.fetch(_APPEND_SQL, APPEND_LOCK_KEY, *args)
        return time.perf_counter() - started

    try:
        try:  # the check is in force: serving's login may not append another service's type
            await login.fetch(_APPEND_SQL, APPEND_LOCK_KEY, [uuid.uuid4()], ["api_key.created"], [1], ["api_key"],
                              ["k"], [datetime.now(UTC)], ["{}"], ["{}"])  # fmt: skip
        except asyncpg.InsufficientPrivilegeError:
            pass
        else:
            raise RuntimeError("serving's login appended api_key.created: the append rights are not in force")
        for _ in range(RIGHTS_CALLS):  # warm up: plans cached, memberships read
            await append_one()
        for round_ in range(rounds):
            on = round_ % 4 in (0, 3)
            await owner.execute(f"ALTER TABLE events {'ENABLE' if on else 'DISABLE'} TRIGGER {RIGHTS_TRIGGER}")
            timings[on] += [await append_one() for _ in range(RIGHTS_CALLS)]
    finally:
        await owner.execute(f"ALTER TABLE events ENABLE TRIGGER {RIGHTS_TRIGGER}")
        await owner.close()
        await login.close()
    return timings


async def postgres_settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        names = ("fsync", "synchronous_commit", "wal_sync_method", "full_page_writes")
        return {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()


async def run(options: Options, workload: Workload, servers: Servers, services: Services, tmp: Path) -> dict[str, Any]:
    token = f"b{uuid.uuid4().hex[:8]}"
    n = workload.n

    pg = await postgres_settings(servers.postgres.admin_url())
    say(
        f"Postgres: fsync={pg['fsync']}, synchronous_commit={pg['synchronous_commit']},"
        f" wal_sync_method={pg['wal_sync_method']} (each commit waits for its WAL flush to disk);"
        " NATS JetStream: file storage"
    )

    # Baseline A: the bus alone.
    say("\n[A] raw JetStream publish_async (1 connection, nats-py, "
        f"max {PUBLISH_ASYNC_MAX_PENDING} pending, header Nats-Msg-Id only)")  # fmt: skip
    publish = await measure_publish_async(servers, workload, f"{token}raw")
    say(f"    {n:,} msgs in {publish.seconds:.2f}s = {publish.rate:,.0f} msgs/s")
    say(f"    cpu: {CpuMeter.describe(publish.cpu, publish.seconds)}")

    # Baseline B: the database alone.
    say("\n[B] raw asyncpg COPY (one transaction, binary COPY) in a fresh migrated database")
    copy_url = await servers.new_database(f"{token}_copy")
    copy_plain, copy_indexed = await measure_copy(servers, copy_url, workload.rows)
    say(f"    events_copy (LIKE events INCLUDING DEFAULTS: no PK, no indexes, no triggers):"
        f" {n:,} rows in {copy_plain.seconds:.2f}s = {copy_plain.rate:,.0f} rows/s")  # fmt: skip
    say(f"    events_copy_indexed (LIKE events INCLUDING ALL: PK, unique event_id, 3 indexes, no triggers):"
        f" {n:,} rows in {copy_indexed.seconds:.2f}s = {copy_indexed.rate:,.0f} rows/s")  # fmt: skip

    # The service, as `d2d up` runs it.
    ingest_url = await servers.new_database(f"{token}_ingest")
    addr, service_roots = await start_ingest(servers, services, ingest_url, token, tmp, options.profile_dir)
    auth_url = await servers.new_database(f"{token}_auth")  # [F]'s servers start now, idle until then
    keyed_and_keyless = KeyedAndKeyless(services, ingest_env(servers, auth_url, f"{token}auth", tmp))
    topology = bus.Topology(token)
    stream = topology.events_stream
    tracing = "OTLP" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "JSON lines in the data dir"
    say(f"\n[C] durable ingest: services/ingest serve + relay as 2 processes on {addr}"
        f" (namespace {token}, stream {stream}; traces: {tracing})")  # fmt: skip
    client = IngestClient(addr)
    nc = await nats.connect(servers.nats.url, name="bench-watch")
    log_conn = await asyncpg.connect(ingest_url)
    try:
        js = nc.jetstream()
        await wait_ready(client, services)
        await register_contracts(client, workload.contracts)
        await keyed_and_keyless.ready(workload.contracts)
        already = await log_conn.fetchval("SELECT count(*) FROM events")  # contract.registered events

        async def relay_caught_up() -> bool:
            services.check_alive()
            return await stream_messages(js, stream) == already

        await wait_until(relay_caught_up, timeout=60, what="relay publishing the contract events")
        say(f"    {len(workload.contracts)} contracts registered; {already} events already on the stream;"
            f" sending {n:,} events in batches of {options.batch}, {options.inflight} in flight")  # fmt: skip

        meter = CpuMeter({**service_roots, **servers.cpu_roots()})
        ingest = await measure_durable_ingest(
            client, js, stream, workload, already=already, batch=options.batch,
            inflight=options.inflight, meter=meter,
        )  # fmt: skip
        in_log = await log_conn.fetchval("SELECT count(*) FROM events") - already
        on_stream = await stream_messages(js, stream) - already
        if in_log != n or on_stream != n:
            raise RuntimeError(f"after the run: {in_log} events in the log, {on_stream} on the stream, of {n}")
        durable = ingest.phase
        committed_rate = per_second(n, ingest.committed_seconds)
        say(f"    all responses after {ingest.committed_seconds:.2f}s ({committed_rate:,.0f} events/s committed);"
            f" JetStream then held {ingest.on_stream_at_last_response:,} of {n:,}")  # fmt: skip
        say(f"    durable (committed + on JetStream): {n:,} events in {durable.seconds:.2f}s"
            f" = {durable.rate:,.0f} events/s")  # fmt: skip
        say(f"    cpu: {CpuMeter.describe(durable.cpu, durable.seconds)}")

        # One-event latency, service otherwise idle (the relay has caught up).
        calls = len(workload.singles)
        say(f"\n[D] one-event AppendEvents latency: {calls} sequential calls;"
            " time until the response = committed in Postgres, EXCLUDING the JetStream ack")  # fmt: skip
        latencies = await measure_append_one(client, workload.singles)
        ms = [s * 1000 for s in latencies]
        p50, p99 = percentile(ms, 50), percentile(ms, 99)
        say(f"    p50 {p50:.2f} ms, p99 {p99:.2f} ms (mean {sum(ms) / calls:.2f}, max {max(ms):.2f})")

        # Bus latency at a low rate, the relay's linger off and on.
        trickle = sum(len(t) - 1 for t in workload.trickles[::2])
        say(f"\n[E] bus latency at a low rate: {trickle} one-event AppendEvents calls per setting, at Poisson"
            f" times ({options.trickle_rate:g}/s on average, none waiting for another); time from sending"
            " each until a subscriber on the events subjects receives it. The relay is restarted for each"
            f" setting of D2D_RELAY_LINGER_MS, in turn, {TRICKLE_ROUNDS} times")  # fmt: skip
        env = ingest_env(servers, ingest_url, token, tmp)
        traces = tmp / "data" / "traces" / "ingest-relay.jsonl"
        settings = (0.0, DEFAULT_LINGER * 1000)
        runs: list[tuple[float, list[float], float, int, int]] = []  # linger, latencies, cpu, seqs (after, through]
        for round_, events in enumerate(workload.trickles):
            linger_ms = settings[round_ % 2]
            meter = CpuMeter({"relay": (restart_relay(services, env, linger_ms), False)})
            after = await log_conn.fetchval("SELECT max(seq) FROM events") + 1  # the warm-up event's
            latencies, cpu = await measure_bus_latency(
                client, nc, topology.events_prefix, events, options.trickle_rate, meter
            )
            through = await log_conn.fetchval("SELECT max(seq) FROM events")
            runs.append((linger_ms, latencies, cpu, after, through))
        restart_relay(services, env, DEFAULT_LINGER * 1000)  # a relay stopped has flushed its spans
        bus_latency = [
            BusLatency(
                linger_ms,
                [s * 1000 for ms, latencies, _, _, _ in runs if ms == linger_ms for s in latencies],
                sum(relay_batches(traces, after, through) for ms, _, _, after, through in runs if ms == linger_ms),
                sum(cpu for ms, _, cpu, _, _ in runs if ms == linger_ms),
            )
            for linger_ms in settings
        ]
        for measured in bus_latency:
            say(f"    linger {measured.linger_ms:g} ms: p50 {measured.p(50):.2f} ms, p99 {measured.p(99):.2f} ms;"
                f" {measured.batches} relay batches for {trickle} events;"
                f" relay CPU {measured.relay_cpu * 1e6 / trickle:.0f} us per event")  # fmt: skip
        off, on = bus_latency
        say(f"    the linger adds {on.p(50) - off.p(50):+.2f} ms at p50, {on.p(99) - off.p(99):+.2f} ms at p99;"
            f" relay batches {off.batches} -> {on.batches}")  # fmt: skip

        # The API key check, priced: the same batches with the key checked and without.
        say(f"\n[F] the API key check: {n:,} events in batches of {options.batch}, {options.inflight} in flight,"
            " to the ingest API served twice by one process (key checked, unchecked), both appending through"
            " one Ingestor to a fresh database; quarters in turn (ABBA BAAB);"
            " until every response (committed)")  # fmt: skip
        key_check = await keyed_and_keyless.measure(workload, batch=options.batch, inflight=options.inflight)
        checked, unchecked = key_check.checked, key_check.unchecked
        for label, phase in (("key checked", checked), ("unchecked  ", unchecked)):
            say(f"    {label}: {n:,} events ({key_check.calls} calls) in {phase.seconds:.2f}s"
                f" = {phase.rate:,.0f} events/s")  # fmt: skip
        say(f"    with the key check / without = {key_check.ratio:.3f} (issue 15: within 10 %; the check's own CPU"
            " per call is priced by bench.serving, auth_check_us_per_call)")  # fmt: skip

        # The append rights, priced: one-event appends as serving's login, the trigger on and off.
        rights_rounds = 4 if options.quick else 8
        say(f"\n[G] the append rights check: {rights_rounds} rounds of {RIGHTS_CALLS} one-event append_events"
            " calls as serving's login (its own decision.made), the trigger on and disabled in turn (ABBA),"
            " straight to Postgres in a fresh database")  # fmt: skip
        rights_url = await servers.new_database(f"{token}_rights")
        rights = await measure_append_rights(rights_url, services.login_url(rights_url, "serving"), rights_rounds)
        rights_us = {on: percentile([t * 1e6 for t in rights[on]], 50) for on in (True, False)}
        say(f"    p50 {rights_us[True]:.0f} us with the check, {rights_us[False]:.0f} us without:"
            f" {rights_us[True] - rights_us[False]:+.0f} us an append statement")  # fmt: skip
    finally:
        await log_conn.close()
        await nc.close()
        await client.close()
        await keyed_and_keyless.close()

    ratio = durable.rate / publish.rate
    say(f"\nratio durable ingest / raw publish_async = {ratio:.2f} (target {TARGET_RATIO});"
        f" durable ingest / raw COPY = {durable.rate / copy_plain.rate:.2f}")  # fmt: skip
    return {
        "bench": "ingest",
        "quick": options.quick,
        "events": n,
        "sim_days": workload.days,
        "batch": options.batch,
        "inflight": options.inflight,
        "postgres_fsync": pg["fsync"] == "on",
        "durable_ingest_events_per_s": rounded(durable.rate),
        "durable_ingest_seconds": round(durable.seconds, 3),
        "committed_events_per_s": rounded(committed_rate),
        "on_stream_at_last_response": ingest.on_stream_at_last_response,
        "raw_publish_async_msgs_per_s": rounded(publish.rate),
        "raw_copy_rows_per_s": rounded(copy_plain.rate),
        "raw_copy_indexed_rows_per_s": rounded(copy_indexed.rate),
        "ratio_vs_publish_async": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "append_one_calls": calls,
        "append_one_p50_ms": round(p50, 3),
        "append_one_p99_ms": round(p99, 3),
        "bus_latency_events": trickle,
        "bus_latency_rate_per_s": options.trickle_rate,
        "relay_linger_ms": on.linger_ms,
        "bus_p50_ms_linger_off": off.p(50),
        "bus_p99_ms_linger_off": off.p(99),
        "bus_p50_ms_linger_on": on.p(50),
        "bus_p99_ms_linger_on": on.p(99),
        "linger_added_p50_ms": round(on.p(50) - off.p(50), 3),
        "linger_added_p99_ms": round(on.p(99) - off.p(99), 3),
        "relay_batches_linger_off": off.batches,
        "relay_batches_linger_on": on.batches,
        "relay_cpu_us_per_event_linger_off": round(off.relay_cpu * 1e6 / trickle),
        "relay_cpu_us_per_event_linger_on": round(on.relay_cpu * 1e6 / trickle),
        "envelope_bytes_avg": round(sum(len(b) for _, _, b in workload.envelopes) / n),
        "auth_on_events_per_s": rounded(checked.rate),
        "auth_off_events_per_s": rounded(unchecked.rate),
        "auth_ratio": round(key_check.ratio, 3),
        "auth_calls": key_check.calls,
        "append_rights_on_p50_us": round(rights_us[True], 1),
        "append_rights_off_p50_us": round(rights_us[False], 1),
        "append_rights_calls_each": len(rights[True]),
        "cpu_s_durable_ingest": durable.cpu,
        "cpu_s_publish_async": publish.cpu,
        "profiled": options.profile_dir is not None,
        "machine": {**machine(), "data_fs": filesystem_of(tmp)},
    }


def main() -> None:
    p = parser("ingest", "Durable ingest throughput and one-event latency, beside raw JetStream and COPY.")
    p.add_argument("--inflight", type=int, default=4, help="AppendEvents requests in flight (default 4)")
    p.add_argument("--batch", type=int, default=500, help="events per AppendEvents request (default 500)")
    p.add_argument("--days", type=float, help=f"simulated days (default {QUICK_DAYS} quick, {FULL_DAYS} full)")
    p.add_argument("--latency-calls", type=int, help=f"one-event calls ({QUICK_SINGLES} quick, {FULL_SINGLES} full)")
    p.add_argument("--trickle", type=int, help=f"one-event appends per linger setting in the bus latency phase"
                   f" ({QUICK_TRICKLE} quick, {FULL_TRICKLE} full)")  # fmt: skip
    p.add_argument("--trickle-rate", type=float, default=TRICKLE_RATE,
                   help=f"their mean rate, events/s (default {TRICKLE_RATE:g})")  # fmt: skip
    p.add_argument("--tmp-dir", type=Path, help="where to put the servers' data (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="run the service processes under cProfile, writing DIR/ingest-*.prof (slows them)")  # fmt: skip
    p.add_argument("--serve-keyed-and-keyless", metavar="KEYED,KEYLESS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_keyed_and_keyless:
        keyed_port, keyless_port = (int(x) for x in args.serve_keyed_and_keyless.split(","))
        run_service(
            "bench-ingest-keyless", lambda settings: serve_keyed_and_keyless(settings, keyed_port, keyless_port)
        )
        return
    stop_on_sigterm()
    days = args.days or (QUICK_DAYS if args.quick else FULL_DAYS)
    singles = args.latency_calls or (QUICK_SINGLES if args.quick else FULL_SINGLES)
    trickle = args.trickle or (QUICK_TRICKLE if args.quick else FULL_TRICKLE)
    profile_dir = args.profile.resolve() if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    options = Options(args.quick, args.batch, args.inflight, profile_dir, args.trickle_rate)

    started = time.perf_counter()
    workload = build_workload(days, singles, trickle)
    info = machine()
    say(f"bench.ingest{' (quick)' if args.quick else ''}: {workload.n:,} simulator events (days={days}),"
        f" built in {time.perf_counter() - started:.1f}s before any timing;"
        f" envelopes avg {sum(len(b) for _, _, b in workload.envelopes) / workload.n:.0f} B")  # fmt: skip
    say(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, Python {info['python']}")
    if profile_dir:
        say(f"PROFILING the services into {profile_dir}: figures are slowed by cProfile")

    with bench_dir("ingest", args.tmp_dir, args.keep) as tmp:
        say(f"servers' data in {tmp} ({filesystem_of(tmp)})")
        with Servers(tmp, fsync=True) as servers, Services(tmp / "logs") as services:
            result = asyncio.run(run(options, workload, servers, services, tmp))
    say(f"done in {time.perf_counter() - started:.1f}s")
    emit(result)


if __name__ == "__main__":
    main()
