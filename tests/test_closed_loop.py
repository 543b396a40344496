"""The closed loop end to end: the platform's services (ingest and its relay, features, registry,
serving, feedback, audit) as their own processes on the embedded Postgres and NATS.

A history is loaded and a first model trained on it with full labels (every chargeback) goes to
production with exploration. Then the simulator sends payments through the loop: serving decides
each one, chargebacks come back hours later only for approved fraud (selective labels), and from
`DRIFT_DAY` a new fraud pattern appears (skimmed cards run through terminals in bursts). Nobody
touches the platform after that: the feedback service must notice the inputs drifting (a PSI
`quality.alert`), ask for a retrain (`retrain.requested`), and the registry must train a candidate
on the newest labelled decisions (weighted by inverse propensity, boosting on from the production
version's trees), put it on canary, watch it and promote it, each step an event in the log, in that
order. The audit service's verify then recomputes everything derived from the
log, the feature vector of every decision included. The promoted version's live AUC on post-drift
traffic is compared with a model trained offline on post-drift payments with full labels (the
simulator's truth: every fraud, approved or declined), on the same payments: the gap is at most 0.03
(the issue's target).

The simulator's clock is paced by the platform: the loop sends a slice of event time, then waits
until the feedback service has applied it, and, while the registry has what it needs to act (the
labels to train on, a canary to judge), until it has acted. Without that the simulator would send
days of traffic in the seconds a training takes.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import numpy as np
import pytest
import xgboost as xgb

from d2d import eventlog
from d2d.client import AuditClient, FeatureClient, FeedbackClient, IngestClient, RegistryClient, ServingClient
from d2d.eventlog import EventLog, StoredEvent
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.runtime.services import service
from d2d.runtime.supervisor import Supervisor
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.loop import LoopState, run_loop, wait_folded
from d2d.sim.training import default_spec
from d2d.training.decisions import decision_examples
from d2d.training.evaluation import weighted_metrics
from d2d.training.labels import LabelDefinition
from d2d.training.spec import TrainingSpec
from d2d.training.split import time_split
from services.registry.loop import retrain_spec
from tests.closed_loop_outcomes import WINDOW_SECONDS
from tests.conftest import ROOT, register_sim_contracts, seed_test_key

T = TypeVar("T")

MODEL = "fraud"
HISTORY_DAYS = 3.0
DRIFT_DAY = 4.5
BURSTS_PER_DAY = 100.0  # the drift's covariate part (see MONITOR)
# Chargebacks 2.4 to 14.4 hours after the payment; the label window (the chargeback rule's, see
# tests/closed_loop_outcomes.py, and the first model's) is one day.
SIM = SimConfig(
    seed=21, customers=400, merchants=40, days=16.0, payments_per_day=3_000, fraud_rate=0.05,
    chargeback_delay_days=(0.1, 0.6), drift_day=DRIFT_DAY, drift_bursts_per_day=BURSTS_PER_DAY,
)  # fmt: skip
LABEL = LabelDefinition("payment.authorized", "payment.chargeback", "payment_id", WINDOW_SECONDS)
ROUNDS = 60
# Decline at a score of 0.3; explore on a fifth of decisions (a uniform draw of the action), so a tenth
# of would-be declines are approved anyway and declined kinds of payments still get labels.
EPSILON, THRESHOLD = 0.2, 0.3
MIN_TRAINING_LABELS = 10_000  # labelled decisions after the request before the candidate is trained
PROMOTION = {"canary_share": 0.5, "min_decisions": 400, "min_labels": 300, "margin": 0.0, "max_decisions": 20_000}
# The drift has a covariate part (SimConfig.drift_bursts_per_day: skimmed cards run through terminals in
# bursts), which moves the card's 10-minute count, so input PSI sees it as soon as a drift window of
# decisions holds some of it, before labels come (the live AUC needs chargebacks, hours later). PSI
# leaves out the inputs that move with the log's age or the time of day rather than with the world:
# against a baseline of the history's first days, lifetime and 7-day values keep growing and 1-day ones
# were still filling (PSI 0.2 to 2.8 before any drift); a customer's first payment has no last IP
# country to compare with, and there were many firsts then (0.47); and a window of 1,000 decisions
# covers a few hours, so the hour of day (3.0) and the merchants' hourly volume (0.12), which follow
# the daily cycle, leave it too. What stays: short-window counts of cards and customers and the amount
# (at most 0.06 before the drift on this seed, point-in-time values, computed offline; the card's
# 10-minute count 0.25 a fifth of a day after it), the channel and the score. The live AUC is over the
# newest 1,500 labels (about 75 fraud): over 600, noise alone dropped it 0.06 below the held-out AUC
# before the drift.
MONITOR = {
    "performance_window": 1500, "performance_every": 250, "performance_drop": 0.06,
    "drift_window": 1000, "drift_every": 250, "drift_threshold": 0.15,
    "drift_inputs_exclude": [
        "*_lifetime", "*_7d", "*_1d", "transform.hour_of_day", "transform.ip_country_same_as_last",
        "merchant_payments.count_1h",
    ],
}  # fmt: skip
SLICE_DAYS = 0.05  # event time sent between looks at the platform
MEASURE_DAYS = 1.5  # post-promotion traffic the live AUC is measured on
TARGET = 0.03  # the issue's: the promoted version's live AUC within this of the full-label model's


@dataclass
class Platform:
    url: str
    addrs: dict[str, str]


@pytest.fixture(scope="module")
def platform(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """The five services as processes, the history in the log, version 1 in production."""
    url = postgres.create_database(f"closed_{uuid.uuid4().hex[:10]}")
    logs = tmp_path_factory.mktemp("closed-loop-logs")
    names = ("ingest", "features", "registry", "serving", "feedback", "audit")
    addrs = {name: f"127.0.0.1:{free_port()}" for name in names}
    env = {
        "D2D_DATABASE_URL": url, "D2D_NATS_URL": nats_server.url, "D2D_NATS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
        "D2D_DATA_DIR": str(logs), **{service(name).addr_env: addr for name, addr in addrs.items()},
        "D2D_OUTCOME_RULES": "tests.closed_loop_outcomes", "D2D_FEEDBACK_MONITOR": json.dumps(MONITOR),
        "D2D_REGISTRY_CANARY_CHECK_SECONDS": "0.5", "D2D_REGISTRY_RETRAIN_MIN_LABELS": str(MIN_TRAINING_LABELS),
    }  # fmt: skip
    cutoff = SIM.start + timedelta(days=HISTORY_DAYS)
    history = [e for e in PaymentsSimulator(SIM).events() if e.occurred_at < cutoff]

    async def load() -> None:
        await eventlog.migrate(url)
        await seed_test_key(url)
        pool = await eventlog.create_pool(url, max_size=2)
        for i in range(0, len(history), 5000):
            await EventLog(pool).append([e.as_new_event() for e in history[i : i + 5000]])
        await pool.close()

    asyncio.run(load())
    supervisor = Supervisor(logs, cwd=ROOT, base_env=env)
    for name in ("ingest", "ingest-relay", "features", "registry", "serving", "feedback", "audit"):
        supervisor.spawn(name, service(name).args)

    async def train_and_deploy() -> None:
        async with (
            IngestClient(addrs["ingest"]) as ingest, RegistryClient(addrs["registry"]) as registry,
            FeatureClient(addrs["features"]) as features, FeedbackClient(addrs["feedback"]) as feedback,
        ):  # fmt: skip
            await ingest.wait_ready()
            await register_sim_contracts(ingest)
            await registry.wait_ready()
            await features.wait_ready()
            await feedback.wait_ready()
            await wait_folded(features, len(history))
            spec = {**default_spec().to_dict(), "label": LABEL.to_dict(), "num_boost_round": ROUNDS}
            await registry.create_model(MODEL)
            await registry.set_promotion_policy(MODEL, **PROMOTION)
            await registry.train(MODEL, json.dumps(spec))
            await registry.set_alias(MODEL, "production", 1)
            await registry.set_policy(MODEL, epsilon=EPSILON, threshold=THRESHOLD, actions=["approve", "decline"])

    try:
        asyncio.run(train_and_deploy())
        yield Platform(url, addrs)
    finally:
        supervisor.stop_all()


async def _read(log: EventLog, after: int, types: list[str] | None = None) -> list[StoredEvent]:
    found: list[StoredEvent] = []
    while page := await log.read(after, 5000, types=types):
        found += page
        after = page[-1].seq
    return found


async def until(probe: Callable[[], Awaitable[T]], what: str, timeout: float = 180) -> T:
    """`probe()`'s first truthy answer (a deadline only so a stuck platform fails instead of hanging)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (answer := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.2)
    return answer


