"""Feedback benchmark: outcomes joined per second by the feedback service's log consumer, beside the
database's own ceiling for the same join.

`python -m bench.feedback [--quick] [--decisions N] [--profile DIR]`

What is measured, in one run, on a real Postgres started in a temp dir (fsync ON, so each commit waits
for the WAL to reach the disk):

1. The log. N `decision.made` events as serving appends them (one model version, an input and a
   score each, valid under the platform contract) are appended to a fresh, migrated database with
   `EventLog.append` in batches of 5,000 (not timed), then VACUUM ANALYZE.
2. Decisions joined. `services.feedback.consumer.FeedbackConsumer` (default batch of 1,000 events per
   transaction) runs IN THIS PROCESS (it is the service's code; `python -m services.feedback` runs
   the same object) over the N decisions until caught up: per batch it reads the events from the log,
   feeds the rule engine and the monitor, applies the `decision.made` projector (inserting
   `decision_outcomes` rows) and moves its position, in one transaction. Before timing, the monitor
   is told the version's training baseline, held-out AUC and that it is in production (what its
   `model.registered` and `model.alias_set` events would tell it), so its drift (PSI every 500
   decisions) and live-AUC (every 250 labels) checks run as in production. Timed: the first
   `step()` until `catch_up()` returns.
3. Outcomes joined (THE FIGURE). N `outcome.recorded` events (one per decision, as the rule engine's
   drafts become) are appended (not timed), VACUUM ANALYZE, then the same consumer is timed over
   them: reading them, the monitor's join of each to its decision, and the `outcome.recorded`
   projector (the first outcome of a decision wins), one transaction per batch. Checked afterwards:
   every row of the join has its label.
4. Baseline (raw asyncpg, same rows, same run): a copy of `decision_outcomes`
   (`LIKE ... INCLUDING ALL`: its primary key and indexes, plus its two foreign keys to `events.seq`,
   which LIKE does not copy) holding the same N decision rows (loaded
   with COPY, itself timed as the decisions' baseline). The same N outcome rows, built as Python
   lists before timing, are written in one transaction in two ways, each into its own fresh copy:
   (a) one `UPDATE ... FROM unnest($1::uuid[], ...)` statement; (b) `copy_records_to_table` into a
   temp staging table, then one `UPDATE ... FROM staging`. Both with the projector's predicate
   (`outcome_id IS NULL`). The faster is the baseline (the database's ceiling for the same join with
   this client); both are printed.

The ratio outcomes joined/s (consumer) / outcome rows/s (raw) is the figure, target >= 0.3. CPU seconds
of Postgres (with its backends) and of this process (the consumer, or the raw client) are printed per
phase. `--profile DIR` runs the outcomes phase under cProfile (DIR/feedback-outcomes.prof; it slows
the figure, which is then marked as profiled).

The last line printed is one JSON object with every figure and its baselines (see bench/_common).
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench._common import (
    CpuMeter,
    Phase,
    bench_dir,
    emit,
    filesystem_of,
    machine,
    parser,
    per_second,
    postgres_server,
    rounded,
    say,
    stop_on_sigterm,
)
from d2d import eventlog
from d2d.eventlog import EventLog, NewEvent
from d2d.outcomes import outcome_event_id
from d2d.runtime.servers import EmbeddedPostgres
from d2d.training.baseline import baseline
from services.feedback.consumer import FeedbackConsumer

TARGET_RATIO = 0.3
QUICK_DECISIONS = 5_000
FULL_DECISIONS = 50_000
APPEND_BATCH = 5_000
SEED = 12
MODEL, VERSION = "fraud", 2
DECIDED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HELDOUT_AUC = 0.75  # about what labels drawn as Bernoulli(score) give: the live-AUC check runs, rarely fires

OUTCOME_COLUMNS = ("decision_id", "outcome_id", "label", "reward", "outcome_at", "outcome_seq", "outcome_source")
DECISION_COLUMNS = (
    "decision_id", "model", "model_version", "arm", "score", "action", "propensity", "explored", "unit_id",
    "decided_at", "decision_seq",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The events and the same rows for the raw writer


@dataclass
class Workload:
    decisions: list[NewEvent]
    outcomes: list[NewEvent]
    inputs: list[float]
    scores: list[float]


def build_workload(n: int, seed: int = SEED) -> Workload:
    """N decisions of one production version (one input, a score) and one outcome each, labelled
    1 with probability score; decided a second apart in event time, outcomes three days later."""
    rng = random.Random(seed)
    decisions, outcomes, inputs, scores = [], [], [], []
    now = datetime.now(UTC)
    for i in range(n):
        decision_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        x, score = rng.gauss(0.0, 1.0), rng.random()
        decided = DECIDED + timedelta(seconds=i)
        payload = {
            "decision_id": decision_id, "model": MODEL, "model_version": f"models/{MODEL}/versions/{VERSION}",
            "arm": "production", "score": score, "action": "approve" if score < 0.5 else "decline",
            "propensity": 0.95, "explored": False, "features": {}, "inputs": [x], "feature_watermark": 10,
            "as_of": decided.isoformat(), "entities": {"customer": f"c{i % 1000}"},
            "context": {"payment_id": f"p-{i}"}, "unit_id": f"c{i % 1000}",
        }  # fmt: skip
        decisions.append(
            NewEvent(uuid.UUID(decision_id), "decision.made", 1, "decision", decision_id, now,
                     orjson.dumps(payload).decode(), {"producer": "serving"})
        )  # fmt: skip
        outcome_id = f"rule:chargeback:{decision_id}"
        at = decided + timedelta(days=3)
        label = int(rng.random() < score)
        out = {
            "outcome_id": outcome_id, "decision_id": decision_id, "label": label, "occurred_at": at.isoformat(),
            "source": "rule", "rule": "chargeback",
        }  # fmt: skip
        outcomes.append(
            NewEvent(outcome_event_id(outcome_id), "outcome.recorded", 1, "decision", decision_id, at,
                     orjson.dumps(out).decode(), {"producer": "feedback"})
        )  # fmt: skip
        inputs.append(x)
        scores.append(score)
    return Workload(decisions, outcomes, inputs, scores)


def decision_rows(events: Sequence[NewEvent], seqs: Sequence[int]) -> list[tuple[Any, ...]]:
    """The `decision_outcomes` rows the decision.made projector writes, in DECISION_COLUMNS order."""
    rows = []
    for e, seq in zip(events, seqs, strict=True):
        p = orjson.loads(e.payload)
        rows.append((
            uuid.UUID(p["decision_id"]), p["model"], VERSION, p["arm"], float(p["score"]), p["action"],
            float(p["propensity"]), bool(p["explored"]), p["unit_id"], datetime.fromisoformat(p["as_of"]), seq,
        ))  # fmt: skip
    return rows


def outcome_columns(events: Sequence[NewEvent], seqs: Sequence[int]) -> list[list[Any]]:
    """The outcome.recorded projector's values, one list per OUTCOME_COLUMNS entry (for unnest)."""
    columns: list[list[Any]] = [[] for _ in OUTCOME_COLUMNS]
    for e, seq in zip(events, seqs, strict=True):
        p = orjson.loads(e.payload)
        row = (uuid.UUID(p["decision_id"]), p["outcome_id"], p["label"], None,
               datetime.fromisoformat(p["occurred_at"]), seq, p["source"])  # fmt: skip
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


