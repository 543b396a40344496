"""Serving benchmark: Predict throughput and latency beside an empty gRPC handler, and micro-batching.

`python -m bench.serving [--quick] [--profile DIR]`

What is measured, in one run, on real servers started in a temp dir (Postgres with fsync ON, so the
group commit of each decision waits for its WAL flush to reach the disk, and NATS JetStream with
file storage). The log is loaded directly: simulator events (full: SimConfig(seed=4, days=35,
payments_per_day=1200, customers=800, merchants=80), as tests/test_serving.py, about 45,000
events; quick: payments_per_day=600, customers=500, merchants=50, about 22,000) appended with
`EventLog.append` in batches of 5,000. Then the platform runs as `d2d up` runs it, each service
its own process: `python -m services.ingest relay`, `python -m services.features`, `python -m
services.registry`, `python -m services.serving` (features in-process, the default), and a second
`python -m services.serving` with `D2D_SERVING_FEATURES=remote` ('serving remote': features from
the features service over gRPC) on its own port. Once the features service has folded the whole
log, a model is trained through `RegistryClient.train` (the default spec: the simulator's views
and transforms, 300 rounds with early stopping after 30) and made the production version. None of
this is timed as a figure.

Requests: `ServingClient.request(model, entities, context, unit_id=customer)` for the newest
payments of the simulation (up to 4,096 different ones, cycled), context = the payment's fields
with occurred_at = the end of the simulated period, no request id (every call is a new decision),
built before any clock starts. Every Predict does the whole path: the deployment lookup, the
features (read from the state serving folds itself; in 'serving remote', a GetOnlineFeatures call
to the features service, coalesced with concurrent ones), model inputs, micro-batched XGBoost
scoring, the policy, and the decision.made event group-committed to the Postgres log; the answer
comes back once that commit is durable. The number of decision.made events in the log is checked
against the calls made. Before timing, both serving processes answer one Predict, so the local
one has built its models' views; its resident memory (RSS) is then reported beside the remote
one's, which holds no feature state: the difference is what the state costs.

1. Predict throughput at concurrency 64: one client process (this one), one channel
   (`d2d.client.ServingClient`'s: `d2d.grpcserver.channel`), 64 coroutines sharing one counter,
   each awaiting unary Predict calls one after another, until N calls (full 20,000, quick 3,000)
   have returned; calls/s = N / wall seconds.
2. Predict latency at concurrency 1: sequential calls (full 2,000, quick 300), p50 / p99.
   Baseline for both: an EMPTY grpc.aio unary handler in a process of its own (`python -m
   bench.serving --serve-empty BARE,PLATFORM`): a bare `grpc.aio.server()` with a generic handler
   for `/d2d.v1.ServingService/Predict` that takes the request bytes without decoding them and
   returns b"" (an empty PredictResponse). The client is the same code (the same stub class on the
   same kind of channel, the same serialized PredictRequests, the same concurrency and counts).
   Targets: Predict throughput >= 0.5 x the empty handler's; Predict p50 <= 3 x and p99 <= 4 x the
   empty handler's.
   Context, measured the same way: the same empty Predict served the platform's way
   (`d2d.grpcserver.new_server` + `add_service`: a traced span per call, exported as JSON
   lines, lenient decoding, the API key checked: how much of a Predict is the platform's gRPC
   plumbing), the same again with no key check (every call admitted: what the check costs, beside
   a Predict's CPU in all processes), and two parts
   of a Predict alone, from this process: 'features lookup', the GetOnlineFeatures call serving
   makes (the model's views, one entity row, as of the request's time) on the platform's client
   channel; 'decision commit', `GroupCommitter.append` of one decision.made event (a real
   decision's payload) to a fresh log database on the same Postgres.
   Every target gets 256 warm-up calls, then the calls in interleaved rounds (full 4, quick 2: each
   round runs every target in turn), so a busy moment of the machine falls on all alike. CPU
   seconds per process (serving, features, relay, registry, Postgres, NATS, the empty server, this
   client) are printed per call for each target, with the CPU that processes this benchmark did
   not start used meanwhile ("other processes": a busy neighbour distorts the figures), and the
   serving process's CPU per thread (by thread name; 'main' runs the event loop).
3. Scoring throughput with micro-batching on and off, in this process: the production artifact
   (`RegistryClient.artifact`) loaded into `xgboost.Booster(nthread=1)` as serving loads it, one
   `services.serving.models.MicroBatcher(booster, enabled=True)` and one with `enabled=False`,
   each driven by 64 coroutines awaiting `batcher.score(row)` one after another until M scores
   (full 40,000, quick 8,000), interleaved in the same rounds. Rows are real model inputs:
   `d2d.training.spec.model_inputs` of features fetched once from the features service for the
   requests' entities and their contexts. Figure: scores/s for both, the ratio (target >= 5) and
   the mean batch size (batcher.rows / batcher.calls). Beside it: XGBoost alone, DMatrix +
   `booster.predict` of 64 of the same rows at a time, as rows/s.

`--profile DIR` runs the serving and features processes under cProfile (DIR/serving.prof,
DIR/features.prof) and prints the serving process's busiest functions at the end, and the mean
batch its MicroBatcher reached (Predict calls / `_predict` calls); such a run's figures are slowed
by the profiler.

The last line printed is one JSON object with every figure and its baselines (see bench/_common).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
import psutil
import xgboost as xgb
from google.protobuf import json_format

from bench._common import (
    CpuMeter,
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
    serve_empty,
    stop_on_sigterm,
    wait_until,
)
from d2d.client import FeatureClient, RegistryClient, ServingClient
from d2d.eventlog import EventLog, GroupCommitter, NewEvent, create_pool
from d2d.runtime.servers import free_port
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.training import default_spec
from d2d.sim.views import VIEWS
from d2d.training.spec import TrainingSpec, model_inputs
from d2d.v1 import features_pb2, serving_pb2, serving_pb2_grpc
from services.serving.models import MicroBatcher

FULL_SIM = SimConfig(seed=4, days=35, payments_per_day=1200, customers=800, merchants=80)
QUICK_SIM = SimConfig(seed=4, days=35, payments_per_day=600, customers=500, merchants=50)
FULL_CALLS, QUICK_CALLS = 20_000, 3_000  # Predict calls at concurrency 64
FULL_LATENCY, QUICK_LATENCY = 2_000, 300  # sequential Predict calls
FULL_SCORES, QUICK_SCORES = 40_000, 8_000  # batcher.score calls per mode
FULL_ROUNDS, QUICK_ROUNDS = 4, 2
CONCURRENCY = 64
WARMUP_CALLS = 256
DISTINCT_REQUESTS = 4_096
APPEND_BATCH = 5_000
CALL_TIMEOUT = 30.0
MODEL = "fraud"
SERVICE_NAME = "d2d.v1.ServingService"
TARGET_THROUGHPUT_RATIO = 0.5  # Predict calls/s >= 0.5 x the empty handler's
TARGET_P50_RATIO = 3.0  # Predict p50 <= 3 x the empty handler's
TARGET_P99_RATIO = 4.0  # Predict p99 <= 4 x the empty handler's
TARGET_BATCHING_RATIO = 5.0  # scores/s with micro-batching >= 5 x without
OTHERS = "other processes"
EMPTY, PLATFORM_EMPTY, SERVING, REMOTE = "empty", "platform empty", "serving", "serving remote"
KEYLESS_EMPTY = "platform empty, no key check"
LOOKUP, COMMIT = "features lookup", "decision commit"


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ---------------------------------------------------------------------------------------------
# The workload, built before any clock starts


@dataclass(frozen=True)
class Workload:
    config: SimConfig
    events: list[NewEvent]
    now: str  # the end of the simulated period: every request's occurred_at
    requests: list[serving_pb2.PredictRequest]

    @property
    def request_bytes(self) -> float:
        return sum(r.ByteSize() for r in self.requests) / len(self.requests)


def build_workload(config: SimConfig) -> Workload:
    now = (config.start + timedelta(days=config.days)).isoformat()
    simulated = list(PaymentsSimulator(config).events())
    events = [e.as_new_event() for e in simulated]
    payments = [e for e in simulated if e.type == "payment.authorized"][-DISTINCT_REQUESTS:]
    requests = []
    for p in payments:
        payload = p.payload
        entities = {"customer": payload["customer_id"], "merchant": payload["merchant_id"], "card": payload["card_id"]}
        context = {**payload, "occurred_at": now}
        requests.append(ServingClient.request(MODEL, entities, context, unit_id=payload["customer_id"]))
    return Workload(config, events, now, requests)


async def load_log(url: str, events: Sequence[NewEvent]) -> None:
    pool = await create_pool(url, max_size=2)
    try:
        log = EventLog(pool)
        for i in range(0, len(events), APPEND_BATCH):
            results = await log.append(events[i : i + APPEND_BATCH])
            if any(r.duplicate for r in results):
                raise RuntimeError(f"load: duplicates in the batch at {i}")
    finally:
        await pool.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE events")
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# CPU, with what the rest of the machine did meanwhile


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def thread_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of `pid`: {tid: (name, seconds)}, the main thread named 'main'."""
    found: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(psutil.Error):
        for t in psutil.Process(pid).threads():
            name = "main"
            if t.id != pid:
                try:
                    name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
                except OSError:
                    name = "?"
            found[t.id] = (name, t.user_time + t.system_time)
    return found


