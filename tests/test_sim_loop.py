"""The simulator in the closed loop (d2d.sim.loop) against the real services: ingest, its relay,
features, registry and serving as their own processes on real Postgres and NATS. A model is trained
on a history loaded into the log, then the loop sends the next hours of payments through ingest, asks
serving for each decision, and sends chargebacks only for approved fraudulent payments, in event-time
order."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from d2d import eventlog
from d2d.client import FeatureClient, IngestClient, RegistryClient, ServingClient
from d2d.eventlog import EventLog, NewEvent
from d2d.features.offline import FrameRow, training_frame
from d2d.outcomes import outcome_event_id
from d2d.replay.partition import same_value
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.runtime.services import service
from d2d.runtime.supervisor import Supervisor
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.loop import MAX_BATCH_SPAN, LoopState, payment_entities, payment_request, run_loop, wait_folded, waves
from d2d.sim.training import default_spec
from d2d.sim.views import VIEWS
from d2d.training.labels import LabelDefinition
from tests.conftest import ROOT, register_sim_contracts, seed_test_key

MODEL = "loop"
# Short chargeback delays and a 2-day label window: a few days of history are enough to train on.
SIM = SimConfig(
    seed=21, customers=400, merchants=40, days=5.0, payments_per_day=1_500, fraud_rate=0.05,
    chargeback_delay_days=(0.25, 1.5),
)  # fmt: skip
HISTORY_DAYS = 4.0
LOOP_DAYS = 1.0
LABEL = LabelDefinition("payment.authorized", "payment.chargeback", "payment_id", 2 * 86_400)


@dataclass
class Services:
    url: str
    addrs: dict[str, str]


@pytest.fixture(scope="module")
def services(
    postgres: EmbeddedPostgres, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    url = postgres.create_database(f"loop_{uuid.uuid4().hex[:10]}")
    logs = tmp_path_factory.mktemp("loop-logs")
    names = ("ingest", "features", "registry", "serving")
    addrs = {name: f"127.0.0.1:{free_port()}" for name in names}
    env = {
        "D2D_DATABASE_URL": url, "D2D_NATS_URL": nats_server.url, "D2D_NATS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
        "D2D_DATA_DIR": str(logs), **{service(name).addr_env: addr for name, addr in addrs.items()},
    }  # fmt: skip
    cutoff = SIM.start + timedelta(days=HISTORY_DAYS)
    history = [e for e in PaymentsSimulator(SIM).events() if e.occurred_at < cutoff]

    async def load() -> None:
        await eventlog.migrate(url)
        await seed_test_key(url)
        pool = await eventlog.create_pool(url, max_size=2)
        log = EventLog(pool)
        for i in range(0, len(history), 5000):
            await log.append([e.as_new_event() for e in history[i : i + 5000]])
        await pool.close()

    asyncio.run(load())
    supervisor = Supervisor(logs, cwd=ROOT, base_env=env)
    for name in ("ingest", "ingest-relay", "features", "registry", "serving"):
        supervisor.spawn(name, service(name).args)

    async def train_and_deploy() -> None:
        async with (
            IngestClient(addrs["ingest"]) as ingest,
            RegistryClient(addrs["registry"]) as registry,
            FeatureClient(addrs["features"]) as features,
        ):
            await ingest.wait_ready()
            await register_sim_contracts(ingest)
            await registry.wait_ready()
            await features.wait_ready()
            await wait_folded(features, len(history))
            spec = {**default_spec().to_dict(), "label": LABEL.to_dict(), "num_boost_round": 40}
            await registry.create_model(MODEL)
            await registry.train(MODEL, json.dumps(spec))
            await registry.set_alias(MODEL, "production", 1)
            # Decline the riskiest payments; explore a fifth of the time so some declines are approved.
            await registry.set_policy(MODEL, epsilon=0.2, threshold=0.1, actions=["approve", "decline"])

    try:
        asyncio.run(train_and_deploy())
        yield Services(url, addrs)
    finally:
        supervisor.stop_all()


async def _logged(url: str, after: int) -> list[eventlog.StoredEvent]:
    pool = await eventlog.create_pool(url, max_size=1)
    try:
        log, found = EventLog(pool), []
        while page := await log.read(after, 5000):
            found += page
            after = page[-1].seq
        return found
    finally:
        await pool.close()


@dataclass
class Looped:
    counts: dict[str, int]
    state: LoopState
    before: int  # the log's length before the loop
    carried: set[str]  # history payments whose chargebacks the loop sent
    progress: list[int]


@pytest.fixture(scope="module")
async def looped(services: Services) -> Looped:
    """One day of payments through the loop, right after the history."""
    sim = PaymentsSimulator(SIM)
    start = SIM.start + timedelta(days=HISTORY_DAYS)
    end = start + timedelta(days=LOOP_DAYS)
    # The history's frauds whose chargebacks fall due in the loop's hours, as if they had been approved.
    state = LoopState(reference_sent=True)
    for p in sim.payment_events():
        if p.occurred_at < start and (chargeback := sim.chargeback(p.payload["payment_id"])) is not None:
            if start <= chargeback.occurred_at:
                state.pending.append((chargeback.occurred_at, chargeback.event_id, chargeback))
    state.pending.sort()
    carried = {e.entity_id for at, _, e in state.pending if at < end}
    before = len(await _logged(services.url, 0))
    seen: list[int] = []
    async with (
        IngestClient(services.addrs["ingest"]) as ingest, ServingClient(services.addrs["serving"]) as serving,
    ):  # fmt: skip
        counts = await run_loop(
            sim, ingest, serving, MODEL, start_day=HISTORY_DAYS, days=LOOP_DAYS, state=state,
            on_progress=lambda c, _: seen.append(c.payments),
        )  # fmt: skip
    return Looped(counts, state, before, carried, seen)


async def test_loop_decides_every_payment_and_charges_back_only_approved_fraud(
    services: Services, looped: Looped
) -> None:
    sim = PaymentsSimulator(SIM)
    truth = sim.truth()
    start = SIM.start + timedelta(days=HISTORY_DAYS)
    end = start + timedelta(days=LOOP_DAYS)
    counts, state, before, carried, seen = looped.counts, looped.state, looped.before, looped.carried, looped.progress
    print(f"\nloop: {counts}, {len(carried)} chargebacks carried in from the history")
    window = [p for p in sim.payment_events() if start <= p.occurred_at < end]
    assert counts["payments"] == len(window) == seen[-1] > 0
    assert counts["approved"] + counts["declined"] == counts["payments"]
    assert counts["declined"] > 0 and counts["explored"] > 0

    events = await _logged(services.url, before)
    decisions = {e.payload["context"]["payment_id"]: e.payload for e in events if e.type == "decision.made"}
    assert set(decisions) == {p.payload["payment_id"] for p in window}
    assert all(d["request_id"] == d["context"]["payment_id"] and d["unit_id"] for d in decisions.values())
    assert sum(d["action"] == "approve" for d in decisions.values()) == counts["approved"]
    assert sum(d["explored"] for d in decisions.values()) == counts["explored"]

    chargebacks = [e for e in events if e.type == "payment.chargeback"]
    expected = {
        pid for pid, d in decisions.items()
        if d["action"] == "approve" and truth[pid].is_fraud and truth[pid].chargeback_at < end
    }  # fmt: skip
    logged = {e.payload["payment_id"] for e in chargebacks}
    assert expected and logged & set(decisions) == expected
    assert logged - set(decisions) == carried  # the history's, carried in by the state
    assert counts["chargebacks"] == len(chargebacks) == len(expected) + len(carried)
    declined_fraud = [pid for pid, d in decisions.items() if d["action"] == "decline" and truth[pid].is_fraud]
    assert not {e.payload["payment_id"] for e in chargebacks} & set(declined_fraud)
    # Chargebacks went out in event-time order, each in its place among the payments; a payment goes out
    # at most one window's span behind a later one (a window is sent in waves, see d2d.sim.loop).
    domain = [e for e in events if e.type in ("payment.authorized", "payment.chargeback")]
    in_time = sorted(domain, key=lambda e: e.occurred_at)
    assert [e.type for e in domain] == [e.type for e in in_time]
    payments = [e.occurred_at for e in domain if e.type == "payment.authorized"]
    assert all(at > max(payments[:i], default=at) - MAX_BATCH_SPAN for i, at in enumerate(payments))
    assert payments != sorted(payments), "waves reorder payments inside a window"
    # Chargebacks due after the window wait in the state for the next run.
    assert all(at >= end for at, _, _ in state.pending)


def test_waves_put_each_payment_after_every_earlier_payment_of_its_entities() -> None:
    sim = PaymentsSimulator(SIM)
    window = list(sim.payment_events())[:400]
    waves_ = waves(window)
    assert sorted(p.event_id for w in waves_ for p in w) == sorted(p.event_id for p in window)
    wave_of = {p.event_id: i for i, w in enumerate(waves_) for p in w}
    for i, payment in enumerate(window):
        mine = set(payment_entities(payment).items())
        for earlier in window[:i]:
            if mine & set(payment_entities(earlier).items()):
                assert wave_of[earlier.event_id] < wave_of[payment.event_id]
    assert 1 < len(waves_) < len(window) / 2, "waves decide many payments per round trip"


async def test_each_decision_reads_exactly_the_features_its_payments_training_row_reads(
    services: Services, looped: Looped
) -> None:
    """Decided before it is in the log, on every earlier payment of its entities: each decision's logged
    features equal the point-in-time features of its payment with the log just before it (the training
    row `rows_from_events` makes of it), so a model is served the inputs it was trained on."""
    events = await _logged(services.url, looped.before)
    payments = {e.payload["payment_id"]: e for e in events if e.type == "payment.authorized"}
    decisions = [e for e in events if e.type == "decision.made"]
    assert decisions and all(d.seq < payments[d.payload["context"]["payment_id"]].seq for d in decisions)
    rows = []
    for d in decisions:
        payment = payments[d.payload["context"]["payment_id"]]
        rows.append(FrameRow(payment_entities(payment), payment.occurred_at, payment.seq - 1))
    pool = await eventlog.create_pool(services.url, max_size=1)
    try:
        frame = await training_frame(EventLog(pool), VIEWS, rows)
    finally:
        await pool.close()
    differences, compared = [], 0
    for i, d in enumerate(decisions):
        for name, logged in d.payload["features"].items():
            compared += 1
            offline = frame[name].iloc[i : i + 1].tolist()[0]  # a plain Python value; an empty mean is NaN
            if not same_value(logged, None if offline != offline else offline):
                differences.append((d.payload["context"]["payment_id"], name, logged, offline))
    print(f"\n{compared} logged feature values of {len(decisions)} decisions against their training rows")
    assert compared >= len(decisions) * 20
    assert not differences, differences[:10]


async def test_a_version_retrained_on_the_loops_decisions_serves_the_same_inputs(
    services: Services, looped: Looped
) -> None:
    """The feedback service's part (outcomes for approved payments) is played here by appending
    `outcome.recorded` events as the chargeback rule would; the registry then trains on the decisions."""
    truth = PaymentsSimulator(SIM).truth()
    events = await _logged(services.url, looped.before)
    outcomes = []
    for e in events:
        if e.type != "decision.made" or e.payload["action"] != "approve":
            continue
        decided_at = datetime.fromisoformat(e.payload["as_of"])
        chargeback_at = truth[e.payload["context"]["payment_id"]].chargeback_at
        fraud = chargeback_at is not None and chargeback_at - decided_at <= LABEL.window
        at = chargeback_at if fraud else decided_at + LABEL.window
        outcome_id = f"rule:chargeback:{e.entity_id}"
        payload = {
            "outcome_id": outcome_id, "decision_id": e.entity_id, "label": int(fraud),
            "occurred_at": at.isoformat().replace("+00:00", "Z"), "source": "rule", "rule": "chargeback",
            "window_closed": not fraud,
        }  # fmt: skip
        outcomes.append(
            NewEvent(
                outcome_event_id(outcome_id), "outcome.recorded", 1, "decision", e.entity_id, at, json.dumps(payload)
            )
        )
    pool = await eventlog.create_pool(services.url, max_size=1)
    try:
        await EventLog(pool).append(outcomes)
    finally:
        await pool.close()

    label = {"source": "decisions", "model": MODEL, "weighting": "inverse_propensity"}
    spec = {**default_spec().to_dict(), "label": label, "after_seq": looped.before, "num_boost_round": 40}
    async with RegistryClient(services.addrs["registry"]) as registry:
        first = await registry.get_version(MODEL, 1)
        retrained = await registry.train(MODEL, json.dumps(spec))
        assert list(retrained.feature_names) == list(first.feature_names)
        lineage = json.loads(retrained.lineage_json)
        assert lineage["weighting"] == "inverse_propensity"
        assert lineage["decisions"]["labelled"] == len(outcomes) == looped.counts["approved"]
        assert lineage["decisions"]["unlabelled"] == looped.counts["declined"]
        await registry.set_alias(MODEL, "production", retrained.name.rsplit("/", 1)[1])
    end = SIM.start + timedelta(days=HISTORY_DAYS + LOOP_DAYS)
    payment = [p for p in PaymentsSimulator(SIM).payment_events() if p.occurred_at < end][-1]  # the newest one
    async with ServingClient(services.addrs["serving"]) as serving:
        for _ in range(100):  # serving picks up the alias move
            request = payment_request(MODEL, payment)
            request.request_id = f"again-{uuid.uuid4()}"  # its own request id names the loop's decision
            answer = await serving.batch_predict([request])
            if answer[0].model_version == retrained.name:
                break
            await asyncio.sleep(0.1)
    assert answer[0].model_version == retrained.name
