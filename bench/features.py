"""Features benchmark: replay, online lookups, training frames and memory, beside raw baselines.

`python -m bench.features [--quick]`

What is measured, in one run, on real servers started in a temp dir (Postgres, fsync OFF because
nothing here measures durable writes, and NATS JetStream with file storage). The log is loaded
directly: simulator events (full: 30 days of 33,000 payments a day, about 1,000,000 events; quick:
3 days, about 100,000; 5% of them arriving out of order) appended with `EventLog.append` in batches
of 5,000, then `VACUUM ANALYZE events`. The load time is reported, it is not a figure of merit.

1. Replay rate: the log's `payment.authorized` events folded into the simulator's three views
   (`d2d.sim.views.VIEWS`) in this process: pages of `EventLog.read(after, 10_000,
   types=[sources])`, each event a `FoldEvent` offered to every `ViewState` of its type (the
   offline frame's fold; the frame itself now reads with `offline.fold_pages`, which selects only
   the columns the fold needs: this loop is kept so that the figure compares with its baseline).
   Baselines in the same run: the same `EventLog.read` paging loop without folding (the baseline
   of the ratio; target replay >= 0.25 x that scan), and a plain asyncpg cursor over `SELECT seq,
   payload FROM events ORDER BY seq` (every event, payload as JSON text,
   not decoded) fetched 10,000 rows at a time.
2. GetOnlineFeatures latency: the real features service (`python -m services.features`) folds the
   loaded log from the namespace's events stream, which the real outbox relay (`python -m
   services.ingest relay`) publishes. Once its watermark equals the log head, one client (the raw
   FeatureService stub on the platform's client channel, requests built before timing) makes
   sequential calls for 1 entity row and for 100 rows, every feature of the three views, as of the
   newest event time; p50/p99. Baseline: an EMPTY grpc.aio unary handler in another process
   (`bench.features --serve-empty`), a bare `grpc.aio.server()` answering the same method path
   with an empty GetOnlineFeaturesResponse without decoding the request; the client sends it the
   same requests through the same stub and channel. Also reported: the same empty handler served the
   platform's way (`d2d.grpcserver.new_server` + `add_service`: a traced span per call, exported
   as JSON lines, lenient request decoding), which says how much of the service's time is the
   platform's gRPC plumbing rather than the feature lookups. The three targets get the same calls,
   interleaved in 5 rounds (a busy moment of the machine falls on all of them alike), each chunk
   after 0.25 s of untimed calls to the same target (a server idle for a while is slower for its
   next ~100 ms). Target: one-row p50 <= 2 x the empty handler's p50.
3. Training-frame rows per second: `training_frame(log, VIEWS, rows)` for 100,000 rows (quick:
   10,000), sampled at random (seeded) from `rows_from_events(log, "payment.authorized", VIEWS)`
   over the whole log and kept in log order, so the frame folds the whole log once. The time the
   frame spends in `offline.watermarks_at` (a query over every event's time) is reported apart.
   Beside it, the same rows by `d2d.replay.partition.partitioned_frame` over every core (source x
   entity-partition units, one worker process each at a time; that module says what each unit
   reads and decodes), checked equal cell for cell to the single-process frame. Target: >= 2 x the
   single-process frame's 2,177 rows/s (full run, 2 cores).
4. Resident memory per entity: RSS of the features service process after it has caught up and
   taken its snapshot at the head, minus its RSS once it was serving on the empty stream (started
   before the relay, so nothing had been folded), divided by the entities its views hold. The
   entity counts are `ViewState.entities()` of the in-process replay of step 1, which folded the
   same events by the same code (a spot check compares the service's answers with that state).
   Beside it: the live bytes of that in-process state (sys.getsizeof of every object the three
   ViewStates reach, each once), which leaves out allocator overhead and freed-but-kept memory,
   and the same once every entity has been queried (a query keeps the entity's rows by column too,
   and its lifetime totals; the service's RSS above is taken before any query).

Every figure is printed beside its baseline; CPU seconds per process (service, relay, Postgres,
NATS, this client) are printed per phase, which shows where the time goes, and so is the CPU that
processes this benchmark did not start used meanwhile ("other processes": a busy neighbour on the
machine distorts the figures; phases where they used more than a quarter of a core are named in a
warning and in `contended_phases`). `--profile DIR` writes cProfile files of the features service
and of the in-process replay and training frame.

The last line printed is one JSON object with every figure and its baselines (see bench/_common).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import os
import random
import socket
import sys
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import methodcaller
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pandas as pd
import psutil

from bench._common import (
    CpuMeter,
    Phase,
    Servers,
    Service,
    Services,
    bench_dir,
    emit,
    filesystem_of,
    machine,
    parser,
    percentile,
    rounded,
    say,
    serve_empty,
    stop_on_sigterm,
    wait_until,
)
from d2d import bus, eventlog, grpcserver
from d2d.eventlog import EventLog, NewEvent
from d2d.features import offline
from d2d.features.definitions import FeatureView
from d2d.features.fold import ViewState, fold_event
from d2d.features.offline import PAGE, FrameRow, rows_from_events, training_frame, watermarks_at
from d2d.replay.partition import partitioned_frame, usable_cores
from d2d.runtime.servers import free_port
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.views import VIEWS
from d2d.v1 import features_pb2, features_pb2_grpc

TARGET_REPLAY_RATIO = 0.25  # replay rate >= 0.25 x the EventLog.read scan
TARGET_LATENCY_RATIO = 2.0  # one-row GetOnlineFeatures p50 <= 2 x the empty handler's p50
FRAME_BASELINE_ROWS_PER_S = 2_177  # the single-process frame before issue 13 (full run, 2 cores)
TARGET_FRAME_SPEEDUP = 2.0  # the partitioned frame's rows/s >= 2 x that
SERVICE_NAME = "d2d.v1.FeatureService"
PAYMENT = "payment.authorized"
SOURCES = list(dict.fromkeys(v.source for v in VIEWS))
ALL_FEATURES = [f"{v.name}.*" for v in VIEWS]
APPEND_BATCH = 5_000
PAYMENTS_PER_DAY = 33_000
OUT_OF_ORDER_FRACTION = 0.05
QUICK_DAYS, FULL_DAYS = 3.0, 30.0
QUICK_FRAME_ROWS, FULL_FRAME_ROWS = 10_000, 100_000
QUICK_CALLS, FULL_CALLS = (500, 100), (2_000, 500)  # (1-row calls, 100-row calls)
WIDE_ROWS = 100
LATENCY_ROUNDS = 5  # the targets' calls alternate in this many rounds
WARM_SECONDS = 0.25  # untimed calls before each round's chunk
CATCH_UP_POLL = 0.2  # seconds between looks at the service's watermark
SEED = 7


# ---------------------------------------------------------------------------------------------
# The workload, built before any clock starts


@dataclass(frozen=True)
class Workload:
    config: SimConfig
    events: list[NewEvent]
    payments: int
    keys: list[dict[str, str]]  # distinct (customer, merchant, card) of sampled payments, for lookups
    newest: datetime  # the newest event time of the log: as_of of the lookups

    @property
    def n(self) -> int:
        return len(self.events)


def build_workload(days: float) -> Workload:
    config = SimConfig(days=days, payments_per_day=PAYMENTS_PER_DAY, out_of_order_fraction=OUT_OF_ORDER_FRACTION)
    events: list[NewEvent] = []
    keys: dict[tuple[str, str, str], None] = {}
    rng = random.Random(SEED)
    newest: datetime | None = None
    payments = 0
    for e in PaymentsSimulator(config).events():
        events.append(e.as_new_event())
        if newest is None or e.occurred_at > newest:
            newest = e.occurred_at
        if e.type == PAYMENT:
            payments += 1
            if rng.random() < 0.01:
                p = e.payload
                keys[(p["customer_id"], p["merchant_id"], p["card_id"])] = None
    assert newest is not None
    rows = [{"customer": c, "merchant": m, "card": k} for c, m, k in keys]
    random.Random(SEED).shuffle(rows)
    return Workload(config, events, payments, rows, newest)


# ---------------------------------------------------------------------------------------------
# Measurements


OTHERS = "other processes"
CONTENDED = 0.25  # other processes' share of a core above which a phase is flagged as distorted


class Meter(CpuMeter):
    """CpuMeter plus the CPU that processes this benchmark did not start used meanwhile (the whole
    machine's busy time minus the labelled processes'): a busy neighbour distorts the figures."""

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def start(self) -> None:
        super().start()
        self._busy0 = self._busy()  # after sampling the processes: that work is not someone else's

    def stop(self) -> dict[str, float]:
        busy = self._busy() - self._busy0
        cpu = super().stop()
        cpu[OTHERS] = round(max(0.0, busy - sum(cpu.values())), 2)
        return cpu


async def timed(roots: dict[str, tuple[int, bool]], work: Callable[[], Awaitable[int]]) -> Phase:
    meter = Meter(roots)
    meter.start()
    started = time.perf_counter()
    count = await work()
    seconds = time.perf_counter() - started
    return Phase(count, seconds, meter.stop())


@contextlib.contextmanager
def profiled(profile_dir: Path | None, name: str) -> Iterator[None]:
    """cProfile the enclosed in-process work into DIR/<name>.prof when profiling."""
    if profile_dir is None:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(profile_dir / f"{name}.prof")


async def load_log(log: EventLog, workload: Workload) -> int:
    for i in range(0, workload.n, APPEND_BATCH):
        results = await log.append(workload.events[i : i + APPEND_BATCH])
        if any(r.duplicate for r in results):
            raise RuntimeError(f"load: duplicates in the batch at {i}")
    return workload.n


async def cursor_scan(conn: asyncpg.Connection) -> int:
    """Baseline: a plain asyncpg cursor over every event, payload as JSON text (not decoded)."""
    count = 0
    async with conn.transaction():
        cursor = await conn.cursor("SELECT seq, payload FROM events ORDER BY seq")
        while rows := await cursor.fetch(PAGE):
            count += len(rows)
    return count


async def read_scan(log: EventLog) -> int:
    """Baseline of the ratio: the replay's EventLog.read paging loop, without folding."""
    count, after = 0, 0
    while True:
        page = await log.read(after, PAGE, types=SOURCES)
        count += len(page)
        if len(page) < PAGE:
            return count
        after = page[-1].seq


