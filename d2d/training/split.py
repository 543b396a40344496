"""Time-based train / validation / test split: every example in a later part is at least as new as
every example in an earlier part, so a model is validated and tested on the future of its training data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Split:
    """Indices into the examples, each part in time order (ties by index)."""

    train: list[int]
    validation: list[int]
    test: list[int]

    def to_dict(self) -> dict[str, list[int]]:
        return {"train": list(self.train), "validation": list(self.validation), "test": list(self.test)}


def _boundary(n: int, share: float) -> int:
    # Rounding first keeps float noise (0.7 + 0.15 == 0.8499999999999999) from losing an example.
    return math.floor(round(n * share, 9))


def time_split(occurred_at: Sequence[datetime], *, train: float = 0.7, validation: float = 0.15) -> Split:
    """Sort by (occurred_at, original index); the first `train` share is train, the next `validation`,
    the rest test.

    Part sizes: train = floor(n * train), train + validation = floor(n * (train + validation)), each
    part then made non-empty (moving at most one example per boundary). Deterministic. Raises ValueError
    for fewer than 3 examples, or for shares outside (0, 1) or summing to >= 1.
    """
    for name, share in (("train", train), ("validation", validation)):
        if not 0 < share < 1:
            raise ValueError(f"{name} share must be in (0, 1), got {share!r}")
    if train + validation >= 1:
        raise ValueError(f"train + validation must be < 1 to leave a test part, got {train + validation!r}")
    n = len(occurred_at)
    if n < 3:
        raise ValueError(f"a train/validation/test split needs at least 3 examples, got {n}")

    order = sorted(range(n), key=lambda i: (occurred_at[i], i))
    end_train = min(max(_boundary(n, train), 1), n - 2)
    end_validation = min(max(_boundary(n, train + validation), end_train + 1), n - 1)
    return Split(order[:end_train], order[end_train:end_validation], order[end_validation:])
