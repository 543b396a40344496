"""The registry closes the loop without a person (real Postgres, the registry in this process): a
`retrain.requested` event becomes a candidate version, the candidate becomes the canary with the
promotion policy's share, and the canary's live metrics (decisions joined with outcomes) promote
it or roll it back; every step is an alias or policy event whose reason holds the numbers. A
restart mid-watch resumes the watch, and a request handled again trains nothing new."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import grpc
import numpy as np
import orjson
import pytest
import xgboost as xgb
from google.rpc import error_details_pb2

from d2d import eventlog, projections
from d2d.client import RegistryClient, error_details
from d2d.config import Settings
from d2d.eventlog import EventLog, NewEvent
from d2d.features.store import register_views
from d2d.outcomes import outcome_event_id
from d2d.runtime.servers import EmbeddedPostgres, free_port
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.training import default_promotion_policy, default_spec
from d2d.sim.views import VIEWS
from d2d.training.artifacts import registered_version
from d2d.training.labels import DecisionLabel
from d2d.training.spec import TrainingSpec
from services.registry.loop import POSITION, ArmMetrics, arm_metrics, judge, retrain_spec
from services.registry.server import serve
from tests.conftest import seed_test_key

SIM = SimConfig(seed=4, days=35, payments_per_day=1200, customers=800, merchants=80)
POLICY = {"canary_share": 0.25, "min_decisions": 20, "min_labels": 10, "margin": 0.02, "max_decisions": 1000}
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# The verdict, as a pure function


def test_a_canary_short_of_decisions_or_labels_waits_with_the_numbers() -> None:
    verdict, reason = judge(POLICY, ArmMetrics(19, 15, 0.9), ArmMetrics(80, 60, 0.7))
    assert verdict == "wait" and "canary 19 decisions, 15 labelled, AUC 0.9000" in reason
    verdict, reason = judge(POLICY, ArmMetrics(40, 9, 0.9), ArmMetrics(80, 60, 0.7))
    assert verdict == "wait" and "9 labelled" in reason
    # production's labels count too, and labels of one class give no AUC to compare
    assert judge(POLICY, ArmMetrics(40, 30, 0.9), ArmMetrics(80, 9, 0.7))[0] == "wait"
    verdict, reason = judge(POLICY, ArmMetrics(40, 30, 0.9), ArmMetrics(80, 60, None))
    assert verdict == "wait" and "AUC n/a" in reason


def test_a_canary_that_gains_the_margin_is_promoted() -> None:
    verdict, reason = judge(POLICY, ArmMetrics(40, 30, 0.8200), ArmMetrics(120, 90, 0.8000))
    assert verdict == "promote"
    assert (
        reason.startswith("canary AUC 0.8200 >= production 0.8000 +0.0200;") and "120 decisions, 90 labelled" in reason
    )


def test_a_negative_margin_promotes_a_canary_slightly_worse() -> None:
    verdict, reason = judge({**POLICY, "margin": -0.02}, ArmMetrics(40, 30, 0.79), ArmMetrics(120, 90, 0.80))
    assert verdict == "promote" and "0.7900 >= production 0.8000 -0.0200" in reason


def test_a_canary_short_of_the_margin_is_rolled_back() -> None:
    verdict, reason = judge(POLICY, ArmMetrics(40, 30, 0.81), ArmMetrics(120, 90, 0.80))
    assert verdict == "rollback" and reason.startswith("canary AUC 0.8100 < production 0.8000 +0.0200;")


def test_a_canary_without_enough_labels_by_max_decisions_is_rolled_back() -> None:
    assert judge(POLICY, ArmMetrics(999, 5, None), ArmMetrics(3000, 40, 0.8))[0] == "wait"
    verdict, reason = judge(POLICY, ArmMetrics(1000, 5, None), ArmMetrics(3000, 40, 0.8))
    assert verdict == "rollback" and "1000 canary decisions reached max_decisions 1000" in reason


def test_arm_metrics_count_every_decision_and_weight_labels_by_inverse_propensity() -> None:
    rows = [
        {"label": 1, "score": 0.9, "propensity": 1.0},
        {"label": 0, "score": 0.1, "propensity": 1.0},
        {"label": 1, "score": 0.2, "propensity": 0.5},  # explored: stands for two decisions
        {"label": 0, "score": 0.8, "propensity": 1.0},
        {"label": None, "score": 0.3, "propensity": 1.0},  # no outcome yet
    ]
    metrics = arm_metrics(rows)
    # pairs won: 0.9 beats both negatives (weight 1 each), 0.2 beats 0.1 (weight 2): 4 of 6
    assert (metrics.decisions, metrics.labelled) == (5, 4) and metrics.auc == pytest.approx(4 / 6)
    assert arm_metrics([]) == ArmMetrics(0, 0, None)


def test_a_model_without_decisions_is_retrained_from_productions_spec_up_to_the_head() -> None:
    production = TrainingSpec.from_dict({**default_spec().to_dict(), "to_seq": 500, "num_boost_round": 40})
    candidate = retrain_spec(production, {"model": "fraud", "reason": "drift", "details": {}}, 9000)
    assert candidate.to_seq == 9000 and candidate.after_seq == production.after_seq
    assert candidate.to_dict() == {**production.to_dict(), "to_seq": 9000}


def test_a_deciding_model_is_retrained_on_its_decisions_after_the_request_weighted_by_propensity() -> None:
    production = TrainingSpec.from_dict({**default_spec().to_dict(), "to_seq": 500, "num_boost_round": 40})
    request = {"model": "fraud", "reason": "performance", "details": {}}
    candidate = retrain_spec(
        production, request, 9000, decisions_after=7000, production_version="models/fraud/versions/3"
    )
    assert candidate.init_model == "models/fraud/versions/3"  # boosting on from production's trees
    assert candidate.label == DecisionLabel("fraud", "inverse_propensity", production.label.window_seconds)
    assert (candidate.after_seq, candidate.to_seq) == (7000, 9000)
    changed = ("label", "after_seq", "to_seq", "init_model")
    same = {k: v for k, v in candidate.to_dict().items() if k not in changed}
    assert same == {k: v for k, v in production.to_dict().items() if k not in changed}


def test_the_domains_promotion_policy_is_valid() -> None:
    from services.registry.store import check_promotion_policy

    assert check_promotion_policy(default_promotion_policy()) == default_promotion_policy()


# ---------------------------------------------------------------------------------------------
# The loop, on a registry in this process


@pytest.fixture(scope="module")
def template(postgres: EmbeddedPostgres) -> Iterator[str]:
    """A database holding 35 simulated days and the registered views, copied for each test."""
    name = f"loop_{uuid.uuid4().hex[:10]}"
    url = postgres.create_database(name)

    async def load() -> None:
        await eventlog.migrate(url)
        await seed_test_key(url)
        pool = await eventlog.create_pool(url, max_size=2)
        log = EventLog(pool)
        events = [e.as_new_event() for e in PaymentsSimulator(SIM).events()]
        for i in range(0, len(events), 5000):
            await log.append(events[i : i + 5000])
        await register_views(log, VIEWS)
        await pool.close()

    asyncio.run(load())
    yield name


@pytest.fixture
async def database(postgres: EmbeddedPostgres, template: str) -> str:
    name = f"loop_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres.admin_url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return postgres.admin_url(name)


@dataclass
class Registry:
    """The registry service (with its loop) in this process, restartable."""

    url: str
    settings: Settings
    client: RegistryClient
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def restart(self) -> None:
        await self.shut()
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(serve(self.settings, self.stop))
        await self.client.wait_ready()

    async def shut(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)


@pytest.fixture
async def registry(database: str) -> AsyncIterator[Registry]:
    settings = Settings(
        database_url=database, addrs={"registry": f"127.0.0.1:{free_port()}"}, registry_canary_check_seconds=0.1,
        registry_retrain_min_labels=40,
    )  # fmt: skip
    stop = asyncio.Event()
    running = Registry(database, settings, RegistryClient(settings.addr("registry")), stop,
                       asyncio.create_task(serve(settings, stop)))  # fmt: skip
    await running.client.wait_ready()
    yield running
    await running.shut()
    await running.client.channel.close()


@pytest.fixture
async def owner_log(database: str) -> AsyncIterator[EventLog]:
    pool = await eventlog.create_pool(database, role=None, max_size=2)
    yield EventLog(pool)
    await pool.close()


async def until(probe: Callable[[], Awaitable[T]], what: str, timeout: float = 180) -> T:
    """`probe()`'s first truthy answer (a deadline only so a broken loop fails instead of hanging)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (answer := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.1)
    return answer


