"""`explain` and `rescore` over decisions the real serving service made (ingest relay, features,
registry and serving as their own processes, on real Postgres and NATS), through the Python API,
the AuditService and the CLI."""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.rpc import error_details_pb2

from d2d import eventlog
from d2d.client import AuditClient, RegistryClient, ServingClient, error_details
from d2d.eventlog import EventLog, NewEvent
from d2d.features.fold import ViewState, fold_event, posix_seconds
from d2d.policies import greedy_action
from d2d.replay.explain import explain, render
from d2d.replay.rescore import rescore
from d2d.runtime.servers import EmbeddedPostgres, NatsServer
from d2d.sim.views import VIEWS
from d2d.training.spec import TrainingSpec, model_inputs
from tests.conftest import MODEL, Platform, audit_service, requests_for, rule_outcome, run_cli, serving_platform

VIEW = {v.name: v for v in VIEWS}
THRESHOLD = 0.015  # among version 1's scores on these requests
EXPLAINED = 12  # decisions whose explanation is checked event by event


@dataclass
class Decided:
    platform: Platform
    decision_ids: list[str]
    labelled: dict[str, int]  # decision id -> the outcome label recorded for it


@pytest.fixture(scope="module")
def decided(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Decided]:
    """80 decisions by version 1 with exploration on and a threshold among their scores (so another
    version's scores change some actions), an outcome recorded for every other one."""
    for platform in serving_platform(postgres, nats_server, tmp_path_factory):
        yield asyncio.run(decide(platform))


async def decide(platform: Platform) -> Decided:
    async with RegistryClient(platform.registry) as registry:
        await registry.set_policy(MODEL, epsilon=0.3, threshold=THRESHOLD)
    await asyncio.sleep(1.0)  # serving follows model.policy_set on the bus
    async with ServingClient(platform.serving) as serving:
        await serving.wait_ready()
        answers = await serving.batch_predict(requests_for(platform, 80))
    ids = [a.decision_id for a in answers]
    labelled = {d: int(i % 3 == 0) for i, d in enumerate(ids[::2])}
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    try:
        await EventLog(pool).append([outcome(d, label) for d, label in labelled.items()])
    finally:
        await pool.close()
    return Decided(platform, ids, labelled)


def outcome(decision_id: str, label: int) -> NewEvent:
    return rule_outcome(decision_id, label, datetime.now(UTC))


@pytest.fixture
async def log(decided: Decided) -> AsyncIterator[EventLog]:
    pool = await eventlog.create_pool(decided.platform.database_url, max_size=4)
    yield EventLog(pool)
    await pool.close()


@pytest.fixture
async def audit(decided: Decided) -> AsyncIterator[str]:
    """The AuditService in this process; its address."""
    async with audit_service(decided.platform.database_url) as addr:
        yield addr


def cli_env(decided: Decided, audit: str) -> dict[str, str]:
    p = decided.platform
    return {"D2D_DATABASE_URL": p.database_url, "D2D_NATS_URL": p.nats_url, "D2D_AUDIT_ADDR": audit}


