"""Upcasting: old payload versions are upgraded when read, through one chain of pure functions; a
v1 -> v2 contract change with an upcaster folds old and new events to the same features, offline
and online alike, while the log keeps the v1 payloads it was given."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest

from d2d import eventlog
from d2d.client import FeatureClient, IngestClient, make_event
from d2d.contracts.upcasting import UPCASTERS, UpcastError, Upcasters, upcast_event
from d2d.eventlog import EventLog, NewEvent
from d2d.features.fold import ViewState, fold_event
from d2d.features.offline import FrameRow, training_frame
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.training.labels import LabelDefinition
from d2d.training.pipeline import labeled_examples
from d2d.training.spec import TrainingSpec
from tests.conftest import settings_env
from tests.upcasting_domain import METER_READING, METER_USAGE, SCHEMA_V1, SCHEMA_V2, VIEWS, meter_reading_v1_v2

# -- the registry --------------------------------------------------------------------------------


def _renamed(old: str, new: str):  # noqa: ANN202
    def step(payload: dict[str, Any]) -> dict[str, Any]:
        return {(new if k == old else k): v for k, v in payload.items()}

    return step


def test_upcasters_chain_any_older_version_to_the_newest() -> None:
    registry = Upcasters()
    registry.register("t.x", 1, _renamed("a", "b"))
    registry.register("t.x", 2, _renamed("b", "c"))
    original = {"a": 1, "k": "v"}
    assert registry.upcast("t.x", 1, original) == (3, {"c": 1, "k": "v"})
    assert registry.upcast("t.x", 2, {"b": 1}) == (3, {"c": 1})
    assert original == {"a": 1, "k": "v"}, "the payload read from the log is not changed"
    assert registry.latest_version("t.x") == 3


def test_the_newest_version_an_unknown_newer_one_and_a_type_without_upcasters_pass_through_unchanged() -> None:
    registry = Upcasters()
    registry.register("t.x", 1, _renamed("a", "b"))
    for event_type, version in (("t.x", 2), ("t.x", 7), ("t.other", 1)):
        payload = {"a": 1}
        got_version, got = registry.upcast(event_type, version, payload)
        assert (got_version, got) == (version, {"a": 1}) and got is payload


def test_a_version_without_an_upcaster_between_two_that_have_one_is_the_identity() -> None:
    registry = Upcasters()
    registry.register("t.x", 1, _renamed("a", "b"))
    registry.register("t.x", 3, _renamed("b", "c"))  # v2 -> v3 was a compatible change: no upcaster
    assert registry.upcast("t.x", 1, {"a": 1}) == (4, {"c": 1})
    assert registry.upcast("t.x", 2, {"b": 1}) == (4, {"c": 1})


def test_a_failing_upcaster_is_an_upcast_error_naming_the_step_and_the_function() -> None:
    registry = Upcasters()
    registry.register(METER_READING, 1, meter_reading_v1_v2)
    with pytest.raises(UpcastError, match=r"meter\.reading v1 -> v2: upcaster tests\.upcasting_domain:meter_reading"):
        registry.upcast(METER_READING, 1, {"meter_id": "m"})  # no kwh


def test_a_second_different_upcaster_for_the_same_step_is_refused() -> None:
    def to_b(payload: dict[str, Any]) -> dict[str, Any]:
        return {"b": payload["a"]}

    def to_z(payload: dict[str, Any]) -> dict[str, Any]:
        return {"z": payload["a"]}

    registry = Upcasters()
    registry.register("t.x", 1, to_b)
    registry.register("t.x", 1, to_b)  # the same function again (a module imported twice)
    with pytest.raises(ValueError, match="already has upcaster .*to_b; refusing .*to_z"):
        registry.register("t.x", 1, to_z)
    with pytest.raises(ValueError, match="from_version"):
        registry.register("t.x", 0, to_b)


def test_the_fold_counts_an_event_whose_upcaster_fails_nowhere_and_moves_on() -> None:
    state = ViewState(METER_USAGE)
    state.apply(fold_event(1, METER_READING, 1, 1_000.0, {"meter_id": "m1"}))  # v1 without kwh: cannot upcast
    state.apply(fold_event(2, METER_READING, 1, 1_001.0, {"meter_id": "m1", "kwh": 2.5}))
    values = state.values("m1", 1_001.0)
    assert values["readings_lifetime"] == 1 and values["kwh_sum_lifetime"] == 2.5
    assert state.watermark == 2


# -- a v1 -> v2 change on a real log -------------------------------------------------------------

METERS = [f"m{i}" for i in range(6)]
READINGS = 240  # the first half written as v1, before v2 is registered


def facts(start: datetime) -> list[tuple[uuid.UUID, str, datetime, float]]:
    """(event id, meter, occurred_at, kWh): readings every 10 minutes, in time order."""
    rng = random.Random(3)
    return [
        (uuid.UUID(int=rng.getrandbits(128)), rng.choice(METERS), start + timedelta(minutes=10 * i),
         round(rng.uniform(0.1, 9.9), 3))
        for i in range(READINGS)
    ]  # fmt: skip


def v1(meter: str, kwh: float) -> dict[str, Any]:
    return {"meter_id": meter, "kwh": kwh}


def v2(meter: str, kwh: float) -> dict[str, Any]:
    return {"meter_id": meter, "reading": {"value": kwh, "unit": "kWh"}}


def frame_rows(all_facts: list[tuple[uuid.UUID, str, datetime, float]]) -> list[FrameRow]:
    """Every meter every 3 hours, and just after the last reading."""
    first, last = all_facts[0][2], all_facts[-1][2]
    times = [first + timedelta(hours=3 * k) for k in range(int((last - first) / timedelta(hours=3)) + 1)] + [last]
    return [FrameRow({"meter": m}, t) for t in times for m in METERS]


async def wait_caught_up(features: FeatureClient, head: int, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        answer = await features.get_online(["meter_usage.readings_lifetime"], [{"meter": "m0"}])
        if answer.watermark >= head:
            return
        assert asyncio.get_running_loop().time() < deadline, "features did not catch up"
        await asyncio.sleep(0.2)


async def test_v1_and_v2_events_fold_to_the_features_of_an_all_v2_log_offline_and_online(
    event_log: EventLog, database_url: str, postgres: EmbeddedPostgres, nats_server: NatsServer, namespace: str,
    start_service,  # noqa: ANN001
) -> None:  # fmt: skip
    all_facts = facts(datetime.now(UTC).replace(microsecond=0) - timedelta(days=2))
    old, new = all_facts[: READINGS // 2], all_facts[READINGS // 2 :]
    ingest_port, features_port = free_port(), free_port()
    env = {
        **settings_env(database_url, nats_server.url, namespace, ingest_port),
        "D2D_UPCASTERS": "tests.upcasting_domain",
    }
    start_service(["-m", "services.ingest", "serve"], env, "ingest")
    start_service(["-m", "services.ingest", "relay"], env, "relay")
    features_env = {**env, "D2D_FEATURES_ADDR": f"127.0.0.1:{features_port}",
                    "D2D_FEATURE_VIEWS": "tests.upcasting_domain", "D2D_FEATURES_CONSUMER": "meters"}  # fmt: skip
    start_service(["-m", "services.features"], features_env, "features")

    async with IngestClient(f"127.0.0.1:{ingest_port}") as ingest:
        await ingest.wait_ready()
        await ingest.create_contract_version(METER_READING, owner="team-energy", json_schema=SCHEMA_V1)
        sent = await ingest.append([make_event(METER_READING, "meter", m, v1(m, kwh), occurred_at=t, event_id=i,
                                               schema_version=1) for i, m, t, kwh in old])  # fmt: skip
        assert all(r.WhichOneof("outcome") == "seq" for r in sent.results)
        # BACKWARD (the default): readers see v1 payloads only through the upcaster, which is checked instead.
        registered = await ingest.create_contract_version(METER_READING, owner="team-energy", json_schema=SCHEMA_V2)
        assert registered.name.endswith("/versions/2")
        sent = await ingest.append([make_event(METER_READING, "meter", m, v2(m, kwh), occurred_at=t, event_id=i,
                                               schema_version=2) for i, m, t, kwh in new])  # fmt: skip
        assert all(r.WhichOneof("outcome") == "seq" for r in sent.results)

    # The log keeps what was written: v1 payloads as v1, and the v2 registration names its upcaster.
    stored = [e for e in await event_log.read(0, 10_000) if e.type == METER_READING]
    assert [(e.schema_version, e.payload) for e in stored] == (
        [(1, v1(m, kwh)) for _, m, _, kwh in old] + [(2, v2(m, kwh)) for _, m, _, kwh in new]
    )
    contracts = [e.payload for e in await event_log.read(0, 10_000, types=["contract.registered"])]
    assert [c.get("upcaster") for c in contracts if c["event_type"] == METER_READING] == [
        None, "tests.upcasting_domain:meter_reading_v1_v2"
    ]  # fmt: skip

    # (a) Offline: the mixed log gives the frame of a log holding the same facts, all as v2.
    rows = frame_rows(all_facts)
    mixed = await training_frame(event_log, VIEWS, rows)
    all_v2_url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    await eventlog.migrate(all_v2_url)
    pool = await eventlog.create_pool(all_v2_url, role="d2d_ingest")
    try:
        all_v2_log = EventLog(pool)
        await all_v2_log.append([NewEvent(i, METER_READING, 2, "meter", m, t, _json(v2(m, kwh)))
                                 for i, m, t, kwh in all_facts])  # fmt: skip
        expected = await training_frame(all_v2_log, VIEWS, rows)
    finally:
        await pool.close()
    pd.testing.assert_frame_equal(mixed.drop(columns="watermark"), expected.drop(columns="watermark"), check_exact=True)
    last = mixed.iloc[-len(METERS) :]
    assert list(last["meter_usage.readings_lifetime"]) == [sum(1 for f in all_facts if f[1] == m) for m in METERS]
    assert set(last["meter_usage.unit_last_lifetime"]) == {"kWh"}

    # Without the upcaster the v1 readings would fold to nothing: the equality above is its doing.
    with _without_upcaster():
        unupcast = await training_frame(event_log, VIEWS, rows)
    assert not unupcast["meter_usage.kwh_sum_lifetime"].equals(mixed["meter_usage.kwh_sum_lifetime"])

    # (b) Online: the features service answers what the offline frame says (zero skew).
    head = await event_log.head()
    as_of = all_facts[-1][2]
    async with FeatureClient(f"127.0.0.1:{features_port}") as online:
        await online.wait_ready()
        await wait_caught_up(online, head)
        answer = await online.get_online(["meter_usage.*"], [{"meter": m} for m in METERS], as_of=as_of)
    offline = await training_frame(event_log, VIEWS, [FrameRow({"meter": m}, as_of, answer.watermark) for m in METERS])
    names = [c for c in offline.columns if "." in c]
    offline_values = [{n: _none(offline.at[i, n]) for n in names} for i in range(len(METERS))]
    assert answer.rows == offline_values
    assert [r["meter_usage.kwh_max_lifetime"] for r in answer.rows] == [
        max(kwh for _, m, _, kwh in all_facts if m == meter) for meter in METERS
    ]


async def test_training_reads_old_payloads_upcast(event_log: EventLog) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    all_facts = facts(start)
    events = [NewEvent(i, METER_READING, 1 if n < READINGS // 2 else 2, "meter", m, t,
                       _json(v1(m, kwh) if n < READINGS // 2 else v2(m, kwh)))
              for n, (i, m, t, kwh) in enumerate(all_facts)]  # fmt: skip
    _, faulty, read_at, _ = all_facts[10]  # a v1 reading, labelled 1 by a fault 5 minutes later
    fault = _json({"meter_id": faulty})
    events.append(NewEvent(uuid.uuid4(), "meter.fault", 1, "meter", faulty, read_at + timedelta(minutes=5), fault))
    await event_log.append(events)
    label = LabelDefinition(example_type=METER_READING, outcome_type="meter.fault", join_field="meter_id",
                            window_seconds=3600)  # fmt: skip
    examples = await labeled_examples(
        event_log, TrainingSpec(((METER_USAGE.name, METER_USAGE.version),), label, to_seq=await event_log.head())
    )
    assert {e.label for e in examples} == {0, 1}
    assert [e.payload for e in examples] == [
        v2(m, kwh) for _, m, t, kwh in all_facts if all_facts[-1][2] - t >= label.window
    ]


def test_upcast_event_gives_the_same_object_when_nothing_changes() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    current = eventlog.StoredEvent(1, uuid.uuid4(), METER_READING, 2, "meter", "m0", at, at, v2("m0", 1.0), {})
    old = eventlog.StoredEvent(2, uuid.uuid4(), METER_READING, 1, "meter", "m0", at, at, v1("m0", 1.0), {})
    assert upcast_event(current) is current
    assert upcast_event(old).schema_version == 2 and upcast_event(old).payload == v2("m0", 1.0)
    assert old.payload == v1("m0", 1.0)


def _json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))


def _none(value: Any) -> Any:
    """pandas turns None into NaN in float columns; the online answer says None."""
    return None if value is None or value != value else value


@contextmanager
def _without_upcaster() -> Iterator[None]:
    UPCASTERS.unregister(METER_READING, 1)
    try:
        yield
    finally:
        UPCASTERS.register(METER_READING, 1, meter_reading_v1_v2)


async def test_a_snapshot_folded_under_other_upcasters_is_not_restored(event_log: EventLog) -> None:
    """A snapshot holds state folded with the upcasters of its time: once an upcaster for a view's
    source is declared (or removed), the old events fold differently, so the state is rebuilt."""
    from d2d.features.online import OnlineState, restore
    from d2d.features.store import Snapshot, save_snapshot

    async def snapshot_at(consumer: str, watermark: int) -> None:
        state = OnlineState(VIEWS)
        state.offer_event(watermark, METER_READING, 1, 1_000.0, {"meter_id": "m1", "kwh": 2.0})
        await save_snapshot(event_log.pool, Snapshot(consumer, watermark, 1, state.fold_key(), state.to_bytes()))

    await snapshot_at("with-upcaster", 7)
    assert (await restore(event_log, VIEWS, "with-upcaster")).watermark == 7  # same upcasters: restored
    with _without_upcaster():
        assert (await restore(event_log, VIEWS, "with-upcaster")).watermark == 0  # rebuilt from the log
        await snapshot_at("without-upcaster", 9)
        assert (await restore(event_log, VIEWS, "without-upcaster")).watermark == 9
    assert (await restore(event_log, VIEWS, "without-upcaster")).watermark == 0


async def test_a_breaking_version_with_an_upcaster_is_backward_compatible_when_the_upcast_payloads_pass_it(
    event_log: EventLog,
) -> None:
    """BACKWARD means new readers read old data. With an upcaster to the new version, readers see old
    payloads only upcast, so the registry checks those (the newest stored ones) against the new
    schema instead of comparing the schemas; without one, the restructuring is refused."""
    from d2d.contracts.registry import ContractRegistry
    from d2d.errors import Refusal

    event_type = "meter.sampled"
    registry = ContractRegistry(event_log)
    await registry.register(event_type, owner="team-energy", json_schema=SCHEMA_V1)
    stored = await event_log.append(
        [NewEvent(uuid.uuid4(), event_type, 1, "meter", "m1", datetime.now(UTC), _json(v1("m1", 1.5 + i)))
         for i in range(3)]
    )  # fmt: skip

    with pytest.raises(Refusal) as refused:
        await registry.register(event_type, owner="team-energy", json_schema=SCHEMA_V2)
    assert refused.value.code == "FAILED_PRECONDITION" and "BACKWARD" in refused.value.message

    def forgets_the_unit(payload: dict[str, Any]) -> dict[str, Any]:
        return {"meter_id": payload["meter_id"], "reading": {"value": payload["kwh"]}}

    with UPCASTERS.declared(event_type, 1, forgets_the_unit), pytest.raises(Refusal) as refused:
        await registry.register(event_type, owner="team-energy", json_schema=SCHEMA_V2)
    assert refused.value.code == "FAILED_PRECONDITION" and refused.value.field == "payload.reading.unit"
    assert f"event seq {stored[0].seq} (version 1), upcast, does not pass the new schema" in refused.value.message

    with UPCASTERS.declared(event_type, 1, meter_reading_v1_v2):
        contract = await registry.register(event_type, owner="team-energy", json_schema=SCHEMA_V2)
    assert contract.version == 2 and contract.compatibility.value == "BACKWARD"
    [registered] = await event_log.newest(below=None, limit=1, event_type="contract.registered", entity_id=event_type)
    assert registered.payload["upcaster"] == "tests.upcasting_domain:meter_reading_v1_v2"
