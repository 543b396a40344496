"""Selective labels on the simulator: the old policy declines risky payments, so only approved ones
ever show whether they were fraud. Retraining on the logged decisions weighted by the inverse of the
logged propensity must rank ALL payments (approved and declined) against the simulator's truth better
than the same retrain unweighted, which learns from the old policy's approvals as if they were the
population.

The old policy: the old model's score, and for payments above `FLAGGED_ABOVE` an issuer's fraud flag
(step-up authentication) that catches nearly all their fraud: a payment it flags scores 0.99 and is
declined unless explored. The flag is information the logged inputs do not carry, so the approved
large payments look far safer than large payments are, and only the explored declines, weighted by
1/propensity, tell the retrain otherwise. (Had the old policy decided on the logged inputs alone, the
labels would be missing at random given them and a tree model would not need the weights.)

The decisions are made offline here, with serving's own choice function
(`services.serving.decisions.choose`) and the inputs serving would log (the same point-in-time
features as online), and appended as `decision.made` events; outcomes only for approved payments, as
the chargeback rule records them.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from d2d.eventlog import EventLog, NewEvent
from d2d.outcomes import outcome_event_id
from d2d.sim import PaymentsSimulator, SimConfig
from d2d.sim.outcomes import CHARGEBACK
from d2d.sim.training import default_spec
from d2d.sim.views import VIEWS
from d2d.training.decisions import decision_examples
from d2d.training.evaluation import roc_auc
from d2d.training.labels import DecisionLabel, LabeledExample
from d2d.training.pipeline import build_inputs, compare_on_rows, predict, train
from d2d.training.spec import SpecError, TrainingSpec, input_names
from services.serving.decisions import choose, decision_id, unit_interval

MODEL = "fraud"
VERSION = f"models/{MODEL}/versions/1"
CONFIG = SimConfig(seed=11, customers=1_500, merchants=150, days=5.0, payments_per_day=12_000)
FIRST_PERIOD_DAYS = 1.5  # the old model learns from these payments (with full labels)
HELD_OUT_FROM_DAY = 4.0  # decisions until then; the retrains are judged on every payment from then on
FLAGGED_ABOVE = 120.0  # the issuer flags payments above this amount (EUR) ...
FLAG_CATCHES = 0.99  # ... catching this share of their fraud ...
FLAG_FALSE_ALARMS = 0.02  # ... and flagging this share of the others
EPSILON = 0.2  # exploration: a would-be decline is approved with propensity 0.1
WINDOW = timedelta(seconds=CHARGEBACK.window_seconds)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def _load(log: EventLog, sim: PaymentsSimulator) -> None:
    events = [e.as_new_event() for e in sim.events()]
    for start in range(0, len(events), 5_000):
        await log.append(events[start : start + 5_000])


async def _payments(log: EventLog, sim: PaymentsSimulator) -> list[LabeledExample]:
    truth = sim.truth()
    found, after = [], 0
    while page := await log.read(after, 20_000, types=["payment.authorized"]):
        found += [
            LabeledExample(
                str(e.event_id), e.seq, e.occurred_at, e.payload, int(truth[e.payload["payment_id"]].is_fraud)
            )
            for e in page
        ]
        after = page[-1].seq
    return found


def _flagged(payment: LabeledExample) -> bool:
    """The issuer's flag: a fixed draw per payment (the same on every run)."""
    if payment.payload["amount"] <= FLAGGED_ABOVE:
        return False
    draw = unit_interval("issuer-flag", payment.payload["payment_id"])
    return draw < (FLAG_CATCHES if payment.label else FLAG_FALSE_ALARMS)


def _first_model(inputs: np.ndarray, labels: np.ndarray, names: list[str]) -> bytes:
    import xgboost as xgb

    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.1, "nthread": 1, "seed": 1}
    booster = xgb.train(params, xgb.DMatrix(inputs, label=labels, feature_names=names, missing=np.nan), 80)
    return bytes(booster.save_raw(raw_format="ubj"))


