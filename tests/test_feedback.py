"""The feedback service on real Postgres: outcomes recorded once and checked against the log,
outcome rules registered as events, and the log consumer that keeps the decision/outcome join
(`decision_outcomes`) equal to its rebuild, across restarts and crashes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import orjson
import pytest
from google.rpc import error_details_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from d2d import eventlog, projections, telemetry
from d2d.client import FeedbackClient, error_details, outcome_rule_request
from d2d.config import Settings
from d2d.contracts.registry import ContractRegistry
from d2d.eventlog import EventLog, NewEvent
from d2d.outcomes import outcome_event_id
from d2d.runtime.servers import EmbeddedPostgres, free_port
from d2d.runtime.services import service
from d2d.sim import load_contracts
from d2d.sim.outcomes import CHARGEBACK
from services.feedback.consumer import FeedbackConsumer, PositionMoved
from services.feedback.server import serve
from tests.conftest import rule_outcome, run_cli, seed_test_key

DECIDED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def decision(**overrides: Any) -> NewEvent:
    """A decision.made event as serving appends it (it passes the platform contract)."""
    decision_id = str(overrides.pop("decision_id", uuid.uuid4()))
    payload = {
        "decision_id": decision_id, "model": "fraud", "model_version": "models/fraud/versions/2",
        "arm": "production", "score": 0.2, "action": "approve", "propensity": 0.95, "explored": False,
        "features": {}, "inputs": [0.5], "feature_watermark": 10, "as_of": DECIDED.isoformat(),
        "entities": {"customer": "c1"}, "context": {"payment_id": f"p-{decision_id[:8]}"}, "unit_id": "c1",
        **overrides,
    }  # fmt: skip
    return NewEvent(
        uuid.UUID(decision_id), "decision.made", 1, "decision", decision_id, datetime.now(UTC),
        orjson.dumps(payload).decode(), {"producer": "serving"},
    )  # fmt: skip


def withdrawal(decision_id: str) -> NewEvent:
    payload = {"decision_id": decision_id, "model": "fraud", "reason": "the caller was answered with an error"}
    return NewEvent(
        uuid.uuid5(uuid.UUID(decision_id), "withdrawn"), "decision.withdrawn", 1, "decision", decision_id,
        datetime.now(UTC), orjson.dumps(payload).decode(),
    )  # fmt: skip


def outcome(decision_id: str, label: int, outcome_id: str | None = None) -> NewEvent:
    """An outcome.recorded event as the rule engine's drafts become, three days after the decision."""
    return rule_outcome(decision_id, label, DECIDED + timedelta(days=3), outcome_id)