async def model_in_production(client: RegistryClient) -> str:
    model = f"fraud-{uuid.uuid4().hex[:6]}"
    await client.create_model(model)
    await client.set_promotion_policy(model, **POLICY)
    await client.train(model, json.dumps({**default_spec().to_dict(), "num_boost_round": 30}))
    await client.set_alias(model, "production", 1)
    return model


async def request_retrain(log: EventLog, model: str, event_id: uuid.UUID | None = None) -> tuple[str, int]:
    payload = {"model": model, "reason": "drift", "details": {"psi": 0.31}}
    event = NewEvent(event_id or uuid.uuid4(), "retrain.requested", 1, "model", model, datetime.now(UTC),
                     orjson.dumps(payload).decode())  # fmt: skip
    [stored] = await log.append([event])
    return str(event.event_id), stored.seq


async def record_decisions(
    log: EventLog, model: str, arm: str, version: int, scored: list[tuple[float, Any]], as_of: datetime | None = None
) -> None:
    """Decisions of one arm in the log, and their rows in the decision/outcome join with the given
    (score, label) each, as the feedback service's consumer writes them; `as_of`: their event time."""
    events = []
    for score, _ in scored:
        decision_id = str(uuid.uuid4())
        payload = {
            "decision_id": decision_id, "model": model, "model_version": f"models/{model}/versions/{version}",
            "arm": arm, "score": score, "action": "approve", "propensity": 1.0, "features": {}, "inputs": [score],
            "feature_watermark": 1, "entities": {"customer": "c1"}, "unit_id": "c1",
        }  # fmt: skip
        if as_of is not None:
            payload["as_of"] = as_of.isoformat()
        events.append(NewEvent(uuid.UUID(decision_id), "decision.made", 1, "decision", decision_id,
                               datetime.now(UTC), orjson.dumps(payload).decode()))  # fmt: skip
    outcomes = [
        NewEvent(outcome_event_id(f"o-{e.event_id}"), "outcome.recorded", 1, "decision", e.entity_id, datetime.now(UTC),
                 orjson.dumps({"outcome_id": f"o-{e.event_id}", "decision_id": e.entity_id, "label": label,
                               "occurred_at": datetime.now(UTC).isoformat(), "source": "api"}).decode())
        for e, (_, label) in zip(events, scored, strict=True) if label is not None
    ]  # fmt: skip
    stored = await log.append([*events, *outcomes])
    async with log.pool.acquire() as conn:  # the join, by its projectors, as the feedback service applies them
        await projections.apply(conn, [await log.get(r.event_id) for r in stored], applied_by=projections.FEEDBACK)


