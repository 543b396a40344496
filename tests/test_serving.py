"""Serving with real services (ingest relay, features, registry, serving as their own processes, on
real Postgres and NATS): routing, exploration, the decision log, hot swap, deadlines and errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

import asyncpg
import grpc
import orjson
import pytest

from d2d import eventlog
from d2d.client import RegistryClient, ServingClient
from d2d.config import Settings
from d2d.dbroles import login_role
from d2d.eventlog import EventLog, NewEvent
from d2d.features.definitions import Aggregate, Aggregation, FeatureView, days, hours
from d2d.features.offline import FrameRow, training_frame
from d2d.features.store import register_views
from d2d.policies import best_action_policy, threshold_policy
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.sim.training import default_spec
from d2d.sim.views import VIEWS
from d2d.training.spec import TrainingSpec
from services.serving.server import serve
from tests.conftest import MODEL, NOW, Platform, context_of, entities_of, requests_for, serving_platform

# A view no served model reads until a test trains a version on it.
CARD_AMOUNTS = FeatureView(
    name="card_amounts",
    entity="card",
    entity_key="card_id",
    source="payment.authorized",
    aggregates=(
        Aggregate("amount_sum", Aggregation.SUM, "amount", (hours(1), days(1))),
        Aggregate("amount_max", Aggregation.MAX, "amount", (days(1),)),
    ),
    allowed_lateness_seconds=3600,
)


@pytest.fixture(scope="module")
def platform(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    yield from serving_platform(postgres, nats_server, tmp_path_factory, prepare=record_writers)


async def record_writers(url: str) -> None:
    """Every row any connection writes from now on is recorded with the role it acted as and the
    connection's client port (which names the process): the test owns this database."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE test_writers (tbl text, acting_role name, client_port int, login name);"
            " GRANT INSERT ON test_writers TO PUBLIC;"
            " CREATE FUNCTION test_record_writer() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN INSERT INTO test_writers VALUES (TG_TABLE_NAME, current_user, inet_client_port(), session_user);"
            " RETURN NULL; END $$;"
        )
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'test_writers'"
        )
        for row in tables:
            await conn.execute(
                f'CREATE TRIGGER test_record_writer AFTER INSERT OR UPDATE OR DELETE ON "{row[0]}"'
                " FOR EACH ROW EXECUTE FUNCTION test_record_writer()"
            )
    finally:
        await conn.close()


