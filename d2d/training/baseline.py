"""The training baseline of a model's inputs and score, and the population stability index (PSI) of live
values against it: how drift is measured.

A baseline entry describes one column over the training rows as plain JSON data (stored in the model
version's lineage):

- `edges`: the distinct quantiles of the non-null values at 0, 1/bins, ..., (bins-1)/bins (each an
  observed value, `inverted_cdf`). They cut the line into len(edges) + 1 buckets, right-closed:
  (-inf, e0], (e0, e1], ..., (e_last, inf). Using observed values and keeping the minimum as a cut
  means a flag or a constant still gets one bucket per value (quantiles alone would merge them), so a
  shift of a binary input is seen too. The outer buckets reach to infinity, so a live value outside the
  training range lands in a bucket (the last one starts empty, so new highs count as drift).
- `shares`: the share of all rows in each bucket; `null_share`: the share of rows that are null (None
  or NaN), its own bucket. `shares` and `null_share` sum to 1.
- `rows`: how many rows the baseline was taken over.

PSI = sum over buckets (actual - expected) * ln(actual / expected), each share floored at `EPSILON` so
an empty bucket gives a large but finite term. Every term is >= 0, so identical distributions give 0.
The usual reading: below 0.1 stable, 0.1 to 0.25 a moderate shift worth watching, above 0.25 a major
shift (the model is scoring a population it was not trained on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

EPSILON = 1e-4
STABLE_BELOW = 0.1
MAJOR_ABOVE = 0.25


def _split_nulls(values: Sequence[float | None] | np.ndarray) -> tuple[np.ndarray, int]:
    """(the non-null values as float64, how many were null). None and NaN are null."""
    if isinstance(values, np.ndarray):
        numbers = values.astype(np.float64, copy=False)
    else:
        numbers = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    present = ~np.isnan(numbers)
    if np.any(np.isinf(numbers[present])):
        raise ValueError("values must be finite or null")
    return numbers[present], int(numbers.size - present.sum())


def _buckets(edges: Sequence[float], present: np.ndarray) -> np.ndarray:
    """Counts per bucket (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), present, side="left")
    return np.bincount(index, minlength=len(edges) + 1)


def column_baseline(values: Sequence[float | None] | np.ndarray, bins: int = 10) -> dict[str, Any]:
    """The baseline entry of one column (see the module docstring)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    present, nulls = _split_nulls(values)
    rows = int(present.size + nulls)
    if rows == 0:
        raise ValueError("no rows to take a baseline over")
    if present.size:
        quantiles = np.quantile(present, [i / bins for i in range(bins)], method="inverted_cdf")
        edges = [float(q) for q in np.unique(quantiles)]
    else:
        edges = []
    counts = _buckets(edges, present)
    return {
        "edges": edges,
        "shares": [int(c) / rows for c in counts],
        "null_share": nulls / rows,
        "rows": rows,
    }


def baseline(columns: dict[str, Sequence[float | None] | np.ndarray], bins: int = 10) -> dict[str, dict[str, Any]]:
    """The baseline entry of every column, by name (names sorted, so the JSON is stable)."""
    return {name: column_baseline(columns[name], bins) for name in sorted(columns)}


def psi(baseline_entry: dict[str, Any], values: Sequence[float | None] | np.ndarray) -> float:
    """Population stability index of `values` against a baseline entry, nulls as their own bucket.
    ValueError if `values` is empty (no population to compare)."""
    present, nulls = _split_nulls(values)
    rows = present.size + nulls
    if rows == 0:
        raise ValueError("no values to compare with the baseline")
    expected = [*baseline_entry["shares"], baseline_entry["null_share"]]
    actual = [int(c) / rows for c in _buckets(baseline_entry["edges"], present)] + [nulls / rows]
    if len(actual) != len(expected):
        raise ValueError(f"baseline entry has {len(expected) - 1} buckets for {len(baseline_entry['edges'])} edges")
    total = 0.0
    for a, e in zip(actual, expected, strict=True):
        a, e = max(a, EPSILON), max(e, EPSILON)
        total += (a - e) * math.log(a / e)
    return total


def reading(value: float) -> str:
    """The usual reading of a PSI: "stable", "moderate" or "major"."""
    return "stable" if value < STABLE_BELOW else "moderate" if value <= MAJOR_ABOVE else "major"
