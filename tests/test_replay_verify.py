"""`verify` on a log the real services made: clean as made, and failing, naming exactly the row or
the decision and feature, once a projection row or a logged vector is tampered with (as the owner
role, in this test database); the same through AuditService and `d2d replay verify`."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import orjson
import pytest
from google.rpc import error_details_pb2

from d2d.client import AuditClient, ServingClient, error_details
from d2d.eventlog import EventLog, create_pool
from d2d.replay.verify import verify
from d2d.runtime.servers import EmbeddedPostgres, NatsServer
from services.feedback.consumer import FeedbackConsumer
from tests.conftest import MODEL, Platform, audit_service, requests_for, run_cli, serving_platform

DECISIONS = 120


@pytest.fixture(scope="module")
def platform(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """The serving platform, with decisions served, joined by the feedback consumer, and a
    features snapshot at least as new as the last decision's watermark."""
    for platform in serving_platform(postgres, nats_server, tmp_path_factory):
        asyncio.run(decide(platform))
        yield platform


async def decide(platform: Platform) -> None:
    async with ServingClient(platform.serving) as serving:
        answers = await serving.batch_predict(requests_for(platform, DECISIONS))
    assert len(answers) == DECISIONS
    pool = await create_pool(platform.database_url, role="d2d_feedback", max_size=2)  # as the feedback service
    try:
        log = EventLog(pool)
        await FeedbackConsumer(log).catch_up()
        head = await log.head()
    finally:
        await pool.close()
    conn = await asyncpg.connect(platform.database_url)
    try:
        for _ in range(300):  # the features service snapshots every few seconds
            if (await conn.fetchval("SELECT max(watermark) FROM feature_snapshots") or 0) >= head:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def tampered(url: str, change: str, undo: str, *args: object, table: str) -> AsyncIterator[None]:
    """`change` run as the owner (with `table`'s own triggers off meanwhile), `undo` run afterwards."""
    conn = await asyncpg.connect(url)

    async def run(statement: str) -> None:
        async with conn.transaction():
            await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            await conn.execute(statement, *args)
            await conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")

    try:
        await run(change)
        yield
    finally:
        await run(undo)
        await conn.close()


async def logged_decision(url: str) -> tuple[str, str, object]:
    """A decision's id, one of its logged features that is a number, and that value."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT event_id, payload->'features' AS features FROM events WHERE type = 'decision.made'"
            " ORDER BY seq DESC LIMIT 1"
        )
    finally:
        await conn.close()
    features = orjson.loads(row["features"])
    name = next(k for k, v in features.items() if isinstance(v, int | float) and not isinstance(v, bool))
    return str(row["event_id"]), name, features[name]


async def decision_in_join(url: str) -> tuple[object, float]:
    conn = await asyncpg.connect(url)
    try:
        return tuple(await conn.fetchrow("SELECT decision_id, score FROM decision_outcomes LIMIT 1"))
    finally:
        await conn.close()


async def test_a_log_made_by_the_services_verifies_clean(platform: Platform) -> None:
    result = await verify(platform.database_url, workers=2)

    assert result["differences"] == [] and result["ok"]
    checked = result["checked"]
    assert checked["decisions"] == DECISIONS and checked["decision_features"] > DECISIONS
    assert checked["decision_inputs"] > 0 and checked["feature_entities"] > 0
    assert checked["projection_rows"] >= DECISIONS and checked["positions"]["feedback"] == result["head"]


async def test_a_tampered_projection_row_is_named(platform: Platform) -> None:
    url = platform.database_url
    alias = "UPDATE model_aliases SET version = {} WHERE model = $1 AND alias = 'production'"
    async with tampered(url, alias.format(2), alias.format(1), MODEL, table="model_aliases"):
        result = await verify(url, workers=2)

    assert not result["ok"]
    assert result["differences"] == [
        {"kind": "projection", "table": "model_aliases", "key": {"model": MODEL, "alias": "production"},
         "column": "version", "stored": 2, "recomputed": 1}
    ]  # fmt: skip


async def test_a_tampered_logged_feature_value_is_named_with_its_decision(platform: Platform) -> None:
    url = platform.database_url
    decision_id, feature, value = await logged_decision(url)
    path = ["features", feature]
    change = "UPDATE events SET payload = jsonb_set(payload, $1, to_jsonb($2::float8 + 7.5)) WHERE event_id = $3::uuid"
    undo = "UPDATE events SET payload = jsonb_set(payload, $1, to_jsonb($2::float8)) WHERE event_id = $3::uuid"
    async with tampered(url, change, undo, path, value, decision_id, table="events"):
        result = await verify(url, workers=2, skip_projections=True)

    assert result["differences"] == [
        {"kind": "decision", "decision_id": decision_id, "feature": feature, "logged": value + 7.5,
         "recomputed": value}
    ]  # fmt: skip


async def test_a_tampered_features_snapshot_is_named_by_view_entity_and_feature(platform: Platform) -> None:
    url = platform.database_url
    conn = await asyncpg.connect(url)
    try:
        consumer, state = await conn.fetchrow("SELECT consumer, state FROM feature_snapshots LIMIT 1")
        doc = orjson.loads(zlib.decompress(state))
        buffers = doc["views"]["customer_payments"]["buffers"]
        entity = next(e for e, rows in sorted(buffers.items()) if rows)
        buffers[entity].pop()  # the online state lost one of the customer's payments
        tampered_state = zlib.compress(orjson.dumps(doc))
        save = "UPDATE feature_snapshots SET state = $2 WHERE consumer = $1"
        await conn.execute(save, consumer, tampered_state)
        try:
            result = await verify(url, workers=2, skip_projections=True)
        finally:
            await conn.execute(save, consumer, state)
    finally:
        await conn.close()

    named = {(d["kind"], d["consumer"], d["view"], d["entity"]) for d in result["differences"]}
    assert named == {("feature_state", consumer, "customer_payments", entity)}
    assert "count_lifetime" in {d["field"] for d in result["differences"]}


async def test_verify_log_streams_progress_and_ends_with_the_result_and_the_cli_exits_1_on_a_difference(
    platform: Platform,
) -> None:
    url = platform.database_url
    stages: list[str] = []
    async with audit_service(url) as addr:
        async with AuditClient(addr) as audit:
            result = await audit.verify(workers=2, on_progress=lambda stage, done, total: stages.append(stage))
            assert result["ok"] and result["checked"]["decisions"] == DECISIONS
            assert {"projections", "decisions"} <= set(stages)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await audit.verify(workers=-1)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for d in error_details(refused.value) if isinstance(d, error_details_pb2.BadRequest)
                    for v in d.field_violations] == ["workers"]  # fmt: skip

        env = {"D2D_AUDIT_ADDR": addr, "D2D_DATABASE_URL": url, "D2D_NATS_URL": platform.nats_url}
        code, output = await run_cli(env, "replay", "verify", "--skip-projections")
        assert code == 0, output
        decision = await decision_in_join(url)
        score = "UPDATE decision_outcomes SET score = $2 WHERE decision_id = $1"
        async with tampered(url, score.replace("$2", "$2 + 1"), score, *decision, table="decision_outcomes"):
            code, output = await run_cli(env, "replay", "verify")
        assert code == 1, output
        assert "projection decision_outcomes" in output and "score" in output
