"""Registry benchmark: training rows per second and artifact fetch time, beside the raw parts.

`python -m bench.registry [--quick]`

What is measured, in one run, on a real Postgres started in a temp dir (fsync ON, the default; no
NATS: the registry does not use the bus). The log is loaded directly: simulator events (full:
SimConfig(seed=3, days=60, payments_per_day=3000, customers=3000, merchants=300), about 190,000
events; quick: days=35, payments_per_day=1000, customers=800, merchants=80, about 37,000) appended
with `EventLog.append` in batches of 5,000, the simulator's views registered with `register_views`,
then `VACUUM ANALYZE events`. The load time is reported, it is not a figure of merit. The registry
runs as `d2d up` runs it: its own process, `python -m services.registry`, driven over gRPC with
`d2d.client.RegistryClient`.

1. Training rows per second: `RegistryClient.train(model, spec)` with the default spec (views = the
   simulator's VIEWS, transforms = TRANSFORMS, 300 rounds with early stopping after 30), timed end
   to end (call until the version is returned). Figure: labelled examples / seconds. The same spec
   is trained twice: the first run is the first in a fresh service process ("cold": it also pays
   the lazy imports of XGBoost and pandas, about a second); the second ("warm") is the figure, with
   the per-stage split and CPU seconds. Both are reported, and whether they gave the same sha256.
   The per-stage split comes from the arrival times of the progress messages. The service's event
   loop sends a message only at its next await, so the intervals are (server code in brackets):
     setup       call -> 'labels'         (model and view lookups, log head)
     labels      'labels' -> 'features'   (reading the payment and chargeback events, labelling)
     features    'features' -> 'training' (point-in-time frame, model_inputs per row, split, DMatrix)
     training    'training' -> 'evaluation' (xgb.train in a thread, save_raw, AND the synchronous
                                           scoring of the test split and evaluate(): 'evaluation'
                                           is put on the queue before them but sent after them)
     store       'evaluation' -> 'stored' (add_version: artifact and version rows, the event)
   Baseline, in this process: XGBoost alone. `xgb.train` with the run's own params (one thread,
   its seed) on a random matrix of the same shape (train rows x inputs, validation rows for the
   eval set, labels at the run's positive rate) for the number of rounds the run did (best
   iteration + 1 + early-stopping rounds, capped at num_boost_round), without early stopping. Also
   timed: the DMatrix construction, and scoring a random test-sized matrix with the trained
   artifact plus evaluate() on it, which the 'training' interval above includes. Rows per second of
   the learner = train rows / xgb.train seconds. The gap between the end-to-end figure and this is
   the feature computation (and labelling) of the platform.
2. Artifact fetch time: the trained artifact's bytes through `RegistryClient.artifact(model,
   version)` (GetArtifact, server-streamed in 1 MiB chunks), N sequential fetches (full 50, quick
   20; 2 warm-up fetches first), p50/p99; beside the same bytes read straight from Postgres with
   asyncpg (`SELECT data FROM artifacts WHERE sha256 = $1`, one connection), the same count,
   interleaved with the gRPC fetches. Also GetModelVersion (metadata only: the lookups GetArtifact
   does before reading the bytes) as context, with the size of the version row's lineage JSON (a
   trained version's holds its held-out example ids; get_version reads it whole). The same again
   for a big artifact (about 8 MB): an XGBoost model trained in this process on random data (deep
   trees, many rounds) and registered with RegisterModelVersion (the default spec, which names
   registered views), so the streaming
   path is measured on something large too.

CPU seconds per process (registry, Postgres, this client) are printed for the training run, which
shows where the time goes. The last line printed is one JSON object with every figure and its
baselines (see bench/_common).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import xgboost as xgb

from bench._common import (
    CpuMeter,
    Services,
    bench_dir,
    emit,
    filesystem_of,
    machine,
    parser,
    per_second,
    percentile,
    postgres_server,
    rounded,
    say,
    seed_bench_key,
    stop_on_sigterm,
)
from d2d import eventlog
from d2d.client import RegistryClient
from d2d.eventlog import EventLog, NewEvent
from d2d.features.store import register_views
from d2d.runtime.servers import EmbeddedPostgres, free_port
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.training import default_spec
from d2d.sim.views import VIEWS
from d2d.training.evaluation import evaluate
from d2d.training.pipeline import predict
from d2d.training.spec import TrainingSpec, input_names
from d2d.v1 import registry_pb2

FULL_SIM = SimConfig(seed=3, days=60, payments_per_day=3000, customers=3000, merchants=300)
QUICK_SIM = SimConfig(seed=3, days=35, payments_per_day=1000, customers=800, merchants=80)
FULL_FETCHES, QUICK_FETCHES = 50, 20
WARMUP_FETCHES = 2
APPEND_BATCH = 5_000
STAGES = ("labels", "features", "training", "evaluation", "stored")
STAGE_NAMES = {"labels": "labels", "features": "features", "training": "training", "evaluation": "store"}
BIG_TARGET_BYTES = 8_000_000
BIG_ROWS = 20_000
# Deep trees on few bins grow many nodes per second: about 65 kB of UBJSON per round here.
BIG_PARAMS = {
    "objective": "binary:logistic", "tree_method": "hist", "max_depth": 12, "max_bin": 32, "eta": 0.3,
    "min_child_weight": 0.0, "nthread": 1, "seed": 1,
}  # fmt: skip
BIG_PROBE_ROUNDS = 10
SEED = 7


def spec_json(**overrides: object) -> str:
    return json.dumps({**default_spec().to_dict(), **overrides})


# ---------------------------------------------------------------------------------------------
# The log, loaded before any clock starts


def build_events(config: SimConfig) -> list[NewEvent]:
    return [e.as_new_event() for e in PaymentsSimulator(config).events()]


async def load_log(url: str, events: list[NewEvent]) -> None:
    """Migrate, append every event, register the simulator's views, VACUUM ANALYZE."""
    await eventlog.migrate(url)
    await seed_bench_key(url)
    pool = await eventlog.create_pool(url, max_size=2)
    try:
        log = EventLog(pool)
        for i in range(0, len(events), APPEND_BATCH):
            results = await log.append(events[i : i + APPEND_BATCH])
            if any(r.duplicate for r in results):
                raise RuntimeError(f"load: duplicates in the batch at {i}")
        await register_views(log, VIEWS)
    finally:
        await pool.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE events")
    finally:
        await conn.close()