# ---------------------------------------------------------------------------------------------
# The consumer


async def append_all(log: EventLog, events: Sequence[NewEvent]) -> list[int]:
    seqs = []
    for i in range(0, len(events), APPEND_BATCH):
        results = await log.append(events[i : i + APPEND_BATCH])
        if any(r.duplicate for r in results):
            raise RuntimeError(f"load: duplicates in the batch at {i}")
        seqs += [r.seq for r in results]
    return seqs


async def vacuum(url: str, *tables: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for table in tables:
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()


async def timed_catch_up(consumer: FeedbackConsumer, meter: CpuMeter, profile: Path | None) -> Phase:
    profiler = cProfile.Profile() if profile else None
    before = consumer.applied
    meter.start()
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    await consumer.catch_up()
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    cpu = meter.stop()
    if profiler and profile:
        profiler.dump_stats(profile)
    return Phase(consumer.applied - before, seconds, cpu)


# ---------------------------------------------------------------------------------------------
# The raw baseline


async def raw_table(conn: asyncpg.Connection, name: str, rows: list[tuple[Any, ...]]) -> float:
    """A copy of decision_outcomes (keys and indexes) holding `rows`; the seconds the COPY took."""
    await conn.execute(f"DROP TABLE IF EXISTS {name}")
    await conn.execute(f"CREATE TABLE {name} (LIKE decision_outcomes INCLUDING ALL)")
    for column in ("decision_seq", "outcome_seq"):  # LIKE copies no foreign keys: the same checks as the join
        await conn.execute(f"ALTER TABLE {name} ADD FOREIGN KEY ({column}) REFERENCES events (seq)")
    started = time.perf_counter()
    async with conn.transaction():
        await conn.copy_records_to_table(name, records=rows, columns=DECISION_COLUMNS)
    seconds = time.perf_counter() - started
    await conn.execute(f"VACUUM ANALYZE {name}")
    return seconds


SET_OUTCOME = (
    "UPDATE {table} d SET outcome_id = o.outcome_id, label = o.label, reward = o.reward,"
    " outcome_at = o.outcome_at, outcome_seq = o.outcome_seq, outcome_source = o.outcome_source"
    " FROM {source} WHERE d.decision_id = o.decision_id AND d.outcome_id IS NULL"
)
UNNEST = (
    "unnest($1::uuid[], $2::text[], $3::smallint[], $4::float8[], $5::timestamptz[], $6::bigint[], $7::text[])"
    " AS o(decision_id, outcome_id, label, reward, outcome_at, outcome_seq, outcome_source)"
)


async def raw_unnest(conn: asyncpg.Connection, table: str, columns: list[list[Any]], meter: CpuMeter) -> Phase:
    """(a) One UPDATE ... FROM unnest(arrays) in one transaction."""
    meter.start()
    started = time.perf_counter()
    async with conn.transaction():
        status = await conn.execute(SET_OUTCOME.format(table=table, source=UNNEST), *columns)
    seconds = time.perf_counter() - started
    return Phase(int(status.split()[-1]), seconds, meter.stop())


async def raw_staged(conn: asyncpg.Connection, table: str, columns: list[list[Any]], meter: CpuMeter) -> Phase:
    """(b) COPY into a temp staging table, then one UPDATE ... FROM it, in one transaction."""
    rows = list(zip(*columns, strict=True))
    meter.start()
    started = time.perf_counter()
    async with conn.transaction():
        await conn.execute(
            "CREATE TEMP TABLE staged_outcomes (decision_id uuid, outcome_id text, label smallint, reward float8,"
            " outcome_at timestamptz, outcome_seq bigint, outcome_source text) ON COMMIT DROP"
        )
        await conn.copy_records_to_table("staged_outcomes", records=rows, columns=OUTCOME_COLUMNS)
        status = await conn.execute(SET_OUTCOME.format(table=table, source="staged_outcomes o"))
    seconds = time.perf_counter() - started
    return Phase(int(status.split()[-1]), seconds, meter.stop())


# ---------------------------------------------------------------------------------------------
# The run


def cpu_line(phase: Phase) -> str:
    return CpuMeter.describe(phase.cpu, phase.seconds)


async def run(n: int, quick: bool, postgres: EmbeddedPostgres, tmp: Path, profile: Path | None) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    url = await asyncio.to_thread(postgres.create_database, f"fb_{uuid.uuid4().hex[:8]}")
    await eventlog.migrate(url)
    assert postgres.process is not None
    roots = {"postgres": (postgres.process.pid, True), "bench process": (os.getpid(), False)}
    work = await asyncio.to_thread(build_workload, n)

    pool = await eventlog.create_pool(url, role="d2d_feedback", max_size=4)
    try:
        log = EventLog(pool)
        started = time.perf_counter()
        decision_seqs = await append_all(log, work.decisions)
        await vacuum(url, "events")
        say(f"log: {n:,} decision.made events appended in {time.perf_counter() - started:.1f}s (not timed)")

        consumer = FeedbackConsumer(log)
        await consumer.start()
        # What the version's model.registered and model.alias_set events would have told the monitor.
        rng = random.Random(SEED + 1)
        trained = baseline(
            {"x": [rng.gauss(0.0, 1.0) for _ in range(5000)], "score": [rng.random() for _ in range(5000)]}
        )
        consumer.monitor.know_version(
            MODEL, VERSION, baseline={"inputs": {"x": trained["x"]}, "score": trained["score"]},
            feature_names=["x"], heldout_auc=HELDOUT_AUC,
        )  # fmt: skip
        consumer.monitor.production_set(MODEL, VERSION)

        say(f"\n[1] decisions joined: FeedbackConsumer (in this process, batch {consumer.batch})"
            f" over {n:,} decision.made")  # fmt: skip
        decided = await timed_catch_up(consumer, CpuMeter(roots), None)
        say(f"    {decided.count:,} events in {decided.seconds:.2f}s = {decided.rate:,.0f} decisions/s")
        say(f"    cpu: {cpu_line(decided)}")

        outcome_seqs = await append_all(log, work.outcomes)
        await vacuum(url, "events", "decision_outcomes")
        say(f"\n[2] outcomes joined: {n:,} outcome.recorded appended (not timed); the same consumer over them"
            + (" (PROFILED: slower)" if profile else ""))  # fmt: skip
        joined = await timed_catch_up(consumer, CpuMeter(roots), profile)
        async with pool.acquire() as conn:
            labelled = await conn.fetchval("SELECT count(*) FROM decision_outcomes WHERE label IS NOT NULL")
            appended = await conn.fetchval(
                "SELECT count(*) FROM events WHERE metadata->>'producer' = 'feedback' AND type <> 'outcome.recorded'"
            )
        if labelled != n:
            raise RuntimeError(f"the consumer joined {labelled} outcomes of {n}")
        say(f"    {joined.count:,} events in {joined.seconds:.2f}s = {joined.rate:,.0f} outcomes joined/s"
            f" ({appended} monitor events appended in both phases)")  # fmt: skip
        say(f"    cpu: {cpu_line(joined)}")
        if profile:
            say(f"    profile written to {profile}")
    finally:
        await pool.close()

    say("\n[3] baseline: raw asyncpg, the same rows, into copies of decision_outcomes (LIKE ... INCLUDING ALL)")
    rows = decision_rows(work.decisions, decision_seqs)
    columns = outcome_columns(work.outcomes, outcome_seqs)
    conn = await asyncpg.connect(url)
    try:
        copy_a = await raw_table(conn, "raw_join_a", rows)
        unnest = await raw_unnest(conn, "raw_join_a", columns, CpuMeter(roots))
        copy_b = await raw_table(conn, "raw_join_b", rows)
        staged = await raw_staged(conn, "raw_join_b", columns, CpuMeter(roots))
    finally:
        await conn.close()
    for phase, what in ((unnest, "unnest"), (staged, "staged")):
        if phase.count != n:
            raise RuntimeError(f"raw {what} updated {phase.count} rows of {n}")
    raw_decisions_rate = per_second(n, min(copy_a, copy_b))
    say(f"    decisions: copy_records_to_table of {n:,} rows {min(copy_a, copy_b):.3f}s"
        f" = {raw_decisions_rate:,.0f} rows/s")  # fmt: skip
    say(f"    (a) UPDATE ... FROM unnest(7 arrays), one statement: {unnest.seconds:.3f}s = {unnest.rate:,.0f} rows/s")
    say(f"        cpu: {cpu_line(unnest)}")
    say(f"    (b) COPY to a temp table + UPDATE ... FROM it:      {staged.seconds:.3f}s = {staged.rate:,.0f} rows/s")
    say(f"        cpu: {cpu_line(staged)}")
    raw, raw_way = (unnest, "update_from_unnest") if unnest.rate >= staged.rate else (staged, "copy_staging_update")
    ratio = joined.rate / raw.rate
    decisions_ratio = decided.rate / raw_decisions_rate
    say(f"\noutcomes joined/s {joined.rate:,.0f} (consumer) / {raw.rate:,.0f} (raw, {raw_way}) = {ratio:.3f}"
        f" (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")  # fmt: skip
    say(f"decisions joined/s {decided.rate:,.0f} (consumer) / {raw_decisions_rate:,.0f} (raw COPY)"
        f" = {decisions_ratio:.3f}")  # fmt: skip

    return {
        "bench": "feedback",
        "quick": quick,
        "decisions": n,
        "outcomes": n,
        "consumer_batch": consumer.batch,
        "consumer_runs": "in-process",
        "postgres_fsync": True,
        "decisions_joined_per_s": rounded(decided.rate),
        "decisions_seconds": round(decided.seconds, 3),
        "decisions_cpu_s": decided.cpu,
        "raw_copy_decisions_per_s": rounded(raw_decisions_rate),
        "ratio_decisions_vs_raw_copy": round(decisions_ratio, 4),
        "outcomes_joined_per_s": rounded(joined.rate),
        "outcomes_seconds": round(joined.seconds, 3),
        "outcomes_cpu_s": joined.cpu,
        "monitor_events_appended": appended,
        "raw_update_unnest_rows_per_s": rounded(unnest.rate),
        "raw_update_unnest_cpu_s": unnest.cpu,
        "raw_copy_staging_update_rows_per_s": rounded(staged.rate),
        "raw_copy_staging_update_cpu_s": staged.cpu,
        "raw_outcome_rows_per_s": rounded(raw.rate),
        "raw_way": raw_way,
        "ratio_vs_raw": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
        "profiled": profile is not None,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": {**machine(), "data_fs": filesystem_of(tmp)},
    }


def main() -> None:
    p = parser("feedback", "Outcomes joined per second by the feedback consumer, beside a raw asyncpg join.")
    p.add_argument(
        "--decisions", type=int, help=f"decisions and outcomes ({QUICK_DECISIONS:,} quick, {FULL_DECISIONS:,} full)"
    )
    p.add_argument("--tmp-dir", type=Path, help="where to put the server's data (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="run the outcomes phase under cProfile into DIR/feedback-outcomes.prof (slows it)")  # fmt: skip
    args = p.parse_args()
    stop_on_sigterm()
    n = args.decisions or (QUICK_DECISIONS if args.quick else FULL_DECISIONS)
    profile = None
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile = args.profile.resolve() / "feedback-outcomes.prof"
    started = time.perf_counter()
    info = machine()
    say(f"bench.feedback{' (quick)' if args.quick else ''}: {n:,} decisions and {n:,} outcomes")
    say(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, Python {info['python']};"
        f" load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    with bench_dir("feedback", args.tmp_dir, args.keep) as tmp:
        say(f"server data in {tmp} ({filesystem_of(tmp)}); Postgres fsync on")
        with postgres_server(tmp) as postgres:
            result = asyncio.run(run(n, args.quick, postgres, tmp, profile))
    say(f"done in {time.perf_counter() - started:.1f}s (load average {os.getloadavg()[0]:.2f})")
    emit(result)


if __name__ == "__main__":
    main()