def refusal(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    fields = [
        v.field for d in error_details(error) if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations
    ]
    return error.code().name, fields


async def register_sim_contracts(log: EventLog) -> None:
    contracts = ContractRegistry(log)
    for spec in load_contracts():
        await contracts.register(spec.event_type, owner=spec.owner, json_schema=spec.schema)


@pytest.fixture
async def feedback(database_url: str, event_log: EventLog) -> AsyncIterator[FeedbackClient]:
    """The feedback service in this process, on the test's database."""
    settings = Settings(database_url=database_url, addrs={"feedback": f"127.0.0.1:{free_port()}"})
    await seed_test_key(database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    client = FeedbackClient(settings.addr("feedback"))
    await client.wait_ready()
    yield client
    stop.set()
    await task
    await client.channel.close()


async def count(log: EventLog, event_type: str) -> int:
    return dict(await log.count_by_type()).get(event_type, 0)


async def join_rows(url: str) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        return {str(r["decision_id"]): dict(r) for r in await conn.fetch("SELECT * FROM decision_outcomes")}
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# RecordOutcome


async def test_an_outcome_is_recorded_once_and_the_same_outcome_again_returns_it(
    feedback: FeedbackClient, event_log: EventLog
) -> None:
    made = decision()
    await event_log.append([made])
    at = DECIDED + timedelta(days=2)
    first = await feedback.record_outcome(made.entity_id, label=1, occurred_at=at, outcome_id="chargeback-77")
    again = await feedback.record_outcome(made.entity_id, label=1, occurred_at=at, outcome_id="chargeback-77")
    assert again == first and first.seq > 0 and first.source == "api"
    assert first.name == f"decisions/{made.entity_id}/outcomes/chargeback-77"
    assert await count(event_log, "outcome.recorded") == 1
    assert await feedback.get_outcome(made.entity_id, "chargeback-77") == first
    stored = await event_log.get(outcome_event_id("chargeback-77"))
    assert stored is not None and stored.payload["label"] == 1 and stored.occurred_at == at


async def test_without_an_outcome_id_a_decision_gets_one_api_outcome(
    feedback: FeedbackClient, event_log: EventLog
) -> None:
    made = decision()
    await event_log.append([made])
    recorded = await feedback.record_outcome(made.entity_id, reward=12.5, occurred_at=DECIDED)
    assert recorded.outcome_id == f"api:{made.entity_id}" and recorded.reward == 12.5
    assert not recorded.HasField("label")
    assert await feedback.record_outcome(made.entity_id, reward=12.5, occurred_at=DECIDED) == recorded


@pytest.mark.parametrize(
    ("case", "code", "field"),
    [
        ("unknown decision", "NOT_FOUND", "outcome.decision"),
        ("not a decision id", "INVALID_ARGUMENT", "outcome.decision"),
        ("label 2", "INVALID_ARGUMENT", "outcome.label"),
        ("neither label nor reward", "INVALID_ARGUMENT", "outcome.label"),
        ("reward not finite", "INVALID_ARGUMENT", "outcome.reward"),
        ("same id, other label", "ALREADY_EXISTS", "outcome.label"),
        ("same id, other time", "ALREADY_EXISTS", "outcome.occur_time"),
        ("another outcome for the decision", "ALREADY_EXISTS", "outcome.decision"),
        ("withdrawn decision", "FAILED_PRECONDITION", "outcome.decision"),
    ],
)
async def test_a_bad_outcome_is_refused_naming_the_field_and_appends_nothing(
    feedback: FeedbackClient, event_log: EventLog, case: str, code: str, field: str
) -> None:
    made = decision()
    await event_log.append([made])
    decision_id = made.entity_id
    await feedback.record_outcome(decision_id, label=1, occurred_at=DECIDED, outcome_id="first")
    if case == "withdrawn decision":
        made = decision()
        decision_id = made.entity_id
        await event_log.append([made, withdrawal(decision_id)])
    head = await event_log.head()
    attempts = {
        "unknown decision": dict(decision_id=str(uuid.uuid4()), label=1),
        "not a decision id": dict(decision_id="payment-17", label=1),
        "label 2": dict(label=2, outcome_id="other"),
        "neither label nor reward": dict(outcome_id="other"),
        "reward not finite": dict(reward=float("nan"), outcome_id="other"),
        "same id, other label": dict(label=0, outcome_id="first"),
        "same id, other time": dict(label=1, outcome_id="first", occurred_at=DECIDED + timedelta(seconds=1)),
        "another outcome for the decision": dict(label=1, outcome_id="second"),
        "withdrawn decision": dict(label=1),
    }
    terms = {"decision_id": decision_id, "occurred_at": DECIDED, **attempts[case]}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await feedback.record_outcome(terms.pop("decision_id"), **terms)
    assert refusal(refused.value) == (code, [field]), refused.value.details()
    assert await event_log.head() == head  # nothing written


async def test_getting_an_outcome_that_is_not_there_is_not_found(feedback: FeedbackClient, event_log: EventLog) -> None:
    made = decision()
    await event_log.append([made])
    await feedback.record_outcome(made.entity_id, label=0, occurred_at=DECIDED, outcome_id="o1")
    for decision_id, outcome_id in ((made.entity_id, "o2"), (str(uuid.uuid4()), "o1")):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await feedback.get_outcome(decision_id, outcome_id)
        assert refusal(missing.value) == ("NOT_FOUND", ["name"])


# ---------------------------------------------------------------------------------------------
# Outcome rules


async def test_a_rule_is_registered_once_and_other_terms_under_its_name_are_refused(
    feedback: FeedbackClient, event_log: EventLog
) -> None:
    await register_sim_contracts(event_log)
    # the service registers D2D_OUTCOME_RULES's rules (the simulator's chargeback) once it can
    for _ in range(200):
        if [r.name for r in await feedback.list_rules()] == ["outcomeRules/chargeback"]:
            break
        await asyncio.sleep(0.05)
    stored = await feedback.get_rule("chargeback")
    assert stored.event_type == "payment.chargeback" and stored.window.seconds == CHARGEBACK.window_seconds
    assert stored.label == 1 and stored.otherwise_label == 0 and list(stored.observed_actions) == ["approve"]
    assert not stored.HasField("reward")
    assert await feedback.create_rule(CHARGEBACK) == stored
    assert await count(event_log, "outcome_rule.registered") == 1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await feedback.create_rule(dataclasses.replace(CHARGEBACK, window_seconds=86400))
    assert refusal(refused.value) == ("ALREADY_EXISTS", ["outcome_rule.window"])
    assert await count(event_log, "outcome_rule.registered") == 1


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"event_type": "payment.unheard_of"}, "FAILED_PRECONDITION", "outcome_rule.event_type"),
        ({"name": "Charge Back"}, "INVALID_ARGUMENT", "outcome_rule_id"),
        ({"label": 2}, "INVALID_ARGUMENT", "outcome_rule.label"),
        ({"label": None, "reward": None}, "INVALID_ARGUMENT", "outcome_rule.label"),
        ({"window_seconds": -1}, "INVALID_ARGUMENT", "outcome_rule.window"),
        ({"event_key": ""}, "INVALID_ARGUMENT", "outcome_rule.event_key"),
    ],
)
async def test_a_rule_that_cannot_work_is_refused_naming_the_term(
    feedback: FeedbackClient, event_log: EventLog, change: dict[str, Any], code: str, field: str
) -> None:
    await register_sim_contracts(event_log)
    terms = {**dataclasses.replace(CHARGEBACK, name="other-rule").to_dict(), **change}
    head = await event_log.head()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await feedback.stub.CreateOutcomeRule(outcome_rule_request(terms), timeout=30)
    assert refusal(refused.value) == (code, [field]), refused.value.details()
    assert await count(event_log, "outcome_rule.registered") <= 1  # at most the service's own
    assert all(e.type == "outcome_rule.registered" for e in await event_log.read(head))