async def decision_transactions(database_url: str, decision_ids: list[str]) -> dict[int, int]:
    """xmin (inserting transaction) -> number of the decisions it committed."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT xmin::text::bigint AS tx, count(*) AS n FROM events WHERE event_id = ANY($1::uuid[]) GROUP BY 1",
            decision_ids,
        )
    finally:
        await conn.close()
    return {r["tx"]: r["n"] for r in rows}


def rescore(artifact: bytes, inputs: list[list[float | None]]) -> list[float]:
    """Scores of logged input vectors by one artifact, independently of serving."""
    import numpy as np

    from d2d.training.pipeline import predict

    matrix = np.asarray([[np.nan if x is None else x for x in row] for row in inputs], dtype=np.float64)
    return [float(s) for s in predict(artifact, matrix)]


async def logged_decisions(database_url: str, answers: list) -> list:  # noqa: ANN001
    pool = await eventlog.create_pool(database_url, max_size=2)
    try:
        log = EventLog(pool)
        return [await log.get(uuid.UUID(a.decision_id)) for a in answers]
    finally:
        await pool.close()


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
        await assert_features_are_offline(log, logged[:50], VIEWS)
        for i, event in enumerate(logged[:50]):
            assert event.payload["score"] == answers[i].score and event.payload["action"] == answers[i].action
    finally:
        await pool.close()
    # concurrent decisions share a commit (group commit)
    transactions = await decision_transactions(platform.database_url, [a.decision_id for a in answers])
    assert sum(transactions.values()) == len(answers)
    assert len(transactions) <= len(answers) // 4, transactions


async def assert_features_are_offline(log: EventLog, logged: list, views: Sequence[FeatureView]) -> None:
    """Each decision's logged features are what the log gives offline at its logged (entities, time,
    watermark): recomputed independently, by the offline frame."""
    rows = [
        FrameRow(e.payload["entities"], datetime.fromisoformat(e.payload["as_of"]), e.payload["feature_watermark"])
        for e in logged
    ]
    frame = await training_frame(log, views, rows)
    compared = 0
    for i, event in enumerate(logged):
        for name, value in event.payload["features"].items():
            offline = frame.at[i, name]
            offline = None if offline is None or offline != offline else offline
            assert value == offline, (event.payload["model_version"], name, value, offline)
            compared += 1
    assert compared >= 20 * len(logged)


async def test_remote_features_mode_logs_what_the_features_service_answers(platform: Platform) -> None:
    """`D2D_SERVING_FEATURES=remote`: the same decisions, features from GetOnlineFeatures, and the
    same guarantee: every logged vector is the offline one at its logged watermark."""
    addr = f"127.0.0.1:{free_port()}"
    settings = Settings(
        database_url=platform.database_url, nats_url=platform.nats_url, nats_namespace=platform.namespace,
        addrs={"serving": addr, "features": platform.features, "registry": platform.registry},
        serving_features="remote", serving_consumer="remote-serving",
    )  # fmt: skip
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, stop))
    try:
        async with ServingClient(addr) as serving:
            await serving.wait_ready()
            answers = await serving.batch_predict(requests_for(platform, 100))
        pool = await eventlog.create_pool(platform.database_url, max_size=2)
        try:
            log = EventLog(pool)
            logged = [await log.get(uuid.UUID(a.decision_id)) for a in answers]
            await assert_features_are_offline(log, logged, VIEWS)
            # nothing folded in serving: no state of its own was saved
            held = "SELECT count(*) FROM feature_snapshots WHERE consumer LIKE 'remote-serving%'"
            assert await pool.fetchval(held) == 0
        finally:
            await pool.close()
    finally:
        stop.set()
        await server


async def test_a_model_needing_a_new_view_is_switched_to_only_once_serving_holds_the_view(platform: Platform) -> None:
    """Serving holds the views of the models it serves. A version reading a view no served model
    read before is promoted under steady load while payments keep arriving (so the view is built
    while the others move on): no request fails, and every decision of the new version, from the
    first, logged that view's features exactly as the log gives them offline at its watermark (a
    half-built or lagging view would answer with events missing)."""
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    log = EventLog(pool)
    try:
        async with ServingClient(platform.serving) as serving:  # serving holds the served views
            await serving.wait_ready()
            assert {a.model_version for a in await serving.batch_predict(requests_for(platform, 5))} == {
                f"models/{MODEL}/versions/1"
            }
        await register_views(log, [CARD_AMOUNTS])
        spec = default_spec().to_dict()
        spec["views"] = [*spec["views"], [CARD_AMOUNTS.name, CARD_AMOUNTS.version]]
        async with RegistryClient(platform.registry) as registry:
            trained = await registry.train(MODEL, json.dumps({**spec, "num_boost_round": 20}))
        version = int(trained.name.rsplit("/", 1)[1])
        failures: list[Exception] = []
        answered: list = []
        stop = asyncio.Event()
        async with ServingClient(platform.serving) as serving:
            workers = steady_predicts(serving, requests_for(platform, 400), stop, answered, failures)
            arriving = arrivals(platform, log, stop)
            await asyncio.sleep(0.5)
            async with RegistryClient(platform.registry) as registry:
                await registry.set_alias(MODEL, "production", version, reason="a new view")
            new_version = f"models/{MODEL}/versions/{version}"
            for _ in range(600):  # until the new version has decided a while
                await asyncio.sleep(0.05)
                if sum(a.model_version == new_version for a in answered) >= 100:
                    break
            stop.set()
            await asyncio.gather(*workers, arriving)
        async with RegistryClient(platform.registry) as registry:
            await registry.set_alias(MODEL, "production", 1)
        assert failures == []
        logged = [e for e in await logged_decisions(platform.database_url, answered)]
        mine = [e for e in logged if e.payload["model_version"] == new_version]
        assert len(mine) >= 100
        assert len({e.payload["feature_watermark"] for e in mine}) > 1  # payments kept being folded
        assert all(any(name.startswith(f"{CARD_AMOUNTS.name}.") for name in e.payload["features"]) for e in mine)
        await assert_features_are_offline(log, mine, [*VIEWS, CARD_AMOUNTS])
    finally:
        await pool.close()


def steady_predicts(
    serving: ServingClient, requests: list, stop: asyncio.Event, answered: list, failures: list
) -> list[asyncio.Task[None]]:
    """8 clients calling Predict one call after another until `stop`: answers (in the order they came)
    into `answered`, errors into `failures`."""

    async def load(worker: int) -> None:
        i = worker
        while not stop.is_set():
            try:
                answered.append(await serving.stub.Predict(requests[i % len(requests)], timeout=10))
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
            i += 8

    return [asyncio.create_task(load(w)) for w in range(8)]


def arrivals(platform: Platform, log: EventLog, stop: asyncio.Event) -> asyncio.Task[int]:
    """Payments of the served entities appended a few every 20 ms until `stop`; the count."""

    async def arrive() -> int:
        when = datetime.fromisoformat(NOW) - timedelta(minutes=5)
        tag = uuid.uuid4().hex[:6]
        for k in itertools.count():
            if stop.is_set():
                return 5 * k
            again = [
                NewEvent(uuid.uuid4(), p.type, p.schema_version, p.entity_type, f"{p.entity_id}-{tag}{k}", when,
                         orjson.dumps({**p.payload, "payment_id": f"{p.entity_id}-{tag}{k}"}).decode())
                for p in platform.payments[-5 * (k % 40 + 1) :][:5]
            ]  # fmt: skip
            await log.append(again)
            await asyncio.sleep(0.02)
        raise AssertionError("unreachable")

    return asyncio.create_task(arrive())


async def test_serving_killed_mid_stream_restores_its_features_and_folds_each_event_once(
    platform: Platform, start_service
) -> None:  # noqa: ANN001
    """Serving's features survive a SIGKILL while payments arrive: the restarted process restores
    its own snapshot (the views it held), folds what the snapshot lacked from its durable consumer,
    and decides on features equal to the log's offline at its watermark: nothing lost, nothing
    folded twice (lifetime counts would show either)."""
    addr = f"127.0.0.1:{free_port()}"
    env = {
        "D2D_DATABASE_URL": platform.database_url, "D2D_NATS_URL": platform.nats_url,
        "D2D_NATS_NAMESPACE": platform.namespace, "D2D_SERVING_ADDR": addr,
        "D2D_FEATURES_ADDR": platform.features, "D2D_REGISTRY_ADDR": platform.registry,
        "D2D_SERVING_CONSUMER": "killed-serving", "D2D_FEATURES_SNAPSHOT_SECONDS": "0.3",
    }  # fmt: skip
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    log = EventLog(pool)
    stop = asyncio.Event()
    try:
        first = start_service(["-m", "services.serving"], env, "serving-killed")
        async with ServingClient(addr) as serving:
            await serving.wait_ready()
            await serving.batch_predict(requests_for(platform, 5))  # it holds the model's views from here on
        arriving = arrivals(platform, log, stop)
        saved = "SELECT watermark FROM feature_snapshots WHERE consumer LIKE 'killed-serving:%'"
        start = await log.head()
        for _ in range(400):
            await asyncio.sleep(0.05)
            if (await pool.fetchval(saved) or 0) > start:
                break
        await asyncio.sleep(0.2)  # folded past the snapshot, payments still arriving
        first.kill()
        again = start_service(["-m", "services.serving"], env, "serving-killed")
        await asyncio.sleep(1.0)
        stop.set()
        assert await arriving > 0
        head = await log.head()
        async with ServingClient(addr) as serving:
            await serving.wait_ready()
            requests = requests_for(platform, 100)
            for request in requests:
                request.min_feature_watermark = head
            answers = await serving.batch_predict(requests)
        logged = [await log.get(uuid.UUID(a.decision_id)) for a in answers]
        assert {e.payload["feature_watermark"] for e in logged} == {head}
        await assert_features_are_offline(log, logged, VIEWS)
        assert "restored snapshot" in again.log() and "built" not in again.log(), again.log()[-3000:]
    finally:
        stop.set()
        await pool.close()


async def test_the_served_input_vector_is_the_one_training_builds(platform: Platform) -> None:
    """Training builds a row from the offline frame as of just before the example and the example's
    own payload (`build_inputs`); the vector serving logged for the same entities, time and
    watermark must be that row."""
    from d2d.training.labels import LabeledExample
    from d2d.training.pipeline import build_inputs

    async with ServingClient(platform.serving) as serving:
        answers = await serving.batch_predict(requests_for(platform, 60, offset=500))
    logged = await logged_decisions(platform.database_url, answers)
    async with RegistryClient(platform.registry) as registry:
        spec = TrainingSpec.from_json((await registry.get_version(MODEL, 1)).spec_json)
    views = [v for v in VIEWS if (v.name, v.version) in spec.views]
    examples = [
        LabeledExample(str(e.event_id), e.payload["feature_watermark"] + 1, datetime.fromisoformat(e.payload["as_of"]),
                       {k: v for k, v in e.payload["context"].items() if k != "occurred_at"}, 0)
        for e in logged
    ]  # fmt: skip
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    try:
        trained_rows = await build_inputs(EventLog(pool), spec, views, examples)
    finally:
        await pool.close()
    assert all(e.payload["model_version"] == f"models/{MODEL}/versions/1" for e in logged)
    for event, row in zip(logged, trained_rows.tolist(), strict=True):
        served = [None if x != x else x for x in row]
        assert event.payload["inputs"] == pytest.approx(served, nan_ok=True), event.payload["decision_id"]
    assert any(x is not None and x != 0 for e in logged for x in e.payload["inputs"])


async def test_repeated_request_id_returns_the_same_decision(platform: Platform) -> None:
    payment = platform.payments[-1]
    async with ServingClient(platform.serving) as serving:
        first = await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="u1", request_id="r-1")
        again = await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="u1", request_id="r-1")
    assert again == first


PREDICT_SPAN = "/d2d.v1.ServingService/Predict"
# Each step a Predict waits on: its span in the Predict's trace, and the span of the shared work
# (one per micro-batch, group commit) that served it; features are read in-process, by no shared work
# (in the remote mode a coalesced call, "serving.features_batch", serves them: the Batcher's test
# checks its links).
STEPS = {"serving.features": None, "serving.score": "serving.score_batch", "serving.commit": "eventlog.group_commit"}


def exported_spans(platform: Platform) -> list[dict]:
    """What the serving process has exported so far (JSON lines under its data directory)."""
    path = platform.logs / "traces" / "serving.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def test_every_predicts_trace_holds_its_feature_read_scoring_and_commit(platform: Platform) -> None:
    async with ServingClient(platform.serving) as serving:
        answers = await asyncio.gather(
            *(serving.stub.Predict(r, timeout=10) for r in requests_for(platform, 50, offset=2000))
        )
    logged = await logged_decisions(platform.database_url, answers)
    traces = {e.payload["trace_id"]: e for e in logged}
    assert len(traces) == len(answers), "one trace per Predict"
    for _ in range(300):  # spans are exported in batches; a Predict's span ends after all it waited on
        spans = exported_spans(platform)
        if traces.keys() <= {s["trace_id"] for s in spans if s["name"] == PREDICT_SPAN}:
            break
        await asyncio.sleep(0.1)
    by_id = {(s["trace_id"], s["span_id"]): s for s in spans}
    served = {step: set() for step in STEPS}  # (trace, span) of every step span a shared span links to
    for span in spans:
        for step, shared in STEPS.items():
            if span["name"] == shared:
                served[step] |= {(link["trace_id"], link["span_id"]) for link in span["links"]}
    for trace_id, event in traces.items():
        [predict] = [s for s in spans if s["trace_id"] == trace_id and s["name"] == PREDICT_SPAN]
        for step, shared in STEPS.items():
            [own] = [s for s in spans if s["trace_id"] == trace_id and s["name"] == step]
            assert own["parent_id"] == predict["span_id"], (step, trace_id)
            if shared is None:
                continue
            assert (trace_id, own["span_id"]) in served[step], f"no {shared} span links to {step} of {trace_id}"
            # and the step's span links to the shared span that served it
            assert any(by_id.get((k["trace_id"], k["span_id"]), {}).get("name") == shared for k in own["links"])
        # the decision carries the Predict's trace context (not its commit's, not the batch's)
        _, traced, parent, _ = event.metadata["traceparent"].split("-")
        assert (traced, parent) == (trace_id, predict["span_id"])


async def test_canary_share_and_sticky_arms(platform: Platform) -> None:
    await set_policy(platform, canary_share=0.2)
    async with RegistryClient(platform.registry) as registry:
        await registry.set_alias(MODEL, "canary", 2)
    await asyncio.sleep(1.0)
    payment = platform.payments[-1]
    units = [f"unit-{i}" for i in range(10_000)]
    async with ServingClient(platform.serving) as serving:
        arms: list[str] = []
        served_by: dict[str, set[str]] = {"canary": set(), "production": set()}
        for start in range(0, len(units), 1000):
            batch = [
                ServingClient.request(MODEL, entities_of(payment), context_of(payment), unit_id=u)
                for u in units[start : start + 1000]
            ]
            for answer in await serving.batch_predict(batch):
                arms.append(answer.arm)
                served_by[answer.arm].add(answer.model_version)
        again = [a.arm for a in await serving.batch_predict(
            [ServingClient.request(MODEL, entities_of(payment), context_of(payment), unit_id=u) for u in units[:500]]
        )]  # fmt: skip
    share = arms.count("canary") / len(arms)
    assert abs(share - 0.2) <= 0.01, share
    assert again == arms[:500]
    # the canary's units are served by the canary version, the rest by production
    assert served_by == {"canary": {f"models/{MODEL}/versions/2"}, "production": {f"models/{MODEL}/versions/1"}}
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
    # The chance each decision had of leaving its greedy action, from what it logged: the propensity
    # of the action taken if it explored, else one minus it.
    observed = sum(1 for a in answers if a.explored)
    expected = sum(a.propensity if a.explored else 1 - a.propensity for a in answers)
    n = len(answers)
    chi2 = (observed - expected) ** 2 / expected + (observed - expected) ** 2 / (n - expected)
    assert chi2 < 10.83, (observed, expected, chi2)  # p > 0.001
    for a in answers:
        assert a.propensity == pytest.approx(epsilon / 2 if a.explored else 1 - epsilon / 2)
        greedy = "decline" if a.score >= 0.5 else "approve"  # the default threshold
        assert (a.action != greedy) == a.explored


async def test_a_best_action_policy_decides_and_logs_its_kind_and_exact_propensities(platform: Platform) -> None:
    """Three actions, softmax exploration: every decision logs the policy with its kind, every
    action's utility, and as its propensity exactly the probability the policy gave its action."""
    policy = best_action_policy(
        {"approve": (-1.0, 0.6), "review": (0.0, 0.15), "decline": (1.0, -0.3)}, temperature=0.25
    )
    async with RegistryClient(platform.registry) as registry:
        await registry.set_policy(MODEL, policy)
    await asyncio.sleep(1.0)  # serving follows model.policy_set on the bus
    try:
        async with ServingClient(platform.serving) as serving:
            answers = await serving.batch_predict(requests_for(platform, 300))
    finally:
        async with RegistryClient(platform.registry) as registry:
            await registry.set_policy(MODEL, threshold_policy(["approve", "decline"], 0.5))
        await asyncio.sleep(1.0)
    logged = await logged_decisions(platform.database_url, answers)
    for answer, event in zip(answers, logged, strict=True):
        p = event.payload
        assert p["policy"] == {**policy.to_dict(), "canary_share": 0.0}
        assert p["policy"]["kind"] == "best_action" and p["policy"]["exploration"] == "softmax"
        assert p["propensity"] == policy.probabilities(p["score"])[p["action"]] == answer.propensity
        assert p["action_scores"] == policy.action_scores(p["score"])
        assert p["greedy_action"] == policy.greedy(p["score"]) and p["explored"] == (p["action"] != p["greedy_action"])
        assert answer.action == p["action"]
    assert {e.payload["action"] for e in logged} == {"approve", "review", "decline"}


