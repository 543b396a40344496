"""Live metrics of a model's decisions from the join of decisions and outcomes (`decision_outcomes`).

Pure functions over rows, so the live numbers and the numbers recomputed from the log by replay are
the same function of the same rows. Rows are sorted (by decision id) before anything is summed, so the
same rows in any order give identical floats. The scoring metrics (AUC, log loss, Brier, calibration)
are `d2d.training.evaluation`'s, the ones a version was evaluated with at training, so live and offline
numbers compare like for like.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from d2d.training.evaluation import evaluate, weighted_metrics

MIN_PROPENSITY = 0.01  # as in retraining on logged decisions: no example weighs more than 100


@dataclass(frozen=True)
class JoinRow:
    """One `decision_outcomes` row: a decision and, once known, its outcome (label and/or reward)."""

    decision_id: str
    model: str
    model_version: int
    arm: str
    score: float
    action: str
    propensity: float
    explored: bool
    decided_at: datetime
    withdrawn: bool = False
    label: int | None = None
    reward: float | None = None
    outcome_at: datetime | None = None

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> JoinRow:
        """From a table row (an asyncpg Record or a dict) by column name; other columns are ignored."""
        values = {f.name: row[f.name] for f in fields(cls) if f.name in row.keys()}
        values["decision_id"] = str(values["decision_id"])
        return cls(**values)


@dataclass(frozen=True)
class Metrics:
    """The metrics of one model version and arm. Scoring metrics are over labelled rows and None when no
    row is labelled (AUC also None with one class only); rates are shares of all decisions.

    calibration: 10 equal-width bins on [0, 1], each {bin_lower, bin_upper, count, mean_predicted,
    observed_rate}. action_rates: action -> share of decisions. positive_action_rate: the share of the
    action given as positive (e.g. the approval rate), None if none was given. label_delay_*: seconds
    from the decision's event time to its outcome's, over rows with an outcome. ips_auc / ips_log_loss:
    the same over labelled rows weighted by 1 / propensity (clipped at 1 / MIN_PROPENSITY), an estimate
    for the whole population when labels are only observed after some actions (selective labels)."""

    model: str
    model_version: int
    arm: str
    decisions: int
    labelled: int
    label_coverage: float
    positives: int
    auc: float | None
    log_loss: float | None
    brier: float | None
    calibration: list[dict[str, Any]] = field(default_factory=list)
    action_rates: dict[str, float] = field(default_factory=dict)
    positive_action_rate: float | None = None
    rewarded: int = 0
    average_reward: float | None = None
    label_delay_mean_seconds: float | None = None
    label_delay_p50_seconds: float | None = None
    explored_share: float = 0.0
    ips_auc: float | None = None
    ips_log_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["calibration"] = [dict(b) for b in self.calibration]
        d["action_rates"] = dict(self.action_rates)
        return d


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group_metrics(key: tuple[str, int, str], rows: list[JoinRow], positive_action: str | None) -> Metrics:
    model, version, arm = key
    decisions = len(rows)
    labelled = [r for r in rows if r.label is not None]
    if labelled:
        scored = evaluate([r.label for r in labelled], [r.score for r in labelled])
        auc, log_loss, brier, calibration = scored.auc, scored.log_loss, scored.brier, scored.calibration
        weights = [1 / max(r.propensity, MIN_PROPENSITY) for r in labelled]
        ips = weighted_metrics([r.label for r in labelled], [r.score for r in labelled], weights)
    else:
        auc = log_loss = brier = None
        calibration = []
        ips = {"auc": None, "log_loss": None}
    actions: dict[str, int] = {}
    for r in rows:
        actions[r.action] = actions.get(r.action, 0) + 1
    rewards = [r.reward for r in rows if r.reward is not None]
    delays = [(r.outcome_at - r.decided_at).total_seconds() for r in rows if r.outcome_at is not None]
    return Metrics(
        model=model,
        model_version=version,
        arm=arm,
        decisions=decisions,
        labelled=len(labelled),
        label_coverage=len(labelled) / decisions,
        positives=sum(r.label for r in labelled),
        auc=auc,
        log_loss=log_loss,
        brier=brier,
        calibration=calibration,
        action_rates={a: actions[a] / decisions for a in sorted(actions)},
        positive_action_rate=None if positive_action is None else actions.get(positive_action, 0) / decisions,
        rewarded=len(rewards),
        average_reward=_mean(rewards),
        label_delay_mean_seconds=_mean(delays),
        label_delay_p50_seconds=statistics.median(sorted(delays)) if delays else None,
        explored_share=sum(1 for r in rows if r.explored) / decisions,
        ips_auc=ips["auc"],
        ips_log_loss=ips["log_loss"],
    )


def compute(rows: Iterable[JoinRow], *, positive_action: str | None = None) -> list[Metrics]:
    """Metrics per (model, model version, arm), in that order; withdrawn decisions are left out (they
    never took effect). Groups with no unwithdrawn decision do not appear."""
    groups: dict[tuple[str, int, str], list[JoinRow]] = {}
    for r in sorted((r for r in rows if not r.withdrawn), key=lambda r: r.decision_id):
        groups.setdefault((r.model, r.model_version, r.arm), []).append(r)
    return [_group_metrics(key, groups[key], positive_action) for key in sorted(groups)]


def windows(
    rows: Iterable[JoinRow], start: datetime, end: datetime, step: timedelta
) -> list[tuple[datetime, datetime, list[JoinRow]]]:
    """The rows by event-time window [start + k*step, start + (k+1)*step) up to `end` (the last window
    cut at `end`), by each decision's event time; rows outside [start, end) are left out. Every window
    is listed, empty ones too, so a day without traffic shows as a day without traffic."""
    if step <= timedelta(0):
        raise ValueError(f"step must be positive, got {step}")
    if end <= start:
        raise ValueError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    bounds = []
    lower = start
    while lower < end:
        bounds.append((lower, min(lower + step, end)))
        lower += step
    grouped: list[list[JoinRow]] = [[] for _ in bounds]
    for r in rows:
        if start <= r.decided_at < end:
            grouped[int((r.decided_at - start) // step)].append(r)
    return [(lo, hi, members) for (lo, hi), members in zip(bounds, grouped, strict=True)]
