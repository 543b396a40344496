"""Evaluation of a binary classifier's probabilities: ROC AUC, log loss, Brier score, a calibration table
and the same metrics per slice. Deterministic, numpy only; every output is a plain int, float, str or
None (no NaN), so an evaluation can be stored as JSON with a model version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_EPS = 1e-15


def _labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("no examples")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be 0 or 1, got dtype {y.dtype}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    return y.astype(np.int64)


def _values(values: Any, n: int, what: str, *, unit_interval: bool) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] != n:
        raise ValueError(f"{what} must be one-dimensional with {n} values, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what} must be finite")
    if unit_interval and (np.any(v < 0) or np.any(v > 1)):
        raise ValueError(f"{what} must be in [0, 1]")
    return v


def _inputs(labels: Any, values: Any, what: str, *, unit_interval: bool = True) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(labels)
    return y, _values(values, y.shape[0], what, unit_interval=unit_interval)


def _weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> float | None:
    """The same pair count with each (positive, negative) pair weighted by the product of their weights
    (a tie still counting one half); None when a class has no weight."""
    order = np.argsort(s, kind="stable")
    y, s, w = y[order], s[order], w[order]
    positive_weight = np.where(y == 1, w, 0.0)
    negative_weight = np.where(y == 0, w, 0.0)
    total_positive, total_negative = float(positive_weight.sum()), float(negative_weight.sum())
    if total_positive <= 0 or total_negative <= 0:
        return None
    new_group = np.empty(y.shape[0], dtype=bool)
    new_group[0] = True
    new_group[1:] = s[1:] != s[:-1]
    starts = np.flatnonzero(new_group)
    group_positive = np.add.reduceat(positive_weight, starts)
    group_negative = np.add.reduceat(negative_weight, starts)
    negative_below = np.cumsum(group_negative) - group_negative
    pairs = float(np.sum(group_positive * (negative_below + 0.5 * group_negative)))
    return pairs / (total_positive * total_negative)


def _auc(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float | None:
    """Mann-Whitney U / (positives * negatives), ties by average rank; None with one class only.
    With weights `w`, each pair counts the product of its weights (see `_weighted_auc`).

    Unweighted, ranks are kept doubled (an average of consecutive integer ranks, doubled, is an
    integer), so the sum is exact and the result is the correctly rounded quotient of two integers."""
    if w is not None:
        return _weighted_auc(y, s, w)
    n = y.shape[0]
    positives = int(y.sum())
    negatives = n - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(s, kind="stable")
    sorted_scores = s[order]
    # Tie groups: [starts[k], ends[k]) in sorted order share a score; their 1-based ranks are
    # starts+1 .. ends, whose average doubled is starts + 1 + ends.
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = sorted_scores[1:] != sorted_scores[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    group_of = np.cumsum(new_group) - 1
    doubled_rank = np.empty(n, dtype=np.int64)
    doubled_rank[order] = (starts + 1 + ends)[group_of]
    doubled_u = int(doubled_rank[y == 1].sum()) - positives * (positives + 1)
    return doubled_u / (2 * positives * negatives)


def roc_auc(labels: Any, scores: Any) -> float:
    """Exact ROC AUC: the probability that a random positive scores above a random negative, a tie
    counting one half (Mann-Whitney with average ranks). ValueError if only one class is present."""
    y, s = _inputs(labels, scores, "scores", unit_interval=False)
    auc = _auc(y, s)
    if auc is None:
        raise ValueError("ROC AUC is undefined with only one class in the labels")
    return auc


def _log_loss(y: np.ndarray, p: np.ndarray, eps: float, w: np.ndarray | None = None) -> float:
    # The probability given to the observed label, clipped to [eps, 1 - eps]: clipping it (rather than p
    # before taking 1 - p) treats both classes alike, a certain mistake costing exactly -log(eps).
    observed = np.where(y == 1, p, 1.0 - p)
    return float(-np.average(np.log(np.clip(observed, eps, 1 - eps)), weights=w))


def _brier(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    return float(np.average((p - y) ** 2, weights=w))


def weighted_metrics(labels: Any, probabilities: Any, weights: Any) -> dict[str, float | None]:
    """AUC, log loss and Brier score with a weight per example (e.g. inverse propensity, so labels
    observed only under some actions stand for the whole population): {"auc" (None when a class has no
    weight), "log_loss", "brier"}. Weights must be finite and >= 0 with a positive sum."""
    y, p = _inputs(labels, probabilities, "probabilities")
    w = _values(weights, y.shape[0], "weights", unit_interval=False)
    if np.any(w < 0) or not w.sum() > 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    return {"auc": _auc(y, p, w), "log_loss": _log_loss(y, p, DEFAULT_EPS, w), "brier": _brier(y, p, w)}


def log_loss(labels: Any, probabilities: Any, eps: float = DEFAULT_EPS) -> float:
    """Mean negative log likelihood (natural log) of the labels, the probability given to each observed
    label clipped to [eps, 1 - eps]."""
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    y, p = _inputs(labels, probabilities, "probabilities")
    return _log_loss(y, p, eps)


def brier(labels: Any, probabilities: Any) -> float:
    """Mean squared difference between probability and label."""
    y, p = _inputs(labels, probabilities, "probabilities")
    return _brier(y, p)


def _calibration(y: np.ndarray, p: np.ndarray, bins: int) -> list[dict[str, Any]]:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    # Edges i / bins (each correctly rounded, unlike a running sum); bin i is [edge i, edge i+1), the
    # last one closed so that 1.0 lands in it.
    edges = np.array([i / bins for i in range(bins + 1)])
    index = np.minimum(np.searchsorted(edges, p, side="right") - 1, bins - 1)
    table = []
    for i in range(bins):
        member = index == i
        count = int(member.sum())
        table.append(
            {
                "bin_lower": float(edges[i]),
                "bin_upper": float(edges[i + 1]),
                "count": count,
                "mean_predicted": float(p[member].mean()) if count else None,
                "observed_rate": float(y[member].mean()) if count else None,
            }
        )
    return table


def calibration_table(labels: Any, probabilities: Any, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins on [0, 1] ([lower, upper), the last bin [lower, 1]), one dict per bin:
    bin_lower, bin_upper, count, mean_predicted, observed_rate. Empty bins are included with count 0
    and None for both means."""
    y, p = _inputs(labels, probabilities, "probabilities")
    return _calibration(y, p, bins)


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    return {
        "rows": int(y.shape[0]),
        "positives": int(y.sum()),
        "auc": _auc(y, p),
        "log_loss": _log_loss(y, p, DEFAULT_EPS),
        "brier": _brier(y, p),
    }


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one set of predictions. `slices`: slice column -> value (as str) -> {"rows",
    "positives", "auc" (None with one class), "log_loss", "brier"}. `baseline_auc` is what a constant
    predictor scores; `base_rate_log_loss` is the log loss of predicting the set's positive rate for
    every row, the bar a useful model must clear."""

    rows: int
    positives: int
    auc: float | None
    log_loss: float
    brier: float
    calibration: list[dict[str, Any]]
    slices: dict[str, dict[str, dict[str, Any]]]
    base_rate_log_loss: float
    baseline_auc: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "positives": self.positives,
            "auc": self.auc,
            "log_loss": self.log_loss,
            "brier": self.brier,
            "calibration": [dict(b) for b in self.calibration],
            "slices": {c: {v: dict(m) for v, m in values.items()} for c, values in self.slices.items()},
            "base_rate_log_loss": self.base_rate_log_loss,
            "baseline_auc": self.baseline_auc,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        return cls(
            rows=int(d["rows"]),
            positives=int(d["positives"]),
            auc=None if d["auc"] is None else float(d["auc"]),
            log_loss=float(d["log_loss"]),
            brier=float(d["brier"]),
            calibration=[dict(b) for b in d["calibration"]],
            slices={c: {v: dict(m) for v, m in values.items()} for c, values in d.get("slices", {}).items()},
            base_rate_log_loss=float(d["base_rate_log_loss"]),
            baseline_auc=float(d.get("baseline_auc", 0.5)),
        )


def _slice_key(value: Any) -> str:
    return str(value.item() if isinstance(value, np.generic) else value)


def evaluate(
    labels: Any, probabilities: Any, *, slices: dict[str, Sequence[Any]] | None = None, bins: int = 10
) -> Evaluation:
    """All metrics for one set. `slices`: column name -> one value per row; rows are grouped by
    `str(value)` (so None, NaN and mixed types give stable, JSON-safe keys), values sorted by that key."""
    y, p = _inputs(labels, probabilities, "probabilities")
    n = y.shape[0]
    overall = _metrics(y, p)
    sliced: dict[str, dict[str, dict[str, Any]]] = {}
    for column, values in (slices or {}).items():
        keys = [_slice_key(v) for v in values]
        if len(keys) != n:
            raise ValueError(f"slice {column!r} has {len(keys)} values for {n} rows")
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        sliced[str(column)] = {key: _metrics(y[groups[key]], p[groups[key]]) for key in sorted(groups)}
    rate = overall["positives"] / n
    return Evaluation(
        rows=overall["rows"],
        positives=overall["positives"],
        auc=overall["auc"],
        log_loss=overall["log_loss"],
        brier=overall["brier"],
        calibration=_calibration(y, p, bins),
        slices=sliced,
        base_rate_log_loss=_log_loss(y, np.full(n, rate), DEFAULT_EPS),
    )