class Meter:
    """CpuMeter over our processes, plus the CPU every other process of the machine used meanwhile,
    and, for one process (`threads_of`), the CPU of its threads by thread name."""

    def __init__(self, roots: Mapping[str, tuple[int, bool]], threads_of: int | None = None) -> None:
        self.cpu = CpuMeter(roots)
        self.threads_of = threads_of
        self.threads: dict[str, float] = {}
        self._busy = 0.0
        self._threads: dict[int, tuple[str, float]] = {}

    def start(self) -> None:
        self._busy = machine_busy_seconds()
        if self.threads_of is not None:
            self._threads = thread_seconds(self.threads_of)
        self.cpu.start()

    def stop(self) -> dict[str, float]:
        ours = self.cpu.stop()
        busy = machine_busy_seconds() - self._busy
        if self.threads_of is not None:
            for tid, (name, seconds) in thread_seconds(self.threads_of).items():
                spent = seconds - self._threads.get(tid, (name, 0.0))[1]
                self.threads[name] = round(self.threads.get(name, 0.0) + spent, 2)
        return {**ours, OTHERS: round(max(0.0, busy - sum(ours.values())), 2)}


def add_cpu(total: dict[str, float], more: Mapping[str, float]) -> None:
    for label, seconds in more.items():
        total[label] = round(total.get(label, 0.0) + seconds, 2)