@dataclass
class Run:
    """What the loop went through: where the drift starts in the log, and when (event time) the
    promoted version started deciding."""

    before: int  # the log's length before the loop
    drift_seq: int = 0  # the log's length before the first post-drift payment
    promoted_at: datetime | None = None
    promoted_version: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class Loop:
    """The simulator driven slice by slice, paced by the platform (see the module docstring)."""

    def __init__(self, platform: Platform, log: EventLog, clients: tuple[IngestClient, ServingClient]) -> None:
        self.platform, self.log, self.clients = platform, log, clients
        self.sim = PaymentsSimulator(SIM)
        self.day = HISTORY_DAYS
        self.state = LoopState(reference_sent=True)
        self.counts: dict[str, int] = {}
        start = SIM.start + timedelta(days=HISTORY_DAYS)
        for p in self.sim.payment_events():  # the history's chargebacks still to come, as if approved
            if p.occurred_at < start and (chargeback := self.sim.chargeback(p.payload["payment_id"])) is not None:
                if chargeback.occurred_at >= start:
                    self.state.pending.append((chargeback.occurred_at, chargeback.event_id, chargeback))
        self.state.pending.sort()

    @property
    def now(self) -> datetime:
        return SIM.start + timedelta(days=self.day)

    async def advance(self, days: float) -> None:
        counts = await run_loop(self.sim, *self.clients, MODEL, start_day=self.day, days=days, state=self.state)
        self.day += days
        self.counts = {k: self.counts.get(k, 0) + v for k, v in counts.items()}
        head = await self.log.head()
        await until(lambda: self._feedback_at(head), "the feedback service to apply the slice")

    async def _feedback_at(self, seq: int) -> bool:
        return await self.log.position("feedback") >= seq