async def postgres_settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        names = ("fsync", "synchronous_commit", "shared_buffers")
        return {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()


async def wait_ready(client: RegistryClient, services: Services, timeout: float = 60) -> None:
    """Wait for the gRPC channel, failing fast (with its log) if the service process exits."""
    ready = asyncio.ensure_future(client.wait_ready(timeout))
    try:
        while not ready.done():
            services.check_alive()
            await asyncio.wait({ready}, timeout=0.1)
        ready.result()
    finally:
        ready.cancel()


# ---------------------------------------------------------------------------------------------
# 1. Training


@dataclass
class Training:
    version: registry_pb2.ModelVersion
    seconds: float
    arrivals: list[tuple[float, str, str]]  # (seconds since the call, stage, message)
    cpu: dict[str, float]
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return int(self.lineage["examples"])

    def stage_seconds(self) -> dict[str, float]:
        """Seconds per interval between progress arrivals (see the module docstring)."""
        first: dict[str, float] = {}
        for t, stage, _ in self.arrivals:
            first.setdefault(stage, t)
        missing = [s for s in STAGES if s not in first]
        if missing:
            raise RuntimeError(f"progress stages missing: {missing}; got {[s for _, s, _ in self.arrivals]}")
        split = {"setup": first["labels"]}
        for stage, following in zip(STAGES, STAGES[1:], strict=False):
            split[STAGE_NAMES[stage]] = first[following] - first[stage]
        split["after stored"] = self.seconds - first["stored"]
        return split


async def measure_training(
    client: RegistryClient, model: str, spec: str, meter: CpuMeter
) -> Training:  # fmt: skip
    arrivals: list[tuple[float, str, str]] = []
    meter.start()
    started = time.perf_counter()
    version = await client.train(
        model, spec, on_progress=lambda p: arrivals.append((time.perf_counter() - started, p.stage, p.message))
    )
    seconds = time.perf_counter() - started
    cpu = meter.stop()
    return Training(version, seconds, arrivals, cpu, json.loads(version.lineage_json))


@dataclass
class Learner:
    """XGBoost alone on a random matrix shaped like the run's."""

    train_rows: int
    validation_rows: int
    test_rows: int
    inputs: int
    rounds: int
    dmatrix_seconds: float
    train_seconds: float
    score_seconds: float  # predict() of the run's artifact on a test-sized matrix
    evaluate_seconds: float  # evaluate() of those scores

    @property
    def rows_per_s(self) -> float:
        return per_second(self.train_rows, self.train_seconds)


def rounds_done(spec: TrainingSpec, best_iteration: int) -> int:
    """How many rounds xgb.train ran: it stops `early_stopping_rounds` after the best one."""
    return min(spec.num_boost_round, best_iteration + 1 + spec.early_stopping_rounds)


def measure_learner(training: Training, artifact: bytes) -> Learner:
    spec = TrainingSpec.from_json(training.version.spec_json)
    rows = training.lineage["rows"]
    n_train, n_valid, n_test = int(rows["train"]), int(rows["validation"]), int(rows["test"])
    names = list(training.version.feature_names)
    rounds = rounds_done(spec, int(training.lineage["best_iteration"]))
    positive_rate = training.lineage["positives"] / training.examples
    rng = np.random.default_rng(SEED)

    def random_matrix(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.standard_normal((n, len(names))), (rng.random(n) < positive_rate).astype(np.float64)

    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = map(random_matrix, (n_train, n_valid, n_test))
    params = {**dict(spec.params), "seed": spec.seed}
    started = time.perf_counter()
    train_m = xgb.DMatrix(x_train, label=y_train, feature_names=names, missing=np.nan)
    valid_m = xgb.DMatrix(x_valid, label=y_valid, feature_names=names, missing=np.nan)
    dmatrix_seconds = time.perf_counter() - started
    started = time.perf_counter()
    xgb.train(params, train_m, num_boost_round=rounds, evals=[(valid_m, "validation")], verbose_eval=False)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scores = predict(artifact, x_test)
    score_seconds = time.perf_counter() - started
    channels = rng.choice(["ecom", "pos"], size=n_test).tolist()
    started = time.perf_counter()
    evaluate(y_test.astype(int).tolist(), scores.tolist(), slices={"channel": channels})
    evaluate_seconds = time.perf_counter() - started
    return Learner(
        n_train, n_valid, n_test, len(names), rounds, dmatrix_seconds, train_seconds, score_seconds, evaluate_seconds
    )


# ---------------------------------------------------------------------------------------------
# 2. Artifact fetches


@dataclass
class Latencies:
    ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.ms, 99)

    def line(self, size: int | None = None) -> str:
        mean = sum(self.ms) / len(self.ms)
        text = f"p50 {self.p50:.2f} ms, p99 {self.p99:.2f} ms (mean {mean:.2f}, max {max(self.ms):.2f})"
        if size:
            text += f"; {size / 2**20 / (self.p50 / 1000):,.0f} MiB/s at p50"
        return text


@dataclass
class Fetches:
    label: str
    size: int
    grpc: Latencies
    postgres: Latencies
    metadata: Latencies  # GetModelVersion
    lineage_bytes: int  # the version row's lineage JSON, which every get_version reads and decodes

    def figures(self) -> dict[str, Any]:
        p = self.label
        return {
            f"{p}_artifact_bytes": self.size,
            f"{p}_grpc_fetch_p50_ms": round(self.grpc.p50, 3),
            f"{p}_grpc_fetch_p99_ms": round(self.grpc.p99, 3),
            f"{p}_asyncpg_fetch_p50_ms": round(self.postgres.p50, 3),
            f"{p}_asyncpg_fetch_p99_ms": round(self.postgres.p99, 3),
            f"{p}_get_model_version_p50_ms": round(self.metadata.p50, 3),
            f"{p}_get_model_version_p99_ms": round(self.metadata.p99, 3),
            f"{p}_version_lineage_bytes": self.lineage_bytes,
            f"{p}_ratio_grpc_vs_asyncpg_p50": round(self.grpc.p50 / self.postgres.p50, 3),
        }


async def timed_ms(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call()
    return (time.perf_counter() - started) * 1000, result


async def measure_fetches(
    label: str, client: RegistryClient, conn: asyncpg.Connection, model: str, version: str, sha: str, n: int
) -> Fetches:  # fmt: skip
    """n GetArtifact fetches interleaved with n asyncpg reads of the same bytes, then n GetModelVersion."""
    grpc_ms: list[float] = []
    pg_ms: list[float] = []
    size = 0
    for i in range(WARMUP_FETCHES + n):
        ms, (data, stated) = await timed_ms(lambda: client.artifact(model, version))
        if stated != sha or hashlib.sha256(data).hexdigest() != sha:
            raise RuntimeError(f"GetArtifact of {model}/{version}: sha256 mismatch")
        size = len(data)
        ms_pg, raw = await timed_ms(lambda: conn.fetchval("SELECT data FROM artifacts WHERE sha256 = $1", sha))
        if len(raw) != size:
            raise RuntimeError(f"asyncpg read {len(raw)} bytes, GetArtifact {size}")
        if i >= WARMUP_FETCHES:
            grpc_ms.append(ms)
            pg_ms.append(ms_pg)
    meta_ms = []
    for i in range(WARMUP_FETCHES + n):
        ms, _ = await timed_ms(lambda: client.get_version(model, version))
        if i >= WARMUP_FETCHES:
            meta_ms.append(ms)
    lineage_bytes = await conn.fetchval(
        "SELECT octet_length(lineage::text) FROM model_versions WHERE model = $1 AND version = $2", model, int(version)
    )
    return Fetches(label, size, Latencies(grpc_ms), Latencies(pg_ms), Latencies(meta_ms), lineage_bytes)


def report_fetches(f: Fetches, n: int) -> None:
    say(f"    GetArtifact (gRPC stream, 1 MiB chunks), {n} fetches: {f.grpc.line(f.size)}")
    say(f"    asyncpg SELECT data FROM artifacts, {n} reads:      {f.postgres.line(f.size)}")
    say(f"    GetModelVersion (metadata only), {n} calls:         {f.metadata.line()}")
    say(f"    (the version row's lineage JSON, which GetArtifact's get_version also reads: {f.lineage_bytes:,} B)")
    say(f"    GetArtifact p50 / asyncpg p50 = {f.grpc.p50 / f.postgres.p50:.2f}")


@dataclass
class BigModel:
    artifact: bytes
    rounds: int
    seconds: float


def train_big_model(names: list[str]) -> BigModel:
    """An XGBoost model of about BIG_TARGET_BYTES as UBJSON: deep trees on random data."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((BIG_ROWS, len(names)))
    y = rng.integers(0, 2, BIG_ROWS).astype(np.float64)
    data = xgb.DMatrix(x, label=y, feature_names=names)
    started = time.perf_counter()
    booster = xgb.train(BIG_PARAMS, data, num_boost_round=BIG_PROBE_ROUNDS)
    per_round = len(booster.save_raw(raw_format="ubj")) / BIG_PROBE_ROUNDS
    more = max(0, round(BIG_TARGET_BYTES / per_round) - BIG_PROBE_ROUNDS)
    if more:
        booster = xgb.train(BIG_PARAMS, data, num_boost_round=more, xgb_model=booster)
    artifact = bytes(booster.save_raw(raw_format="ubj"))
    return BigModel(artifact, BIG_PROBE_ROUNDS + more, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Options:
    quick: bool
    config: SimConfig
    fetches: int
    profile_dir: Path | None


async def run(
    options: Options, events: list[NewEvent], postgres: EmbeddedPostgres, services: Services, tmp: Path
) -> dict[str, Any]:  # fmt: skip
    n_fetch = options.fetches
    load_before = os.getloadavg()[0]
    pg = await postgres_settings(postgres.admin_url())
    say(f"Postgres: fsync={pg['fsync']}, synchronous_commit={pg['synchronous_commit']},"
        f" shared_buffers={pg['shared_buffers']}")  # fmt: skip

    url = await asyncio.to_thread(postgres.create_database, f"reg_{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    await load_log(url, events)
    load_seconds = time.perf_counter() - started
    say(f"log loaded: {len(events):,} events + {len(VIEWS)} view registrations in {load_seconds:.1f}s"
        " (EventLog.append, batches of 5,000; then VACUUM ANALYZE)")  # fmt: skip

    addr = f"127.0.0.1:{free_port()}"
    env = {"D2D_DATABASE_URL": url, "D2D_REGISTRY_ADDR": addr, "D2D_DATA_DIR": str(tmp / "data")}
    args = ["-m", "services.registry"]
    if options.profile_dir is not None:
        args = ["-m", "cProfile", "-o", str(options.profile_dir / "registry.prof"), *args]
    service = services.start("registry", args, env)
    assert postgres.process is not None
    roots = {
        "registry": (service.process.pid, False),
        "postgres": (postgres.process.pid, True),
        "bench client": (os.getpid(), False),
    }
    client = RegistryClient(addr)
    conn = await asyncpg.connect(url)
    try:
        await wait_ready(client, services)
        say(f"registry: python -m services.registry on {addr} (pid {service.process.pid})")
        model = f"bench-{uuid.uuid4().hex[:8]}"
        await client.create_model(model, "bench.registry")

        # 1. Training
        say("\n[1] training: RegistryClient.train with the default spec (3 views, transforms, 300 rounds,"
            " early stopping 30), end to end, twice")  # fmt: skip
        cold = await measure_training(client, model, spec_json(), CpuMeter(roots))
        services.check_alive()
        say(f"    first run in the fresh service process (cold: lazy imports of XGBoost, pandas): {cold.seconds:.2f}s"
            f" = {per_second(cold.examples, cold.seconds):,.0f} examples/s")  # fmt: skip
        training = await measure_training(client, model, spec_json(), CpuMeter(roots))
        services.check_alive()
        same_sha = training.version.sha256 == cold.version.sha256
        say(f"    second run (warm, the figure): same artifact sha256 as the first: {same_sha}")
        lineage = training.lineage
        rows = lineage["rows"]
        examples = training.examples
        e2e_rate = per_second(examples, training.seconds)
        evaluation = json.loads(training.version.evaluation_json)
        auc = evaluation.get("auc", float("nan"))
        say(f"    {examples:,} examples ({lineage['positives']:,} positive; train {rows['train']:,},"
            f" validation {rows['validation']:,}, test {rows['test']:,}),"
            f" {len(training.version.feature_names)} inputs, best iteration {lineage['best_iteration']},"
            f" test AUC {auc:.4f}")  # fmt: skip
        say(f"    end to end: {training.seconds:.2f}s = {e2e_rate:,.0f} examples/s;"
            f" artifact {training.version.artifact_bytes:,} B")  # fmt: skip
        split = training.stage_seconds()
        for stage, seconds in split.items():
            say(f"      {stage:<13} {seconds:7.2f}s  {100 * seconds / training.seconds:5.1f}%")
        say(f"    cpu: {CpuMeter.describe(training.cpu, training.seconds)}")

        artifact, _ = await client.artifact(model, training.version.name.rsplit("/", 1)[1])
        learner = await asyncio.to_thread(measure_learner, training, artifact)
        say(f"    baseline, XGBoost alone in this process (same params, 1 thread, random"
            f" {learner.train_rows:,} x {learner.inputs} matrix, {learner.validation_rows:,} validation rows,"
            f" {learner.rounds} rounds):")  # fmt: skip
        say(f"      xgb.train {learner.train_seconds:.2f}s = {learner.rows_per_s:,.0f} train rows/s"
            f" ({learner.train_rows * learner.rounds / learner.train_seconds:,.0f} row-rounds/s);"
            f" DMatrix {learner.dmatrix_seconds * 1000:.1f} ms; scoring {learner.test_rows:,} test rows"
            f" {learner.score_seconds * 1000:.1f} ms + evaluate()"
            f" {learner.evaluate_seconds * 1000:.1f} ms")  # fmt: skip
        learner_share = learner.train_seconds / training.seconds
        features_share = (split["labels"] + split["features"]) / training.seconds
        say(f"    of the end-to-end time: labels + features {100 * features_share:.0f}%,"
            f" the learner alone would be {100 * learner_share:.0f}%;"
            f" end-to-end examples/s / XGBoost-alone train rows/s = {e2e_rate / learner.rows_per_s:.3f}")  # fmt: skip

        # 2. Artifact fetches
        version = training.version.name.rsplit("/", 1)[1]
        say(f"\n[2a] artifact fetch, trained model ({training.version.artifact_bytes:,} B), {n_fetch} each"
            f" after {WARMUP_FETCHES} warm-up, GetArtifact and asyncpg interleaved")  # fmt: skip
        small = await measure_fetches("trained", client, conn, model, version, training.version.sha256, n_fetch)
        report_fetches(small, n_fetch)

        names = input_names(default_spec(), VIEWS)
        big = await asyncio.to_thread(train_big_model, names)
        register = registry_pb2.RegisterModelVersionRequest(
            parent=f"models/{model}", artifact=big.artifact, spec_json=spec_json(), feature_names=names
        )
        started = time.perf_counter()
        big_version = await client.stub.RegisterModelVersion(register, timeout=300)
        register_seconds = time.perf_counter() - started
        if big_version.sha256 != hashlib.sha256(big.artifact).hexdigest():
            raise RuntimeError("RegisterModelVersion stated another sha256 than the artifact's")
        say(f"\n[2b] artifact fetch, big model: {len(big.artifact):,} B (XGBoost, {big.rounds} rounds of depth"
            f" {BIG_PARAMS['max_depth']} on random data, trained in {big.seconds:.1f}s), registered with"
            f" RegisterModelVersion in {register_seconds * 1000:.0f} ms")  # fmt: skip
        big_fetches = await measure_fetches(
            "big", client, conn, model, big_version.name.rsplit("/", 1)[1], big_version.sha256, n_fetch
        )
        report_fetches(big_fetches, n_fetch)
        services.check_alive()
    finally:
        await conn.close()
        await client.channel.close()

    return {
        "bench": "registry",
        "quick": options.quick,
        "sim": {
            "seed": options.config.seed,
            "days": options.config.days,
            "payments_per_day": options.config.payments_per_day,
            "customers": options.config.customers,
            "merchants": options.config.merchants,
        },  # fmt: skip
        "events": len(events),
        "load_seconds": round(load_seconds, 2),
        "postgres_fsync": pg["fsync"] == "on",
        "train_cold_seconds": round(cold.seconds, 3),
        "train_cold_examples_per_s": rounded(per_second(cold.examples, cold.seconds)),
        "train_cold_stage_seconds": {k: round(v, 3) for k, v in cold.stage_seconds().items()},
        "train_warm_same_sha256_as_cold": same_sha,
        "examples": examples,
        "positives": lineage["positives"],
        "train_rows": rows["train"],
        "validation_rows": rows["validation"],
        "test_rows": rows["test"],
        "inputs": len(training.version.feature_names),
        "best_iteration": lineage["best_iteration"],
        "rounds_run": learner.rounds,
        "test_auc": evaluation.get("auc"),
        "train_end_to_end_seconds": round(training.seconds, 3),
        "train_examples_per_s": rounded(e2e_rate),
        "train_stage_seconds": {k: round(v, 3) for k, v in split.items()},
        "train_stage_share": {k: round(v / training.seconds, 3) for k, v in split.items()},
        "features_stage_examples_per_s": rounded(per_second(examples, split["features"])),
        "train_cpu_s": training.cpu,
        "xgb_alone_train_seconds": round(learner.train_seconds, 3),
        "xgb_alone_train_rows_per_s": rounded(learner.rows_per_s),
        "xgb_alone_dmatrix_seconds": round(learner.dmatrix_seconds, 4),
        "xgb_alone_score_test_seconds": round(learner.score_seconds, 4),
        "xgb_alone_evaluate_seconds": round(learner.evaluate_seconds, 4),
        "ratio_end_to_end_vs_xgb_alone": round(e2e_rate / learner.rows_per_s, 4),
        "fetches": n_fetch,
        **small.figures(),
        "big_artifact_rounds": big.rounds,
        "big_register_seconds": round(register_seconds, 3),
        **big_fetches.figures(),
        "profiled": options.profile_dir is not None,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": {**machine(), "data_fs": filesystem_of(tmp)},
    }


def main() -> None:
    p = parser("registry", "Training rows per second and artifact fetch time, beside XGBoost alone and asyncpg.")
    p.add_argument("--fetches", type=int, help=f"fetches per artifact ({QUICK_FETCHES} quick, {FULL_FETCHES} full)")
    p.add_argument("--tmp-dir", type=Path, help="where to put the server's data (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="run the registry process under cProfile, writing DIR/registry.prof (slows it)")  # fmt: skip
    args = p.parse_args()
    stop_on_sigterm()
    config = QUICK_SIM if args.quick else FULL_SIM
    profile_dir = args.profile.resolve() if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    fetches = args.fetches or (QUICK_FETCHES if args.quick else FULL_FETCHES)
    options = Options(args.quick, config, fetches, profile_dir)

    started = time.perf_counter()
    events = build_events(config)
    info = machine()
    say(f"bench.registry{' (quick)' if args.quick else ''}: {len(events):,} simulator events (seed={config.seed},"
        f" days={config.days}, payments_per_day={config.payments_per_day}, customers={config.customers},"
        f" merchants={config.merchants}), built in {time.perf_counter() - started:.1f}s before any timing")  # fmt: skip
    say(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, Python {info['python']},"
        f" XGBoost {xgb.__version__}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    if profile_dir:
        say(f"PROFILING the registry into {profile_dir}: figures are slowed by cProfile")

    with bench_dir("registry", args.tmp_dir, args.keep) as tmp:
        say(f"server data in {tmp} ({filesystem_of(tmp)})")
        with postgres_server(tmp) as postgres, Services(tmp / "logs") as services:
            result = asyncio.run(run(options, events, postgres, services, tmp))
    say(f"done in {time.perf_counter() - started:.1f}s (load average {os.getloadavg()[0]:.2f})")
    emit(result)


if __name__ == "__main__":
    main()
