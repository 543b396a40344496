"""Serving with real services (ingest relay, features, registry, serving as their own processes, on
real Postgres and NATS): routing, exploration, the decision log, hot swap, deadlines and errors."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import asyncpg
import grpc
import pytest

from d2d import eventlog
from d2d.client import RegistryClient, ServingClient
from d2d.eventlog import EventLog
from d2d.features.offline import FrameRow, training_frame
from d2d.runtime.servers import EmbeddedPostgres, NatsServer
from d2d.sim.views import VIEWS
from tests.conftest import MODEL, Platform, context_of, entities_of, requests_for, serving_platform


@pytest.fixture(scope="module")
def platform(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    yield from serving_platform(postgres, nats_server, tmp_path_factory)


async def set_policy(platform: Platform, **policy: float) -> None:
    async with RegistryClient(platform.registry) as registry:
        await registry.set_policy(MODEL, **policy)
    await asyncio.sleep(1.0)  # serving follows model.policy_set on the bus


async def test_predict_logs_every_decision_with_the_features_served(platform: Platform) -> None:
    async with ServingClient(platform.serving) as serving:
        await serving.wait_ready()
        answers = await serving.batch_predict(requests_for(platform, 200))
    assert all(a.model_version == f"models/{MODEL}/versions/1" and a.arm == "production" for a in answers)
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    try:
        log = EventLog(pool)
        logged = [await log.get(uuid.UUID(a.decision_id)) for a in answers]
        assert all(e is not None and e.type == "decision.made" for e in logged)
        assert [e.seq for e in logged] == [a.seq for a in answers]
        # the logged vector is what the features service answers at the logged (time, watermark):
        # recomputed independently from the log, offline
        rows = [
            FrameRow(e.payload["entities"], datetime.fromisoformat(e.payload["as_of"]),
                     e.payload["feature_watermark"]) for e in logged[:50]
        ]  # fmt: skip
        frame = await training_frame(log, VIEWS, rows)
        for i, event in enumerate(logged[:50]):
            for name, value in event.payload["features"].items():
                offline = frame.at[i, name]
                offline = None if offline is None or offline != offline else offline
                assert value == offline, (name, value, offline)
            assert event.payload["score"] == answers[i].score and event.payload["action"] == answers[i].action
    finally:
        await pool.close()


async def test_repeated_request_id_returns_the_same_decision(platform: Platform) -> None:
    payment = platform.payments[-1]
    async with ServingClient(platform.serving) as serving:
        first = await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="u1", request_id="r-1")
        again = await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="u1", request_id="r-1")
    assert again == first


async def test_canary_share_and_sticky_arms(platform: Platform) -> None:
    await set_policy(platform, canary_share=0.2)
    async with RegistryClient(platform.registry) as registry:
        await registry.set_alias(MODEL, "canary", 2)
    await asyncio.sleep(1.0)
    payment = platform.payments[-1]
    units = [f"unit-{i}" for i in range(10_000)]
    async with ServingClient(platform.serving) as serving:
        arms: list[str] = []
        for start in range(0, len(units), 1000):
            batch = [
                ServingClient.request(MODEL, entities_of(payment), context_of(payment), unit_id=u)
                for u in units[start : start + 1000]
            ]
            arms += [a.arm for a in await serving.batch_predict(batch)]
        again = [a.arm for a in await serving.batch_predict(
            [ServingClient.request(MODEL, entities_of(payment), context_of(payment), unit_id=u) for u in units[:500]]
        )]  # fmt: skip
    share = arms.count("canary") / len(arms)
    assert abs(share - 0.2) <= 0.01, share
    assert again == arms[:500]
    await set_policy(platform, canary_share=0.0)


async def test_exploration_frequencies_match_the_logged_propensities(platform: Platform) -> None:
    epsilon = 0.3
    await set_policy(platform, epsilon=epsilon)
    async with ServingClient(platform.serving) as serving:
        answers = []
        for offset in range(0, 4000, 1000):
            answers += await serving.batch_predict(requests_for(platform, 1000, offset=offset))
    await set_policy(platform, epsilon=0.0)
    # Each decision took its greedy action with probability 1 - eps/2 and the other with eps/2, as
    # logged. Chi-square of observed against expected counts of non-greedy actions (1 dof).
    observed = sum(1 for a in answers if a.explored)
    expected = sum(epsilon / 2 for _ in answers)
    n = len(answers)
    chi2 = (observed - expected) ** 2 / expected + (observed - expected) ** 2 / (n - expected)
    assert chi2 < 10.83, (observed, expected, chi2)  # p > 0.001
    for a in answers:
        assert a.propensity == pytest.approx(epsilon / 2 if a.explored else 1 - epsilon / 2)


async def test_alias_moved_under_steady_load_fails_no_request(platform: Platform) -> None:
    requests = requests_for(platform, 400)
    failures: list[Exception] = []
    versions: list[str] = []
    stop = asyncio.Event()

    async with ServingClient(platform.serving) as serving:

        async def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                try:
                    versions.append((await serving.stub.Predict(requests[i % len(requests)], timeout=5)).model_version)
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)
                i += 8

        workers = [asyncio.create_task(load(w)) for w in range(8)]
        await asyncio.sleep(1.0)
        async with RegistryClient(platform.registry) as registry:
            await registry.set_alias(MODEL, "production", 2, reason="hot swap test")
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*workers)
        async with RegistryClient(platform.registry) as registry:
            await registry.set_alias(MODEL, "production", 1)
    assert failures == []
    assert versions[0].endswith("/1") and versions[-1].endswith("/2") and len(versions) > 100


async def test_unknown_model_is_not_found(platform: Platform) -> None:
    async with ServingClient(platform.serving) as serving:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await serving.predict("no-such-model", {"customer": "cus_000001"}, {}, unit_id="u")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in caught.value.details()


async def test_missing_entity_is_answered_with_defaults_and_flagged(platform: Platform) -> None:
    payment = platform.payments[-1]
    entities = {**entities_of(payment), "customer": "cus_999999"}
    async with ServingClient(platform.serving) as serving:
        answer = await serving.predict(MODEL, entities, context_of(payment), unit_id="u-new")
    assert list(answer.unknown_entities) == ["customer"] and answer.decision_id and answer.action


async def test_an_expired_deadline_is_honoured(platform: Platform) -> None:
    payment = platform.payments[-1]
    async with ServingClient(platform.serving) as serving:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="u", timeout=0.002)
        elapsed = time.monotonic() - started
    # The client's deadline fires first, or serving gives up just before it rather than act unrecorded.
    assert elapsed < 0.5
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
        caught.value.code() == grpc.StatusCode.UNAVAILABLE and "no decision was returned" in caught.value.details()
    ), caught.value


async def test_postgres_unreachable_gives_unavailable_and_no_unlogged_decision(
    platform: Platform, postgres: EmbeddedPostgres
) -> None:
    payment = platform.payments[-1]
    admin = await asyncpg.connect(postgres.admin_url())
    request_ids = [f"down-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    try:
        await admin.execute(f'ALTER DATABASE "{platform.database}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", platform.database
        )
        async with ServingClient(platform.serving) as serving:
            for request_id in request_ids:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="u",
                                          request_id=request_id, timeout=2.0)  # fmt: skip
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
                assert time.monotonic() - started < 2.0  # inside the caller's deadline
    finally:
        await admin.execute(f'ALTER DATABASE "{platform.database}" ALLOW_CONNECTIONS true')
        await admin.close()
    conn = await asyncpg.connect(platform.database_url)
    try:
        logged = await conn.fetchval(
            "SELECT count(*) FROM events WHERE type = 'decision.made' AND payload->>'request_id' = ANY($1)", request_ids
        )
    finally:
        await conn.close()
    assert logged == 0  # nothing was decided behind the caller's back
    async with ServingClient(platform.serving) as serving:  # and serving recovers
        for _ in range(50):
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="u")
                break
            await asyncio.sleep(0.2)
        assert answer.seq > 0