# 40 decisions, 30 of them labelled, half fraud: a perfect ranking (AUC 1) and a useless one (AUC 0.5).
SHARP = [(0.8 if i % 2 else 0.2, (i % 2) if i < 30 else None) for i in range(40)]
BLUNT = [(0.5, (i % 2) if i < 30 else None) for i in range(40)]


async def serve_both_arms(
    log: EventLog, model: str, canary: list[tuple[float, Any]], production: list[tuple[float, Any]]
) -> None:
    """The candidate (version 2) decided as canary and version 1 as production, with these outcomes."""
    await record_decisions(log, model, "canary", 2, canary)
    await record_decisions(log, model, "production", 1, production)


async def verdict_of(client: RegistryClient, model: str) -> Any:
    """The model once its canary is gone (promoted or rolled back) and no units go to a canary."""

    def done(m: Any) -> bool:
        return "canary" not in m.aliases and m.deployment_policy.canary_share == 0.0

    return await until(lambda: _when(client.get_model(model), done), "the verdict")


async def canary_of(client: RegistryClient, model: str) -> Any:
    record = await client.get_model(model)
    return record if record.aliases.get("canary") and record.deployment_policy.canary_share > 0 else None


def steps_for(record: Any, request_id: str) -> list[tuple[str, str, str]]:
    """(alias, version, reason) of the model's alias changes that name the request."""
    return [(c.alias, c.version, c.reason) for c in record.alias_history if request_id in c.reason]


