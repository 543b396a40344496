"""Replay benchmark: `verify` and off-policy evaluation beside a raw asyncpg cursor scan of the same
log, in the same run.

The log: the payments simulator (30 days, about 1,000,000 events; quick: 2 days) with one decision
in every DECIDE_EVERY payments appended after it as `decision.made` events, each with an
outcome. A decision's score is the simulator's true fraud probability blurred by seeded noise; it
names version 1 of the model, a small XGBoost model over the decisions' inputs registered before
them (what OPE evaluates and verify checks the inputs against). Its action is drawn from the threshold +
epsilon policy's `d2d.policies.action_probabilities`, its propensity that probability; its
logged features are the real values at (its entities, the payment's time, the payment's seq - 1),
computed by the offline frame (by construction what the online service answers there), so verify
must pass. The decision/outcome join is applied as the feedback consumer applies it, up to the head.

Figures (each timed once, in this order):
1. Raw scan: a plain asyncpg cursor over every event (`SELECT seq, payload FROM events ORDER BY
   seq`, payload as JSON text, not decoded): events/s. The baseline.
2. `d2d.replay.verify.verify(url, workers=every core)`: every projection rebuilt into a scratch
   database and compared, every decision's features and inputs recomputed (one partitioned fold):
   log events/s and decisions/s. Target: verify >= 0.1 x the raw scan's events/s on >= 1,000,000
   events.
3. OPE: `d2d.replay.ope.evaluate_policy` of version 1 under a stricter threshold on the same
   decisions and outcomes (IPS, SNIPS, DR, 200 bootstrap resamples): decisions/s.

The last line is one JSON object with every figure and its baseline.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench._common import CpuMeter, Servers, bench_dir, emit, filesystem_of, machine, parser, rounded, say
from d2d import eventlog, projections
from d2d.eventlog import EventLog, NewEvent
from d2d.features.offline import PAGE, FrameRow, rows_from_events
from d2d.features.store import register_views
from d2d.policies import action_probabilities
from d2d.replay.log import no_progress
from d2d.replay.ope import evaluate_policy
from d2d.replay.partition import partitioned_frame, usable_cores
from d2d.replay.verify import verify
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.training import default_spec
from d2d.sim.views import VIEWS
from d2d.training.spec import numeric_features
from services.registry.store import ModelStore

TARGET_VERIFY_RATIO = 0.1  # verify events/s >= 0.1 x the raw cursor scan's
PAYMENTS_PER_DAY = 33_000
OUT_OF_ORDER_FRACTION = 0.05
QUICK_DAYS, FULL_DAYS = 2.0, 30.0
DECIDE_EVERY = 20  # one decision per this many payments
APPEND_BATCH = 5_000
SEED = 13
MODEL = "fraud"
MODEL_VERSION = f"models/{MODEL}/versions/1"
INPUTS = numeric_features(VIEWS)  # the decisions' input vector, and the registered version's inputs
POLICY = {"threshold": 0.5, "epsilon": 0.1, "actions": ["approve", "decline"], "canary_share": 0.0}


async def load_payments(log: EventLog, config: SimConfig) -> tuple[int, dict[str, Any]]:
    simulated = PaymentsSimulator(config)
    events = [e.as_new_event() for e in simulated.events()]
    for i in range(0, len(events), APPEND_BATCH):
        await log.append(events[i : i + APPEND_BATCH])
    return len(events), simulated.truth()


def decision_events(row: FrameRow, features: dict[str, Any], truth: Any, rng: random.Random) -> list[NewEvent]:
    """A decision on the payment of `row` (and its outcome), as serving and the feedback rules log them."""
    decision_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    score = min(1.0, max(0.0, truth.fraud_probability + rng.gauss(0.0, 0.1)))
    probabilities = action_probabilities(score, POLICY)
    action = rng.choices(list(probabilities), weights=list(probabilities.values()))[0]
    greedy = max(probabilities, key=probabilities.__getitem__)
    inputs = [features[name] for name in INPUTS]
    payload = {
        "decision_id": decision_id, "model": MODEL, "model_version": MODEL_VERSION, "arm": "production",
        "score": score, "action": action, "propensity": probabilities[action], "explored": action != greedy,
        "greedy_action": greedy, "action_scores": {"decline": score}, "policy": POLICY, "features": features,
        "inputs": inputs, "feature_watermark": row.watermark, "as_of": row.as_of.isoformat(),
        "entities": row.keys, "context": {"payment_id": truth.payment_id}, "unit_id": row.keys["customer"],
    }  # fmt: skip
    decided = NewEvent(uuid.UUID(decision_id), "decision.made", 1, "decision", decision_id, row.as_of,
                       orjson.dumps(payload).decode(), {"producer": "serving"})  # fmt: skip
    at = row.as_of + timedelta(days=45)
    reward = (-1.0 if truth.is_fraud else 0.05) if action == "approve" else 0.0
    outcome = {"outcome_id": f"rule:chargeback:{decision_id}", "decision_id": decision_id,
               "label": int(truth.is_fraud), "reward": reward, "occurred_at": at.isoformat(), "source": "rule",
               "rule": "chargeback"}  # fmt: skip
    recorded = NewEvent(uuid.uuid5(uuid.UUID(decision_id), "outcome"), "outcome.recorded", 1, "decision", decision_id,
                        at, orjson.dumps(outcome).decode())  # fmt: skip
    return [decided, recorded]


async def register_version(url: str, log: EventLog, truth: dict[str, Any]) -> None:
    """Version 1 of MODEL, the one the decisions name: a small XGBoost model over INPUTS fitted to the
    simulator's truth on a sample of payments (what it scores does not matter here: OPE and verify's
    inputs check need a registered version with its artifact)."""
    import numpy as np
    import xgboost as xgb

    rows = (await rows_from_events(log, "payment.authorized", VIEWS))[::50]
    frame = await partitioned_frame(url, VIEWS, rows, workers=usable_cores())
    async with log.pool.acquire() as conn:
        payment_ids = dict(await conn.fetch(
            "SELECT event_id::text, payload->>'payment_id' FROM events WHERE type = 'payment.authorized'"
        ))  # fmt: skip
    x = frame[INPUTS].astype(float).to_numpy()
    y = np.asarray([int(truth[payment_ids[r.row_id]].is_fraud) for r in rows])
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": SEED},
                        xgb.DMatrix(x, label=y, missing=np.nan), 20)  # fmt: skip
    store = ModelStore(log, default_policy=POLICY)
    await store.create_model(MODEL, "bench.replay's decisions", POLICY)
    await store.add_version(MODEL, bytes(booster.save_raw(raw_format="ubj")), default_spec().to_dict(), INPUTS)


async def load_decisions(url: str, log: EventLog, truth: dict[str, Any]) -> int:
    """Decisions on every DECIDE_EVERY-th payment, their features from the offline frame."""
    every = await rows_from_events(log, "payment.authorized", VIEWS)
    rows = every[::DECIDE_EVERY]
    frame = await partitioned_frame(url, VIEWS, rows, workers=usable_cores())
    names = [c for c in frame.columns if "." in c]
    columns = {name: frame[name].tolist() for name in names}
    rng = random.Random(SEED)
    made: list[NewEvent] = []
    async with log.pool.acquire() as conn:
        payment_ids = dict(await conn.fetch(
            "SELECT event_id::text, payload->>'payment_id' FROM events WHERE type = 'payment.authorized'"
        ))  # fmt: skip
    for i, row in enumerate(rows):
        if frame["stale"].iat[i]:
            continue
        features = {name: _plain(columns[name][i]) for name in names}
        made += decision_events(row, features, truth[payment_ids[row.row_id]], rng)
    # Decisions as serving's group commits append them, then their outcomes (weeks later, in a log).
    made = made[0::2] + made[1::2]
    for i in range(0, len(made), APPEND_BATCH):
        batch = made[i : i + APPEND_BATCH]
        async with log.recording() as tx:
            stored = await tx.append(*batch)
            await projections.apply(tx.conn, stored, applied_by=projections.FEEDBACK)  # as the feedback consumer
            await tx.conn.execute(
                "INSERT INTO log_positions (name, seq) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = now()",
                projections.FEEDBACK, stored[-1].seq,
            )  # fmt: skip
    return len(made) // 2


def _plain(value: Any) -> Any:
    """A frame cell as the online answer logs it (missing as None)."""
    if isinstance(value, float) and value != value:
        return None
    return value


async def cursor_scan(url: str) -> int:
    """Baseline: a plain asyncpg cursor over every event, payload as JSON text (not decoded)."""
    conn = await asyncpg.connect(url)
    count = 0
    try:
        async with conn.transaction():
            cursor = await conn.cursor("SELECT seq, payload FROM events ORDER BY seq")
            while rows := await cursor.fetch(PAGE):
                count += len(rows)
    finally:
        await conn.close()
    return count


async def timed(roots: dict[str, tuple[int, bool]], work: Any) -> tuple[Any, float, dict[str, float]]:
    meter = CpuMeter(roots)
    meter.start()
    started = time.perf_counter()
    value = await work()
    seconds = time.perf_counter() - started
    return value, seconds, meter.stop()


async def run(days: float, servers: Servers, quick: bool) -> dict[str, Any]:
    roots = {**servers.cpu_roots(), "bench client": (os.getpid(), True)}
    url = await servers.new_database(f"b{uuid.uuid4().hex[:8]}_replay")
    pool = await eventlog.create_pool(url, role=None, max_size=4)
    log = EventLog(pool)
    cores = usable_cores()
    config = SimConfig(seed=SEED, days=days, payments_per_day=PAYMENTS_PER_DAY,
                       out_of_order_fraction=OUT_OF_ORDER_FRACTION)  # fmt: skip
    try:
        started = time.perf_counter()
        await register_views(log, VIEWS)
        loaded, truth = await load_payments(log, config)
        await register_version(url, log, truth)
        decisions = await load_decisions(url, log, truth)
        async with pool.acquire() as conn:
            await conn.execute("VACUUM ANALYZE")
        head = await log.head()
        say(
            f"[0] log: {head:,} events ({loaded:,} simulated over {days} days, {decisions:,} decisions with"
            f" their outcomes, joined up to the head), built in {time.perf_counter() - started:.1f}s, not timed"
        )

        scanned, scan_seconds, scan_cpu = await timed(roots, lambda: cursor_scan(url))
        scan_rate = scanned / scan_seconds
        say(f"[1] raw asyncpg cursor scan: {scanned:,} events in {scan_seconds:.2f}s = {scan_rate:,.0f} events/s")
        say(f"      cpu: {CpuMeter.describe(scan_cpu, scan_seconds)}")

        stages: dict[str, float] = {}
        last = [time.perf_counter()]

        def progress(stage: str, done: int, total: int) -> None:
            now = time.perf_counter()
            stages[stage] = stages.get(stage, 0.0) + now - last[0]
            last[0] = now

        result, verify_seconds, verify_cpu = await timed(roots, lambda: verify(url, workers=cores, progress=progress))
        verify_rate = head / verify_seconds
        ratio = verify_rate / scan_rate
        say(f"[2] verify (workers={cores}): ok={result['ok']} ({len(result['differences'])} differences) in"
            f" {verify_seconds:.2f}s = {verify_rate:,.0f} log events/s, {decisions / verify_seconds:,.0f} decisions/s;"
            f" checked {result['checked']}")  # fmt: skip
        say(f"      time by stage (until its last progress report): { {k: round(v, 2) for k, v in stages.items()} }")
        say(f"      cpu: {CpuMeter.describe(verify_cpu, verify_seconds)}")
        verdict = "met" if ratio >= TARGET_VERIFY_RATIO else "MISSED"
        say(f"    verify / raw scan = {ratio:.3f} (target >= {TARGET_VERIFY_RATIO} on >= 1,000,000 events): {verdict}"
            f"{' (a quick log is too small to judge)' if quick else ''}")  # fmt: skip

        # OPE of the same version under a stricter threshold, on the logged decisions and outcomes.
        estimate, ope_seconds, ope_cpu = await timed(
            roots, lambda: evaluate_policy(log, MODEL_VERSION, policy={"threshold": 0.3}, progress=no_progress)
        )
        ope = {"seconds": round(ope_seconds, 3), "decisions_per_s": rounded(decisions / ope_seconds),
               "decisions_used": estimate["counts"], "cpu_s": ope_cpu}  # fmt: skip
        say(f"[3] ope: {decisions:,} decisions in {ope_seconds:.2f}s = {decisions / ope_seconds:,.0f} decisions/s"
            f" (IPS, SNIPS, DR with a cross-fitted reward model and 200 bootstrap resamples)")  # fmt: skip
        return {
            "bench": "replay", "quick": quick, "events": head, "decisions": decisions, "workers": cores,
            "raw_scan_events_per_s": rounded(scan_rate), "raw_scan_seconds": round(scan_seconds, 3),
            "raw_scan": "asyncpg cursor, SELECT seq, payload FROM events ORDER BY seq, payload not decoded",
            "verify_seconds": round(verify_seconds, 3), "verify_events_per_s": rounded(verify_rate),
            "verify_decisions_per_s": rounded(decisions / verify_seconds), "verify_ok": result["ok"],
            "verify_differences": len(result["differences"]), "verify_checked": result["checked"],
            "verify_stage_seconds": {k: round(v, 2) for k, v in stages.items()},
            "verify_vs_raw_scan": round(ratio, 4), "target_verify_vs_raw_scan": TARGET_VERIFY_RATIO,
            "baseline_single_process_fold_vs_raw_scan": 0.07, "ope": ope,
            "cpu_s_raw_scan": scan_cpu, "cpu_s_verify": verify_cpu,
        }  # fmt: skip
    finally:
        await pool.close()


def main() -> None:
    p = parser("replay", "verify and OPE rates beside a raw asyncpg cursor scan of the same log.")
    p.add_argument("--days", type=float, help=f"simulated days (default {QUICK_DAYS} quick, {FULL_DAYS} full)")
    p.add_argument("--tmp-dir", type=Path, help="where to put the servers' data (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir afterwards")
    args = p.parse_args()
    days = args.days or (QUICK_DAYS if args.quick else FULL_DAYS)
    started = time.perf_counter()
    info = machine()
    say(f"bench.replay{' (quick)' if args.quick else ''}: {days} simulated days, {PAYMENTS_PER_DAY:,} payments/day;"
        f" machine: {info['cpus']} CPUs ({info['cpu_model']}), load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    with bench_dir("replay", args.tmp_dir, args.keep) as tmp:
        say(f"servers' data in {tmp} ({filesystem_of(tmp)}); Postgres fsync off (no durable writes are measured)")
        with Servers(tmp, fsync=False) as servers:
            result = asyncio.run(run(days, servers, args.quick))
    result["machine"] = {**info, "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}
    say(f"done in {time.perf_counter() - started:.1f}s")
    emit(result)


if __name__ == "__main__":
    main()