@dataclass
class Replay:
    states: dict[str, ViewState] = field(default_factory=dict)
    applied: int = 0  # (event, view) pairs folded


async def replay(log: EventLog, into: Replay) -> int:
    """The offline frame's fold (ViewState.apply) over EventLog.read pages of the sources' events,
    each a FoldEvent offered to every view of its type. Returns the events read."""
    states = into.states = {v.name: ViewState(v) for v in VIEWS}
    by_source: dict[str, list[ViewState]] = {}
    for v in VIEWS:
        by_source.setdefault(v.source, []).append(states[v.name])
    count, applied, after = 0, 0, 0
    while True:
        page = await log.read(after, PAGE, types=SOURCES)
        for e in page:
            event = fold_event(e.seq, e.type, e.schema_version, e.occurred_at.timestamp(), e.payload)
            for state in by_source[e.type]:
                applied += state.apply(event)
        count += len(page)
        if len(page) < PAGE:
            break
        after = page[-1].seq
    into.applied = applied
    return count


async def sample_frame_rows(log: EventLog, n: int) -> tuple[list[FrameRow], int]:
    """n rows drawn at random (seeded) from one row per payment, in log order; and how many there were."""
    every = await rows_from_events(log, PAYMENT, VIEWS)
    picked = sorted(random.Random(SEED).sample(range(len(every)), min(n, len(every))))
    return [every[i] for i in picked], len(every)