async def test_alias_moved_under_steady_load_fails_no_request(platform: Platform) -> None:
    failures: list[Exception] = []
    answered: list = []
    stop = asyncio.Event()

    async with ServingClient(platform.serving) as serving:
        workers = steady_predicts(serving, requests_for(platform, 400), stop, answered, failures)
        await asyncio.sleep(1.0)
        async with RegistryClient(platform.registry) as registry:
            await registry.set_alias(MODEL, "production", 2, reason="hot swap test")
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*workers)
        async with RegistryClient(platform.registry) as registry:
            await registry.set_alias(MODEL, "production", 1)
    assert failures == []
    versions = [a.model_version for a in answered]
    assert versions[0].endswith("/1") and versions[-1].endswith("/2") and len(versions) > 100
    # Every decision, also those in flight at the swap, was scored whole by the version it names:
    # its logged inputs rescored by that version's artifact give its score.
    logged = await logged_decisions(platform.database_url, answered)
    async with RegistryClient(platform.registry) as registry:
        artifacts = {f"models/{MODEL}/versions/{n}": (await registry.artifact(MODEL, n))[0] for n in (1, 2)}
    for name, artifact in artifacts.items():
        mine = [e for e in logged if e.payload["model_version"] == name]
        assert mine, name
        assert rescore(artifact, [e.payload["inputs"] for e in mine]) == pytest.approx(
            [e.payload["score"] for e in mine], abs=1e-6
        )
    other = rescore(artifacts[f"models/{MODEL}/versions/2"], [e.payload["inputs"] for e in logged[:50]])
    assert other != pytest.approx([e.payload["score"] for e in logged[:50]], abs=1e-6), "the versions must differ"