async def _first(log: EventLog, after: int, type_: str, match: Callable[[StoredEvent], bool]) -> StoredEvent | None:
    return next((e for e in await _read(log, after, [type_]) if match(e)), None)


@pytest.mark.timeout(1200)  # about 7 minutes alone on 2 cores; the suite's default is 5
async def test_drift_is_noticed_retrained_on_logged_decisions_and_promoted_through_canary(platform: Platform) -> None:
    pool = await eventlog.create_pool(platform.url, role=None, max_size=2)
    log = EventLog(pool)
    try:
        async with (
            IngestClient(platform.addrs["ingest"]) as ingest, ServingClient(platform.addrs["serving"]) as serving,
            RegistryClient(platform.addrs["registry"]) as registry,
            FeedbackClient(platform.addrs["feedback"]) as feedback,
        ):  # fmt: skip
            run = Run(before=await log.head())
            loop = Loop(platform, log, (ingest, serving))
            await loop.advance(DRIFT_DAY - HISTORY_DAYS)  # labels of the first half close before the drift
            run.drift_seq = await log.head()
            early = await _first(log, run.before, "retrain.requested", lambda e: True)
            if early is not None:
                cause = await log.get(uuid.UUID(early.payload["alert_event_id"]))
                raise AssertionError(f"a retrain was requested before the drift: {cause and cause.payload}")

            # 1. The drift: traffic until the platform asks for a retrain by itself.
            request = None
            while request is None:
                assert loop.day < SIM.days - 6, "no retrain.requested in the days after the drift"
                await loop.advance(SLICE_DAYS)
                request = await _first(log, run.drift_seq, "retrain.requested", lambda e: True)
            print(f"\nretrain requested at day {loop.day:.2f}: {request.payload}")
            alert = await log.get(uuid.UUID(request.payload["alert_event_id"]))
            print(f"alert: {alert and alert.payload}")

            # 2. Traffic until the candidate is trained: while the registry has the labels it waits
            # for, the simulator waits for the registry.
            first = await registry.get_version(MODEL, 1)
            production_spec = TrainingSpec.from_dict(json.loads(first.spec_json))
            wanted = retrain_spec(production_spec, request.payload, 0, decisions_after=request.seq)

            async def candidate() -> StoredEvent | None:
                return await _first(
                    log, request.seq, "model.registered",
                    lambda e: (e.payload.get("lineage") or {}).get("retrain_request") == str(request.event_id),
                )  # fmt: skip

            while (registered := await candidate()) is None:
                assert loop.day < SIM.days - 4, "no candidate trained in the days after the request"
                spec = TrainingSpec.from_dict({**wanted.to_dict(), "to_seq": await log.head()})
                try:
                    labelled = (await decision_examples(log, spec, list(first.feature_names))).counts["labelled"]
                except ValueError:
                    labelled = 0
                if labelled >= MIN_TRAINING_LABELS:
                    registered = await until(candidate, "the candidate the registry has the labels for")
                    break
                await loop.advance(SLICE_DAYS)
            version = registered.payload["version"]
            lineage = registered.payload["lineage"]
            print(f"candidate version {version} at day {loop.day:.2f}: decisions {lineage['decisions']}, positives"
                  f" {lineage['positives']}, held-out AUC {registered.payload['evaluation'].get('auc')}")  # fmt: skip

            # 3. Traffic until the canary's verdict: after each slice the registry gets a look.
            async def verdict() -> Any:
                record = await registry.get_model(MODEL)
                done = "canary" not in record.aliases and record.deployment_policy.canary_share == 0.0
                return record if done else None

            await until(lambda: _canary_set(registry, str(version)), "the canary")
            while (record := await verdict()) is None:
                assert loop.day < SIM.days - 2.5, "no verdict on the canary in the days after it was set"
                await loop.advance(SLICE_DAYS)
                await asyncio.sleep(1.5)  # three canary checks
            assert record.aliases["production"] == str(version), f"the canary was not promoted: {record.alias_history}"
            run.promoted_at, run.promoted_version = loop.now, version
            print(f"promoted at day {loop.day:.2f}")

            # 4. Post-promotion traffic to measure on, then a label window more so its labels close.
            await loop.advance(MEASURE_DAYS)
            await loop.advance(WINDOW_SECONDS / 86_400 + 0.1)
            run.counts = loop.counts
            metrics = await feedback.model_metrics(
                MODEL, start=run.promoted_at, end=run.promoted_at + timedelta(days=MEASURE_DAYS)
            )
            # 5. Everything derived from the log recomputed from it: every projection, the features
            # service's snapshots, and the feature vector of every decision the loop made.
            async with AuditClient(platform.addrs["audit"]) as audit:
                verified = await audit.verify()
            assert verified["ok"], "\n".join(json.dumps(d, default=str) for d in verified["differences"][:20])
            assert verified["checked"]["decisions"] >= loop.counts["payments"]  # one decision per payment sent
        events = await _read(log, run.before)
        await _assert_steps_in_order(events, run, request, registered)
        versions = await _read(log, 0, ["model.registered"])
        await _assert_live_auc_near_full_label_model(events, versions, run, registered, metrics)
    finally:
        await pool.close()


