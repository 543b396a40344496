"""`EvaluatePolicy` through the real AuditService on a log of decisions and outcomes, and `d2d replay ope`."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2

from d2d.client import AuditClient, error_details
from d2d.eventlog import EventLog, NewEvent
from d2d.policies import best_action_policy
from d2d.replay.log import load_version
from services.serving.decisions import choose
from tests.conftest import audit_service, rule_outcome, run_cli

POLICY = {"threshold": 0.5, "epsilon": 0.2, "actions": ["approve", "decline"], "canary_share": 0.0}
TABLE = {"approve": {"0": 1.0, "1": -10.0}, "decline": {"0": 0.0, "1": 0.0}}
DECIDED = datetime(2026, 3, 1, tzinfo=UTC)
N = 300


def model_artifact() -> bytes:
    """A model whose score rises with its one input (request.x) from about 0 to about 1."""
    import xgboost as xgb

    x = np.linspace(0, 1, 400).reshape(-1, 1)
    params = {"objective": "binary:logistic", "max_depth": 2, "eta": 0.5, "nthread": 1, "seed": 1}
    booster = xgb.train(params, xgb.DMatrix(x, label=(x[:, 0] > 0.5).astype(float)), 20)
    return bytes(booster.save_raw(raw_format="ubj"))


async def register(log: EventLog, artifact: bytes) -> None:
    sha = hashlib.sha256(artifact).hexdigest()
    async with log.pool.acquire() as conn:
        await conn.execute("INSERT INTO artifacts (sha256, data, size_bytes) VALUES ($1, $2, $3)", sha, artifact,
                           len(artifact))  # fmt: skip
    payload = {"model": "fraud", "version": 1, "sha256": sha, "spec": {}, "evaluation": {}, "lineage": {},
               "feature_names": ["request.x"]}  # fmt: skip
    await log.append([NewEvent(uuid.uuid4(), "model.registered", 1, "model", "fraud", DECIDED, json.dumps(payload))])


def made(i: int, x: float, score: float, **overrides: object) -> tuple[NewEvent, dict]:
    decision = uuid.uuid5(uuid.NAMESPACE_URL, f"ope-test/{i}")
    choice = choose(score, POLICY, decision)
    payload = {
        "decision_id": str(decision), "model": "fraud", "model_version": "models/fraud/versions/1",
        "arm": "production", "score": score, "action": choice.action, "propensity": choice.propensity,
        "explored": choice.explored, "greedy_action": choice.greedy_action, "policy": POLICY, "features": {},
        "inputs": [x], "feature_watermark": 0, "as_of": DECIDED.isoformat(), "entities": {"customer": f"c{i}"},
        "context": {}, "unit_id": f"c{i}", **overrides,
    }  # fmt: skip
    event = NewEvent(decision, "decision.made", 1, "decision", str(decision), DECIDED, json.dumps(payload))
    return event, payload


def outcome(payload: dict, label: int) -> NewEvent:
    return rule_outcome(payload["decision_id"], label, DECIDED + timedelta(days=30))


@pytest.fixture
async def audit(database_url: str, event_log: EventLog) -> AsyncIterator[AuditClient]:
    """The audit service in this process, on the test's database."""
    async with audit_service(database_url) as addr, AuditClient(addr) as client:
        yield client


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    return [
        v.field for d in error_details(error) if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations
    ]