# ---------------------------------------------------------------------------------------------
# The consumer: decision_outcomes as a projection of the log


async def rebuilt_equals_live(postgres: EmbeddedPostgres, database_url: str) -> list[str]:
    rebuilt = await asyncio.to_thread(postgres.create_database, f"r_{uuid.uuid4().hex[:12]}")
    await eventlog.migrate(rebuilt)
    await projections.rebuild(database_url, rebuilt)
    return [str(d) for d in await projections.compare(database_url, rebuilt)]


async def test_the_consumer_joins_decisions_with_their_first_outcome_and_equals_the_rebuild(
    event_log: EventLog, database_url: str, postgres: EmbeddedPostgres
) -> None:
    labelled, unlabelled, withdrawn = decision(), decision(explored=True, propensity=0.05), decision()
    await event_log.append([labelled, unlabelled, withdrawn])
    await event_log.append([outcome(labelled.entity_id, 1), withdrawal(withdrawn.entity_id)])
    await event_log.append([outcome(labelled.entity_id, 0, outcome_id="late-second")])  # the first wins
    consumer = FeedbackConsumer(event_log)
    await consumer.catch_up()
    rows = await join_rows(database_url)
    assert set(rows) == {labelled.entity_id, unlabelled.entity_id, withdrawn.entity_id}
    row = rows[labelled.entity_id]
    assert (row["label"], row["outcome_id"], row["outcome_source"]) == (
        1,
        f"rule:chargeback:{labelled.entity_id}",
        "rule",
    )
    assert row["model_version"] == 2 and row["decided_at"] == DECIDED and row["propensity"] == 0.95
    assert row["outcome_at"] == DECIDED + timedelta(days=3)
    assert rows[unlabelled.entity_id]["label"] is None and rows[unlabelled.entity_id]["explored"] is True
    assert rows[withdrawn.entity_id]["withdrawn"] is True and not rows[labelled.entity_id]["withdrawn"]
    assert consumer.position == await event_log.head()
    assert await rebuilt_equals_live(postgres, database_url) == []