async def _canary_set(registry: RegistryClient, version: str) -> bool:
    record = await registry.get_model(MODEL)
    return record.aliases.get("canary") == version


async def _assert_steps_in_order(
    events: list[StoredEvent], run: Run, request: StoredEvent, registered: StoredEvent
) -> None:
    """alert -> retrain.requested -> model.registered (its lineage naming the request) -> canary ->
    canary share -> production -> canary removed, in the log's order, after the drift began."""
    request_id = str(request.event_id)
    alert = next(e for e in events if e.event_id == uuid.UUID(request.payload["alert_event_id"]))
    assert alert.type == "quality.alert" and alert.seq > run.drift_seq
    assert alert.payload["kind"] == "drift", alert.payload
    assert alert.payload["source"] == f"models/{MODEL}/versions/1"
    lineage = registered.payload["lineage"]
    assert lineage["retrain_request"] == request_id and lineage["weighting"] == "inverse_propensity"
    spec = registered.payload["spec"]
    assert spec["label"]["source"] == "decisions" and spec["after_seq"] == request.seq
    version = registered.payload["version"]
    moves = [e for e in events if e.type in ("model.alias_set", "model.policy_set") and e.seq > registered.seq]
    steps = [
        (e.type, e.payload.get("alias"), e.payload.get("version"))
        for e in moves
        if e.type == "model.policy_set" or request_id in e.payload.get("reason", "")
    ]
    print("steps:", [(alert.type, alert.payload["kind"]), (request.type, request.payload["reason"]),
                     ("model.registered", version), *steps])  # fmt: skip
    assert alert.seq <= request.seq < registered.seq
    assert steps[:4] == [
        ("model.alias_set", "canary", version),
        ("model.policy_set", None, None),
        ("model.alias_set", "production", version),
        ("model.alias_set", "canary", None),
    ], steps
    policies = [e.payload for e in moves if e.type == "model.policy_set"]
    assert policies[0]["policy"]["canary_share"] == PROMOTION["canary_share"]
    assert policies[1]["policy"]["canary_share"] == 0.0


