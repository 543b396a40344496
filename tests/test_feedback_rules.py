"""The outcome rule engine (services/feedback/rules.py): which decisions get which outcome, when."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from d2d.outcomes import OutcomeRule, outcome_event_id
from d2d.sim.outcomes import CHARGEBACK
from services.feedback.rules import OutcomeDraft, RuleEngine

T0 = datetime(2025, 3, 1, tzinfo=UTC)
DAY = 86400
WINDOW = CHARGEBACK.window_seconds


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def decision(payment_id: Any, action: str = "approve") -> dict[str, Any]:
    return {"action": action, "context": {"payment_id": payment_id}}


def chargeback(payment_id: Any) -> dict[str, Any]:
    return {"payment_id": payment_id}


def test_chargeback_within_window_labels_the_decision_1_with_the_event_as_cause() -> None:
    engine = RuleEngine([CHARGEBACK])
    assert engine.on_decision("d1", decision("p1"), at(0), seq=1) == []
    drafts = engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(10 * DAY), seq=2)
    assert len(drafts) == 1
    draft = drafts[0]
    assert (draft.decision_id, draft.label, draft.reward) == ("d1", 1, None)
    assert (draft.cause_event_id, draft.window_closed, draft.occurred_at) == ("e1", False, at(10 * DAY))
    assert draft.outcome_id == "rule:chargeback:d1"
    assert draft.event_id == outcome_event_id("rule:chargeback:d1")
    # the decision is done: its window closing later gives nothing more
    engine.on_event("e2", "payment.chargeback", chargeback("p9"), at(40 * DAY), seq=3)
    assert engine.close_windows() == []


def test_no_chargeback_labels_0_only_once_the_watermark_passes_the_window() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    engine.on_decision("d2", decision("p2"), at(WINDOW), seq=2)  # watermark exactly at d1's window end
    assert engine.close_windows() == []
    engine.on_decision("d3", decision("p3"), at(WINDOW + 1), seq=3)
    [draft] = engine.close_windows()
    assert (draft.decision_id, draft.label, draft.window_closed, draft.cause_event_id) == ("d1", 0, True, None)
    assert draft.occurred_at == at(WINDOW)
    assert engine.close_windows() == []


def test_allowed_lateness_keeps_the_window_open_for_late_events() -> None:
    rule = OutcomeRule("late", "payment.chargeback", "payment_id", "context.payment_id", window_seconds=100,
                       allowed_lateness_seconds=50)  # fmt: skip
    engine = RuleEngine([rule])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    engine.on_decision("d2", decision("p2"), at(140), seq=2)
    assert engine.close_windows() == []
    [draft] = engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(90), seq=3)  # late, but allowed
    assert (draft.decision_id, draft.label, draft.cause_event_id) == ("d1", 1, "e1")


def test_allowed_lateness_keeps_early_events_for_decisions_that_arrive_late() -> None:
    rule = OutcomeRule("late", "payment.chargeback", "payment_id", "context.payment_id", window_seconds=100,
                       allowed_lateness_seconds=50)  # fmt: skip
    engine = RuleEngine([rule])
    engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(10), seq=1)
    engine.on_decision("d9", decision("p9"), at(140), seq=2)  # 130s after the event, within window + lateness
    [draft] = engine.on_decision("d1", decision("p1"), at(0), seq=3)
    assert (draft.decision_id, draft.cause_event_id) == ("d1", "e1")


def test_window_bounds_are_inclusive() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    engine.on_decision("d2", decision("p2"), at(0), seq=2)
    [at_start] = engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(0), seq=3)
    [at_end] = engine.on_event("e2", "payment.chargeback", chargeback("p2"), at(WINDOW), seq=4)
    assert (at_start.decision_id, at_end.decision_id) == ("d1", "d2")


def test_chargeback_after_the_window_closed_gives_nothing() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    assert engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(WINDOW + 1), seq=2) == []
    [closed] = engine.close_windows()
    assert (closed.label, closed.window_closed) == (0, True)
    assert engine.on_event("e2", "payment.chargeback", chargeback("p1"), at(WINDOW + 2), seq=3) == []


def test_event_inside_the_window_but_later_than_the_watermark_allows_gives_nothing() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    engine.on_decision("d2", decision("p2"), at(WINDOW + 5), seq=2)  # closes d1's window
    assert engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(DAY), seq=3) == []
    [closed] = engine.close_windows()
    assert (closed.decision_id, closed.label) == ("d1", 0)


def test_chargeback_before_its_decision_is_joined_when_the_decision_arrives() -> None:
    engine = RuleEngine([CHARGEBACK])
    assert engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(5), seq=1) == []
    [draft] = engine.on_decision("d1", decision("p1"), at(2), seq=2)
    assert (draft.decision_id, draft.label, draft.cause_event_id, draft.occurred_at) == ("d1", 1, "e1", at(5))
    # an event earlier than the decision in event time is not its outcome
    engine.on_event("e2", "payment.chargeback", chargeback("p2"), at(5), seq=3)
    assert engine.on_decision("d2", decision("p2"), at(6), seq=4) == []


def test_declined_decision_never_gets_an_outcome() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision("p1", action="decline"), at(0), seq=1)
    assert engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(DAY), seq=2) == []
    engine.on_decision("d2", decision("p2"), at(2 * WINDOW), seq=3)
    assert engine.close_windows() == []


def test_withdrawn_decision_gets_nothing() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    engine.on_decision("d2", decision("p2"), at(0), seq=2)
    engine.on_withdrawn("d1")
    engine.on_withdrawn("d2")
    assert engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(DAY), seq=3) == []
    engine.on_decision("d3", decision("p3"), at(2 * WINDOW), seq=4)
    assert engine.close_windows() == []


def test_redelivered_decisions_and_events_change_nothing() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    [first] = engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(DAY), seq=2)
    assert first.decision_id == "d1"
    # d1 is done and forgotten: its redelivery must not open it again, the event's must not label twice
    assert engine.on_decision("d1", decision("p1"), at(0), seq=1) == []
    assert engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(DAY), seq=2) == []
    engine.on_decision("d2", decision("p2"), at(DAY), seq=3)
    assert engine.on_decision("d2", decision("p2"), at(DAY), seq=3) == []
    engine.on_decision("d3", decision("p3"), at(2 * WINDOW), seq=4)
    assert [d.decision_id for d in engine.close_windows()] == ["d2"]
    assert engine.on_decision("d1", decision("p1"), at(0), seq=1) == []
    assert engine.on_decision("d2", decision("p2"), at(DAY), seq=3) == []
    engine.on_decision("d4", decision("p4"), at(4 * WINDOW), seq=5)
    assert [d.decision_id for d in engine.close_windows()] == ["d3"]


def test_two_rules_observing_one_decision_give_two_outcomes() -> None:
    refund = OutcomeRule("refund", "payment.refunded", "payment_id", "context.payment_id", label=None,
                         reward=-1.0, window_seconds=DAY, otherwise_label=None, otherwise_reward=0.0)  # fmt: skip
    engine = RuleEngine([CHARGEBACK, refund])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    [charged] = engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(100), seq=2)
    assert engine.on_event("e2", "payment.chargeback", chargeback("p1"), at(200), seq=3) == []
    engine.on_decision("d2", decision("p2"), at(DAY + 1), seq=4)
    [unrefunded] = engine.close_windows()
    assert (charged.rule, charged.label, charged.outcome_id) == ("chargeback", 1, "rule:chargeback:d1")
    assert (unrefunded.rule, unrefunded.label, unrefunded.reward) == ("refund", None, 0.0)
    assert unrefunded.outcome_id == "rule:refund:d1" != charged.outcome_id


def test_window_zero_means_no_time_limit_and_never_closes() -> None:
    forever = OutcomeRule("forever", "payment.chargeback", "payment_id", "context.payment_id", window_seconds=0,
                          otherwise_label=0)  # fmt: skip
    engine = RuleEngine([forever])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    engine.on_decision("d2", decision("p2"), at(1000 * DAY), seq=2)
    assert engine.close_windows() == []
    [draft] = engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(999 * DAY), seq=3)
    assert (draft.decision_id, draft.label) == ("d1", 1)


def test_decision_arriving_after_its_window_closed_gets_nothing() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(2 * WINDOW), seq=1)
    engine.on_event("e0", "payment.chargeback", chargeback("p0"), at(WINDOW - 10), seq=2)
    assert engine.on_decision("d0", decision("p0"), at(0), seq=3) == []
    assert engine.close_windows() == []


def test_integer_and_string_keys_match_and_missing_keys_never_do() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision(123), at(0), seq=1)
    engine.on_decision("d2", {"action": "approve", "context": {}}, at(0), seq=2)
    engine.on_decision("d3", decision(True), at(0), seq=3)
    [draft] = engine.on_event("e1", "payment.chargeback", chargeback("123"), at(1), seq=4)
    assert draft.decision_id == "d1"
    assert engine.on_event("e2", "payment.chargeback", {}, at(2), seq=5) == []
    assert engine.on_event("e3", "payment.chargeback", chargeback(True), at(2), seq=6) == []
    engine.on_decision("d4", decision("p4"), at(2 * WINDOW), seq=7)
    assert engine.close_windows() == []  # d2 and d3 were never observed: no label 0 for them


def test_draft_payload_is_the_outcome_recorded_payload() -> None:
    engine = RuleEngine([CHARGEBACK])
    decision_id = str(uuid.UUID(int=7))
    engine.on_decision(decision_id, decision("p1"), at(0), seq=1)
    [draft] = engine.on_event("e1", "payment.chargeback", chargeback("p1"), at(60), seq=2)
    assert draft.payload() == {
        "outcome_id": f"rule:chargeback:{decision_id}", "decision_id": decision_id, "label": 1,
        "occurred_at": "2025-03-01T00:01:00+00:00", "source": "rule", "rule": "chargeback",
        "cause_event_id": "e1", "window_closed": False,
    }  # fmt: skip


def test_naive_times_are_refused_naming_the_field() -> None:
    engine = RuleEngine([CHARGEBACK])
    with pytest.raises(ValueError, match="decided_at"):
        engine.on_decision("d1", decision("p1"), datetime(2025, 3, 1), seq=1)


def test_checkpoint_keeps_state_only_for_rules_whose_terms_are_unchanged() -> None:
    engine = RuleEngine([CHARGEBACK])
    engine.on_decision("d1", decision("p1"), at(0), seq=1)
    state = json.loads(json.dumps(engine.to_dict()))
    longer = OutcomeRule(**{**CHARGEBACK.to_dict(), "window_seconds": 2 * WINDOW, "observed_actions": ("approve",)})
    resumed = RuleEngine.from_dict([longer], state)
    assert resumed.on_event("e1", "payment.chargeback", chargeback("p1"), at(1), seq=2) == []
    assert resumed.on_decision("d1", decision("p1"), at(0), seq=1) == []  # still a redelivery
    same = RuleEngine.from_dict([CHARGEBACK], state)
    assert [d.decision_id for d in same.on_event("e1", "payment.chargeback", chargeback("p1"), at(1), seq=2)] == ["d1"]


# --- randomised: the engine, with and without checkpoints, against a plain reference --------------

RULES = (
    OutcomeRule("chargeback", "payment.chargeback", "payment_id", "context.payment_id", window_seconds=100,
                allowed_lateness_seconds=10, observed_actions=("approve",)),
    OutcomeRule("quick", "payment.chargeback", "payment_id", "context.payment_id", label=None, reward=1.5,
                window_seconds=20, otherwise_label=None, otherwise_reward=0.25),
    OutcomeRule("refund", "payment.refunded", "payment_id", "context.payment_id", label=0, window_seconds=0,
                otherwise_label=None, observed_actions=("approve", "review")),
)  # fmt: skip


@dataclass(frozen=True)
class Op:
    kind: str  # decision | event | withdraw | close
    seq: int = 0
    id: str = ""
    event_type: str = ""
    payload: Any = None
    ms: int = 0


def generate(rng: random.Random, n: int) -> list[Op]:
    keys = [f"p{i}" for i in range(30)]
    ops: list[Op] = []
    clock = seq = 0
    decided: list[str] = []
    for _ in range(n):
        clock += rng.randrange(0, 3000)
        roll = rng.random()
        if roll < 0.45:
            seq += rng.choice((1, 1, 2))
            lag = rng.choice((0, 0, rng.randrange(0, 15_000), rng.randrange(0, 200_000)))
            context = {"payment_id": rng.choice(keys)} if rng.random() > 0.05 else {}
            action = rng.choice(("approve", "approve", "approve", "decline", "review"))
            decision_id = str(uuid.UUID(int=rng.getrandbits(128)))
            decided.append(decision_id)
            ops.append(Op("decision", seq, decision_id, "", {"action": action, "context": context}, clock - lag))
        elif roll < 0.8:
            seq += 1
            lag = rng.choice((0, rng.randrange(0, 30_000)))
            event_type = rng.choice(("payment.chargeback", "payment.chargeback", "payment.refunded", "payment.other"))
            payload = {"payment_id": rng.choice(keys)}
            ops.append(Op("event", seq, f"e{seq}", event_type, payload, clock - lag))
        elif roll < 0.86 and decided:
            ops.append(Op("withdraw", id=rng.choice(decided)))
        elif roll < 0.92:
            earlier = [op for op in ops if op.kind in ("decision", "event")]
            if earlier:
                ops.append(rng.choice(earlier[-20:]))  # a redelivery: same seq as before
        else:
            ops.append(Op("close"))
    ops.append(Op("close"))
    return ops


def apply(engine: RuleEngine, op: Op) -> list[OutcomeDraft]:
    moment = T0 + timedelta(milliseconds=op.ms)
    if op.kind == "decision":
        return engine.on_decision(op.id, op.payload, moment, op.seq)
    if op.kind == "event":
        return engine.on_event(op.id, op.event_type, op.payload, moment, op.seq)
    if op.kind == "withdraw":
        engine.on_withdrawn(op.id)
        return []
    return engine.close_windows()


def run(ops: list[Op], restart_at: frozenset[int] = frozenset()) -> list[OutcomeDraft]:
    engine = RuleEngine(RULES)
    drafts: list[OutcomeDraft] = []
    for position, op in enumerate(ops):
        if position in restart_at:
            engine = RuleEngine.from_dict(RULES, json.loads(json.dumps(engine.to_dict())))
            for replayed in ops[max(0, position - 5) : position]:  # redelivered after the restart
                if replayed.kind != "close":
                    drafts += apply(engine, replayed)
        drafts += apply(engine, op)
    return drafts


def reference(ops: list[Op]) -> dict[str, tuple[Any, ...]]:
    """Each (rule, decision)'s outcome, by the semantics as stated, from the whole stream at once."""
    event_types = {r.event_type for r in RULES}
    fresh: list[bool] = []
    watermark_after: list[float] = []
    last_seq, watermark = -1, float("-inf")
    for op in ops:
        is_new = op.kind in ("decision", "event") and op.seq > last_seq
        fresh.append(is_new)
        if is_new:
            last_seq = op.seq
            if op.kind == "decision" or op.event_type in event_types:
                watermark = max(watermark, op.ms)
        watermark_after.append(watermark)

    def key(payload: dict[str, Any], path: str) -> Any:
        value: Any = payload
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    outcomes: dict[str, tuple[Any, ...]] = {}
    for rule in RULES:
        window = rule.window_seconds * 1000 if rule.window_seconds else float("inf")
        for pd, d in enumerate(ops):
            if not fresh[pd] or d.kind != "decision" or not rule.observes(d.payload["action"]):
                continue
            d_key = key(d.payload, rule.decision_key)
            deadline = d.ms + window + rule.allowed_lateness_seconds * 1000
            if d_key is None or watermark_after[pd] > deadline:
                continue
            withdrawn_at = next(
                (p for p in range(pd + 1, len(ops)) if ops[p].kind == "withdraw" and ops[p].id == d.id), len(ops)
            )
            candidates = []  # (when it is decided, tie-break, outcome)
            for pe, e in enumerate(ops):
                if not fresh[pe] or e.kind != "event" or e.event_type != rule.event_type:
                    continue
                if key(e.payload, rule.event_key) != d_key or not 0 <= e.ms - d.ms <= window:
                    continue
                outcome = (rule.label, rule.reward, e.ms, e.id, False)
                if pe < pd:
                    candidates.append((pd, pe, outcome))
                elif watermark_after[pe] <= deadline:
                    candidates.append((pe, pe, outcome))
            for pc in range(pd + 1, len(ops)):
                if ops[pc].kind == "close" and watermark_after[pc] > deadline:
                    otherwise = (rule.otherwise_label, rule.otherwise_reward, d.ms + window, None, True)
                    candidates.append((pc, pc, otherwise))
                    break
            if not candidates:
                continue
            decided_at, _, outcome = min(candidates, key=lambda c: (c[0], c[1]))
            if decided_at > withdrawn_at or (outcome[0] is None and outcome[1] is None):
                continue
            outcomes[rule.outcome_id(d.id)] = outcome
    return outcomes