async def test_the_consumer_resumes_after_a_restart_and_a_crash_without_applying_anything_twice(
    event_log: EventLog, database_url: str, postgres: EmbeddedPostgres
) -> None:
    decisions = [decision() for _ in range(40)]
    await event_log.append(decisions)
    await event_log.append([outcome(d.entity_id, i % 2) for i, d in enumerate(decisions[:25])])
    await event_log.append([withdrawal(d.entity_id) for d in decisions[30:33]])
    total = 40 + 25 + 3

    first = FeedbackConsumer(event_log, batch=9)
    assert await first.step() == 9 and await first.step() == 9
    assert len(await join_rows(database_url)) == 18

    crashing = FeedbackConsumer(event_log, batch=9)  # a restart: it resumes at the stored position
    calls = 0
    real_set_position = event_log.set_position

    async def set_position_then_crash(name: str, seq: int, *, conn: Any = None) -> None:
        nonlocal calls
        calls += 1
        await real_set_position(name, seq, conn=conn)
        if calls == 2:  # dies after applying a batch, before its transaction commits
            raise ConnectionResetError("killed mid-batch")

    event_log.set_position = set_position_then_crash  # type: ignore[method-assign]
    try:
        assert await crashing.step() == 9
        with pytest.raises(ConnectionResetError):
            await crashing.step()
    finally:
        event_log.set_position = real_set_position  # type: ignore[method-assign]
    assert await event_log.position("feedback") == crashing.position == first.position + 9
    assert len(await join_rows(database_url)) == 27  # the crashed batch left nothing

    restarted = FeedbackConsumer(event_log, batch=9)
    await restarted.catch_up()  # a decision row applied twice would violate its primary key
    assert first.applied + crashing.applied + restarted.applied == total
    rows = await join_rows(database_url)
    assert len(rows) == 40 and sum(r["label"] is not None for r in rows.values()) == 25
    assert sum(r["withdrawn"] for r in rows.values()) == 3
    assert await rebuilt_equals_live(postgres, database_url) == []


async def test_outcomes_applied_together_in_one_batch_keep_each_decisions_first_outcome(
    event_log: EventLog, database_url: str, postgres: EmbeddedPostgres
) -> None:
    """Consecutive decisions and outcomes in one batch are applied as runs; the join is as if one by one."""
    decisions = [decision() for _ in range(4)]
    first, second = decisions[0].entity_id, decisions[1].entity_id
    await event_log.append(decisions)
    await event_log.append([outcome(first, 1), outcome(first, 0, outcome_id="same-run-second"), outcome(second, 0)])
    await event_log.append([outcome(second, 1, outcome_id="next-batch")])
    consumer = FeedbackConsumer(event_log)
    await consumer.catch_up()
    rows = await join_rows(database_url)
    assert (rows[first]["label"], rows[first]["outcome_id"]) == (1, f"rule:chargeback:{first}")
    assert (rows[second]["label"], rows[second]["outcome_id"]) == (0, f"rule:chargeback:{second}")
    assert [rows[d.entity_id]["label"] for d in decisions[2:]] == [None, None]
    assert await rebuilt_equals_live(postgres, database_url) == []


async def test_a_second_consumer_behind_the_stored_position_is_stopped(event_log: EventLog) -> None:
    await event_log.append([decision() for _ in range(5)])
    stale = FeedbackConsumer(event_log, batch=2)
    await stale.start()
    await FeedbackConsumer(event_log, batch=2).step()
    with pytest.raises(PositionMoved):
        await stale.step()


async def test_the_consumers_span_links_to_the_span_that_made_the_decision(
    event_log: EventLog, spans: InMemorySpanExporter
) -> None:
    with telemetry.tracer("tests").start_as_current_span("predict") as producer:
        await event_log.append([decision()])  # the event's metadata carries this span's traceparent
    await FeedbackConsumer(event_log).catch_up()
    [applied] = [s for s in spans.get_finished_spans() if s.name == "feedback.apply"]
    assert [link.context.span_id for link in applied.links] == [producer.get_span_context().span_id]


