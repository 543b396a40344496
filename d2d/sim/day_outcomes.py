"""Outcome rules of the story (`d2d demo`, `D2D_OUTCOME_RULES=d2d.sim.day_outcomes`): the
simulator's chargeback rule with a one-day attribution window, so a few simulated days close many
windows (the simulator's own rule waits 30 days)."""

from __future__ import annotations

import dataclasses

from d2d.outcomes import OutcomeRule
from d2d.sim.outcomes import CHARGEBACK

WINDOW_SECONDS = 86_400

RULES: tuple[OutcomeRule, ...] = (dataclasses.replace(CHARGEBACK, window_seconds=WINDOW_SECONDS),)
