"""Every table but `events` and `dead_letters` is a projection of the log: after the whole scenario
(contracts, features, training, promotion, policy, aliases, decisions, outcome rules and outcomes
joined by the feedback service) run by the real services, the
tables rebuilt from the log alone into a fresh database equal the live ones row for row, and a
tampered row is found and named."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from google.protobuf import field_mask_pb2

from d2d import eventlog, projections
from d2d.client import FeedbackClient, RegistryClient, ServingClient
from d2d.config import Settings
from d2d.contracts.registry import ContractRegistry
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.sim import load_contracts
from d2d.v1 import registry_pb2
from services.feedback.server import serve as serve_feedback
from tests.conftest import MODEL, Platform, requests_for, serving_platform


@pytest.fixture(scope="module")
def scenario(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """The serving platform (log loaded, features folded, two versions trained, v1 in production)
    and then, through the services' own code paths: contracts, a description, a policy, a canary
    moved and removed, decisions, and the feedback service (its outcome rule, an outcome, and the
    join applied up to that outcome)."""
    for platform in serving_platform(postgres, nats_server, tmp_path_factory):
        asyncio.run(_drive(platform))
        yield platform


async def _drive(platform: Platform) -> None:
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    try:
        contracts = ContractRegistry(eventlog.EventLog(pool))
        for spec in load_contracts():
            await contracts.register(
                spec.event_type, owner=spec.owner, json_schema=spec.schema, pii_fields=spec.pii_fields,
                description=f"{spec.event_type} from the simulator", allowed_lateness_seconds=3600,
                null_rate_limits={"/amount": 0.01}, max_future_skew_seconds=60,
            )  # fmt: skip
    finally:
        await pool.close()
    async with RegistryClient(platform.registry) as registry:
        await registry.stub.UpdateModel(
            registry_pb2.UpdateModelRequest(
                model=registry_pb2.Model(name=f"models/{MODEL}", description="fraud on card payments"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
            timeout=30,
        )
        await registry.set_policy(MODEL, canary_share=0.3, epsilon=0.1, threshold=0.6)
        await registry.set_alias(MODEL, "canary", 2)
        await registry.set_alias(MODEL, "shadow", 2)
        await registry.delete_alias(MODEL, "shadow")
    async with ServingClient(platform.serving) as serving:
        await serving.wait_ready()
        await asyncio.sleep(1.0)  # serving follows the policy and aliases on the bus
        decisions = [await serving.stub.Predict(request, timeout=30) for request in requests_for(platform, 20)]
    await _feedback(platform, decisions[0].decision_id)


async def _feedback(platform: Platform, decision_id: str) -> None:
    """Run the feedback service until its consumer has applied the log up to an outcome it recorded
    (the join lags the log by design: a rebuild is compared with what the consumer applied)."""
    settings = Settings(database_url=platform.database_url, addrs={"feedback": f"127.0.0.1:{free_port()}"})
    stop = asyncio.Event()
    service = asyncio.create_task(serve_feedback(settings, stop))
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    try:
        async with FeedbackClient(settings.addr("feedback")) as feedback:
            await feedback.wait_ready()
            recorded = await feedback.record_outcome(decision_id, label=1, outcome_id="scenario")
            log = eventlog.EventLog(pool)
            for _ in range(1200):
                if await log.position("feedback") >= recorded.seq and await feedback.list_rules():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the feedback service did not apply the log up to its outcome")
    finally:
        stop.set()
        await service
        await pool.close()


async def _rebuilt(postgres: EmbeddedPostgres, source_url: str, name: str) -> str:
    url = await asyncio.to_thread(postgres.create_database, name)
    await eventlog.migrate(url)
    await projections.rebuild(source_url, url)
    return url


async def test_every_projection_rebuilt_from_the_log_alone_equals_the_live_one(
    scenario: Platform, postgres: EmbeddedPostgres
) -> None:
    rebuilt = await _rebuilt(postgres, scenario.database_url, f"{scenario.database}_rebuilt")
    assert [str(d) for d in await projections.compare(scenario.database_url, rebuilt)] == []
    live = await asyncpg.connect(scenario.database_url)
    try:  # the scenario really filled every projection, so equality says something
        for table in projections.TABLES:
            assert await live.fetchval(f"SELECT count(*) FROM {table}") > 0, table
        assert await live.fetchval("SELECT description FROM models WHERE name = $1", MODEL) == "fraud on card payments"
        assert await live.fetchval("SELECT count(*) FROM events WHERE type = 'decision.made'") >= 20
        assert await live.fetchval("SELECT count(*) FROM decision_outcomes") >= 20
        assert await live.fetchval("SELECT label FROM decision_outcomes WHERE outcome_id = 'scenario'") == 1
        first_policy = await live.fetchval(  # a new model's policy is a fact of its model.registered event
            "SELECT payload->'policy'->'actions'->>0 FROM events"
            " WHERE type = 'model.registered' AND NOT payload ? 'version'"
        )
        assert first_policy == "approve"
    finally:
        await live.close()


async def test_a_tampered_projection_row_is_found_and_named(scenario: Platform, postgres: EmbeddedPostgres) -> None:
    rebuilt = await _rebuilt(postgres, scenario.database_url, f"{scenario.database}_tampered")
    owner = await asyncpg.connect(rebuilt)
    try:
        await owner.execute("UPDATE model_aliases SET version = 1 WHERE model = $1 AND alias = 'canary'", MODEL)
    finally:
        await owner.close()
    [difference] = await projections.compare(scenario.database_url, rebuilt)
    assert difference.table == "model_aliases" and difference.key == (MODEL, "canary")
    assert "model_aliases {'model': 'fraud', 'alias': 'canary'}: version 2 != 1" in str(difference)


async def test_a_fact_outside_the_log_is_not_in_the_rebuild(scenario: Platform, postgres: EmbeddedPostgres) -> None:
    """A row written to a projection without an event (as the platform used to for a model's
    description) shows as a difference: the rebuild only has what events carry."""
    copy = await asyncio.to_thread(postgres.create_database, f"{scenario.database}_bare")
    await eventlog.migrate(copy)
    await projections.rebuild(scenario.database_url, copy)
    owner = await asyncpg.connect(copy)
    try:
        await owner.execute(
            "INSERT INTO models (name, description, deployment_policy, registered_seq)"
            " VALUES ('ghost', 'no event', '{}', 1)"
        )
    finally:
        await owner.close()
    [difference] = await projections.compare(copy, scenario.database_url)
    assert difference.table == "models" and difference.key == ("ghost",) and difference.rebuilt is None
