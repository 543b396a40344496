"""The simulator's outcome rules (`D2D_OUTCOME_RULES`): a chargeback within 30 days of a payment
labels the decision on that payment 1; an approved payment without one is labelled 0 once 30 days
have passed in event time. A declined payment shows nothing (selective labels)."""

from __future__ import annotations

from d2d.outcomes import OutcomeRule
from d2d.sim.training import CHARGEBACK_LABEL

CHARGEBACK = OutcomeRule(
    name="chargeback",
    event_type=CHARGEBACK_LABEL.outcome_type,
    event_key=CHARGEBACK_LABEL.join_field,
    decision_key=f"context.{CHARGEBACK_LABEL.join_field}",
    label=1,
    window_seconds=CHARGEBACK_LABEL.window_seconds,
    otherwise_label=0,
    observed_actions=("approve",),
)

RULES: tuple[OutcomeRule, ...] = (CHARGEBACK,)
