"""`replay state`: the platform's state as it was at a log position or time, rebuilt from the log
(real services deciding, real Postgres and NATS), through the Python API, the AuditService and the CLI."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from google.rpc import error_details_pb2

from d2d import eventlog
from d2d.client import AuditClient, RegistryClient, ServingClient, error_details
from d2d.eventlog import EventLog
from d2d.features.offline import FrameRow, training_frame
from d2d.replay.state import replay_state
from d2d.runtime.servers import EmbeddedPostgres, NatsServer
from d2d.sim.views import VIEWS
from tests.conftest import MODEL, Platform, audit_service, requests_for, rule_outcome, run_cli, serving_platform

EARLY = 6000  # a log position inside the simulated payments


@dataclass
class History:
    platform: Platform
    before_promotion: int  # the log's head before the policy change and the promotion to version 2
    promoted_at: int  # the seq of the model.alias_set that made version 2 production
    first: list[str]  # decisions by version 1
    second: list[str]  # decisions by version 2, after the promotion
    labelled: int


@pytest.fixture(scope="module")
def history(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    """30 decisions by version 1 under the default policy; then a new policy and version 2 promoted;
    then 40 decisions by version 2; outcomes for every third decision."""
    for platform in serving_platform(postgres, nats_server, tmp_path_factory):
        yield asyncio.run(make_history(platform))


async def make_history(platform: Platform) -> History:
    pool = await eventlog.create_pool(platform.database_url, max_size=2)
    log = EventLog(pool)
    try:
        async with ServingClient(platform.serving) as serving:
            await serving.wait_ready()
            first = [a.decision_id for a in await serving.batch_predict(requests_for(platform, 30))]
            before = await log.head()
            async with RegistryClient(platform.registry) as registry:
                await registry.set_policy(MODEL, epsilon=0.25, threshold=0.3)
                await registry.set_alias(MODEL, "production", 2)
            await asyncio.sleep(1.0)  # serving follows the alias and policy on the bus
            [promoted] = [e for e in await log.read(before, 100, types=["model.alias_set"])]
            second = [a.decision_id for a in await serving.batch_predict(requests_for(platform, 40, offset=100))]
        decided = first + second
        await log.append([rule_outcome(d, int(i % 2 == 0), datetime.now(UTC)) for i, d in enumerate(decided[::3])])
        return History(platform, before, promoted.seq, first, second, len(decided[::3]))
    finally:
        await pool.close()


@pytest.fixture
async def log(history: History) -> AsyncIterator[EventLog]:
    pool = await eventlog.create_pool(history.platform.database_url, max_size=4)
    yield EventLog(pool)
    await pool.close()


@pytest.fixture
async def audit(history: History) -> AsyncIterator[str]:
    async with audit_service(history.platform.database_url) as addr:
        yield addr


def refusal(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    fields = [
        v.field for d in error_details(error) if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations
    ]
    return error.code().name, fields


async def test_state_before_a_promotion_shows_the_old_version_and_the_then_policy(
    history: History, log: EventLog
) -> None:
    url = history.platform.database_url
    before = await replay_state(log, url, seq=history.before_promotion)
    model = before["models"][MODEL]
    assert model["aliases"]["production"]["version"] == 1
    assert (model["policy"]["epsilon"], model["policy"]["threshold"]) == (0.0, 0.5)
    assert [v["version"] for v in model["versions"]] == [1, 2]
    assert before["joins"][MODEL]["decisions"] == len(history.first)
    assert before["joins"][MODEL]["labelled"] == 0
    assert [(m["model_version"], m["arm"], m["decisions"]) for m in before["metrics"]] == [
        (1, "production", len(history.first))
    ]

    after = await replay_state(log, url)
    model = after["models"][MODEL]
    assert model["aliases"]["production"] == {"version": 2, "set_seq": history.promoted_at}
    assert (model["policy"]["epsilon"], model["policy"]["threshold"]) == (0.25, 0.3)
    assert after["joins"][MODEL]["decisions"] == len(history.first) + len(history.second)
    assert after["joins"][MODEL]["labelled"] == history.labelled
    by_version = {m["model_version"]: m for m in after["metrics"]}
    assert by_version[1]["decisions"] == len(history.first) and by_version[2]["decisions"] == len(history.second)
    assert by_version[1]["labelled"] + by_version[2]["labelled"] == history.labelled

    just_before = await replay_state(log, url, seq=history.promoted_at - 1)
    assert just_before["models"][MODEL]["aliases"]["production"]["version"] == 1
    at_promotion = await replay_state(log, url, seq=history.promoted_at)
    assert at_promotion["models"][MODEL]["aliases"]["production"]["version"] == 2


async def test_state_at_a_time_is_the_state_after_the_events_recorded_by_then(history: History, log: EventLog) -> None:
    [promotion] = [e for e in await log.read(history.promoted_at - 1, 1)]
    state = await replay_state(log, history.platform.database_url, time=promotion.recorded_at)
    first_after = await log.get(uuid.UUID(history.second[0]))
    assert history.promoted_at <= state["seq"] < first_after.seq
    assert state["models"][MODEL]["aliases"]["production"]["version"] == 2
    assert state["joins"][MODEL]["decisions"] == len(history.first)


async def test_feature_values_as_of_an_early_seq_equal_the_training_frame(history: History, log: EventLog) -> None:
    [event] = await log.read(EARLY - 1, 1, types=["payment.authorized"])
    customer, merchant = event.payload["customer_id"], event.payload["merchant_id"]
    asked = [f"customer/{customer}", f"merchant/{merchant}", "customer/nobody"]
    state = await replay_state(log, history.platform.database_url, seq=EARLY, entities=asked)
    features = state["features"]
    assert set(features) == {v.name for v in VIEWS}
    for view in VIEWS:
        assert features[view.name]["watermark"] == EARLY and features[view.name]["version"] == view.version
        assert features[view.name]["registered_after"]  # the features service registered its views later
    as_of = features["customer_payments"]["as_of"]
    frame = await training_frame(
        log, VIEWS, [FrameRow({"customer": customer, "merchant": merchant}, datetime.fromisoformat(as_of), EARLY)]
    )
    customer_values = features["customer_payments"]["values"][f"customer/{customer}"]
    merchant_values = features["merchant_payments"]["values"][f"merchant/{merchant}"]
    assert customer_values["known"] and customer_values["values"]["count_lifetime"] >= 1
    for view, values in (("customer_payments", customer_values), ("merchant_payments", merchant_values)):
        for feature, value in values["values"].items():
            offline = frame.at[0, f"{view}.{feature}"]
            assert value == (None if offline is None or offline != offline else offline), (view, feature)
    nobody = features["customer_payments"]["values"]["customer/nobody"]
    assert not nobody["known"] and nobody["values"]["count_lifetime"] == 0
    # a later position has folded more: the same customer's lifetime count cannot shrink
    later = await replay_state(log, history.platform.database_url, entities=[f"customer/{customer}"])
    assert (
        later["features"]["customer_payments"]["values"][f"customer/{customer}"]["values"]["count_lifetime"]
        >= customer_values["values"]["count_lifetime"]
    )


async def test_replay_state_through_the_audit_service_and_the_cli(history: History, log: EventLog, audit: str) -> None:
    head = await log.head()
    async with AuditClient(audit) as client:
        state = await client.replay_state(seq=history.before_promotion, entities=["customer/nobody"])
        assert state["seq"] == history.before_promotion
        assert state["models"][MODEL]["aliases"]["production"]["version"] == 1
        with pytest.raises(grpc.aio.AioRpcError) as past:
            await client.replay_state(seq=head + 1000)
        assert refusal(past.value) == ("INVALID_ARGUMENT", ["seq"])
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await client.replay_state(seq=1, entities=["customer"])
        assert refusal(malformed.value) == ("INVALID_ARGUMENT", ["entities"])
    env = {
        "D2D_DATABASE_URL": history.platform.database_url, "D2D_NATS_URL": history.platform.nats_url,
        "D2D_AUDIT_ADDR": audit,
    }  # fmt: skip
    args = ("replay", "state", "--as-of", str(history.before_promotion), "--entity", "customer/nobody")
    code, out = await run_cli(env, *args)
    assert code == 0, out
    assert "production -> 1" in out and "customer/nobody (unknown: defaults)" in out
    assert all(len(line) <= 100 for line in out.splitlines())
    code, out = await run_cli(env, *args, "--json")
    assert code == 0 and json.loads(out)["models"] == state["models"]
    code, out = await run_cli(env, "replay", "state", "--as-of", str(head + 1000))
    assert code != 0 and "INVALID_ARGUMENT" in out