async def test_shadow_version_is_scored_and_logged_but_never_acts(platform: Platform) -> None:
    async with RegistryClient(platform.registry) as registry:
        await registry.set_alias(MODEL, "shadow", 2)
        artifacts = {n: (await registry.artifact(MODEL, n))[0] for n in (1, 2)}
    await asyncio.sleep(1.0)  # serving follows model.alias_set on the bus
    try:
        async with ServingClient(platform.serving) as serving:
            answers = await serving.batch_predict(requests_for(platform, 200, offset=1000))
    finally:
        async with RegistryClient(platform.registry) as registry:
            await registry.delete_alias(MODEL, "shadow")
        await asyncio.sleep(1.0)
    logged = await logged_decisions(platform.database_url, answers)
    inputs = [e.payload["inputs"] for e in logged]
    production, shadow = rescore(artifacts[1], inputs), rescore(artifacts[2], inputs)
    for answer, event, acting, shadowed in zip(answers, logged, production, shadow, strict=True):
        assert answer.model_version == f"models/{MODEL}/versions/1" and answer.arm == "production"
        assert [(s.model_version, s.score) for s in answer.shadow_scores] == [
            (f"models/{MODEL}/versions/2", pytest.approx(shadowed, abs=1e-6))
        ]
        assert event.payload["shadow"] == [
            {"model_version": f"models/{MODEL}/versions/2", "score": answer.shadow_scores[0].score}
        ]
        # the action follows the production score alone
        assert answer.score == pytest.approx(acting, abs=1e-6)
        assert answer.action == ("decline" if acting >= 0.5 else "approve")
    flips = [a for a, s in zip(production, shadow, strict=True) if (a >= 0.5) != (s >= 0.5)]
    differs = sum(1 for a, s in zip(production, shadow, strict=True) if abs(a - s) > 1e-6)
    assert differs > len(answers) // 2, "the shadow scores differently, so acting on it would show"
    print(f"{len(flips)} of {len(answers)} decisions would have flipped had the shadow acted")