async def test_a_retrain_request_trains_a_candidate_that_a_better_canary_takes_to_production(
    registry: Registry,
) -> None:
    client = registry.client
    model = await model_in_production(client)
    log = EventLog(await eventlog.create_pool(registry.url, max_size=2))
    try:
        request_id, request_seq = await request_retrain(log, model)
        record = await until(lambda: canary_of(client, model), "the canary")
        assert record.aliases["canary"] == "2" and record.deployment_policy.canary_share == 0.25
        candidate = await client.get_version(model, 2)
        assert json.loads(candidate.lineage_json)["retrain_request"] == request_id
        assert json.loads(candidate.spec_json)["to_seq"] == request_seq

        await serve_both_arms(log, model, SHARP, BLUNT)
        record = await verdict_of(client, model)
        assert record.aliases["production"] == "2" and record.deployment_policy.canary_share == 0.0
        steps = steps_for(record, request_id)
        assert [(alias, version) for alias, version, _ in steps] == [
            ("canary", "2"),
            ("production", "2"),
            ("canary", ""),
        ]
        assert "canary AUC 1.0000 >= production 0.5000 +0.0200" in steps[1][2]
        assert "canary 40 decisions, 30 labelled" in steps[1][2]
        types = [e.type for e in await log.read(request_seq, 100, types=["model.alias_set", "model.policy_set",
                                                                         "model.registered"])]  # fmt: skip
        assert types == ["model.registered", "model.alias_set", "model.policy_set", "model.alias_set",
                         "model.alias_set", "model.policy_set"]  # fmt: skip
    finally:
        await log.pool.close()


async def test_a_deciding_model_is_retrained_on_its_labelled_decisions_after_the_request_once_enough_are(
    registry: Registry, owner_log: EventLog
) -> None:
    """Decisions older than the label window (30 days), 30 labelled per batch: the batch before the
    request is not learnt from, one batch after it is short of the 40 labels the registry waits for."""
    client = registry.client
    model = await model_in_production(client)
    old = datetime.now(UTC) - timedelta(days=60)
    await record_decisions(owner_log, model, "production", 1, SHARP, as_of=old)
    request_id, request_seq = await request_retrain(owner_log, model)
    await record_decisions(owner_log, model, "production", 1, SHARP, as_of=old)
    short = await owner_log.head()
    await record_decisions(owner_log, model, "production", 1, SHARP, as_of=old)
    await until(lambda: canary_of(client, model), "the canary")
    candidate = await client.get_version(model, 2)
    spec, lineage = json.loads(candidate.spec_json), json.loads(candidate.lineage_json)
    assert spec["label"] == {
        "source": "decisions", "model": model, "weighting": "inverse_propensity", "window_seconds": 30 * 86_400
    }  # fmt: skip
    assert spec["after_seq"] == request_seq and spec["to_seq"] > short
    assert lineage["retrain_request"] == request_id and lineage["weighting"] == "inverse_propensity"
    assert lineage["decisions"]["labelled"] == 60 and lineage["decisions"]["unlabelled"] == 20
    # It boosted on from production's trees: its first trees are version 1's, up to its best iteration.
    assert spec["init_model"] == lineage["init_model"] == f"models/{model}/versions/1"
    (first, parent), (_, child) = [await registered_version(owner_log, f"models/{model}/versions/{n}") for n in (1, 2)]
    parent_trees = int(xgb_booster(parent).attr("best_iteration")) + 1
    assert lineage["init_trees"] == parent_trees and xgb_booster(child).num_boosted_rounds() > parent_trees
    rows = np.random.default_rng(3).normal(size=(50, len(first.payload["feature_names"])))
    assert np.array_equal(
        xgb_booster(parent).predict(xgb.DMatrix(rows), iteration_range=(0, parent_trees), validate_features=False),
        xgb_booster(child).predict(xgb.DMatrix(rows), iteration_range=(0, parent_trees), validate_features=False),
    )


def xgb_booster(artifact: bytes) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(bytearray(artifact))
    return booster


async def _when(call: Awaitable[T], condition: Callable[[T], bool]) -> T | None:
    value = await call
    return value if condition(value) else None