async def test_evaluate_policy_streams_progress_and_answers_ips_snips_and_dr(
    audit: AuditClient, event_log: EventLog, database_url: str
) -> None:
    artifact = model_artifact()
    await register(event_log, artifact)
    rng = np.random.default_rng(4)
    xs = rng.uniform(size=(N, 1))
    # The logged scores are the version's own (the candidate below is the same version, greedy).
    scores = (await load_version(event_log, "fraud@1")).predict(xs).tolist()
    decisions, outcomes, logged = [], [], []
    for i, score in enumerate(scores):
        event, payload = made(i, float(xs[i, 0]), float(score))
        decisions.append(event)
        logged.append(payload)
        fraud = int(rng.uniform() < xs[i, 0] * 0.4)
        if payload["action"] == "approve" and i % 10 != 0:  # every tenth approval has no outcome yet
            outcomes.append(outcome(payload, fraud))
    await event_log.append(decisions)
    await event_log.append(outcomes)

    stages: list[str] = []
    result = await audit.evaluate_policy(
        "models/fraud/versions/1", policy={"epsilon": 0.0}, reward=TABLE, bootstrap=100, seed=3,
        on_progress=lambda stage, done, total: stages.append(stage),
    )  # fmt: skip
    assert {"decisions", "scoring", "reward model", "bootstrap"} <= set(stages)
    recorded = {json.loads(o.payload)["decision_id"]: json.loads(o.payload)["label"] for o in outcomes}
    used = [p for p in logged if p["action"] == "decline" or p["decision_id"] in recorded]
    assert result["counts"] == {"read": N, "used": len(used), "left_out": {"no_outcome": N - len(used)}}
    # IPS by hand: the greedy candidate takes the logged action only where it was the greedy one.
    terms = [
        (p["action"] == p["greedy_action"]) / p["propensity"]
        * (0.0 if p["action"] == "decline" else TABLE["approve"][str(recorded[p["decision_id"]])])
        for p in used
    ]  # fmt: skip
    assert result["estimates"]["ips"]["value"] == pytest.approx(sum(terms) / len(used))
    for name in ("ips", "snips", "dr"):
        e = result["estimates"][name]
        assert e["ci_low"] <= e["value"] <= e["ci_high"] and e["se"] > 0
    assert 0 < result["ess"] <= len(used)
    assert result["actions"] == ["approve", "decline"] and result["bootstrap"] == 100 and result["seed"] == 3
    assert result["warnings"]  # decisions were left out

    # The CLI answers the same request with a table.
    env = {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": "nats://127.0.0.1:1", "D2D_AUDIT_ADDR": audit.target}
    code, out = await run_cli(env, "replay", "ope", "--policy", "fraud@1", "--epsilon", "0", "--bootstrap", "100",
                              "--seed", "3", "--reward", json.dumps(TABLE))  # fmt: skip
    assert code == 0, out
    assert "doubly robust" in out and "effective sample size" in out
    assert f"{result['estimates']['ips']['value']:,.4f}" in out

    # A candidate that explores where the logging policy never did is refused, naming a decision.
    greedy_log = {**POLICY, "epsilon": 0.0}
    event, payload = made(N + 1, 0.9, 0.9, policy=greedy_log, action="decline", propensity=1.0)
    await event_log.append([event])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit.evaluate_policy("models/fraud/versions/1", policy={"epsilon": 0.1}, reward=TABLE)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert payload["decision_id"] in (refused.value.details() or "")
    assert violations(refused.value) == ["policy_json"]

    # A logged propensity of 0 is refused, naming the decision. The decision.made contract refuses
    # one on append, so only a log written around append's checks can hold it.
    event, payload = made(N + 2, 0.2, 0.2, propensity=0.0)
    async with event_log.pool.acquire() as conn:
        await event_log._append_locked(conn, [event])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit.evaluate_policy("models/fraud/versions/1", reward=TABLE)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert payload["decision_id"] in (refused.value.details() or "")
    assert violations(refused.value) == ["model"]

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit.evaluate_policy("models/fraud/versions/9", reward=TABLE)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert violations(refused.value) == ["model_version"]


async def test_a_request_quoting_megabytes_gets_its_own_status_with_the_message_cut(audit: AuditClient) -> None:
    """A refusal quotes what it refuses; quoting a 3 MB name whole would overflow grpc's trailers and the
    caller would see RESOURCE_EXHAUSTED instead of the refusal (d2d.grpcserver.status cuts the message)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit.explain("x" * 3_000_000)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()[:200]
    assert violations(refused.value) == ["name"]
    details = refused.value.details()
    assert details.startswith("'xxx") and details.endswith(" characters in all)") and "... (cut: 3,000," in details
    assert len(details) < 1_100


# A logging policy over three actions that prefers `review` whatever the score, exploring with
# epsilon 0.6: review 0.6, approve 0.2, decline 0.2 everywhere.
LOGGING_THREE = {
    "kind": "best_action", "actions": ["approve", "review", "decline"],
    "utilities": [{"action": "approve", "weight": 0.0, "bias": 0.0}, {"action": "review", "weight": 0.0, "bias": 1.0},
                  {"action": "decline", "weight": 0.0, "bias": 0.0}],
    "exploration": "epsilon_greedy", "epsilon": 0.6, "canary_share": 0.0,
}  # fmt: skip
# The candidate: approve low scores (0.5 - s), decline high ones (s - 0.5), review (0) never greedy
# at the scores below; epsilon 0.3 gives the greedy action 0.8 and the others 0.1 each.
CANDIDATE_THREE = {
    "kind": "best_action",
    "utilities": [{"action": "approve", "weight": -1.0, "bias": 0.5}, {"action": "review", "weight": 0.0, "bias": 0.0},
                  {"action": "decline", "weight": 1.0, "bias": -0.5}],
    "exploration": "epsilon_greedy", "epsilon": 0.3,
}  # fmt: skip
TABLE_THREE = {"approve": {"0": 1.0, "1": -10.0}, "review": 0.5, "decline": {"0": 0.0, "1": 2.0}}


async def test_ips_of_a_best_action_candidate_on_best_action_decisions_is_the_textbook_value(
    audit: AuditClient, event_log: EventLog, database_url: str
) -> None:
    """Six logged decisions over three actions, worked by hand: w = pi(a|x) / p, IPS = mean(w r),
    SNIPS = sum(w r) / sum(w)."""
    await register(event_log, model_artifact())
    # (x, action taken, label or None): three low scores, three high ones
    logged = [(0.05, "approve", 0), (0.10, "review", None), (0.15, "decline", 0),
              (0.90, "decline", 1), (0.95, "approve", 1), (0.85, "review", None)]  # fmt: skip
    scores = (await load_version(event_log, "fraud@1")).predict(np.asarray([[x] for x, _, _ in logged])).tolist()
    assert all(s < 0.3 for s in scores[:3]) and all(s > 0.7 for s in scores[3:]), scores
    decisions, outcomes = [], []
    for i, ((x, action, label), score) in enumerate(zip(logged, scores, strict=True)):
        propensity = 0.6 if action == "review" else 0.2
        event, payload = made(1000 + i, x, score, policy=LOGGING_THREE, action=action, propensity=propensity,
                              explored=action != "review", greedy_action="review")  # fmt: skip
        decisions.append(event)
        if label is not None:
            outcomes.append(outcome(payload, label))
    await event_log.append(decisions)
    await event_log.append(outcomes)

    result = await audit.evaluate_policy(
        "models/fraud/versions/1", policy=CANDIDATE_THREE, reward=TABLE_THREE, bootstrap=20, seed=1
    )
    # pi(a|x): 0.8 for approve at low scores and decline at high ones, else 0.1
    # weights:  4, 1/6, 1/2 | 4, 1/2, 1/6      rewards: 1, 0.5, 0 | 2, -10, 0.5
    weights = [4.0, 1 / 6, 0.5, 4.0, 0.5, 1 / 6]
    rewards = [1.0, 0.5, 0.0, 2.0, -10.0, 0.5]
    terms = [w * r for w, r in zip(weights, rewards, strict=True)]
    assert sum(terms) == pytest.approx(7 + 1 / 6)
    assert result["estimates"]["ips"]["value"] == pytest.approx((7 + 1 / 6) / 6)
    assert result["estimates"]["snips"]["value"] == pytest.approx((7 + 1 / 6) / sum(weights))
    assert result["actions"] == ["approve", "review", "decline"] and result["counts"]["used"] == 6

    # The CLI names the same candidate as JSON.
    env = {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": "nats://127.0.0.1:1", "D2D_AUDIT_ADDR": audit.target}
    code, out = await run_cli(env, "replay", "ope", "--policy", "fraud@1", "--decision-policy",
                              json.dumps(CANDIDATE_THREE), "--reward", json.dumps(TABLE_THREE), "--bootstrap", "20",
                              "--json")  # fmt: skip
    assert code == 0, out
    assert json.loads(out[out.index("{") :])["estimates"]["ips"]["value"] == pytest.approx((7 + 1 / 6) / 6)

    # A candidate whose utilities are not finite is refused naming the field.
    bad = {**CANDIDATE_THREE, "utilities": [*CANDIDATE_THREE["utilities"][:2], {"action": "decline", "weight": "x"}]}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit.evaluate_policy("models/fraud/versions/1", policy=bad, reward=TABLE_THREE)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(refused.value) == ["policy_json.utilities[2].weight"]
    # A threshold over logged best_action policies has nothing to apply to: refused, not ignored.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit.evaluate_policy("models/fraud/versions/1", policy={"threshold": 0.3}, reward=TABLE_THREE)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no threshold" in refused.value.details()
    assert violations(refused.value) == ["policy_json"]


async def test_rescore_applies_each_decisions_best_action_policy_to_the_new_scores(
    audit: AuditClient, event_log: EventLog
) -> None:
    """Rescore compares the greedy action of the logged best_action policy at the logged score with
    its greedy action at the version's score on the logged inputs."""
    await register(event_log, model_artifact())
    policy = best_action_policy({"approve": (-2.0, 1.0), "review": (0.0, 0.2), "decline": (2.0, -1.0)}, epsilon=0.1)
    assert [policy.greedy(s) for s in (0.05, 0.5, 0.95)] == ["approve", "review", "decline"]
    # (input x, the score logged): the version scores x = 0.05 low and x = 0.95 high
    logged = [(0.05, 0.5), (0.05, 0.95), (0.95, 0.96), (0.05, 0.04)]
    new = (await load_version(event_log, "fraud@1")).predict(np.asarray([[x] for x, _ in logged])).tolist()
    assert new[0] < 0.2 and new[2] > 0.8, new
    events = []
    for i, (x, score) in enumerate(logged):
        greedy, logged_policy = policy.greedy(score), {**policy.to_dict(), "canary_share": 0.0}
        propensity = policy.probabilities(score)[greedy]
        event, _ = made(2000 + i, x, score, policy=logged_policy, action=greedy, propensity=propensity,
                        explored=False, greedy_action=greedy)  # fmt: skip
        events.append(event)
    await event_log.append(events)
    result = await audit.rescore("models/fraud/versions/1")
    assert result["by_action_pair"] == {"approve -> approve": 1, "decline -> approve": 1, "decline -> decline": 1,
                                        "review -> approve": 1}  # fmt: skip
    assert result["actions_differ"] == 2
