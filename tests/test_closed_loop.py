"""The closed loop end to end: the story `d2d demo` tells (d2d.sim.story), run once on the platform's
services (ingest and its relay, features, registry, serving, feedback, audit) as their own processes
on the embedded Postgres and NATS, then checked against the log.

A history goes through ingest (a few broken copies: dead letters) and a first model trained on it
with full labels (every chargeback) goes to production with exploration. Then the simulator sends
payments through the loop: serving decides each one, chargebacks come back hours later only for
approved fraud (selective labels), and from the drift day a new fraud pattern appears (skimmed cards
run through terminals in bursts). Nobody touches the platform after that: the feedback service must
notice the inputs drifting (a PSI `quality.alert`), ask for a retrain (`retrain.requested`), and the
registry must train a candidate on the newest labelled decisions (weighted by inverse propensity,
boosting on from the production version's trees), put it on canary, watch it and promote it, each
step an event in the log, in that order. The old and the new policy are compared off-policy and one
decision is explained. The audit service's verify then recomputes everything derived from the log,
the feature vector of every decision included. The promoted version's live AUC on post-drift traffic
is compared with a model trained offline on post-drift payments with full labels (the simulator's
truth: every fraud, approved or declined), on the same payments: the gap is at most 0.03 (the issue's
target). The demo's summary, rendered at 80 columns as `d2d demo` renders it, shows what the log holds.

The story is the demo's (`DEMO`), with post-promotion traffic to measure the live AUC on and the
verify stage added.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from rich.console import Console

from d2d import eventlog
from d2d.cli.demo import run_story, summary
from d2d.client import FeedbackClient
from d2d.eventlog import EventLog, StoredEvent
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.runtime.services import service
from d2d.runtime.supervisor import Supervisor
from d2d.sim import PaymentsSimulator
from d2d.sim.story import DEMO, STAGES, StoryResult, read_events
from d2d.training.evaluation import weighted_metrics
from d2d.training.split import time_split
from tests.conftest import ROOT, seed_test_key

CONFIG = dataclasses.replace(DEMO, measure_days=1.5, verify=True)
SIM, MODEL = CONFIG.sim, CONFIG.model
TARGET = 0.03  # the issue's: the promoted version's live AUC within this of the full-label model's


@dataclass
class Told:
    """The story as it ran: its result, its output at 80 columns, and the platform it ran on."""

    result: StoryResult
    output: str
    url: str
    addrs: dict[str, str]


@pytest.fixture(scope="module")
def told(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Told]:
    """The six services as processes, the story run once on them (as `d2d demo` runs it)."""
    url = postgres.create_database(f"closed_{uuid.uuid4().hex[:10]}")
    logs = tmp_path_factory.mktemp("closed-loop-logs")
    names = ("ingest", "features", "registry", "serving", "feedback", "audit")
    addrs = {name: f"127.0.0.1:{free_port()}" for name in names}
    env = {
        "D2D_DATABASE_URL": url, "D2D_NATS_URL": nats_server.url, "D2D_NATS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
        "D2D_DATA_DIR": str(logs), **{service(name).addr_env: addr for name, addr in addrs.items()},
        **CONFIG.service_env(),
    }  # fmt: skip

    async def prepare() -> None:
        await eventlog.migrate(url)
        await seed_test_key(url)

    asyncio.run(prepare())
    supervisor = Supervisor(logs, cwd=ROOT, base_env=env)
    for name in ("ingest", "ingest-relay", "features", "registry", "serving", "feedback", "audit"):
        supervisor.spawn(name, service(name).args)
    try:
        out = Console(width=80, file=io.StringIO(), record=True, force_terminal=False)
        result = run_story(CONFIG, addrs, url, out)
        for table in summary(result, CONFIG):
            out.print(table)
        yield Told(result, out.export_text(), url, addrs)
    finally:
        supervisor.stop_all()


async def _log_events(url: str, after: int = 0, types: list[str] | None = None) -> list[StoredEvent]:
    pool = await eventlog.create_pool(url, max_size=2)
    try:
        return await read_events(EventLog(pool), after, types)
    finally:
        await pool.close()


@pytest.mark.timeout(1200)  # the story: about 4 minutes alone on 2 cores; the suite's default is 5
async def test_drift_is_noticed_retrained_on_logged_decisions_and_promoted_through_canary(told: Told) -> None:
    run = told.result
    print(told.output)
    assert [s.name for s in run.stages] == list(STAGES), run.stages
    assert all(s.ok for s in run.stages), [s for s in run.stages if not s.ok]
    assert run.request is not None and run.registered is not None and run.promoted_at is not None
    verified = run.verified
    assert verified is not None and verified["ok"]
    assert verified["checked"]["decisions"] >= run.counts["payments"]  # one decision per payment sent
    async with FeedbackClient(told.addrs["feedback"]) as feedback:
        metrics = await feedback.model_metrics(
            MODEL, start=run.promoted_at, end=run.promoted_at + timedelta(days=CONFIG.measure_days)
        )
    events = await _log_events(told.url, run.loop_start)
    await _assert_steps_in_order(events, run, run.request, run.registered)
    versions = await _log_events(told.url, 0, ["model.registered"])
    await _assert_live_auc_near_full_label_model(events, versions, run, run.registered, metrics)


@pytest.mark.timeout(1200)  # the story runs in the first test that asks for it
async def test_the_demos_summary_shows_what_the_log_holds(told: Told) -> None:
    """Every figure of the summary counted again from the log; the output fits 80 columns."""
    run = told.result
    events = [e for e in await _log_events(told.url) if e.seq <= run.head]  # what the summary counted
    by_type = Counter(e.type for e in events)
    live = [e for e in events if e.seq > run.loop_start]
    decisions = [e for e in live if e.type == "decision.made"]
    assert run.head == len(events) == events[-1].seq
    assert run.event_counts == dict(by_type)
    assert run.counts["payments"] == len(decisions) == sum(v.decisions for v in run.versions)
    assert run.counts["explored"] == sum(bool(e.payload["explored"]) for e in decisions)
    assert run.counts["approved"] == sum(e.payload["action"] == "approve" for e in decisions)
    assert run.counts["chargebacks"] == sum(e.type == "payment.chargeback" for e in live)
    assert run.alerts == dict(Counter(str(e.payload["kind"]) for e in events if e.type == "quality.alert"))
    assert run.alerts.get("drift", 0) >= 1
    # Every history event is in the log; the broken copies were refused (dead letters).
    history_end = SIM.start + timedelta(days=CONFIG.history_days)
    history = [e for e in PaymentsSimulator(SIM).events() if e.occurred_at < history_end]
    assert run.history_events == len(history)
    assert {uuid.UUID(e.event_id) for e in history} <= {e.event_id for e in events}
    payments = (e.type == "payment.authorized" for e in history)
    broken = sum(1 for i, payment in enumerate(payments, start=1) if payment and i % CONFIG.broken_every == 0)
    assert run.refused == run.dead_letters == broken > 0
    assert run.skew_checked > 0 and run.skew_mismatches == 0
    assert [v.version for v in run.versions] == [1, run.promoted_version]
    assert [v.role for v in run.versions] == ["retired", "production"]
    # Both policies valued on the same decisions, each estimate inside its interval.
    first, new = run.ope[1], run.ope[run.promoted_version]
    assert first["counts"] == new["counts"] and first["counts"]["used"] > 0
    for result in (first, new):
        for estimate in result["estimates"].values():
            assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"], estimate
    # The explained decision is the promoted version's; its inputs' contributions and the bias add up to
    # the logit of the score it logged, which is what the version's trees give its logged inputs.
    explained = run.explained
    [logged] = [e for e in decisions if e.payload["decision_id"] == explained["decision_id"]]
    assert logged.payload["model_version"] == f"models/{MODEL}/versions/{run.promoted_version}"
    assert explained["rescored"] == pytest.approx(logged.payload["score"], abs=1e-5)
    assert 1 / (1 + math.exp(-explained["log_odds"])) == pytest.approx(logged.payload["score"], abs=1e-5)
    assert len(explained["top_inputs"]) == 5
    lines = told.output.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    for stage in STAGES:
        assert any(line.startswith(f"✓ {stage}") for line in lines), stage
    assert explained["decision_id"] in told.output and f"{run.head:,}" in told.output


async def _assert_steps_in_order(
    events: list[StoredEvent], run: StoryResult, request: StoredEvent, registered: StoredEvent
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
    assert policies[0]["policy"]["canary_share"] == CONFIG.promotion["canary_share"]
    assert policies[1]["policy"]["canary_share"] == 0.0


def _auc(labels: list[int], scores: list[float], weights: list[float] | None = None) -> float:
    w = np.ones(len(labels)) if weights is None else np.asarray(weights)
    value = weighted_metrics(np.asarray(labels), np.asarray(scores), w)["auc"]
    assert value is not None
    return float(value)


async def _assert_live_auc_near_full_label_model(
    events: list[StoredEvent],
    registrations: list[StoredEvent],
    run: StoryResult,
    registered: StoredEvent,
    metrics: Any,
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

    end = run.promoted_at + timedelta(days=CONFIG.measure_days)
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


@pytest.mark.timeout(1200)  # the story runs in the first test that asks for it
async def test_every_logged_score_is_its_versions_score_of_its_logged_inputs(told: Told) -> None:
    """What explain, rescore and OPE rest on: a decision's logged score is what its model version's
    trees give its logged inputs (scored as serving scores: up to the version's best iteration)."""
    from d2d.client import RegistryClient

    decisions = await _log_events(told.url, told.result.loop_start, ["decision.made"])
    differ: list[tuple[int, str, float, float]] = []
    async with RegistryClient(told.addrs["registry"]) as registry:
        for name in sorted({e.payload["model_version"] for e in decisions}):
            data, _ = await registry.artifact(MODEL, name.rsplit("/", 1)[1])
            booster = xgb.Booster(params={"nthread": 1})
            booster.load_model(bytearray(data))
            best = int(booster.attr("best_iteration") or -1)
            mine = [e for e in decisions if e.payload["model_version"] == name]
            rows = np.asarray([[math.nan if x is None else float(x) for x in e.payload["inputs"]] for e in mine])
            scores = booster.inplace_predict(
                rows, iteration_range=(0, best + 1), missing=np.nan, validate_features=False
            )
            differ += [
                (e.seq, name, e.payload["score"], float(got))
                for e, got in zip(mine, scores, strict=True)
                if abs(e.payload["score"] - got) > 1e-5
            ]
    assert not differ, f"{len(differ)} of {len(decisions)} logged scores differ, e.g. {differ[:5]}"


@pytest.mark.timeout(1200)  # the story runs in the first test that asks for it
async def test_the_demos_report_has_every_plot_with_data(told: Told, tmp_path: Path) -> None:
    """`d2d demo` ends by writing `d2d report`'s page of the story: on the story's platform every
    section has a plot, none says "no data yet" (tests/test_report.py sees such plots render)."""
    from d2d.cli.demo import write_story_report

    page = tmp_path / "demo-report.html"
    sections = await write_story_report(page, told.addrs, told.result, CONFIG)
    assert {s.key: s.missing for s in sections if s.figure is None} == {}
    assert len(sections) == 9 and all(f'data-plot="{s.key}"' in page.read_text() for s in sections)