async def test_a_worse_canary_is_rolled_back_and_production_stays(registry: Registry) -> None:
    client = registry.client
    model = await model_in_production(client)
    log = EventLog(await eventlog.create_pool(registry.url, max_size=2))
    try:
        request_id, _ = await request_retrain(log, model)
        await until(lambda: canary_of(client, model), "the canary")
        await serve_both_arms(log, model, BLUNT, SHARP)
        record = await verdict_of(client, model)
        assert record.aliases["production"] == "1" and record.deployment_policy.canary_share == 0.0
        steps = steps_for(record, request_id)
        assert [(alias, version) for alias, version, _ in steps] == [("canary", "2"), ("canary", "")]
        assert "rolled back: canary AUC 0.5000 < production 1.0000 +0.0200" in steps[1][2]
    finally:
        await log.pool.close()


async def test_a_restart_mid_watch_resumes_the_canary_without_retraining(
    registry: Registry, owner_log: EventLog
) -> None:
    client = registry.client
    model = await model_in_production(client)
    request_id, request_seq = await request_retrain(owner_log, model)
    await until(lambda: canary_of(client, model), "the canary")
    await registry.restart()
    assert await owner_log.position(POSITION) < request_seq  # not handled yet: it is watched again

    await serve_both_arms(owner_log, model, SHARP, BLUNT)
    record = await verdict_of(client, model)
    assert record.aliases["production"] == "2"
    assert len(await client.list_versions(model)) == 2  # the candidate was not trained again
    assert [alias for alias, _, _ in steps_for(record, request_id)] == ["canary", "production", "canary"]


async def test_a_request_handled_again_trains_nothing_and_appends_nothing(
    registry: Registry, owner_log: EventLog
) -> None:
    client = registry.client
    model = await model_in_production(client)
    request_id, request_seq = await request_retrain(owner_log, model)
    await until(lambda: canary_of(client, model), "the canary")
    await serve_both_arms(owner_log, model, BLUNT, SHARP)
    await until(lambda: _when(owner_log.position(POSITION), lambda seq: seq >= request_seq), "the request handled")
    head = await owner_log.head()

    again_id, again_seq = await request_retrain(owner_log, model, uuid.UUID(request_id))  # sent twice: stored once
    assert (again_id, again_seq) == (request_id, request_seq)
    await owner_log.set_position(POSITION, 0)  # and the loop reads it again after a restart
    await registry.restart()
    await until(lambda: _when(owner_log.position(POSITION), lambda seq: seq >= request_seq), "the request re-read")
    assert await owner_log.head() == head
    assert len(await client.list_versions(model)) == 2


async def test_a_person_moving_production_mid_watch_ends_the_watch_with_nothing_appended(
    registry: Registry, owner_log: EventLog
) -> None:
    client = registry.client
    model = await model_in_production(client)
    _, request_seq = await request_retrain(owner_log, model)
    await until(lambda: canary_of(client, model), "the canary")
    await client.set_alias(model, "production", 2, reason="by hand")
    await until(lambda: _when(owner_log.position(POSITION), lambda seq: seq >= request_seq), "the watch ended")
    head = await owner_log.head()
    await serve_both_arms(owner_log, model, SHARP, BLUNT)
    record = await client.get_model(model)
    assert record.aliases["canary"] == "2" and record.aliases["production"] == "2"
    appended = {e.type for e in await owner_log.read(head, 1000)}
    assert appended == {"decision.made", "outcome.recorded"}  # the traffic only: no alias or policy event


async def test_the_promotion_policy_is_set_by_update_model_and_checked_field_by_field(registry: Registry) -> None:
    client = registry.client
    model = f"fraud-{uuid.uuid4().hex[:6]}"
    created = await client.create_model(model)
    assert created.promotion_policy_is_default and created.promotion_policy.canary_share == 0.1
    updated = await client.set_promotion_policy(model, **{**POLICY, "margin": -0.01})
    assert not updated.promotion_policy_is_default
    assert (updated.promotion_policy.min_labels, updated.promotion_policy.margin) == (10, -0.01)
    for bad, field in (({"canary_share": 0.0}, "canary_share"), ({"margin": 1.5}, "margin"),
                       ({"max_decisions": 19}, "max_decisions"), ({"min_labels": -1}, "min_labels")):  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.set_promotion_policy(model, **{**POLICY, **bad})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        [violation] = [d for d in error_details(refused.value) if isinstance(d, error_details_pb2.BadRequest)]
        assert violation.field_violations[0].field == f"model.promotion_policy.{field}"
    assert (await client.get_model(model)).promotion_policy.margin == -0.01  # the refusals changed nothing