def _registered(spec: TrainingSpec, names: list[str], artifact: bytes) -> NewEvent:
    payload = {
        "model": MODEL, "version": 1, "sha256": hashlib.sha256(artifact).hexdigest(), "spec": spec.to_dict(),
        "evaluation": {}, "lineage": {}, "feature_names": names,
    }  # fmt: skip
    return NewEvent(uuid.uuid4(), "model.registered", 1, "model", MODEL, datetime.now(UTC), json.dumps(payload))


def _decision(payment: LabeledExample, inputs: np.ndarray, score: float, policy: dict[str, Any]) -> NewEvent:
    p = payment.payload
    decision = decision_id(MODEL, p["payment_id"])
    choice = choose(score, policy, decision)
    context = {
        "amount": p["amount"], "channel": p["channel"], "ip_country": p["ip_country"],
        "occurred_at": _iso(payment.occurred_at), "payment_id": p["payment_id"],
    }  # fmt: skip
    payload = {
        "decision_id": str(decision), "model": MODEL, "model_version": VERSION, "arm": "production", "score": score,
        "action": choice.action, "propensity": choice.propensity, "explored": choice.explored,
        "greedy_action": choice.greedy_action, "action_scores": choice.action_scores, "policy": policy,
        "features": {}, "inputs": [None if math.isnan(x) else float(x) for x in inputs],
        "feature_watermark": payment.seq - 1, "as_of": payment.occurred_at.isoformat(), "unknown_entities": [],
        "shadow": [], "entities": {"customer": p["customer_id"], "merchant": p["merchant_id"], "card": p["card_id"]},
        "context": context, "unit_id": p["customer_id"], "request_id": p["payment_id"], "trace_id": "",
    }  # fmt: skip
    return NewEvent(
        decision, "decision.made", 1, "decision", str(decision), payment.occurred_at, json.dumps(payload),
        {"producer": "serving", "model": MODEL},
    )  # fmt: skip


def _outcome(decision: NewEvent, decided_at: datetime, chargeback_at: datetime | None) -> NewEvent:
    """The chargeback rule's outcome: 1 with a chargeback within the window, else 0 when it closes."""
    decision_id_ = str(decision.event_id)
    outcome_id = CHARGEBACK.outcome_id(decision_id_)
    fraud = chargeback_at is not None and chargeback_at - decided_at <= WINDOW
    at = chargeback_at if fraud else decided_at + WINDOW
    assert at is not None
    payload = {
        "outcome_id": outcome_id, "decision_id": decision_id_, "label": int(fraud), "occurred_at": _iso(at),
        "source": "rule", "rule": CHARGEBACK.name, "window_closed": not fraud,
    }  # fmt: skip
    return NewEvent(
        outcome_event_id(outcome_id), "outcome.recorded", 1, "decision", decision_id_, at, json.dumps(payload)
    )


@pytest.fixture
async def logged(event_log: EventLog) -> dict[str, Any]:
    """The simulated log with the old model's decisions and the outcomes they let be seen."""
    sim = PaymentsSimulator(CONFIG)
    truth = sim.truth()
    await _load(event_log, sim)
    payments = await _payments(event_log, sim)
    spec = default_spec()
    names = input_names(spec, VIEWS)
    inputs = await build_inputs(event_log, spec, VIEWS, payments)
    labels = np.asarray([p.label for p in payments], dtype=np.float64)
    day = [(p.occurred_at - CONFIG.start) / timedelta(days=1) for p in payments]
    first = [i for i, d in enumerate(day) if d < FIRST_PERIOD_DAYS]
    decided = [i for i, d in enumerate(day) if FIRST_PERIOD_DAYS <= d < HELD_OUT_FROM_DAY]
    held_out = [i for i, d in enumerate(day) if d >= HELD_OUT_FROM_DAY]

    artifact = _first_model(inputs[first], labels[first], names)
    scores = predict(artifact, inputs).tolist()
    policy = {"canary_share": 0.0, "epsilon": EPSILON, "threshold": 0.5, "actions": ["approve", "decline"]}
    flagged = [_flagged(p) for p in payments]
    await event_log.append([_registered(spec, names, artifact)])
    decisions, outcomes = [], []
    for i in decided:
        event = _decision(payments[i], inputs[i], 0.99 if flagged[i] else scores[i], policy)
        decisions.append(event)
        if json.loads(event.payload)["action"] == "approve":
            chargeback_at = truth[payments[i].payload["payment_id"]].chargeback_at
            outcomes.append(_outcome(event, payments[i].occurred_at, chargeback_at))
    for events in (decisions, outcomes):
        for start in range(0, len(events), 5_000):
            await event_log.append(events[start : start + 5_000])
    return {
        "spec": spec, "inputs": inputs, "labels": labels, "held_out": held_out, "old_scores": scores,
        "decisions": decisions, "outcomes": outcomes,
    }  # fmt: skip