_NOT_STATE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
              types.CodeType, FeatureView, methodcaller)  # fmt: skip


def live_bytes(roots: Sequence[object]) -> tuple[int, int]:
    """(bytes, objects): sys.getsizeof of every object reachable from `roots`, each counted once, not
    following functions, classes, modules or view definitions (no allocator overhead included)."""
    seen: set[int] = set()
    total = 0
    stack = list(roots)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, _NOT_STATE):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total, len(seen)


# ---------------------------------------------------------------------------------------------
# Services and lookups


@dataclass
class FeaturesService:
    service: Service
    addr: str
    consumer: str  # the snapshot's consumer name


def service_env(servers: Servers, url: str, namespace: str, tmp: Path) -> dict[str, str]:
    return {
        "D2D_DATABASE_URL": url,
        "D2D_NATS_URL": servers.nats.url,
        "D2D_NATS_NAMESPACE": namespace,
        "D2D_DATA_DIR": str(tmp / "data"),
    }


def start_features(
    services: Services, env: dict[str, str], namespace: str, profile_dir: Path | None
) -> FeaturesService:
    addr = f"127.0.0.1:{free_port()}"
    args = ["-m", "services.features"]
    if profile_dir is not None:
        args = ["-m", "cProfile", "-o", str(profile_dir / "features-service.prof"), *args]
    service = services.start("features", args, {**env, "D2D_FEATURES_ADDR": addr, "D2D_FEATURES_CONSUMER": "bench"})
    return FeaturesService(service, addr, f"bench:{bus.Topology(namespace).events_stream}")


async def wait_logged(services: Services, service: Service, text: str, timeout: float = 120) -> None:
    """Until the service's log holds `text` (failing fast, with its log, if a started process exits)."""

    async def logged() -> bool:
        services.check_alive()
        return text in service.log_tail(100_000)

    await wait_until(logged, timeout=timeout, interval=0.1, what=f"{service.name} logging {text!r}")


async def wait_listening(services: Services, ports: Sequence[int], timeout: float = 60) -> None:
    """Until something accepts TCP connections on each port of 127.0.0.1."""

    async def listening() -> bool:
        services.check_alive()
        for port in ports:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        return True

    await wait_until(listening, timeout=timeout, interval=0.1, what=f"listeners on {list(ports)}")


async def wait_channel(channel: grpc.aio.Channel, services: Services, timeout: float = 60) -> None:
    """Wait for a gRPC channel, failing fast (with its log) if a started process exits."""
    ready = asyncio.ensure_future(asyncio.wait_for(channel.channel_ready(), timeout))
    try:
        while not ready.done():
            services.check_alive()
            await asyncio.wait({ready}, timeout=0.1)
        ready.result()
    finally:
        ready.cancel()


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS = VmHWM) of a process, in bytes."""
    rss = psutil.Process(pid).memory_info().rss
    peak = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return rss, peak


def request(rows: Sequence[dict[str, str]], as_of: datetime) -> features_pb2.GetOnlineFeaturesRequest:
    r = features_pb2.GetOnlineFeaturesRequest(
        features=ALL_FEATURES, rows=[features_pb2.EntityRow(keys=keys) for keys in rows]
    )
    r.as_of.FromDatetime(as_of)
    return r


def requests(keys: Sequence[dict[str, str]], per_call: int, calls: int, as_of: datetime) -> list[Any]:
    """`calls` requests of `per_call` rows each, walking through `keys` (so rows differ call to call)."""
    out = []
    for c in range(calls):
        start = (c * per_call) % len(keys)
        rows = [keys[(start + j) % len(keys)] for j in range(per_call)]
        out.append(request(rows, as_of))
    return out


async def measure_calls(stub: features_pb2_grpc.FeatureServiceStub, calls: Sequence[Any]) -> list[float]:
    """Sequential GetOnlineFeatures calls; milliseconds until each response."""
    latencies: list[float] = []
    for r in calls:
        started = time.perf_counter()
        await stub.GetOnlineFeatures(r, timeout=30)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


@dataclass
class Latency:
    ms: list[float]
    cpu: dict[str, float]
    wall: float

    @property
    def p50(self) -> float:
        return percentile(self.ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.ms, 99)

    def line(self) -> str:
        mean = sum(self.ms) / len(self.ms)
        return f"p50 {self.p50:.3f} ms, p99 {self.p99:.3f} ms (mean {mean:.3f}, max {max(self.ms):.2f})"

    def cpu_per_call_us(self, label: str) -> float:
        return 1e6 * self.cpu.get(label, 0.0) / len(self.ms)


async def warm(stub: features_pb2_grpc.FeatureServiceStub, calls: Sequence[Any], seconds: float) -> None:
    """Untimed calls for `seconds` (at least 3): a server idle for a while answers slower for the
    next ~100 ms (measured here: ~1.2x for ~100 calls of the empty handler after 100 ms idle)."""
    deadline = time.perf_counter() + seconds
    i = 0
    while i < 3 or time.perf_counter() < deadline:
        await stub.GetOnlineFeatures(calls[i % len(calls)], timeout=30)
        i += 1


async def interleaved(
    targets: dict[str, tuple[features_pb2_grpc.FeatureServiceStub, dict[str, tuple[int, bool]]]],
    calls: Sequence[Any], rounds: int,
) -> dict[str, Latency]:  # fmt: skip
    """The same calls against every target, in `rounds` rounds of one chunk per target (the order
    rotating each round), so a busy moment of the machine falls on every target alike; each chunk
    is preceded by WARM_SECONDS of untimed calls to the same target."""
    size = -(-len(calls) // rounds)
    out = {name: Latency([], {}, 0.0) for name in targets}
    names = list(targets)
    for r in range(rounds):
        part = calls[r * size : (r + 1) * size]
        if not part:
            break
        for name in names[r % len(names) :] + names[: r % len(names)]:
            stub, roots = targets[name]
            await warm(stub, part, WARM_SECONDS)
            meter = Meter(roots)
            meter.start()
            ms = await measure_calls(stub, part)
            cpu = meter.stop()
            m = out[name]
            m.ms.extend(ms)
            m.wall += meter.wall
            for label, seconds in cpu.items():
                m.cpu[label] = round(m.cpu.get(label, 0.0) + seconds, 2)
    return out


def _plain(value: features_pb2.FeatureValue) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind in (None, "null_value") else getattr(value, kind)


def _expected(v: Any) -> Any:
    """What the service's answer carries for an in-process value (numbers as float64)."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, bool) or isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return float(v)
    return str(v)