async def test_every_service_process_writes_as_its_own_login(platform: Platform) -> None:
    """Each process logs in as its own role and writes only as it (relay: positions, features:
    snapshots, registry: models, serving: decisions), never as the owner; events are inserted
    only by `append_events`, which runs as its owner."""
    import psutil

    conn = await asyncpg.connect(platform.database_url)
    try:
        port = await conn.fetchval("SELECT inet_server_port()")
        owner = await conn.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'events'")
        rows = await conn.fetch("SELECT tbl, acting_role, client_port, login FROM test_writers")
    finally:
        await conn.close()
    assert rows, "nothing was written since the platform started"
    assert {r["acting_role"] for r in rows if r["tbl"] == "events"} == {owner}
    assert all(r["acting_role"] == r["login"] for r in rows if r["tbl"] != "events")
    writes_by_port: dict[int, set[tuple[str, str]]] = {}
    for r in rows:
        writes_by_port.setdefault(r["client_port"], set()).add((r["tbl"], r["login"]))
    written_by = {}
    for name, process in zip(("ingest-relay", "features", "registry", "serving"), platform.processes, strict=True):
        connections = psutil.Process(process.pid).net_connections(kind="tcp")
        ports = {c.laddr.port for c in connections if c.raddr and c.raddr.port == port}
        assert ports, f"{process.args} holds no connection to Postgres"
        writes = set().union(*(writes_by_port.get(p, set()) for p in ports))
        assert {login for _, login in writes} <= {login_role(name)}, (name, writes)
        written_by[name] = {table for table, _ in writes}
    assert "log_positions" in written_by["ingest-relay"] and "feature_snapshots" in written_by["features"]
    assert {"models", "model_versions"} & written_by["registry"] and "events" in written_by["serving"]


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
    request_id = f"expired-{uuid.uuid4().hex[:8]}"
    async with ServingClient(platform.serving) as serving:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await serving.predict(
                MODEL, entities_of(payment), context_of(payment), unit_id="u", request_id=request_id, timeout=0.002
            )
    # The client's deadline fires first, or serving gives up just before it rather than act unrecorded.
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
        caught.value.code() == grpc.StatusCode.UNAVAILABLE and "no decision was returned" in caught.value.details()
    ), caught.value
    # Served again with time to answer, the same request id decides once and is answered.
    async with ServingClient(platform.serving) as serving:
        answer = await serving.predict(
            MODEL, entities_of(payment), context_of(payment), unit_id="u", request_id=request_id
        )
    conn = await asyncpg.connect(platform.database_url)
    try:
        logged = await conn.fetchval(
            "SELECT count(*) FROM events WHERE type = 'decision.made' AND payload->>'request_id' = $1", request_id
        )
    finally:
        await conn.close()
    assert logged == 1 and answer.seq > 0


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
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await serving.predict(MODEL, entities_of(payment), context_of(payment), unit_id="u",
                                          request_id=request_id, timeout=2.0)  # fmt: skip
                # serving's own answer inside the caller's deadline, not the deadline running out
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
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