def refusal(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    fields = [
        v.field for d in error_details(error) if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations
    ]
    return error.code().name, fields


def plain(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


# ---------------------------------------------------------------------------------------------
# explain


async def test_the_events_explain_lists_reproduce_the_logged_vector_alone(decided: Decided, log: EventLog) -> None:
    """Fed alone through the feature code (a fresh state per view folding only the listed events),
    the events `explain` lists give every logged feature value and the logged input vector, exactly."""
    windowed_narrower = filtered_subset = 0
    for decision_id in decided.decision_ids[:EXPLAINED]:
        explanation = await explain(log, decision_id)
        decision = (await log.get(uuid.UUID(decision_id))).payload
        listed: dict[str, set[str]] = {}
        for name, feature in explanation["features"].items():
            listed.setdefault(name.split(".", 1)[0], set()).update(feature["events"])
        recomputed: dict[str, object] = {}
        as_of = posix_seconds(decision["as_of"])
        for view_name, ids in listed.items():
            view = VIEW[view_name]
            events = sorted([await log.get(uuid.UUID(i)) for i in ids], key=lambda e: e.seq)
            state = ViewState(view)
            for e in events:
                assert e.seq <= decision["feature_watermark"]
                state.apply(fold_event(e.seq, e.type, e.schema_version, e.occurred_at.timestamp(), e.payload))
            values = state.values(decision["entities"][view.entity], as_of) or state.defaults()
            recomputed.update({f"{view_name}.{f}": v for f, v in values.items()})
        assert set(recomputed) == set(decision["features"])
        for name, value in decision["features"].items():
            assert plain(recomputed[name]) == value, (name, value)  # (online numbers travel as doubles)
        async with RegistryClient(decided.platform.registry) as registry:
            spec = TrainingSpec.from_json((await registry.get_version(MODEL, 1)).spec_json)
        views = [VIEW[name] for name, _ in spec.views]
        inputs = [plain(x) for x in model_inputs(spec, views, recomputed, decision["context"])]
        assert inputs == decision["inputs"]

        features = explanation["features"]
        day, lifetime = features["customer_payments.count_1d"], features["customer_payments.count_lifetime"]
        windowed_narrower += 0 < len(day["events"]) < len(lifetime["events"])
        ecom = set(features["customer_payments.ecom_count_1d"]["events"])
        filtered_subset += 0 < len(ecom) < len(day["events"]) and ecom < set(day["events"])
    assert windowed_narrower >= 3 and filtered_subset >= 1, (windowed_narrower, filtered_subset)


async def test_each_feature_lists_the_events_its_aggregate_took(decided: Decided, log: EventLog) -> None:
    """Counts list as many events as they count, inside the window and passing the filter; distinct
    counts list events with as many distinct values; every event is the entity's, within the watermark."""
    for decision_id in decided.decision_ids[EXPLAINED : EXPLAINED + 6]:
        explanation = await explain(log, decision_id)
        decision = explanation["decision"]
        as_of = datetime.fromisoformat(decision["as_of"])
        for name, feature in explanation["features"].items():
            view_name, feature_name = name.split(".", 1)
            view = VIEW[view_name]
            events = [await log.get(uuid.UUID(i)) for i in feature["events"]]
            for e in events:
                assert e.payload[view.entity_key] == decision["entities"][view.entity]
                assert e.seq <= explanation["vector"]["feature_watermark"] and e.occurred_at <= as_of
            window = {"10m": timedelta(minutes=10), "1h": timedelta(hours=1), "1d": timedelta(days=1),
                      "7d": timedelta(days=7)}.get(feature_name.rsplit("_", 1)[1])  # fmt: skip
            if window is not None:
                assert all(e.occurred_at > as_of - window for e in events), name
            if feature_name.startswith(("count_", "ecom_count_")):
                assert len(events) == feature["logged"], name
            if feature_name.startswith("ecom_count_"):
                assert all(e.payload["channel"] == "ecom" for e in events)
            if feature_name.startswith("distinct_"):
                field = {"merchants": "merchant_id", "devices": "device_id", "customers": "customer_id",
                         "ip": "ip_country"}[feature_name.split("_")[1]]  # fmt: skip
                assert len({e.payload[field] for e in events}) == feature["logged"], name
            assert feature["matches_logged"], name


async def test_explain_shows_the_version_its_lineage_the_outcome_and_the_trace(decided: Decided, log: EventLog) -> None:
    labelled = next(d for d, label in decided.labelled.items() if label == 1)
    explanation = await explain(log, f"decisions/{labelled}")
    decision = (await log.get(uuid.UUID(labelled))).payload
    async with RegistryClient(decided.platform.registry) as registry:
        version = await registry.get_version(MODEL, 1)
    version_lineage = json.loads(version.lineage_json)
    mv = explanation["model_version"]
    assert mv["name"] == f"models/{MODEL}/versions/1" and mv["sha256"] == version.sha256
    assert mv["log_range"] == version_lineage["log_range"] and mv["log_range"][1] > 0
    assert mv["spec"] == json.loads(version.spec_json)
    assert mv["evaluation"]["auc"] == json.loads(version.evaluation_json)["auc"]
    assert explanation["outcome"]["label"] == 1 and explanation["outcome"]["decision_id"] == labelled
    assert explanation["trace_id"] == decision["trace_id"] and len(explanation["trace_id"]) == 32
    d = explanation["decision"]
    assert (d["score"], d["action"], d["propensity"], d["policy"]) == (
        decision["score"],
        decision["action"],
        decision["propensity"],
        decision["policy"],
    )
    assert d["policy"]["epsilon"] == 0.3
    assert explanation["vector"]["inputs"] == dict(zip(mv["feature_names"], decision["inputs"], strict=True))
    report = render(explanation)
    assert all(len(line) <= 100 for line in report.splitlines())
    assert labelled in report and decision["trace_id"] in report
    assert re.search(r"^  label +1, reward -, from rule chargeback$", report, re.MULTILINE)
    unlabelled = next(d for d in decided.decision_ids if d not in decided.labelled)
    assert (await explain(log, unlabelled))["outcome"] is None


async def test_explain_decision_through_the_audit_service_and_the_cli(decided: Decided, audit: str) -> None:
    decision_id = decided.decision_ids[0]
    async with AuditClient(audit) as client:
        answer = await client.explain(decision_id)
        assert answer.name == f"decisions/{decision_id}" and answer.model_version == f"models/{MODEL}/versions/1"
        explanation = json.loads(answer.explanation_json)
        assert explanation["matches_logged"] and len(answer.trace_id) == 32
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await client.explain(str(uuid.uuid4()))
        assert refusal(unknown.value) == ("NOT_FOUND", ["name"])
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await client.explain("not-a-decision")
        assert refusal(malformed.value) == ("INVALID_ARGUMENT", ["name"])
    code, out = await run_cli(cli_env(decided, audit), "replay", "explain", decision_id)
    assert code == 0, out
    some_event = next(e for f in explanation["features"].values() for e in f["events"])
    assert decision_id in out and some_event in out and explanation["trace_id"] in out
    code, out = await run_cli(cli_env(decided, audit), "replay", "explain", decision_id, "--json")
    assert code == 0 and json.loads(out) == explanation


# ---------------------------------------------------------------------------------------------
# rescore


async def test_rescore_scores_logged_decisions_with_another_version(decided: Decided, log: EventLog) -> None:
    """Version 2's scores on the logged vectors are its own predictions; the greedy actions of each
    decision's policy for both scores are compared, pair by pair."""
    import numpy as np

    from d2d.training.pipeline import predict

    result = await rescore(log, f"{MODEL}@2")
    assert result["decisions"] == len(decided.decision_ids) and result["labelled"] == len(decided.labelled)
    async with RegistryClient(decided.platform.registry) as registry:
        artifact, _ = await registry.artifact(MODEL, "2")
    payloads = [(await log.get(uuid.UUID(d))).payload for d in decided.decision_ids]
    inputs = np.asarray([[np.nan if x is None else x for x in p["inputs"]] for p in payloads], dtype=np.float64)
    scores = [float(s) for s in predict(artifact, inputs)]
    changed = {
        p["decision_id"]: (greedy_action(p["score"], p["policy"]), greedy_action(s, p["policy"]))
        for p, s in zip(payloads, scores, strict=True)
        if greedy_action(p["score"], p["policy"]) != greedy_action(s, p["policy"])
    }  # fmt: skip
    assert result["actions_differ"] == len(changed) > 0
    assert sum(result["by_action_pair"].values()) == len(decided.decision_ids)
    listed = {d["decision_id"]: d for d in result["differing"]}
    assert listed.keys() == changed.keys()
    for decision_id, (before, after) in changed.items():
        assert (listed[decision_id]["greedy_action"], listed[decision_id]["new_greedy_action"]) == (before, after)
        assert listed[decision_id]["new_score"] == pytest.approx(scores[decided.decision_ids.index(decision_id)])
    mean_new = sum(scores) / len(scores)
    assert result["scores"]["mean_new"] == pytest.approx(mean_new)
    assert result["auc"]["logged"] is not None and result["auc"]["new"] is not None

    recomputed = await rescore(log, f"{MODEL}@2", recompute_features=True)
    assert recomputed["vectors_differing_from_logged"] == 0
    assert recomputed["scores"] == result["scores"] and recomputed["by_action_pair"] == result["by_action_pair"]

    first = (await log.get(uuid.UUID(decided.decision_ids[0]))).seq
    only_after = await rescore(log, f"models/{MODEL}/versions/2", after_seq=first)
    assert only_after["decisions"] == len(decided.decision_ids) - 1


async def test_rescore_through_the_audit_service_and_the_cli(decided: Decided, log: EventLog, audit: str) -> None:
    expected = await rescore(log, f"{MODEL}@2")
    stages: list[str] = []
    async with AuditClient(audit) as client:
        result = await client.rescore(f"models/{MODEL}/versions/2", on_progress=lambda s, d, t: stages.append(s))
        assert result == json.loads(json.dumps(expected)) and "decisions" in stages
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await client.rescore(f"models/{MODEL}/versions/9")
        assert refusal(unknown.value) == ("NOT_FOUND", ["model_version"])
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await client.rescore("fraud")
        assert refusal(malformed.value) == ("INVALID_ARGUMENT", ["model_version"])
    code, out = await run_cli(cli_env(decided, audit), "replay", "rescore", "--model", f"{MODEL}@2")
    assert code == 0, out
    assert f"Greedy actions differ on {expected['actions_differ']}" in out
    code, out = await run_cli(cli_env(decided, audit), "replay", "rescore", "--model", f"{MODEL}@2", "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(expected))