def _auc(labels: list[int], scores: list[float], weights: list[float] | None = None) -> float:
    w = np.ones(len(labels)) if weights is None else np.asarray(weights)
    value = weighted_metrics(np.asarray(labels), np.asarray(scores), w)["auc"]
    assert value is not None
    return float(value)


async def _assert_live_auc_near_full_label_model(
    events: list[StoredEvent], registrations: list[StoredEvent], run: Run, registered: StoredEvent, metrics: Any
) -> None:
    """The promoted version's live AUC (GetModelMetrics, its production arm, decisions in the
    measurement days) against a model trained offline with every payment's true label, scored on the
    same labelled decisions.

    The offline model learns from the same post-drift payments the candidate could learn from: those
    decided in its log range and past the label window when it was trained, approved or declined (the
    candidate saw only the approved ones' outcomes, weighted by inverse propensity), trained the way
    the platform trains (the candidate's parameters, rounds, early stopping and time split). Same
    payments, same inputs, same learner: what differs is selective labels against full ones, which is
    what the 0.03 target is about. A second offline model that also learns the range's payments still
    inside the label window (labels the platform cannot have yet) is printed for the record."""
    assert run.promoted_at is not None
    truth = PaymentsSimulator(SIM).truth()
    promoted = f"models/{MODEL}/versions/{run.promoted_version}"
    [arm] = [a for a in metrics.arms if a.model_version == promoted and a.arm == "production"]
    live = json.loads(arm.metrics_json)
    assert arm.HasField("auc")

    end = run.promoted_at + timedelta(days=MEASURE_DAYS)
    decisions = [e for e in events if e.type == "decision.made"]
    names = {e.payload["model_version"] for e in decisions}
    versions = {
        e.payload["version"]: e.payload["feature_names"]
        for e in registrations
        if e.payload["model"] == MODEL and "version" in e.payload
    }
    assert all(versions[int(n.rsplit("/", 1)[1])] == versions[1] for n in names)  # the same inputs throughout

    def when(e: StoredEvent) -> datetime:
        return datetime.fromisoformat(e.payload["as_of"])

    def row(e: StoredEvent) -> list[float]:
        return [math.nan if x is None else float(x) for x in e.payload["inputs"]]

    spec = registered.payload["spec"]
    in_range = [e for e in decisions if spec["after_seq"] < e.seq <= spec["to_seq"]]
    assert spec["after_seq"] > run.drift_seq and in_range
    # The range's end in event time, as training on decisions reads it (d2d.training.decisions).
    outcomes_in_range = [
        e.occurred_at for e in events if e.type == "outcome.recorded" and spec["after_seq"] < e.seq <= spec["to_seq"]
    ]
    as_of = max([when(e) for e in in_range] + outcomes_in_range)
    window = timedelta(seconds=spec["label"]["window_seconds"])
    eligible = [e for e in in_range if as_of - when(e) >= window]
    assert (
        len(eligible)
        == registered.payload["lineage"]["decisions"]["decisions"]
        - (registered.payload["lineage"]["decisions"]["censored"])
    )

    def offline_model(train: list[StoredEvent]) -> Any:
        x = np.asarray([row(e) for e in train])
        y = np.asarray([int(truth[e.payload["context"]["payment_id"]].is_fraud) for e in train])
        split = time_split([when(e) for e in train], train=spec["train_share"], validation=spec["validation_share"])
        return xgb.train(
            {**spec["params"], "seed": spec["seed"]}, xgb.DMatrix(x[split.train], label=y[split.train]),
            num_boost_round=spec["num_boost_round"], early_stopping_rounds=spec["early_stopping_rounds"],
            evals=[(xgb.DMatrix(x[split.validation], label=y[split.validation]), "validation")], verbose_eval=False,
        )  # fmt: skip

    def scores(booster: Any, rows: list[StoredEvent]) -> list[float]:
        matrix = xgb.DMatrix(np.asarray([row(e) for e in rows]))
        return list(booster.predict(matrix, iteration_range=(0, booster.best_iteration + 1)))

    # The payments the live AUC is over: the promoted version's production decisions of the
    # measurement days that got a label (approved ones: selective labels).
    measured = [
        e for e in decisions
        if e.payload["model_version"] == promoted and e.payload["arm"] == "production"
        and run.promoted_at <= when(e) < end
    ]  # fmt: skip
    outcomes: dict[str, int] = {}
    for e in events:
        if e.type == "outcome.recorded" and e.payload.get("label") is not None:
            outcomes.setdefault(e.payload["decision_id"], int(e.payload["label"]))
    labelled = [e for e in measured if e.payload["decision_id"] in outcomes]
    assert len(labelled) == arm.labelled and len(measured) == arm.decisions
    labels = [outcomes[e.payload["decision_id"]] for e in labelled]
    weights = [1.0 / max(e.payload["propensity"], 0.01) for e in labelled]
    every = [int(truth[e.payload["context"]["payment_id"]].is_fraud) for e in measured]

    same, whole = offline_model(eligible), offline_model(in_range)
    offline = _auc(labels, scores(same, labelled))
    fraud = sum(int(truth[e.payload["context"]["payment_id"]].is_fraud) for e in eligible)
    had = registered.payload["lineage"]["decisions"]["labelled"]
    offline_ips, offline_whole = _auc(labels, scores(same, labelled), weights), _auc(labels, scores(whole, labelled))
    live_truth = _auc(every, [e.payload["score"] for e in measured])
    same_truth, whole_truth = _auc(every, scores(same, measured)), _auc(every, scores(whole, measured))
    report = (
        f"promoted {promoted}: live AUC {arm.auc:.4f} (IPS {live['ips_auc']:.4f}) over {arm.labelled} labelled of"
        f" {arm.decisions} post-drift decisions. Offline full-label model on the {len(eligible)} post-drift payments"
        f" the candidate could learn from ({fraud} fraud; the candidate had labels for {had}): AUC {offline:.4f}"
        f" (IPS {offline_ips:.4f}) on the same; gap {offline - arm.auc:+.4f} (target {TARGET}). For the record:"
        f" offline on all {len(in_range)} payments of the range (those inside the label window too): AUC"
        f" {offline_whole:.4f}; against the truth on all {len(measured)} measured payments (declined too): live"
        f" {live_truth:.4f}, offline {same_truth:.4f}, offline on all {whole_truth:.4f}; loop {run.counts}"
    )
    print(report)
    # Measured gaps (epsilon 0.2): +0.0001 with 8,000 training labels, +0.020 with 4,000, both boosting
    # on from version 1's trees. Trained from nothing on the decisions alone they were +0.023 and +0.031
    # with 8,000, +0.020 to +0.035 with 4,000 (and +0.024 with epsilon 0.4).
    assert offline - arm.auc <= TARGET, report
