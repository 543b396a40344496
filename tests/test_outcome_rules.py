"""Outcome rules as data: what they accept, what they refuse (naming the term), their round trip."""

from __future__ import annotations

import pytest

from d2d.outcomes import OutcomeRule, outcome_event_id, resolve
from d2d.sim.outcomes import CHARGEBACK


def test_a_rule_round_trips_through_its_dict_and_names_one_outcome_per_decision() -> None:
    assert OutcomeRule.from_dict(CHARGEBACK.to_dict()) == CHARGEBACK
    assert CHARGEBACK.outcome_id("d1") == "rule:chargeback:d1" != CHARGEBACK.outcome_id("d2")
    assert outcome_event_id("rule:chargeback:d1") == outcome_event_id("rule:chargeback:d1")
    assert outcome_event_id("rule:chargeback:d1") != outcome_event_id("rule:chargeback:d2")
    assert CHARGEBACK.observes("approve") and not CHARGEBACK.observes("decline")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Charge Back"}, "name"),
        ({"event_type": ""}, "event_type"),
        ({"decision_key": None}, "decision_key"),
        ({"label": 2}, "label"),
        ({"label": True}, "label"),
        ({"otherwise_label": -1}, "otherwise_label"),
        ({"reward": "high"}, "reward"),
        ({"label": None, "reward": None}, "label"),
        ({"window_seconds": -5}, "window_seconds"),
        ({"allowed_lateness_seconds": 1.5}, "allowed_lateness_seconds"),
        ({"observed_actions": "approve"}, "observed_actions"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_bad_term_is_refused_naming_it(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        OutcomeRule.from_dict({**CHARGEBACK.to_dict(), **change})


def test_a_missing_term_is_refused_naming_it() -> None:
    terms = CHARGEBACK.to_dict()
    del terms["event_key"]
    with pytest.raises(ValueError, match="event_key"):
        OutcomeRule.from_dict(terms)


def test_resolve_follows_a_dotted_path_and_gives_none_where_it_breaks() -> None:
    payload = {"context": {"payment_id": "pay_1", "n": 0}, "flat": 3}
    assert resolve(payload, "context.payment_id") == "pay_1"
    assert resolve(payload, "context.n") == 0
    assert resolve(payload, "flat") == 3
    assert resolve(payload, "flat.deeper") is None
    assert resolve(payload, "context.missing") is None
