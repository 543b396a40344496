"""Outcome rules for tests/test_closed_loop.py (`D2D_OUTCOME_RULES`): the simulator's chargeback rule
with a one-day attribution window, so the test's few simulated days close many windows."""

from __future__ import annotations

import dataclasses

from d2d.outcomes import OutcomeRule
from d2d.sim.outcomes import CHARGEBACK

WINDOW_SECONDS = 86_400

RULES: tuple[OutcomeRule, ...] = (dataclasses.replace(CHARGEBACK, window_seconds=WINDOW_SECONDS),)