def as_outcomes(drafts: list[OutcomeDraft]) -> dict[str, tuple[Any, ...]]:
    return {
        d.outcome_id: (d.label, d.reward, (d.occurred_at - T0) // timedelta(milliseconds=1), d.cause_event_id,
                       d.window_closed)
        for d in drafts
    }  # fmt: skip


def test_engine_gives_exactly_the_reference_outcomes_and_each_once() -> None:
    ops = generate(random.Random(1212), 800)
    drafts = run(ops)
    assert len({d.outcome_id for d in drafts}) == len(drafts)
    expected = reference(ops)
    assert as_outcomes(drafts) == expected
    # the stream exercises every path: events, closed windows, the window-less rule
    assert sum(1 for o in expected.values() if o[4]) > 20
    assert sum(1 for o in expected.values() if not o[4]) > 20
    assert any(oid.startswith("rule:refund:") for oid in expected)


def test_checkpoint_and_restart_mid_stream_gives_the_outcomes_of_an_uninterrupted_run() -> None:
    rng = random.Random(77)
    ops = generate(rng, 800)
    uninterrupted = run(ops)
    restarts = frozenset(rng.sample(range(1, len(ops)), 12))
    assert run(ops, restarts) == uninterrupted
    assert as_outcomes(uninterrupted) == reference(ops)