# ---------------------------------------------------------------------------------------------
# The measurements of calls (the same client code for every gRPC target)


Call = Callable[[int], Awaitable[bool]]  # call(i): make call number i; True if it did the work (a decision)


@dataclass
class Target:
    name: str
    call: Call
    calls: int = 0
    seconds: float = 0.0
    throughput_cpu: dict[str, float] = field(default_factory=dict)
    ms: list[float] = field(default_factory=list)
    latency_seconds: float = 0.0
    latency_cpu: dict[str, float] = field(default_factory=dict)
    threads_of: int | None = None  # a process whose threads' CPU is reported
    throughput_threads: dict[str, float] = field(default_factory=dict)
    latency_threads: dict[str, float] = field(default_factory=dict)
    made: int = 0  # calls made, warm-up included
    answered: int = 0  # calls that did the work

    @property
    def rate(self) -> float:
        return per_second(self.calls, self.seconds)

    @property
    def p50(self) -> float:
        return percentile(self.ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.ms, 99)

    def latency_line(self) -> str:
        mean = sum(self.ms) / len(self.ms)
        return f"p50 {self.p50:.2f} ms, p99 {self.p99:.2f} ms (mean {mean:.2f}, max {max(self.ms):.2f})"


def per_call_us(cpu: Mapping[str, float], calls: int) -> dict[str, float]:
    """CPU microseconds per call of each of our processes, busiest first (other processes left out)."""
    ours = sorted(((k, v) for k, v in cpu.items() if k != OTHERS), key=lambda kv: -kv[1])
    return {label: round(1e6 * s / calls) for label, s in ours if s > 0}


def predict_call(stub: serving_pb2_grpc.ServingServiceStub, requests: Sequence[serving_pb2.PredictRequest]) -> Call:
    async def call(i: int) -> bool:
        response = await stub.Predict(requests[i % len(requests)], timeout=CALL_TIMEOUT)
        return bool(response.decision_id)

    return call


async def concurrent_calls(target: Target, n: int) -> None:
    """n calls, CONCURRENCY in flight (coroutines sharing one counter)."""
    pending = iter(range(target.made, target.made + n))
    target.made += n

    async def worker() -> None:
        for i in pending:
            done = await target.call(i)  # awaited first: `x += await f()` would read x before the await
            target.answered += done

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def sequential_calls(target: Target, n: int) -> None:
    for i in range(target.made, target.made + n):
        started = time.perf_counter()
        done = await target.call(i)
        target.ms.append((time.perf_counter() - started) * 1000)
        target.answered += done
    target.made += n


def split(total: int, rounds: int) -> list[int]:
    return [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]


async def measure_calls(
    targets: Sequence[Target], roots: Mapping[str, tuple[int, bool]], *, calls: int, latency_calls: int, rounds: int,
    services: Services,
) -> None:  # fmt: skip
    """Warm-up, then throughput rounds and latency rounds, the targets interleaved in each."""
    for t in targets:
        await concurrent_calls(t, WARMUP_CALLS)
    services.check_alive()
    for n in split(calls, rounds):
        for t in targets:
            meter = Meter(roots, t.threads_of)
            meter.start()
            started = time.perf_counter()
            await concurrent_calls(t, n)
            t.seconds += time.perf_counter() - started
            add_cpu(t.throughput_cpu, meter.stop())
            add_cpu(t.throughput_threads, meter.threads)
            t.calls += n
        services.check_alive()
    for n in split(latency_calls, rounds):
        for t in targets:
            meter = Meter(roots, t.threads_of)
            meter.start()
            started = time.perf_counter()
            await sequential_calls(t, n)
            t.latency_seconds += time.perf_counter() - started
            add_cpu(t.latency_cpu, meter.stop())
            add_cpu(t.latency_threads, meter.threads)
        services.check_alive()


# ---------------------------------------------------------------------------------------------
# Micro-batching, in this process


@dataclass
class Scoring:
    enabled: bool
    scores: int = 0
    seconds: float = 0.0
    calls: int = 0  # predict calls the batcher made
    rows: int = 0

    @property
    def rate(self) -> float:
        return per_second(self.scores, self.seconds)

    @property
    def mean_batch(self) -> float:
        return self.rows / self.calls if self.calls else float("nan")


async def drive_batcher(batcher: MicroBatcher, rows: Sequence[list[float]], n: int) -> list[float]:
    pending = iter(range(n))
    scores: list[float] = []

    async def worker() -> None:
        for i in pending:
            scores.append(await batcher.score(rows[i % len(rows)]))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return scores


async def measure_batching(booster: xgb.Booster, rows: Sequence[list[float]], total: int, rounds: int) -> list[Scoring]:
    modes = [Scoring(True), Scoring(False)]
    batchers = {m.enabled: MicroBatcher(booster, enabled=m.enabled) for m in modes}
    try:
        # Both modes score the same rows alike (a batch gives each row the score it gets alone).
        alone = await drive_batcher(batchers[False], rows[:CONCURRENCY], CONCURRENCY)
        together = await drive_batcher(batchers[True], rows[:CONCURRENCY], CONCURRENCY)
        if sorted(alone) != sorted(together):
            raise RuntimeError("micro-batched scores differ from scores computed one row at a time")
        for n in split(total, rounds):
            for m in modes:
                b = batchers[m.enabled]
                calls, counted = b.calls, b.rows
                started = time.perf_counter()
                await drive_batcher(b, rows, n)
                m.seconds += time.perf_counter() - started
                m.scores += n
                m.calls += b.calls - calls
                m.rows += b.rows - counted
    finally:
        for b in batchers.values():
            b.close()
    return modes