async def test_the_service_joins_an_outcome_it_recorded(
    feedback: FeedbackClient, event_log: EventLog, database_url: str
) -> None:
    made = decision()
    await event_log.append([made])
    recorded = await feedback.record_outcome(made.entity_id, label=1, occurred_at=DECIDED + timedelta(hours=5))
    for _ in range(400):  # the service's consumer applies the log as it grows
        row = (await join_rows(database_url)).get(made.entity_id)
        if row is not None and row["outcome_seq"] is not None:
            break
        await asyncio.sleep(0.05)
    assert row is not None and (row["label"], row["outcome_seq"], row["outcome_source"]) == (1, recorded.seq, "api")


# ---------------------------------------------------------------------------------------------
# The deployable: its own process, killed and started again; the CLI


async def wait_for_join(log: EventLog, url: str, decisions: int, labelled: int) -> dict[str, dict[str, Any]]:
    """decision_outcomes once the service's consumer has applied the whole log (bounded wait)."""
    for _ in range(1200):
        if await log.position("feedback") == await log.head():
            break
        await asyncio.sleep(0.05)
    rows = await join_rows(url)
    assert len(rows) == decisions and sum(r["label"] is not None for r in rows.values()) == labelled
    return rows


async def test_the_service_process_killed_mid_stream_resumes_and_applies_each_event_once(
    start_service,
    event_log: EventLog,
    database_url: str,
    postgres: EmbeddedPostgres,  # noqa: ANN001
) -> None:
    env = {"D2D_DATABASE_URL": database_url, "D2D_FEEDBACK_ADDR": f"127.0.0.1:{free_port()}"}
    first = start_service(list(service("feedback").args), env, "feedback")
    async with FeedbackClient(env["D2D_FEEDBACK_ADDR"]) as feedback:
        await feedback.wait_ready()
    decisions = [decision() for _ in range(3000)]
    for i in range(0, len(decisions), 500):  # the consumer applies while decisions keep coming
        await event_log.append(decisions[i : i + 500])
        await event_log.append([outcome(d.entity_id, 1) for d in decisions[i : i + 100]])
    first.process.kill()  # SIGKILL: whatever batch was in flight is not committed
    first.process.wait()
    killed_at = await event_log.position("feedback")
    start_service(list(service("feedback").args), env, "feedback")
    await wait_for_join(event_log, database_url, 3000, 600)  # a twice-applied decision breaks its key
    assert killed_at <= await event_log.position("feedback") == await event_log.head()
    assert await rebuilt_equals_live(postgres, database_url) == []


async def test_outcomes_commands_record_one_and_list_the_rules(
    feedback: FeedbackClient, event_log: EventLog, database_url: str
) -> None:
    await register_sim_contracts(event_log)
    await feedback.create_rule(CHARGEBACK)
    made = decision()
    await event_log.append([made])
    env = {"D2D_FEEDBACK_ADDR": feedback.target, "D2D_DATABASE_URL": database_url, "D2D_NATS_URL": "nats://unused"}
    code, out = await run_cli(env, "outcomes", "record", made.entity_id, "--label", "1", "--at", DECIDED.isoformat())
    assert code == 0 and f"decisions/{made.entity_id}/outcomes/api:{made.entity_id}: label 1" in out, out
    code, out = await run_cli(env, "outcomes", "record", made.entity_id, "--label", "0", "--at", DECIDED.isoformat())
    assert code == 1 and "ALREADY_EXISTS" in out, out
    code, out = await run_cli(env, "outcomes", "rules")
    assert code == 0 and "chargeback" in out and "payment.chargeback" in out and "approve" in out, out


# ---------------------------------------------------------------------------------------------
# Outcome rules in the consumer


def chargeback(payment_id: str) -> NewEvent:
    payload = {"payment_id": payment_id, "amount": 10.0}
    return NewEvent(
        uuid.uuid4(), "payment.chargeback", 1, "payment", payment_id, DECIDED + timedelta(days=4),
        orjson.dumps(payload).decode(),
    )  # fmt: skip


