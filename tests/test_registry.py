"""The registry service on real Postgres: training from the log, evaluation against the simulator's
truth, byte-for-byte reproduction, gated promotion, aliases that survive a restart, and precise
errors for specs that cannot work."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from d2d import eventlog
from d2d.client import RegistryClient, error_details
from d2d.config import Settings
from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.features.store import register_views
from d2d.runtime.servers import EmbeddedPostgres, free_port
from d2d.sim import PaymentsSimulator, SimConfig, write_truth_csv
from d2d.sim.training import CHARGEBACK_LABEL, default_spec
from d2d.sim.views import MERCHANT_PAYMENTS, VIEWS
from d2d.training.evaluation import roc_auc
from d2d.training.pipeline import train
from d2d.training.spec import TrainingSpec
from d2d.v1 import registry_pb2
from services.registry.server import serve
from services.registry.store import ModelStore
from tests.conftest import run_cli, seed_test_key

SIM = SimConfig(seed=3, days=40, payments_per_day=1500, customers=1000, merchants=100)


@pytest.fixture(scope="module")
def simulated() -> PaymentsSimulator:
    return PaymentsSimulator(SIM)


@pytest.fixture(scope="module")
def loaded_url(postgres: EmbeddedPostgres, simulated: PaymentsSimulator) -> Iterator[str]:
    """One database holding 40 simulated days (about 63,000 events) and the registered views."""
    url = postgres.create_database(f"reg_{uuid.uuid4().hex[:10]}")

    async def load() -> None:
        await eventlog.migrate(url)
        await seed_test_key(url)
        pool = await eventlog.create_pool(url, max_size=2)
        log = EventLog(pool)
        events = list(simulated.events())
        for i in range(0, len(events), 5000):
            await log.append([e.as_new_event() for e in events[i : i + 5000]])
        await register_views(log, VIEWS)
        await pool.close()

    asyncio.run(load())
    yield url


def spec_json(**overrides: object) -> str:
    return json.dumps({**default_spec().to_dict(), **overrides})


@pytest.fixture
async def registry(loaded_url: str) -> AsyncIterator[tuple[RegistryClient, Settings]]:
    settings = Settings(database_url=loaded_url, addrs={"registry": f"127.0.0.1:{free_port()}"})
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    client = RegistryClient(settings.addr("registry"))
    await client.wait_ready()
    yield client, settings
    stop.set()
    await task
    await client.channel.close()


async def new_model(client: RegistryClient) -> str:
    model = f"fraud-{uuid.uuid4().hex[:8]}"
    await client.create_model(model, "test model")
    return model


async def test_trained_model_beats_a_constant_and_nears_the_truth(
    registry, simulated: PaymentsSimulator, tmp_path: Path
) -> None:  # noqa: ANN001
    client, settings = registry
    model = await new_model(client)
    truth_csv = tmp_path / "truth.csv"
    write_truth_csv(simulated.truth(), truth_csv)
    stages = []
    version = await client.train(
        model, spec_json(truth_path=str(truth_csv)), on_progress=lambda p: stages.append(p.stage)
    )
    assert stages[0] == "labels" and stages[-1] == "stored" and "training" in stages
    evaluation = json.loads(version.evaluation_json)
    assert evaluation["auc"] > 0.75, evaluation["auc"]
    assert evaluation["log_loss"] < evaluation["base_rate_log_loss"]
    assert len(evaluation["calibration"]) == 10 and set(evaluation["slices"]["channel"]) == {"ecom", "pos"}
    assert {"grocery", "electronics"} <= set(evaluation["slices"]["merchant_category"])
    assert 0 < evaluation["brier"] < 0.05

    # the truth's own AUC on the same held-out rows, computed here independently of the pipeline
    pool = await eventlog.create_pool(settings.database_url, max_size=2)
    async with pool.acquire() as conn:
        held_out = await conn.fetchval(  # a blob the version's lineage names by sha256
            "SELECT a.data FROM model_versions v JOIN artifacts a ON a.sha256 = v.lineage->>'test_examples_sha256'"
            " WHERE v.model = $1 AND v.version = 1",
            model,
        )
        test_examples = json.loads(held_out)
    await pool.close()
    by_id = {e.event_id: e for e in simulated.events()}
    truth = simulated.truth()
    labels = [label for _, label in test_examples]
    truth_auc = roc_auc(labels, [truth[by_id[i].payload["payment_id"]].fraud_probability for i, _ in test_examples])
    print(f"model AUC {evaluation['auc']:.4f}, truth AUC {truth_auc:.4f} on {len(labels)} held-out payments")
    assert evaluation["truth"]["auc"] == pytest.approx(truth_auc) and evaluation["truth"]["rows"] == len(labels)
    assert evaluation["auc"] > 0.5 + 0.6 * (truth_auc - 0.5), (evaluation["auc"], truth_auc)


async def test_reproduction_gives_the_identical_sha256(registry) -> None:  # noqa: ANN001
    client, settings = registry
    model = await new_model(client)
    version = await client.train(model, spec_json(num_boost_round=60))
    artifact, stated = await client.artifact(model, 1)
    assert hashlib.sha256(artifact).hexdigest() == stated == version.sha256

    pool = await eventlog.create_pool(settings.database_url, max_size=2)
    try:
        again = await train(EventLog(pool), TrainingSpec.from_json(version.spec_json), VIEWS)
    finally:
        await pool.close()
    assert again.sha256 == version.sha256 and again.artifact == artifact
    assert json.loads(version.spec_json)["to_seq"] > 0  # the stored spec names the log range it used


async def test_a_trained_versions_event_carries_the_training_baseline_of_every_input_and_the_score(
    registry,
) -> None:  # noqa: ANN001
    """Drift is measured against the distribution the model was trained on: model.registered's lineage
    holds it, per input and for the score, over the training rows."""
    client, settings = registry
    model = await new_model(client)
    version = await client.train(model, spec_json(num_boost_round=20))
    pool = await eventlog.create_pool(settings.database_url, max_size=2)
    try:
        (event,) = await EventLog(pool).read(version.registered_seq - 1, 1)
    finally:
        await pool.close()
    assert event.type == "model.registered" and event.payload["version"] == 1
    lineage = event.payload["lineage"]
    assert json.loads(version.lineage_json)["baseline"] == lineage["baseline"]
    inputs, score = lineage["baseline"]["inputs"], lineage["baseline"]["score"]
    assert set(inputs) == set(version.feature_names) and len(version.feature_names) > 3
    train_rows = lineage["rows"]["train"]
    for entry in [*inputs.values(), score]:
        assert entry["rows"] == train_rows
        assert len(entry["shares"]) == len(entry["edges"]) + 1 <= 11
        assert sum(entry["shares"]) + entry["null_share"] == pytest.approx(1.0)
    assert score["null_share"] == 0.0 and len(score["edges"]) == 10
    assert 0.0 <= score["edges"][0] < score["edges"][-1] <= 1.0


async def test_gated_promotion_of_a_worse_model_is_refused_and_rollback_works(registry) -> None:  # noqa: ANN001
    client, _ = registry
    model = await new_model(client)
    good = await client.train(model, spec_json())
    weak_views = [[v.name, v.version] for v in VIEWS if v.name == "merchant_payments"]
    weak = await client.train(
        model, spec_json(views=weak_views, transforms=[], request_numbers=[], request_flags=[], num_boost_round=3)
    )
    await client.set_alias(model, "production", 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.set_alias(model, "production", 2, require_improvement=0.0)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "falls short by" in caught.value.details() and "version 2" in caught.value.details()
    assert (await client.get_model(model)).aliases["production"] == "1"

    await client.set_alias(model, "production", 2, reason="forced, no gate")
    rolled = await client.set_alias(model, "production", 1, reason="rollback")
    assert rolled.aliases["production"] == "1"
    assert [(c.version, c.previous_version, c.reason) for c in rolled.alias_history] == [
        ("1", "", ""),
        ("2", "1", "forced, no gate"),
        ("1", "2", "rollback"),
    ]
    assert good.sha256 != weak.sha256


async def test_aliases_and_their_history_survive_a_restart(loaded_url: str) -> None:
    settings = Settings(database_url=loaded_url, addrs={"registry": f"127.0.0.1:{free_port()}"})
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    async with RegistryClient(settings.addr("registry")) as client:
        await client.wait_ready()
        model = await new_model(client)
        await client.train(model, spec_json(num_boost_round=20))
        await client.set_alias(model, "canary", 1)
        await client.set_alias(model, "shadow", 1)
        await client.delete_alias(model, "shadow")
        before = await client.get_model(model)
    stop.set()
    await task

    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    async with RegistryClient(settings.addr("registry")) as client:
        await client.wait_ready()
        after = await client.get_model(model)
        production = await client.get_version(model, "canary")
    stop.set()
    await task
    assert dict(after.aliases) == {"canary": "1"} == dict(before.aliases)
    assert list(after.alias_history) == list(before.alias_history) and len(after.alias_history) == 3
    assert production.name == f"models/{model}/versions/1"


@pytest.mark.parametrize(
    ("overrides", "code", "needle"),
    [
        (
            {"label": {**CHARGEBACK_LABEL.to_dict(), "outcome_type": "payment.refunded"}},
            "FAILED_PRECONDITION",
            "only class 0",
        ),
        ({"label": None}, "INVALID_ARGUMENT", "label (example_type, outcome_type, join_field, window_seconds)"),
        ({"after_seq": 50, "to_seq": 60}, "FAILED_PRECONDITION", "holds no payment.authorized events"),
        ({"views": [["customer_payments", "0000000000000000"]]}, "NOT_FOUND", "'customer_payments' version"),
        ({"views": [["no_such_view", "abc"]]}, "NOT_FOUND", "'no_such_view'"),
    ],
)
async def test_specs_that_cannot_work_fail_naming_the_cause(registry, overrides: dict, code: str, needle: str) -> None:  # noqa: ANN001
    client, _ = registry
    model = await new_model(client)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.train(model, spec_json(**overrides))
    assert caught.value.code() == getattr(grpc.StatusCode, code)
    assert needle in caught.value.details()


async def test_unknown_model_is_not_found(registry) -> None:  # noqa: ANN001
    client, _ = registry
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.get_version("no-such-model", 1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "models/no-such-model" in caught.value.details()


async def test_a_new_models_policy_is_in_its_event_and_a_model_without_one_is_refused(registry) -> None:  # noqa: ANN001
    client, settings = registry
    given = {"canary_share": 0.25, "epsilon": 0.05, "threshold": 0.3, "actions": ["pass", "review"]}
    created = await client.create_model("policy-given", policy=given)
    assert list(created.deployment_policy.actions) == ["pass", "review"] and created.deployment_policy.threshold == 0.3
    defaulted = await client.create_model("policy-defaulted")
    assert list(defaulted.deployment_policy.actions) == ["approve", "decline"]  # the simulator's default_policy()

    pool = await eventlog.create_pool(settings.database_url or "", max_size=1)
    try:
        log = EventLog(pool)
        [event] = await log.newest(below=None, limit=1, event_type="model.registered", entity_id="policy-given")
        # the whole policy, with the kind and exploration it was read as
        assert event.payload["policy"] == {**given, "kind": "threshold", "exploration": "epsilon_greedy"}
        # A domain without a default_policy(): the creator must name the actions.
        with pytest.raises(Refusal) as refused:
            await ModelStore(log).create_model("policy-missing")
        assert refused.value.code == "INVALID_ARGUMENT" and refused.value.field == "model.deployment_policy.actions"
        assert await log.newest(below=None, limit=1, event_type="model.registered", entity_id="policy-missing") == []
    finally:
        await pool.close()


def cli_env(settings: Settings) -> dict[str, str]:
    return {"D2D_DATABASE_URL": settings.database_url or "", "D2D_NATS_URL": "nats://unused",
            "D2D_REGISTRY_ADDR": settings.addr("registry")}  # fmt: skip


async def test_models_commands_train_show_promote_rollback_reproduce(registry) -> None:  # noqa: ANN001
    _, settings = registry
    model = f"cli-{uuid.uuid4().hex[:6]}"
    env = cli_env(settings)
    code, out = await run_cli(env, "models", "train", model, "--rounds", "25")
    assert code == 0 and f"registered models/{model}/versions/1" in out and "test AUC" in out, out
    code, out = await run_cli(env, "models", "train", model, "--rounds", "40")
    assert code == 0 and f"models/{model}/versions/2" in out, out
    code, out = await run_cli(env, "models", "promote", model, "1", "--no-gate")
    assert code == 0 and "production of" in out and "is version 1" in out, out
    code, out = await run_cli(
        cli_env(settings), "models", "promote", model, "2", "--no-gate", "--reason", "more rounds"
    )
    assert code == 0 and "is version 2" in out, out
    code, out = await run_cli(env, "models", "rollback", model)
    assert code == 0 and "rolled back to version 1" in out, out
    code, out = await run_cli(env, "models", "show", model, "2")
    assert code == 0 and "alias history" in out and "more rounds" in out and "calibration" in out, out
    code, out = await run_cli(env, "models", "list")
    assert code == 0 and model in out and "production=1" in out, out
    code, out = await run_cli(env, "models", "reproduce", model, "2")
    assert code == 0 and "identical" in out, out


async def test_an_externally_trained_artifact_is_registered_with_its_spec(registry) -> None:  # noqa: ANN001
    import numpy as np
    import xgboost as xgb

    client, _ = registry
    model = await new_model(client)
    rng = np.random.default_rng(0)
    booster = xgb.train(
        {"objective": "binary:logistic", "nthread": 1},
        xgb.DMatrix(rng.random((200, 3)), label=rng.integers(0, 2, 200)),
        5,
    )
    artifact = bytes(booster.save_raw(raw_format="ubj"))
    request = registry_pb2.RegisterModelVersionRequest(
        parent=f"models/{model}", artifact=artifact, spec_json=spec_json(), feature_names=["a", "b", "c"],
        evaluation_json=json.dumps({"auc": 0.5}),
    )  # fmt: skip
    version = await client.stub.RegisterModelVersion(request)
    assert version.sha256 == hashlib.sha256(artifact).hexdigest() and list(version.feature_names) == ["a", "b", "c"]
    fetched, _ = await client.artifact(model, 1)
    assert fetched == artifact
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        bad = registry_pb2.RegisterModelVersionRequest(
            parent=f"models/{model}", artifact=artifact, spec_json=spec_json(views=[["nope", "1"]]), feature_names=["a"]
        )
        await client.stub.RegisterModelVersion(bad)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in caught.value.details()


async def test_reproduce_exits_1_when_the_retrained_bytes_differ(registry) -> None:  # noqa: ANN001
    """A version whose artifact did not come from its stated spec: here trained by the pipeline with
    another seed than the spec it is registered with. Retraining from the spec gives other bytes."""
    client, settings = registry
    model = await new_model(client)
    stated = spec_json(num_boost_round=8, seed=7)
    pool = await eventlog.create_pool(settings.database_url, max_size=2)
    try:
        actual = await train(EventLog(pool), TrainingSpec.from_json(spec_json(num_boost_round=8, seed=8)), VIEWS)
    finally:
        await pool.close()
    request = registry_pb2.RegisterModelVersionRequest(
        parent=f"models/{model}", artifact=actual.artifact, spec_json=stated, feature_names=actual.feature_names,
        evaluation_json=json.dumps({"auc": 0.5}),
    )  # fmt: skip
    await client.stub.RegisterModelVersion(request)
    code, out = await run_cli(cli_env(settings), "models", "reproduce", model, "1")
    assert code == 1 and "DIFFERENT" in out, out
    assert "evaluation.auc: stored 0.5, retrained 0." in out, out  # what else differs is shown


def refused_fields(error: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for d in error_details(error) if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("", "INVALID_ARGUMENT"),
        ("models/{model}", "INVALID_ARGUMENT"),
        ("models//versions/1", "INVALID_ARGUMENT"),
        ("models/{model}/versions/", "INVALID_ARGUMENT"),
        ("models/{model}/revisions/1", "INVALID_ARGUMENT"),
        ("models/no-such-model/versions/1", "NOT_FOUND"),
        ("models/{model}/versions/7", "NOT_FOUND"),
        ("models/{model}/versions/production", "NOT_FOUND"),
    ],
)
async def test_reproducing_an_unknown_or_malformed_version_name_is_refused_naming_it(
    registry, name: str, code: str
) -> None:  # noqa: ANN001
    client, _ = registry
    model = await new_model(client)  # a model without versions or aliases
    request = registry_pb2.ReproduceModelVersionRequest(name=name.format(model=model))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in client.stub.ReproduceModelVersion(request, timeout=60):
            pass
    assert caught.value.code() == getattr(grpc.StatusCode, code), caught.value.details()
    assert refused_fields(caught.value) == ["name"]


async def test_reproducing_a_version_appends_nothing_to_the_log(registry) -> None:  # noqa: ANN001
    client, settings = registry
    model = await new_model(client)
    version = await client.train(model, spec_json(num_boost_round=20))
    await client.set_alias(model, "canary", 1)
    pool = await eventlog.create_pool(settings.database_url, max_size=2)
    try:
        head = await EventLog(pool).head()
        stages = []
        result = await client.reproduce(model, "canary", on_progress=lambda p: stages.append(p.stage))
        assert await EventLog(pool).head() == head
    finally:
        await pool.close()
    assert result.identical and result.retrained_sha256 == result.stored_sha256 == version.sha256
    assert result.name == f"models/{model}/versions/1" and not result.differences
    assert result.duration.ToTimedelta().total_seconds() > 0
    assert stages[0] == "labels" and stages[-1] == "compared"
    assert len(await client.list_versions(model)) == 1


async def test_reproducing_a_spec_whose_view_version_the_log_no_longer_knows_fails_naming_the_view(
    registry,
) -> None:  # noqa: ANN001
    """The registered views no longer hold the version a stored spec names (here its projection row
    is deleted; in life, a view's version hash computed differently since): retraining cannot start,
    and the fault is the state, not the name asked for."""
    client, settings = registry
    model = await new_model(client)
    gone = dataclasses.replace(MERCHANT_PAYMENTS, name="merchant_payments_gone")
    pool = await eventlog.create_pool(settings.database_url, max_size=2)
    try:
        await register_views(EventLog(pool), [gone])
        request = registry_pb2.RegisterModelVersionRequest(
            parent=f"models/{model}", artifact=b"{}", feature_names=["a"],
            spec_json=spec_json(views=[[gone.name, gone.version]], transforms=[], request_numbers=[], request_flags=[]),
        )  # fmt: skip
        await client.stub.RegisterModelVersion(request)
    finally:
        await pool.close()
    owner = await asyncpg.connect(settings.database_url)  # the table refuses deletes: only its owner can lift that
    try:
        async with owner.transaction():
            await owner.execute("ALTER TABLE feature_views DISABLE TRIGGER feature_views_no_update_delete")
            await owner.execute("DELETE FROM feature_views WHERE name = $1", gone.name)
            await owner.execute("ALTER TABLE feature_views ENABLE TRIGGER feature_views_no_update_delete")
    finally:
        await owner.close()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.reproduce(model, 1)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"'merchant_payments_gone' version '{gone.version}'" in caught.value.details()
    assert refused_fields(caught.value) == ["name"]