def mismatches(
    response: features_pb2.GetOnlineFeaturesResponse, rows: Sequence[dict[str, str]], states: dict[str, ViewState],
    as_of: float,
) -> int:  # fmt: skip
    """Rows whose online answer differs from the in-process replay's state at the same as_of."""
    names = list(response.feature_names)
    bad = 0
    for keys, row in zip(rows, response.rows, strict=True):
        expected: list[Any] = []
        for view in VIEWS:
            values = states[view.name].values(keys[view.entity], as_of) or states[view.name].defaults()
            expected.extend(_expected(values[f]) for f in view.feature_names())
        got = [_plain(v) for v in row.values]
        if len(got) != len(names) or got != expected:
            bad += 1
    return bad


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Options:
    quick: bool
    frame_rows: int
    calls_one: int
    calls_wide: int
    profile_dir: Path | None


async def run(options: Options, workload: Workload, servers: Servers, services: Services, tmp: Path) -> dict[str, Any]:
    token = f"b{uuid.uuid4().hex[:8]}"
    n = workload.n
    roots = servers.cpu_roots()
    url = await servers.new_database(f"{token}_features")
    owner_pool = await eventlog.create_pool(url, role=None, max_size=2)
    pool = await eventlog.create_pool(url, role="d2d_features", max_size=4)
    admin = await asyncpg.connect(url)
    result: dict[str, Any] = {"bench": "features", "quick": options.quick}
    try:
        # Loading (not a figure of merit).
        say(f"\n[0] loading {n:,} events with EventLog.append, {APPEND_BATCH:,} a transaction (owner connection)")
        load = await timed(roots, lambda: load_log(EventLog(owner_pool), workload))
        started = time.perf_counter()
        await admin.execute("VACUUM ANALYZE events")
        vacuum_seconds = time.perf_counter() - started
        log = EventLog(pool)
        head = await log.head()
        table_mb = await admin.fetchval("SELECT pg_total_relation_size('events')") / 2**20
        say(f"    {n:,} events in {load.seconds:.2f}s = {load.rate:,.0f} events/s;"
            f" VACUUM ANALYZE {vacuum_seconds:.2f}s; head seq {head:,};"
            f" events table {table_mb:,.0f} MB with indexes")  # fmt: skip
        del workload.events[:]  # the rows are in Postgres now; free the memory

        # 1. Replay.
        say(f"\n[1] replay: {workload.payments:,} {PAYMENT} events folded into {len(VIEWS)} views in this process")
        plain = await asyncpg.connect(url)  # no codecs: jsonb arrives as text
        try:  # connected before the meter starts, so its backend's CPU is counted
            cursor = await timed(roots, lambda: cursor_scan(plain))
        finally:
            await plain.close()
        say(f"    baseline: asyncpg cursor SELECT seq, payload FROM events ORDER BY seq (all {cursor.count:,} events,"
            f" payload as JSON text): {cursor.seconds:.2f}s = {cursor.rate:,.0f} rows/s")  # fmt: skip
        say(f"      cpu: {CpuMeter.describe(cursor.cpu, cursor.seconds)}")
        scan = await timed(roots, lambda: read_scan(log))
        say(f"    baseline: EventLog.read(after, {PAGE:,}, types={SOURCES}) paging loop, no folding:"
            f" {scan.count:,} events in {scan.seconds:.2f}s = {scan.rate:,.0f} events/s")  # fmt: skip
        say(f"      cpu: {CpuMeter.describe(scan.cpu, scan.seconds)}")
        folded = Replay()
        with profiled(options.profile_dir, "replay"):
            rep = await timed(roots, lambda: replay(log, folded))
        replay_ratio = rep.rate / scan.rate
        say(f"    replay (same loop + FoldEvent + ViewState.apply x{len(VIEWS)}): {rep.count:,} events in"
            f" {rep.seconds:.2f}s = {rep.rate:,.0f} events/s ({folded.applied:,} view applications)")  # fmt: skip
        say(f"      cpu: {CpuMeter.describe(rep.cpu, rep.seconds)}")
        fold_us = 1e6 * (rep.seconds - scan.seconds) / max(1, rep.count)
        say(f"    ratio replay / EventLog.read scan = {replay_ratio:.2f} (target >= {TARGET_REPLAY_RATIO});"
            f" replay / asyncpg cursor = {rep.rate / cursor.rate:.2f};"
            f" folding adds ~{fold_us:.1f} us/event")  # fmt: skip
        entities = {name: s.entities() for name, s in folded.states.items()}
        rows_held = {name: s.rows() for name, s in folded.states.items()}
        dropped = {name: s.dropped_late for name, s in folded.states.items()}
        say(f"    entities {entities}; rows held {rows_held}; dropped late {dropped}")
        started = time.perf_counter()
        live, live_objects = live_bytes(list(folded.states.values()))
        say(f"    live objects of the 3 ViewStates (sys.getsizeof, each object once): {live / 2**20:,.1f} MB in"
            f" {live_objects:,} objects, counted in {time.perf_counter() - started:.1f}s")  # fmt: skip
        for state in folded.states.values():  # a query builds an entity's columns and lifetime totals
            for eid in state.entity_ids():
                state.values(eid, state.max_event_time)
        live_queried, _ = live_bytes(list(folded.states.values()))
        say(f"    the same once every entity has been queried (its columns and lifetime totals built):"
            f" {live_queried / 2**20:,.1f} MB")  # fmt: skip

        # 3. Training frame (in-process, before the service starts, so nothing else runs meanwhile).
        say(f"\n[3] training frame: training_frame(log, VIEWS, rows) for {options.frame_rows:,} rows")
        started = time.perf_counter()
        rows, candidates = await sample_frame_rows(log, options.frame_rows)
        rows_seconds = time.perf_counter() - started
        say(f"    rows: {len(rows):,} drawn at random (seed {SEED}) from rows_from_events(log, {PAYMENT!r}, VIEWS)"
            f" ({candidates:,} rows, one per payment, each as of its event time with watermark seq - 1),"
            f" kept in log order; built in {rows_seconds:.2f}s (not timed below)")  # fmt: skip
        frame_holder: list[Any] = []
        lookups: list[tuple[int, float]] = []  # (times asked, seconds) of each offline.watermarks_at call

        async def timed_watermarks_at(log_: EventLog, times: Sequence[float]) -> list[int]:
            started = time.perf_counter()
            try:
                return await watermarks_at(log_, times)
            finally:
                lookups.append((len(times), time.perf_counter() - started))

        async def make_frame() -> int:
            frame_holder.append(await training_frame(log, VIEWS, rows))
            return len(rows)

        # training_frame looks watermarks_at up in its module at call time: time it from there.
        offline.watermarks_at = timed_watermarks_at  # type: ignore[assignment]
        try:
            with profiled(options.profile_dir, "training-frame"):
                frame = await timed(roots, make_frame)
        finally:
            offline.watermarks_at = watermarks_at
        df = frame_holder.pop()
        stale_rows = int(df["stale"].sum())
        unknown_rows = int((df["unknown_entities"] != "").sum())
        say(f"    {len(rows):,} rows x {df.shape[1]} columns in {frame.seconds:.2f}s = {frame.rate:,.0f} rows/s"
            f" ({stale_rows} stale, {unknown_rows} with unknown entities)")  # fmt: skip
        say(f"      cpu: {CpuMeter.describe(frame.cpu, frame.seconds)}")
        watermarks_seconds = sum(seconds for _, seconds in lookups)
        say(f"    of which offline.watermarks_at: {watermarks_seconds:.2f}s in {len(lookups)} call(s)"
            f" asking {sum(n for n, _ in lookups):,} time(s) (every row here has its watermark;"
            " the query reads every event's time)")  # fmt: skip
        say(f"    for scale: the replay of step 1 folded the same log in {rep.seconds:.2f}s")

        # 3b. The same frame folded in (source, partition) units over every core.
        cores = usable_cores()
        say(f"\n[3b] the same frame by partitioned_frame(url, VIEWS, rows, workers={cores}): one unit per"
            f" (source, entity partition), {cores} partitions, each a worker process with its own cursor")  # fmt: skip

        async def make_partitioned() -> int:
            frame_holder.append(await partitioned_frame(url, VIEWS, rows, workers=cores, role="d2d_features"))
            return len(rows)

        parted = await timed({**roots, "bench client": (os.getpid(), True)}, make_partitioned)
        parted_df = frame_holder.pop()
        try:
            pd.testing.assert_frame_equal(parted_df, df, check_exact=True)
            frames_equal = list(parted_df.dtypes) == list(df.dtypes)
        except AssertionError as exc:
            say(f"    NOT EQUAL to the single-process frame: {str(exc)[:400]}")
            frames_equal = False
        frame_speedup = parted.rate / FRAME_BASELINE_ROWS_PER_S
        say(
            f"    {len(rows):,} rows in {parted.seconds:.2f}s = {parted.rate:,.0f} rows/s"
            f" ({parted.rate / frame.rate:.2f} x the single-process frame in this run;"
            f" {frame_speedup:.2f} x the {FRAME_BASELINE_ROWS_PER_S:,} rows/s baseline,"
            f" target >= {TARGET_FRAME_SPEEDUP}); equal cell for cell to the single-process frame: {frames_equal}"
        )
        say(f"      cpu: {CpuMeter.describe(parted.cpu, parted.seconds)}")
        del df, parted_df

        # 2 and 4. The service. No gRPC in this process until every subprocess is started: grpc
        # complains about fork() while its threads run.
        env = service_env(servers, url, token, tmp)
        features = start_features(services, env, token, options.profile_dir)
        fpid = features.service.process.pid
        say(f"\n[2] features service: python -m services.features on {features.addr} (namespace {token});"
            " started before the relay, so it serves an empty stream first")  # fmt: skip
        await wait_logged(services, features.service, "features serving on")
        await asyncio.sleep(1.0)  # let start-up allocations settle
        rss_before, _ = rss_bytes(fpid)
        head = await log.head()  # the service registered its views: feature_view.registered events
        say(f"    SERVING with nothing folded: RSS {rss_before / 2**20:,.1f} MB; log head now {head:,}")
        bare_port, platform_port = free_port(), free_port()
        empty_args = ["-m", "bench.features", "--serve-empty", f"{bare_port},{platform_port}"]
        empty = services.start("empty-grpc", empty_args, env)
        await wait_listening(services, [bare_port, platform_port])
        relay = services.start("relay", ["-m", "services.ingest", "relay"], env)
        catch_roots = {**roots, "features service": (fpid, False), "relay": (relay.process.pid, False)}
        channel = grpcserver.channel(features.addr)
        bare_channel = grpcserver.channel(f"127.0.0.1:{bare_port}")
        platform_channel = grpcserver.channel(f"127.0.0.1:{platform_port}")
        try:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            probe = request([{"customer": "x", "merchant": "x", "card": "x"}], workload.newest)

            async def caught_up() -> int:
                async def at_head() -> bool:
                    services.check_alive()
                    answer = await stub.GetOnlineFeatures(probe, timeout=30)
                    return answer.watermark >= head

                await wait_until(at_head, timeout=900, interval=CATCH_UP_POLL, what="features service at the log head")
                return head

            catch = await timed(catch_roots, caught_up)
            say(f"    relay started; the service reached the head (seq {head:,}) after {catch.seconds:.2f}s"
                f" = {catch.rate:,.0f} events/s through relay -> JetStream -> fold"
                " (timed from the relay's start)")  # fmt: skip
            say(f"      cpu: {CpuMeter.describe(catch.cpu, catch.seconds)}")

            async def snapshot_at_head() -> bool:
                services.check_alive()
                found = await admin.fetchval(
                    "SELECT watermark FROM feature_snapshots WHERE consumer = $1", features.consumer
                )
                return bool(found and found >= head)

            await wait_until(snapshot_at_head, timeout=120, interval=0.2, what="a snapshot at the head")
            snapshot_bytes = await admin.fetchval(
                "SELECT length(state) FROM feature_snapshots WHERE consumer = $1", features.consumer
            )
            await asyncio.sleep(1.0)
            rss_after, rss_peak = rss_bytes(fpid)

            # Spot check: the service holds the state the in-process replay built.
            as_of = request([], workload.newest).as_of.ToMicroseconds() / 1e6
            check_rows = workload.keys[:WIDE_ROWS]
            answer = await stub.GetOnlineFeatures(request(check_rows, workload.newest), timeout=30)
            bad = mismatches(answer, check_rows, folded.states, as_of)
            say(f"    spot check: {len(check_rows) - bad} of {len(check_rows)} rows answered by the service equal the"
                " in-process replay's values")  # fmt: skip

            # 4. Memory.
            total_entities = sum(entities.values())
            total_rows = sum(rows_held.values())
            delta = rss_after - rss_before
            say(f"\n[4] memory: service RSS {rss_before / 2**20:,.1f} MB serving before folding ->"
                f" {rss_after / 2**20:,.1f} MB after catch-up and its snapshot"
                f" (peak {rss_peak / 2**20:,.1f} MB)")  # fmt: skip
            say(f"    {delta / 2**20:,.1f} MB for {total_entities:,} entities ({entities}) ="
                f" {delta / total_entities:,.0f} bytes/entity; {total_rows:,} buffered rows ="
                f" {delta / max(1, total_rows):,.0f} bytes/row;"
                f" snapshot {snapshot_bytes / 2**20:,.1f} MB (zlib)")  # fmt: skip
            say(f"    beside: live objects of the in-process replay's states {live / 2**20:,.1f} MB ="
                f" {live / total_entities:,.0f} bytes/entity, {live / max(1, total_rows):,.0f} bytes/row;"
                f" service RSS delta / live = {delta / live:.2f}")  # fmt: skip

            # 2. Latency.
            await wait_channel(bare_channel, services)
            await wait_channel(platform_channel, services)
            ours = {**catch_roots, "empty server": (empty.process.pid, False)}
            targets = {
                "features": (stub, ours),
                "empty": (features_pb2_grpc.FeatureServiceStub(bare_channel), ours),
                "platform empty": (features_pb2_grpc.FeatureServiceStub(platform_channel), ours),
            }
            measured: dict[tuple[str, int], Latency] = {}
            for per_call, calls in ((1, options.calls_one), (WIDE_ROWS, options.calls_wide)):
                batch = requests(workload.keys, per_call, calls, workload.newest)
                sample = await stub.GetOnlineFeatures(batch[0], timeout=30)
                say(f"\n    GetOnlineFeatures, {per_call} row(s) x every feature of {len(VIEWS)} views"
                    f" ({len(sample.feature_names)} values a row), as of {workload.newest.isoformat()}:"
                    f" {calls} sequential calls per target, interleaved in {LATENCY_ROUNDS} rounds, each after"
                    f" {WARM_SECONDS}s of untimed calls; request {batch[0].ByteSize():,} B,"
                    f" response {sample.ByteSize():,} B")  # fmt: skip
                for name, m in (await interleaved(targets, batch, LATENCY_ROUNDS)).items():
                    measured[(name, per_call)] = m
                    server = "features service" if name == "features" else "empty server"
                    say(f"    {name:>14}: {m.line()}; server CPU {m.cpu_per_call_us(server):,.0f} us/call,"
                        f" client CPU {m.cpu_per_call_us('bench client'):,.0f} us/call,"
                        f" other processes {m.cpu.get(OTHERS, 0.0) / m.wall:.0%} of a core")  # fmt: skip
                one = measured[("features", per_call)]
                say(f"    ratio p50 features / empty = {one.p50 / measured[('empty', per_call)].p50:.2f}"
                    f" (platform empty: {one.p50 / measured[('platform empty', per_call)].p50:.2f})"
                    + (f"; target <= {TARGET_LATENCY_RATIO}" if per_call == 1 else ""))  # fmt: skip
        finally:
            await channel.close()
            await bare_channel.close()
            await platform_channel.close()
    finally:
        await admin.close()
        await pool.close()
        await owner_pool.close()

    latency_ratio = measured[("features", 1)].p50 / measured[("empty", 1)].p50
    say(f"\nreplay / EventLog.read scan = {replay_ratio:.2f} (target >= {TARGET_REPLAY_RATIO}):"
        f" {'met' if replay_ratio >= TARGET_REPLAY_RATIO else 'MISSED'}")  # fmt: skip
    say(f"one-row GetOnlineFeatures p50 / empty handler p50 = {latency_ratio:.2f} (target <= {TARGET_LATENCY_RATIO}):"
        f" {'met' if latency_ratio <= TARGET_LATENCY_RATIO else 'MISSED'}")  # fmt: skip
    phases = {
        "asyncpg cursor scan": cursor.cpu.get(OTHERS, 0.0) / cursor.seconds,
        "EventLog.read scan": scan.cpu.get(OTHERS, 0.0) / scan.seconds,
        "replay": rep.cpu.get(OTHERS, 0.0) / rep.seconds,
        "training frame": frame.cpu.get(OTHERS, 0.0) / frame.seconds,
        "catch-up": catch.cpu.get(OTHERS, 0.0) / catch.seconds,
        **{f"{name} {n} row(s)": m.cpu.get(OTHERS, 0.0) / m.wall for (name, n), m in measured.items()},
    }
    contended = {phase: round(share, 2) for phase, share in phases.items() if share > CONTENDED}
    if contended:
        say(f"WARNING: processes this benchmark did not start used more than {CONTENDED:.0%} of a core during"
            f" {', '.join(f'{k} ({v:.0%})' for k, v in contended.items())}: those figures are distorted")  # fmt: skip

    def lat(name: str, per_call: int) -> dict[str, float]:
        m = measured[(name, per_call)]
        return {
            "p50_ms": round(m.p50, 3), "p99_ms": round(m.p99, 3), "calls": len(m.ms),
            "other_processes_cores": round(m.cpu.get(OTHERS, 0.0) / m.wall, 2),
        }  # fmt: skip

    config = workload.config
    result.update({
        "events": n,
        "payments": workload.payments,
        "sim": {"days": config.days, "payments_per_day": config.payments_per_day, "customers": config.customers,
                "merchants": config.merchants, "out_of_order_fraction": config.out_of_order_fraction},
        "load_seconds": round(load.seconds, 3),
        "load_events_per_s": rounded(load.rate),
        "vacuum_analyze_seconds": round(vacuum_seconds, 3),
        "replay_events_per_s": rounded(rep.rate),
        "replay_seconds": round(rep.seconds, 3),
        "replay_events": rep.count,
        "scan_eventlog_read_events_per_s": rounded(scan.rate),
        "scan_eventlog_read_seconds": round(scan.seconds, 3),
        "scan_asyncpg_cursor_rows_per_s": rounded(cursor.rate),
        "scan_asyncpg_cursor_rows": cursor.count,
        "replay_ratio_vs_eventlog_read_scan": round(replay_ratio, 3),
        "replay_ratio_vs_asyncpg_cursor": round(rep.rate / cursor.rate, 3),
        "target_replay_ratio": TARGET_REPLAY_RATIO,
        "cpu_s_replay": rep.cpu,
        "cpu_s_scan_eventlog_read": scan.cpu,
        "online_1_row": lat("features", 1),
        "empty_handler_1_row": lat("empty", 1),
        "platform_empty_handler_1_row": lat("platform empty", 1),
        f"online_{WIDE_ROWS}_rows": lat("features", WIDE_ROWS),
        f"empty_handler_{WIDE_ROWS}_rows": lat("empty", WIDE_ROWS),
        f"platform_empty_handler_{WIDE_ROWS}_rows": lat("platform empty", WIDE_ROWS),
        "online_1_row_p50_ratio_vs_empty": round(latency_ratio, 3),
        f"online_{WIDE_ROWS}_rows_p50_ratio_vs_empty": round(
            measured[("features", WIDE_ROWS)].p50 / measured[("empty", WIDE_ROWS)].p50, 3
        ),
        "target_latency_ratio": TARGET_LATENCY_RATIO,
        "empty_handler": "bare grpc.aio server in a subprocess, generic handler returning an empty"
        " GetOnlineFeaturesResponse without decoding the request; same requests, stub and channel",
        "platform_empty_handler": "the same empty handler served by d2d.grpcserver.new_server + add_service"
        " (a server span per call exported as JSON lines, request decoded) in the same subprocess",
        "replay_ratio_baseline": "EventLog.read paging loop with the same types filter, no folding",
        "service_cpu_us_per_call_1_row": round(measured[("features", 1)].cpu_per_call_us("features service")),
        f"service_cpu_us_per_call_{WIDE_ROWS}_rows": round(
            measured[("features", WIDE_ROWS)].cpu_per_call_us("features service")
        ),
        "online_matches_replay_rows": len(check_rows) - bad,
        "online_checked_rows": len(check_rows),
        "frame_rows": frame.count,
        "frame_seconds": round(frame.seconds, 3),
        "frame_rows_per_s": rounded(frame.rate),
        "frame_rows_built_from": f"{frame.count} of {candidates} rows_from_events({PAYMENT}) rows, random seed {SEED}",
        "frame_rows_build_seconds": round(rows_seconds, 3),
        "frame_watermarks_at_seconds": round(watermarks_seconds, 3),
        "frame_watermarks_at_calls": len(lookups),
        "frame_stale_rows": stale_rows,
        "frame_partitioned_workers": cores,
        "frame_partitioned_seconds": round(parted.seconds, 3),
        "frame_partitioned_rows_per_s": rounded(parted.rate),
        "frame_partitioned_vs_single_process": round(parted.rate / frame.rate, 2),
        "frame_partitioned_equal": frames_equal,
        "frame_baseline_rows_per_s": FRAME_BASELINE_ROWS_PER_S,
        "frame_baseline": "training_frame, one process: 100,000 rows over 1,005,322 events on 2 cores (issue 13)",
        "frame_partitioned_vs_baseline": round(frame_speedup, 2),
        "target_frame_vs_baseline": TARGET_FRAME_SPEEDUP,
        "cpu_s_frame_partitioned": parted.cpu,
        "cpu_s_frame": frame.cpu,
        "catch_up_seconds": round(catch.seconds, 3),
        "catch_up_events_per_s": rounded(catch.rate),
        "cpu_s_catch_up": catch.cpu,
        "memory_measured_as": "features service RSS after catch-up and its snapshot at the head minus RSS when"
        " serving before anything was folded; entities from the in-process replay's ViewState.entities()",
        "service_rss_before_mb": round(rss_before / 2**20, 1),
        "service_rss_after_mb": round(rss_after / 2**20, 1),
        "service_rss_peak_mb": round(rss_peak / 2**20, 1),
        "entities": entities,
        "entities_total": total_entities,
        "rows_held": rows_held,
        "bytes_per_entity": round(delta / total_entities),
        "bytes_per_row_held": round(delta / max(1, total_rows)),
        "live_state_bytes": live,
        "live_state_bytes_every_entity_queried": live_queried,
        "live_bytes_per_entity": round(live / total_entities),
        "live_bytes_per_row_held": round(live / max(1, total_rows)),
        "live_measured_as": "in-process: sys.getsizeof of every object the replay's 3 ViewStates reach, once each",
        "snapshot_bytes": snapshot_bytes,
        "contended_phases": contended,
        "profiled": options.profile_dir is not None,
        "machine": {**machine(), "data_fs": filesystem_of(tmp), "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
    })  # fmt: skip
    return result


def main() -> None:
    p = parser("features", "Replay, online lookup latency, training frames and memory, beside raw baselines.")
    p.add_argument("--days", type=float, help=f"simulated days (default {QUICK_DAYS} quick, {FULL_DAYS} full)")
    p.add_argument("--frame-rows", type=int, help=f"frame rows ({QUICK_FRAME_ROWS} quick, {FULL_FRAME_ROWS} full)")
    p.add_argument("--calls", type=int, nargs=2, metavar=("ONE", "WIDE"),
                   help=f"1-row and {WIDE_ROWS}-row calls ({QUICK_CALLS} quick, {FULL_CALLS} full)")  # fmt: skip
    p.add_argument("--tmp-dir", type=Path, help="where to put the servers' data (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="cProfile the features service, the in-process replay and frame into DIR/*.prof")  # fmt: skip
    p.add_argument("--serve-empty", metavar="BARE,PLATFORM", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_empty:
        bare_port, platform_port = (int(x) for x in args.serve_empty.split(","))
        asyncio.run(serve_empty(features_pb2.DESCRIPTOR.services_by_name["FeatureService"], "GetOnlineFeatures",
                                bare_port, platform_port))  # fmt: skip
        return
    stop_on_sigterm()
    days = args.days or (QUICK_DAYS if args.quick else FULL_DAYS)
    calls_one, calls_wide = args.calls or (QUICK_CALLS if args.quick else FULL_CALLS)
    frame_rows = args.frame_rows or (QUICK_FRAME_ROWS if args.quick else FULL_FRAME_ROWS)
    profile_dir = args.profile.resolve() if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    options = Options(args.quick, frame_rows, calls_one, calls_wide, profile_dir)

    started = time.perf_counter()
    workload = build_workload(days)
    info = machine()
    say(f"bench.features{' (quick)' if args.quick else ''}: {workload.n:,} simulator events (days={days},"
        f" {PAYMENTS_PER_DAY:,} payments/day, {OUT_OF_ORDER_FRACTION:.0%} out of order; {workload.payments:,}"
        f" {PAYMENT}), built in {time.perf_counter() - started:.1f}s before any timing")  # fmt: skip
    say(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, Python {info['python']};"
        f" load average {os.getloadavg()[0]:.2f} (see the CPU of other processes per phase)")  # fmt: skip
    if profile_dir:
        say(f"PROFILING into {profile_dir}: figures are slowed by cProfile")

    with bench_dir("features", args.tmp_dir, args.keep) as tmp:
        say(f"servers' data in {tmp} ({filesystem_of(tmp)}); Postgres fsync off (no durable writes are measured)")
        with Servers(tmp, fsync=False) as servers, Services(tmp / "logs") as services:
            result = asyncio.run(run(options, workload, servers, services, tmp))
    say(f"done in {time.perf_counter() - started:.1f}s")
    emit(result)


if __name__ == "__main__":
    main()