async def test_rule_outcomes_are_appended_with_the_batch_and_joined_once_across_a_restart(
    event_log: EventLog, database_url: str, postgres: EmbeddedPostgres
) -> None:
    """A chargeback labels the approved decision on its payment 1; a declined one never gets an
    outcome; a chargeback for a payment not (yet) decided is kept; a restart replays the log through
    a fresh engine and appends nothing twice."""
    from services.feedback.store import FeedbackStore

    await register_sim_contracts(event_log)
    early = decision()  # decided before the rule existed: the rule does not see it
    await event_log.append([early])
    await FeedbackStore(event_log).register_rule(CHARGEBACK)
    decisions = [decision(), decision(), decision(action="decline", score=0.9)]
    payments = [orjson.loads(d.payload)["context"]["payment_id"] for d in decisions]
    later = decision()  # its chargeback comes first
    later_payment = orjson.loads(later.payload)["context"]["payment_id"]
    await event_log.append([*decisions, chargeback(payments[0]), chargeback(payments[2]), chargeback(later_payment)])
    await event_log.append([chargeback(orjson.loads(early.payload)["context"]["payment_id"]), later])
    await FeedbackConsumer(event_log).catch_up()
    rows = await join_rows(database_url)
    assert rows[decisions[0].entity_id]["label"] == 1 and rows[decisions[0].entity_id]["outcome_source"] == "rule"
    assert rows[later.entity_id]["label"] == 1  # the chargeback came first, and was kept
    assert rows[decisions[2].entity_id]["label"] is None  # declined: never observed
    assert rows[early.entity_id]["label"] is None  # before its rule
    assert await count(event_log, "outcome.recorded") == 2

    await event_log.append([chargeback(payments[1])])
    restarted = FeedbackConsumer(event_log)
    await restarted.catch_up()  # replays the log up to its position through a fresh engine first
    assert await count(event_log, "outcome.recorded") == 3
    [second] = [e for e in await event_log.read(0, types=["outcome.recorded"]) if e.entity_id == decisions[1].entity_id]
    assert second.payload["cause_event_id"] == str((await event_log.read(0, types=["payment.chargeback"]))[-1].event_id)
    rows = await join_rows(database_url)
    assert [rows[d.entity_id]["label"] for d in decisions] == [1, 1, None]
    assert await rebuilt_equals_live(postgres, database_url) == []


# ---------------------------------------------------------------------------------------------
# Live metrics and the monitor


async def create_model(log: EventLog, model: str = "fraud") -> None:
    from services.registry.store import ModelStore

    policy = {"canary_share": 0.2, "epsilon": 0.0, "threshold": 0.5, "actions": ["approve", "decline"]}
    await ModelStore(log, default_policy=policy).create_model(model)


async def test_metrics_per_version_and_arm_equal_a_hand_computation_and_their_recomputation_from_the_log(
    feedback: FeedbackClient, event_log: EventLog, database_url: str, postgres: EmbeddedPostgres
) -> None:
    await create_model(event_log)
    production = [(0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1)]  # AUC 3/4
    canary = [(0.2, 0), (0.9, 1)]  # AUC 1
    made = [decision(score=s) for s, _ in production]
    made += [decision(score=s, arm="canary", model_version="models/fraud/versions/3") for s, _ in canary]
    made.append(decision(score=0.6, action="decline"))  # no outcome: counts as a decision only
    late = decision(score=0.3, as_of=(DECIDED + timedelta(days=10)).isoformat())
    await event_log.append([*made, late])
    labels = [label for _, label in production + canary]
    await event_log.append([outcome(d.entity_id, label) for d, label in zip(made, labels, strict=False)])
    await wait_for_join(event_log, database_url, decisions=8, labelled=6)

    answer = await feedback.model_metrics("fraud", positive_action="approve")
    arms = {(a.model_version, a.arm): a for a in answer.arms}
    prod = arms[("models/fraud/versions/2", "production")]
    assert (prod.decisions, prod.labelled, prod.auc) == (6, 4, 0.75)
    m = json.loads(prod.metrics_json)
    assert m["positive_action_rate"] == pytest.approx(5 / 6) and m["label_coverage"] == pytest.approx(4 / 6)
    assert m["label_delay_p50_seconds"] == 3 * 86400  # outcomes occur three days after the decision
    can = arms[("models/fraud/versions/3", "canary")]
    assert (can.decisions, can.labelled, can.auc) == (2, 2, 1.0)
    assert answer.position == await event_log.head()

    window = await feedback.model_metrics("fraud", end=DECIDED + timedelta(days=1))
    assert {(a.arm, a.decisions) for a in window.arms} == {("production", 5), ("canary", 2)}  # `late` left out

    code, out = await run_cli(
        {"D2D_DATABASE_URL": database_url, "D2D_NATS_URL": "nats://unused", "D2D_FEEDBACK_ADDR": feedback.target},
        "metrics",
        "fraud",
    )
    assert code == 0 and "0.7500" in out and "1.0000" in out, out

    # The same metrics from a join rebuilt from the log alone, exactly.
    from d2d.metrics import compute
    from services.feedback.store import FeedbackStore

    rebuilt = await asyncio.to_thread(postgres.create_database, f"m_{uuid.uuid4().hex[:12]}")
    await eventlog.migrate(rebuilt)
    await projections.rebuild(database_url, rebuilt)
    pool = await eventlog.create_pool(rebuilt, max_size=1)
    try:
        rows, _ = await FeedbackStore(EventLog(pool)).join_rows("fraud", None, None)
    finally:
        await pool.close()
    recomputed = {
        (f"models/fraud/versions/{m.model_version}", m.arm): m.to_dict()
        for m in compute(rows, positive_action="approve")
    }
    assert recomputed == {k: json.loads(a.metrics_json) for k, a in arms.items()}