def xgboost_alone(booster: xgb.Booster, rows: Sequence[list[float]], repeats: int) -> float:
    """Rows/s of booster.predict on DMatrix batches of CONCURRENCY rows (as the batcher calls it)."""
    best = int(booster.attr("best_iteration") or -1)
    batch = np.asarray(rows[:CONCURRENCY], dtype=np.float64)
    started = time.perf_counter()
    for _ in range(repeats):
        matrix = xgb.DMatrix(batch, missing=np.nan)
        booster.predict(matrix, iteration_range=(0, best + 1) if best >= 0 else (0, 0), validate_features=False)
    return per_second(repeats * len(batch), time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Options:
    quick: bool
    calls: int
    latency_calls: int
    scores: int
    rounds: int
    profile_dir: Path | None


async def until_ready(ready: Awaitable[Any], services: Services, timeout: float = 60) -> None:
    """Await `ready`, failing fast (with its log) if a started process exits."""
    task = asyncio.ensure_future(asyncio.wait_for(ready, timeout))
    try:
        while not task.done():
            services.check_alive()
            await asyncio.wait({task}, timeout=0.1)
        task.result()
    finally:
        task.cancel()


async def postgres_settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        names = ("fsync", "synchronous_commit", "wal_sync_method")
        return {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()


def cpu_line(cpu: Mapping[str, float], calls: int, wall: float) -> str:
    ours = {k: v for k, v in cpu.items() if k != OTHERS}
    per_call = ", ".join(f"{k} {v:,.0f}" for k, v in per_call_us(ours, calls).items())
    return (
        f"cpu us/call: {per_call}; total {1e6 * sum(ours.values()) / calls:,.0f} us/call;"
        f" other processes {cpu.get(OTHERS, 0.0) / wall:.0%} of a core"
    )


async def run(
    options: Options, workload: Workload, servers: Servers, services: Services, tmp: Path
) -> dict[str, Any]:  # fmt: skip
    token = f"s{uuid.uuid4().hex[:8]}"
    pg = await postgres_settings(servers.postgres.admin_url())
    say(f"Postgres: fsync={pg['fsync']}, synchronous_commit={pg['synchronous_commit']},"
        f" wal_sync_method={pg['wal_sync_method']} (each decision's commit waits for its WAL flush)")  # fmt: skip

    url = await servers.new_database(f"{token}_serving")
    started = time.perf_counter()
    await load_log(url, workload.events)
    say(f"log loaded: {len(workload.events):,} events in {time.perf_counter() - started:.1f}s"
        " (EventLog.append, batches of 5,000; then VACUUM ANALYZE)")  # fmt: skip

    ports = {name: free_port() for name in ("features", "registry", "serving")}
    env = {
        "D2D_DATABASE_URL": url, "D2D_NATS_URL": servers.nats.url, "D2D_NATS_NAMESPACE": token,
        "D2D_DATA_DIR": str(tmp / "data"),
        **{f"D2D_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()},
    }  # fmt: skip
    remote_env = {**env, "D2D_SERVING_ADDR": f"127.0.0.1:{free_port()}", "D2D_SERVING_FEATURES": "remote"}
    bare_port, platform_port, keyless_port = free_port(), free_port(), free_port()
    started_services = {}
    for name, module in (
        ("relay", ["services.ingest", "relay"]), ("features", ["services.features"]),
        ("registry", ["services.registry"]), ("serving", ["services.serving"]),
        ("serving remote", ["services.serving"]),
        ("empty server", ["bench.serving", "--serve-empty", f"{bare_port},{platform_port},{keyless_port}"]),
    ):  # fmt: skip
        args = ["-m", *module]
        if options.profile_dir is not None and name in ("features", "serving"):
            args = ["-m", "cProfile", "-o", str(options.profile_dir / f"{name}.prof"), *args]
        own = remote_env if name == "serving remote" else env
        started_services[name] = services.start(name.replace(" ", "-"), args, own)
    roots = {**{f"{name}": (s.process.pid, False) for name, s in started_services.items()}, **servers.cpu_roots()}
    say(f"services: relay, features, registry, serving (namespace {token}) and the empty server, each its own"
        " process")  # fmt: skip

    registry = RegistryClient(env["D2D_REGISTRY_ADDR"])
    features = FeatureClient(env["D2D_FEATURES_ADDR"])
    serving = ServingClient(env["D2D_SERVING_ADDR"])
    remote = ServingClient(remote_env["D2D_SERVING_ADDR"])
    bare = ServingClient(f"127.0.0.1:{bare_port}")
    platform = ServingClient(f"127.0.0.1:{platform_port}")
    keyless = ServingClient(f"127.0.0.1:{keyless_port}")
    conn = await asyncpg.connect(url)
    try:
        for client in (registry, features, serving, remote, bare, platform, keyless):
            await until_ready(client.wait_ready(), services)

        # The features service folds the whole log (relay -> JetStream -> fold).
        started = time.perf_counter()
        probe_refs = [f"{v.name}.*" for v in VIEWS]

        async def caught_up() -> bool:
            services.check_alive()
            head = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
            try:
                answer = await features.get_online(probe_refs[:1], [{"customer": "x"}], timeout=10)
            except grpc.aio.AioRpcError:
                return False
            return answer.watermark >= head

        await wait_until(caught_up, timeout=900, interval=0.2, what="the features service at the log head")
        say(f"features service at the log head after {time.perf_counter() - started:.1f}s")

        started = time.perf_counter()
        await registry.create_model(MODEL, "bench.serving")
        version = await registry.train(MODEL, json.dumps(default_spec().to_dict()))
        number = version.name.rsplit("/", 1)[1]
        await registry.set_alias(MODEL, "production", number)
        lineage = json.loads(version.lineage_json)
        say(f"model {version.name} trained in {time.perf_counter() - started:.1f}s ({lineage['examples']:,} examples,"
            f" {len(version.feature_names)} inputs, best iteration {lineage['best_iteration']},"
            f" {version.artifact_bytes:,} B) and set as production")  # fmt: skip

        # 1 and 2: Predict against serving and the empty handlers, and two parts of a Predict alone.
        spec = TrainingSpec.from_json(version.spec_json)
        views = {(v.name, v.version): v for v in VIEWS}
        spec_views = [views[v] for v in spec.views]
        as_of = datetime.fromisoformat(workload.now)
        lookups = []
        for r in workload.requests:  # what serving asks the features service for each request
            lookup = features_pb2.GetOnlineFeaturesRequest(
                features=[f"{v.name}.*" for v in spec_views], rows=[features_pb2.EntityRow(keys=dict(r.entities))]
            )
            lookup.as_of.FromDatetime(as_of)
            lookups.append(lookup)

        async def lookup_call(i: int) -> bool:
            await features.stub.GetOnlineFeatures(lookups[i % len(lookups)], timeout=CALL_TIMEOUT)
            return True

        first = await serving.stub.Predict(workload.requests[0], timeout=CALL_TIMEOUT)
        await remote.stub.Predict(workload.requests[0], timeout=CALL_TIMEOUT)
        rss = {name: psutil.Process(started_services[name].process.pid).memory_info().rss for name in (SERVING, REMOTE)}
        state_bytes = rss[SERVING] - rss[REMOTE]
        say(f"serving RSS {rss[SERVING] / 2**20:,.1f} MB holding its model's views (watermark"
            f" {first.feature_watermark:,}), 'serving remote' RSS {rss[REMOTE] / 2**20:,.1f} MB holding none:"
            f" the state costs about {state_bytes / 2**20:,.1f} MB")  # fmt: skip
        decision = await conn.fetchrow(
            "SELECT payload::text AS payload, metadata FROM events WHERE event_id = $1", uuid.UUID(first.decision_id)
        )
        if decision is None:
            raise RuntimeError(f"decision {first.decision_id} answered but not in the log")
        decision_payload = decision["payload"]
        probe_url = await servers.new_database(f"{token}_commit")
        probe_pool = await create_pool(probe_url, max_size=8)  # as serving's pool
        committer = GroupCommitter(EventLog(probe_pool))

        async def commit_call(i: int) -> bool:
            event_id = uuid.uuid4()
            event = NewEvent(
                event_id, "decision.made", 1, "decision", str(event_id), datetime.now(UTC), decision_payload,
                {"producer": "serving", "model": MODEL},
            )  # fmt: skip
            [logged] = await committer.append([event])
            return not logged.duplicate

        serving_pid = started_services["serving"].process.pid
        targets = [
            Target(EMPTY, predict_call(bare.stub, workload.requests)),
            Target(PLATFORM_EMPTY, predict_call(platform.stub, workload.requests)),
            Target(KEYLESS_EMPTY, predict_call(keyless.stub, workload.requests)),
            Target(SERVING, predict_call(serving.stub, workload.requests), threads_of=serving_pid),
            Target(REMOTE, predict_call(remote.stub, workload.requests)),
            Target(LOOKUP, lookup_call),
            Target(COMMIT, commit_call),
        ]
        say(f"\n[1, 2] Predict: {options.calls:,} calls at concurrency {CONCURRENCY} and {options.latency_calls:,}"
            f" sequential calls per target, in {options.rounds} interleaved rounds after {WARMUP_CALLS} warm-up"
            f" calls; {len(workload.requests):,} distinct requests, {workload.request_bytes:.0f} B serialized"
            " on average")  # fmt: skip
        say(f"    parts of a Predict, measured alike in the same rounds: '{LOOKUP}' = the GetOnlineFeatures call"
            f" serving makes ({len(spec_views)} views, 1 entity row, {lookups[0].ByteSize()} B), from this process;"
            f" '{COMMIT}' = GroupCommitter.append of one decision.made event ({len(decision_payload):,} B payload, a"
            " real one) to a fresh log database on the same Postgres, from this process")  # fmt: skip
        before = await conn.fetchval("SELECT count(*) FROM events WHERE type = 'decision.made'")
        try:
            await measure_calls(
                targets, roots, calls=options.calls, latency_calls=options.latency_calls, rounds=options.rounds,
                services=services,
            )  # fmt: skip
        finally:
            await committer.close()
            await probe_pool.close()
        decisions = await conn.fetchval("SELECT count(*) FROM events WHERE type = 'decision.made'") - before
        by_name = {t.name: t for t in targets}
        empty, platform_empty, predict = by_name[EMPTY], by_name[PLATFORM_EMPTY], by_name[SERVING]
        keyless_empty = by_name[KEYLESS_EMPTY]
        remote_predict = by_name[REMOTE]
        lookup, commit = by_name[LOOKUP], by_name[COMMIT]
        made = predict.made + remote_predict.made
        if decisions != made or predict.answered + remote_predict.answered != made or commit.answered != commit.made:
            raise RuntimeError(
                f"{made} Predict calls, {predict.answered + remote_predict.answered} answers with a decision id,"
                f" {decisions} decision.made events in the log; {commit.answered} of {commit.made} commits stored"
            )
        say(f"    every one of the {made:,} Predict calls to serving (both modes) answered a decision; the log holds"
            f" {decisions:,} new decision.made events")  # fmt: skip
        for t in targets:
            say(f"    {t.name:>15}: {t.calls:,} calls at concurrency {CONCURRENCY} in {t.seconds:.2f}s ="
                f" {t.rate:,.0f} calls/s")  # fmt: skip
            say(f"    {'':>15}  {cpu_line(t.throughput_cpu, t.calls, t.seconds)}")
        for t in targets:
            say(f"    {t.name:>15}: sequential, {len(t.ms):,} calls: {t.latency_line()}")
            say(f"    {'':>15}  {cpu_line(t.latency_cpu, len(t.ms), t.latency_seconds)}")
        for what, threads, calls in (
            (f"at concurrency {CONCURRENCY}", predict.throughput_threads, predict.calls),
            ("sequential", predict.latency_threads, len(predict.ms)),
        ):  # fmt: skip
            say(f"    serving process threads, {what}, cpu us/call: "
                + ", ".join(f"{k} {v:,.0f}" for k, v in per_call_us(threads, calls).items()))  # fmt: skip
        parts_p50 = platform_empty.p50 + lookup.p50 + commit.p50
        say(f"    sequential p50 of the parts: platform empty {platform_empty.p50:.2f} + features lookup"
            f" {lookup.p50:.2f} + decision commit {commit.p50:.2f} = {parts_p50:.2f} ms, beside Predict"
            f" {predict.p50:.2f} ms (the rest: inputs, scoring, policy, payload, serving's scheduling)")  # fmt: skip

        # 3: micro-batching, in this process, with real model inputs.
        data, sha = await registry.artifact(MODEL, number)
        booster = xgb.Booster(params={"nthread": 1})
        booster.load_model(bytearray(data))
        contexts = [json_format.MessageToDict(r.context) for r in workload.requests[:512]]
        served = await features.get_online(
            [f"{v.name}.*" for v in spec_views], [dict(r.entities) for r in workload.requests[:512]],
            as_of=as_of, timeout=60,
        )  # fmt: skip
        rows = [model_inputs(spec, spec_views, f, c) for f, c in zip(served.rows, contexts, strict=True)]
        say(f"\n[3] scoring in this process: {len(rows)} real input vectors ({len(rows[0])} inputs), production"
            f" artifact {len(data):,} B in xgboost.Booster(nthread=1); {options.scores:,} batcher.score calls per"
            f" mode from {CONCURRENCY} coroutines, in {options.rounds} interleaved rounds")  # fmt: skip
        on, off = await measure_batching(booster, rows, options.scores, options.rounds)
        alone = xgboost_alone(booster, rows, max(200, options.scores // CONCURRENCY))
        for m in (on, off):
            say(f"    micro-batching {'on ' if m.enabled else 'off'}: {m.scores:,} scores in {m.seconds:.2f}s ="
                f" {m.rate:,.0f} scores/s; {m.calls:,} predict calls, mean batch {m.mean_batch:.1f} rows")  # fmt: skip
        say(f"    beside: XGBoost alone, DMatrix + predict of {CONCURRENCY} rows at a time: {alone:,.0f} rows/s")
        services.check_alive()
    finally:
        await conn.close()
        for client in (registry, features, serving, remote, bare, platform, keyless):
            with contextlib.suppress(Exception):
                await client.channel.close()

    throughput_ratio = predict.rate / empty.rate
    p50_ratio, p99_ratio = predict.p50 / empty.p50, predict.p99 / empty.p99
    batching_ratio = on.rate / off.rate
    say(f"\nPredict throughput / empty handler = {throughput_ratio:.3f} (target >= {TARGET_THROUGHPUT_RATIO}):"
        f" {met(throughput_ratio >= TARGET_THROUGHPUT_RATIO)}")  # fmt: skip
    say(f"Predict p50 / empty handler p50 = {p50_ratio:.2f} (target <= {TARGET_P50_RATIO}):"
        f" {met(p50_ratio <= TARGET_P50_RATIO)}")  # fmt: skip
    say(f"Predict p99 / empty handler p99 = {p99_ratio:.2f} (target <= {TARGET_P99_RATIO}):"
        f" {met(p99_ratio <= TARGET_P99_RATIO)}")  # fmt: skip
    remote_ratios = (remote_predict.rate / empty.rate, remote_predict.p50 / empty.p50, remote_predict.p99 / empty.p99)
    say(f"remote features mode, beside: throughput {remote_ratios[0]:.3f}, p50 {remote_ratios[1]:.2f},"
        f" p99 {remote_ratios[2]:.2f} x the empty handler's")  # fmt: skip
    say(f"  (against the platform-served empty handler: throughput {predict.rate / platform_empty.rate:.3f},"
        f" p50 {predict.p50 / platform_empty.p50:.2f}, p99 {predict.p99 / platform_empty.p99:.2f})")  # fmt: skip
    # The API key check alone: the same empty handler served the platform's way with and without it.
    server_us = {
        t.name: per_call_us(t.throughput_cpu, t.calls).get("empty server", 0.0) for t in (platform_empty, keyless_empty)
    }
    check_us = server_us[PLATFORM_EMPTY] - server_us[KEYLESS_EMPTY]
    predict_us = sum(v for k, v in per_call_us(predict.throughput_cpu, predict.calls).items() if k != OTHERS)
    say(f"API key check: the platform's empty handler with it {platform_empty.rate:,.0f} calls/s, p50"
        f" {platform_empty.p50:.2f} ms ({server_us[PLATFORM_EMPTY]:,.0f} us of server CPU a call); without it"
        f" {keyless_empty.rate:,.0f} calls/s, p50 {keyless_empty.p50:.2f} ms ({server_us[KEYLESS_EMPTY]:,.0f} us):"
        f" the check costs {check_us:,.0f} us a call, {check_us / predict_us:.1%} of a Predict's {predict_us:,.0f} us"
        " of CPU in all processes")  # fmt: skip
    say(f"scores/s micro-batching on / off = {batching_ratio:.2f} (target >= {TARGET_BATCHING_RATIO}):"
        f" {met(batching_ratio >= TARGET_BATCHING_RATIO)}")  # fmt: skip

    def grpc_figures(t: Target) -> dict[str, Any]:
        return {
            "calls_per_s": rounded(t.rate), "calls": t.calls, "seconds": round(t.seconds, 3),
            "p50_ms": round(t.p50, 3), "p99_ms": round(t.p99, 3), "mean_ms": round(sum(t.ms) / len(t.ms), 3),
            "latency_calls": len(t.ms),
            "throughput_cpu_us_per_call": per_call_us(t.throughput_cpu, t.calls),
            "latency_cpu_us_per_call": per_call_us(t.latency_cpu, len(t.ms)),
            "throughput_other_processes_cores": round(t.throughput_cpu.get(OTHERS, 0.0) / t.seconds, 2),
            "latency_other_processes_cores": round(t.latency_cpu.get(OTHERS, 0.0) / t.latency_seconds, 2),
            **({"throughput_threads_cpu_us_per_call": per_call_us(t.throughput_threads, t.calls),
                "latency_threads_cpu_us_per_call": per_call_us(t.latency_threads, len(t.ms))}
               if t.threads_of is not None else {}),
        }  # fmt: skip

    config = workload.config
    return {
        "bench": "serving",
        "quick": options.quick,
        "sim": {
            "seed": config.seed,
            "days": config.days,
            "payments_per_day": config.payments_per_day,
            "customers": config.customers,
            "merchants": config.merchants,
        },  # fmt: skip
        "events": len(workload.events),
        "postgres_fsync": pg["fsync"] == "on",
        "concurrency": CONCURRENCY,
        "rounds": options.rounds,
        "request_bytes_avg": round(workload.request_bytes),
        "model_inputs": len(version.feature_names),
        "model_best_iteration": lineage["best_iteration"],
        "artifact_bytes": len(data),
        "artifact_sha256": sha,
        "predict_calls_per_s": rounded(predict.rate),
        "predict_p50_ms": round(predict.p50, 3),
        "predict_p99_ms": round(predict.p99, 3),
        "empty_calls_per_s": rounded(empty.rate),
        "empty_p50_ms": round(empty.p50, 3),
        "empty_p99_ms": round(empty.p99, 3),
        "ratio_throughput_vs_empty": round(throughput_ratio, 3),
        "ratio_p50_vs_empty": round(p50_ratio, 3),
        "ratio_p99_vs_empty": round(p99_ratio, 3),
        "target_throughput_ratio": TARGET_THROUGHPUT_RATIO,
        "target_p50_ratio": TARGET_P50_RATIO,
        "target_p99_ratio": TARGET_P99_RATIO,
        "throughput_target_met": throughput_ratio >= TARGET_THROUGHPUT_RATIO,
        "p50_target_met": p50_ratio <= TARGET_P50_RATIO,
        "p99_target_met": p99_ratio <= TARGET_P99_RATIO,
        "serving": grpc_figures(predict),
        "serving_remote": grpc_figures(remote_predict),
        "remote_predict_calls_per_s": rounded(remote_predict.rate),
        "remote_predict_p50_ms": round(remote_predict.p50, 3),
        "remote_predict_p99_ms": round(remote_predict.p99, 3),
        "remote_ratio_throughput_vs_empty": round(remote_ratios[0], 3),
        "remote_ratio_p50_vs_empty": round(remote_ratios[1], 3),
        "remote_ratio_p99_vs_empty": round(remote_ratios[2], 3),
        "serving_rss_bytes": rss[SERVING],
        "serving_remote_rss_bytes": rss[REMOTE],
        "serving_feature_state_bytes": state_bytes,
        "empty_handler": grpc_figures(empty),
        "platform_empty_handler": grpc_figures(platform_empty),
        "keyless_empty_handler": grpc_figures(keyless_empty),
        "auth_check_us_per_call": round(check_us),
        "auth_share_of_predict_cpu": round(check_us / predict_us, 4),
        "part_features_lookup": grpc_figures(lookup),
        "part_decision_commit": grpc_figures(commit),
        "parts_p50_sum_ms": round(parts_p50, 3),
        "empty_handler_is": "bare grpc.aio server in a subprocess, generic handler for ServingService/Predict"
        " returning b'' without decoding the request",
        "platform_empty_handler_is": "the same empty Predict served by d2d.grpcserver.new_server + add_service",
        "part_features_lookup_is": "GetOnlineFeatures as serving calls it (the model's views, 1 entity row), from"
        " the bench process on the platform's client channel",
        "part_decision_commit_is": "GroupCommitter.append of one real-sized decision.made event to a fresh log"
        " database on the same Postgres (fsync on), from the bench process",
        "decisions_logged": decisions,
        "batching_on_scores_per_s": rounded(on.rate),
        "batching_off_scores_per_s": rounded(off.rate),
        "ratio_batching_on_vs_off": round(batching_ratio, 3),
        "target_batching_ratio": TARGET_BATCHING_RATIO,
        "batching_target_met": batching_ratio >= TARGET_BATCHING_RATIO,
        "batching_mean_batch_rows": round(on.mean_batch, 2),
        "batching_off_mean_batch_rows": round(off.mean_batch, 2),
        "batching_scores_per_mode": on.scores,
        "xgboost_alone_rows_per_s_batch_of_64": rounded(alone),
        "profiled": options.profile_dir is not None,
        "machine": {**machine(), "data_fs": filesystem_of(tmp), "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
    }


def print_profile(path: Path, predict_calls: int, lines: int = 30) -> None:
    """The busiest functions of a profile, and how many rows serving's batcher scored per predict call."""
    if not path.exists():
        say(f"(no profile at {path}: the process did not exit cleanly)")
        return
    stats = pstats.Stats(str(path))
    batches = sum(
        v[1] for (file, _, name), v in stats.stats.items()  # type: ignore[attr-defined]
        if file.endswith("services/serving/models.py") and name == "_predict"
    )  # fmt: skip
    if batches:
        say(
            f"\nin the serving process, MicroBatcher._predict ran {batches:,} times for {predict_calls:,} Predict"
            f" calls: mean batch {predict_calls / batches:.2f} rows (every call of the run, sequential ones included)"
        )
    say(f"\nprofile of {path.name}: the {lines} functions with the most time of their own (tottime)")
    entries = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:lines]  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    for (file, line, name), (_, calls, tottime, cumtime, _) in entries:
        where = f"{Path(file).name}:{line}({name})" if line else name
        say(f"    {tottime:8.2f}s {100 * tottime / total:5.1f}%  cum {cumtime:8.2f}s  {calls:>9,}  {where}")


def main() -> None:
    p = parser("serving", "Predict throughput and latency beside an empty gRPC handler; micro-batched scoring.")
    p.add_argument("--calls", type=int, help=f"Predict calls at concurrency 64 ({QUICK_CALLS} quick, {FULL_CALLS})")
    p.add_argument("--latency-calls", type=int, help=f"sequential calls ({QUICK_LATENCY} quick, {FULL_LATENCY} full)")
    p.add_argument("--scores", type=int, help=f"batcher.score calls per mode ({QUICK_SCORES} quick, {FULL_SCORES})")
    p.add_argument("--tmp-dir", type=Path, help="where to put the servers' data (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data, traces) afterwards")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="run serving and features under cProfile, writing DIR/*.prof (slows them)")  # fmt: skip
    p.add_argument("--serve-empty", metavar="BARE,PLATFORM,KEYLESS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_empty:
        bare_port, platform_port, keyless_port = (int(x) for x in args.serve_empty.split(","))
        asyncio.run(serve_empty(serving_pb2.DESCRIPTOR.services_by_name["ServingService"], "Predict",
                                bare_port, platform_port, keyless_port))  # fmt: skip
        return
    stop_on_sigterm()
    quick = args.quick
    profile_dir = args.profile.resolve() if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    options = Options(
        quick,
        args.calls or (QUICK_CALLS if quick else FULL_CALLS),
        args.latency_calls or (QUICK_LATENCY if quick else FULL_LATENCY),
        args.scores or (QUICK_SCORES if quick else FULL_SCORES),
        QUICK_ROUNDS if quick else FULL_ROUNDS,
        profile_dir,
    )  # fmt: skip

    started = time.perf_counter()
    config = QUICK_SIM if quick else FULL_SIM
    workload = build_workload(config)
    info = machine()
    say(f"bench.serving{' (quick)' if quick else ''}: {len(workload.events):,} simulator events (seed={config.seed},"
        f" days={config.days}, payments_per_day={config.payments_per_day}, customers={config.customers},"
        f" merchants={config.merchants}), built in {time.perf_counter() - started:.1f}s before any timing")  # fmt: skip
    say(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, Python {info['python']},"
        f" XGBoost {xgb.__version__}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    if profile_dir:
        say(f"PROFILING serving and features into {profile_dir}: figures are slowed by cProfile")

    with bench_dir("serving", args.tmp_dir, args.keep) as tmp:
        say(f"servers' data in {tmp} ({filesystem_of(tmp)})")
        with Servers(tmp, fsync=True) as servers, Services(tmp / "logs") as services:
            result = asyncio.run(run(options, workload, servers, services, tmp))
    if profile_dir:
        print_profile(profile_dir / "serving.prof", result["decisions_logged"] + 1)
    say(f"done in {time.perf_counter() - started:.1f}s (load average {os.getloadavg()[0]:.2f})")
    emit(result)


if __name__ == "__main__":
    main()