async def test_weighted_retrain_beats_unweighted_on_all_payments(event_log: EventLog, logged: dict[str, Any]) -> None:
    held_out = logged["held_out"]
    labels = logged["labels"][held_out]
    aucs, retrained = {}, {}
    for weighting in ("inverse_propensity", "none"):
        spec = replace(logged["spec"], label=DecisionLabel(MODEL, weighting))
        retrained[weighting] = await train(event_log, spec, VIEWS)
        aucs[weighting] = roc_auc(labels, predict(retrained[weighting].artifact, logged["inputs"][held_out]).tolist())
    old = roc_auc(labels, [logged["old_scores"][i] for i in held_out])
    counts = retrained["none"].lineage["decisions"]
    figures = (
        f"AUC against the simulator's truth on all {len(held_out)} held-out payments: propensity-weighted retrain "
        f"{aucs['inverse_propensity']:.4f}, unweighted retrain {aucs['none']:.4f}, old model {old:.4f} "
        f"({counts['labelled']} of {counts['decisions']} decisions labelled)"
    )
    print("\n" + figures)
    assert aucs["inverse_propensity"] > aucs["none"], figures
    # The promotion gate compares them on the weighted retrain's held-out decisions, each scoring the
    # inputs those decisions logged: the candidate's AUC there is the one its evaluation reports.
    weighted, plain = retrained["inverse_propensity"], retrained["none"]
    rows = [tuple(r) for r in weighted.lineage["test_examples"]]
    candidate_auc, incumbent_auc, n = await compare_on_rows(
        event_log, rows, (weighted.spec, VIEWS, weighted.artifact), (plain.spec, VIEWS, plain.artifact)
    )
    assert n == len(rows) == weighted.lineage["rows"]["test"]
    assert candidate_auc == weighted.evaluation["auc"] and 0.5 < incumbent_auc < 1
    # Both learned from the same labelled decisions: only the weights differ.
    assert retrained["none"].lineage["decisions"] == retrained["inverse_propensity"].lineage["decisions"]
    assert retrained["inverse_propensity"].lineage["weighting"] == "inverse_propensity"


def _made(model: str, version: int, inputs: list[float | None], propensity: float, t: datetime) -> NewEvent:
    decision = uuid.uuid4()
    payload = {
        "decision_id": str(decision), "model": model, "model_version": f"models/{model}/versions/{version}",
        "arm": "production", "score": 0.1, "action": "approve", "propensity": propensity, "features": {},
        "inputs": inputs, "feature_watermark": 0, "as_of": t.isoformat(), "entities": {"customer": "c"},
        "context": {"payment_id": f"pay_{decision.hex[:8]}"}, "unit_id": "c",
    }  # fmt: skip
    return NewEvent(decision, "decision.made", 1, "decision", str(decision), t, json.dumps(payload))


def _recorded(decision: NewEvent, outcome_id: str, t: datetime, **terms: Any) -> NewEvent:
    payload = {"outcome_id": outcome_id, "decision_id": decision.entity_id, "occurred_at": _iso(t), "source": "api"}
    return NewEvent(
        outcome_event_id(outcome_id), "outcome.recorded", 1, "decision", decision.entity_id, t,
        json.dumps({**payload, **terms}),
    )  # fmt: skip