async def test_metrics_of_a_model_that_does_not_exist_or_of_a_backward_window_are_refused(
    feedback: FeedbackClient, event_log: EventLog
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await feedback.model_metrics("no-such-model")
    assert refusal(caught.value) == ("NOT_FOUND", ["name"])
    await create_model(event_log)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await feedback.model_metrics("fraud", start=DECIDED, end=DECIDED - timedelta(days=1))
    assert refusal(caught.value) == ("INVALID_ARGUMENT", ["end_time"])


async def test_drift_in_the_decisions_of_the_production_version_appends_one_alert_and_one_retrain_request(
    event_log: EventLog, database_url: str
) -> None:
    """Decisions whose input left the training distribution: the consumer's monitor appends a
    quality.alert with the PSI and a retrain.requested, once, and a restart appends neither again."""
    import random

    from d2d.training.baseline import baseline
    from services.feedback.monitor import MonitorSettings

    rng = random.Random(7)
    trained = [rng.gauss(50, 10) for _ in range(2000)]
    scores = baseline({"s": [rng.random() for _ in range(2000)]})["s"]
    lineage = {"baseline": {"inputs": baseline({"amount": trained}), "score": scores}}
    version = {"model": "fraud", "version": 2, "sha256": "0" * 64, "spec": {}, "evaluation": {"auc": 0.9},
               "lineage": lineage, "feature_names": ["amount"]}  # fmt: skip
    alias = {"model": "fraud", "alias": "production", "version": 2, "previous_version": None, "reason": "test"}
    platform = [
        NewEvent(uuid.uuid4(), "model.registered", 1, "model", "fraud", DECIDED, orjson.dumps(version).decode()),
        NewEvent(uuid.uuid4(), "model.alias_set", 1, "model", "fraud", DECIDED, orjson.dumps(alias).decode()),
    ]
    await event_log.append(platform)
    settings = MonitorSettings(drift_window=600, drift_every=300)
    stable = [decision(inputs=[rng.gauss(50, 10)], score=rng.random()) for _ in range(900)]
    shifted = [decision(inputs=[rng.gauss(80, 10)], score=rng.random()) for _ in range(900)]
    await event_log.append(stable)
    await FeedbackConsumer(event_log, monitor_settings=settings).catch_up()
    assert [a.payload for a in await event_log.read(0, types=["quality.alert"])] == []
    await event_log.append(shifted)
    await FeedbackConsumer(event_log, monitor_settings=settings, batch=50).catch_up()
    alerts = await event_log.read(0, types=["quality.alert"])
    [request] = await event_log.read(0, types=["retrain.requested"])
    assert alerts and {a.payload["kind"] for a in alerts} == {"drift"}
    assert alerts[0].payload["worst"] == "amount" and alerts[0].payload["psi_max"] > 0.25
    assert request.payload["reason"] == "drift" and request.payload["alert_event_id"] == str(alerts[0].event_id)
    before = await event_log.head()
    await FeedbackConsumer(event_log, monitor_settings=settings).catch_up()  # replays, appends nothing again
    assert await event_log.head() == before