def _version(model: str, version: int, names: list[str]) -> NewEvent:
    payload = {"model": model, "version": version, "sha256": "0" * 64, "spec": {}, "feature_names": names}
    return NewEvent(uuid.uuid4(), "model.registered", 1, "model", model, datetime.now(UTC), json.dumps(payload))


async def test_decisions_join_their_first_labelled_outcome_with_the_inputs_they_logged(event_log: EventLog) -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    by_v1 = _made("m", 1, [1.0, 2.0, None], 0.95, t)
    by_v2 = _made("m", 2, [30.0, 10.0], 0.1, t + timedelta(hours=1))
    withdrawn = _made("m", 1, [5.0, 5.0, 5.0], 0.95, t + timedelta(hours=2))
    unlabelled = _made("m", 1, [6.0, 6.0, 6.0], 0.95, t + timedelta(hours=3))
    rewarded = _made("m", 1, [7.0, 7.0, 7.0], 0.95, t + timedelta(hours=4))
    other_model = _made("n", 1, [8.0], 0.5, t + timedelta(hours=5))
    withdrawal = {"decision_id": withdrawn.entity_id, "model": "m", "reason": "its caller got an error"}
    await event_log.append([
        _version("m", 1, ["request.a", "request.b", "request.c"]), _version("m", 2, ["request.c", "request.a"]),
        by_v1, by_v2, withdrawn, unlabelled, rewarded, other_model,
        NewEvent(uuid.uuid4(), "decision.withdrawn", 1, "decision", withdrawn.entity_id, t, json.dumps(withdrawal)),
        _recorded(by_v1, "first", t + timedelta(days=3), label=1),
        _recorded(by_v1, "second", t + timedelta(days=4), label=0),
        _recorded(by_v2, "only", t + timedelta(days=30), label=0, reward=1.5),
        _recorded(withdrawn, "ignored", t + timedelta(days=3), label=1),
        _recorded(rewarded, "reward-only", t + timedelta(days=3), reward=2.0),
        _recorded(rewarded, "too-late", t + timedelta(days=5), label=1),
        _recorded(other_model, "elsewhere", t + timedelta(days=3), label=1),
    ])  # fmt: skip
    spec = TrainingSpec(
        views=(("unused", "1"),), label=DecisionLabel("m"), to_seq=await event_log.head(), request_numbers=("a", "c")
    )
    found = await decision_examples(event_log, spec, ["request.a", "request.c"])
    assert [e.event_id for e in found.examples] == [by_v1.entity_id, by_v2.entity_id]
    assert [e.label for e in found.examples] == [1, 0]
    assert [e.occurred_at for e in found.examples] == [t, t + timedelta(hours=1)]  # the decisions' event times
    assert found.examples[0].payload == json.loads(by_v1.payload)["context"]
    assert found.inputs[0][0] == 1.0 and math.isnan(found.inputs[0][1])  # by name: a, then c (None: missing)
    assert found.inputs[1].tolist() == [10.0, 30.0]  # version 2 logged c before a
    assert found.weights.tolist() == [1 / 0.95, 10.0]
    assert found.counts == {"decisions": 5, "withdrawn": 1, "censored": 0, "unlabelled": 2, "labelled": 2}
    # With the rule's window: the end of the range is the newest outcome (day 30); decisions younger than
    # the window then are left out, whatever outcome they already have.
    windowed = replace(spec, label=DecisionLabel("m", window_seconds=30 * 86_400 - 1800))
    found = await decision_examples(event_log, windowed, ["request.a", "request.c"])
    assert [e.event_id for e in found.examples] == [by_v1.entity_id]
    assert found.counts == {"decisions": 5, "withdrawn": 1, "censored": 3, "unlabelled": 0, "labelled": 1}

    with pytest.raises(SpecError, match="versions/2 did not log the input.*request.b") as refused:
        await decision_examples(event_log, spec, ["request.a", "request.b"])
    assert refused.value.code == "FAILED_PRECONDITION"
    with pytest.raises(SpecError, match="no decisions of models/x") as refused:
        await decision_examples(event_log, replace(spec, label=DecisionLabel("x")), ["request.a"])
    assert refused.value.code == "FAILED_PRECONDITION"
