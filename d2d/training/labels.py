"""Binary labels from the log: one example per event of one type, labelled by whether an outcome event
joined to it by a payload field occurred within a window after it.

Pure logic over events already read from the log (anything with `seq`, `event_id`, `type`, `occurred_at`
(an aware datetime) and `payload`), so the same log range always gives the same labelled examples.

An example is labelled 1 when an outcome with the same join value has
`0 <= outcome.occurred_at - example.occurred_at <= window`, else 0. Examples younger than the window at
`as_of` (the end of the range in event time) are left out: their outcome could still come, and labelling
them 0 would bias the label towards 0. For every example kept, the window ends at or before `as_of`, so a
label uses only events that had occurred by `as_of`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, ClassVar

DECISION_WEIGHTINGS = ("inverse_propensity", "none")


@dataclass(frozen=True)
class LabelDefinition:
    """A binary label from the log: an example per `example_type` event; label 1 if an `outcome_type`
    event with the same `join_field` value occurs within `window_seconds` after the example's
    occurred_at, else 0. Examples younger than the window at the end of the log range (their outcome
    could still come) are left out. Every field is the domain's to name (the simulator's label, a
    chargeback within 30 days of a payment, is `d2d.sim.training.CHARGEBACK_LABEL`)."""

    example_type: str
    outcome_type: str
    join_field: str
    window_seconds: int

    def __post_init__(self) -> None:
        for name in ("example_type", "outcome_type", "join_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if isinstance(self.window_seconds, bool) or not isinstance(self.window_seconds, int):
            raise ValueError(f"window_seconds must be an integer, got {self.window_seconds!r}")
        if self.window_seconds < 0:
            raise ValueError(f"window_seconds must be >= 0, got {self.window_seconds}")

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.window_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelDefinition:
        """The inverse of `to_dict`. Unknown and missing keys are an error (ValueError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown label definition fields: {unknown}")
        missing = [name for name in known if name not in d]
        if missing:
            raise ValueError(f"label definition: missing field(s) {', '.join(sorted(missing))}")
        return cls(**d)


@dataclass(frozen=True)
class DecisionLabel:
    """Labels from the platform's own decisions: an example per `decision.made` event of `model` (not
    withdrawn) with a recorded outcome label (its first `outcome.recorded`), its inputs the vector the
    decision logged. Outcomes are selective (only approved payments show fraud), so with
    `weighting="inverse_propensity"` each example weighs 1/propensity (capped at `MAX_WEIGHT`): the
    few explored approvals stand for all the declines like them, and the retrained model is not biased
    toward the old policy. `"none"`: every example weighs 1.

    As JSON: `{"source": "decisions", "model": M, "weighting": "inverse_propensity" | "none"}`, with an
    optional `window_seconds` (the outcome rule's attribution window): decisions younger than it at the
    end of the range are left out, as `LabelDefinition` leaves out examples whose outcome could still
    come. Without it a recent decision counts as soon as it is labelled, and a chargeback (label 1)
    comes long before its window closes (label 0), so the newest labelled decisions would be mostly
    fraud.
    """

    SOURCE: ClassVar[str] = "decisions"
    EXAMPLE_TYPE: ClassVar[str] = "decision.made"
    MAX_WEIGHT: ClassVar[float] = 100.0  # 1 / propensity is clipped here (propensity 0.01)

    model: str
    weighting: str = "inverse_propensity"
    window_seconds: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty model name, got {self.model!r}")
        if self.weighting not in DECISION_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(DECISION_WEIGHTINGS)}, got {self.weighting!r}")
        if isinstance(self.window_seconds, bool) or not isinstance(self.window_seconds, int) or self.window_seconds < 0:
            raise ValueError(f"window_seconds must be an integer >= 0, got {self.window_seconds!r}")

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.window_seconds)

    @property
    def example_type(self) -> str:
        return self.EXAMPLE_TYPE

    def weight(self, propensity: float) -> float:
        if self.weighting == "none":
            return 1.0
        return min(1.0 / propensity, self.MAX_WEIGHT)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.SOURCE, "model": self.model, "weighting": self.weighting}
        if self.window_seconds:
            d["window_seconds"] = self.window_seconds
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecisionLabel:
        """The inverse of `to_dict`. Unknown and missing keys are an error (ValueError)."""
        unknown = sorted(set(d) - {"source", "model", "weighting", "window_seconds"})
        if unknown:
            raise ValueError(f"unknown decision label fields: {unknown}")
        if d.get("source") != cls.SOURCE:
            raise ValueError(f"decision label: source must be {cls.SOURCE!r}, got {d.get('source')!r}")
        if "model" not in d:
            raise ValueError("decision label: missing field model")
        return cls(d["model"], d.get("weighting", "inverse_propensity"), d.get("window_seconds", 0))


Label = LabelDefinition | DecisionLabel


def label_from_dict(d: Mapping[str, Any]) -> Label:
    """A spec's label: `{"source": "decisions", ...}` is a `DecisionLabel`; anything else (no `source`)
    a `LabelDefinition`, as every spec stored before decisions could be learned from."""
    if not isinstance(d, Mapping):
        raise ValueError(f"label must be an object, got {type(d).__name__}")
    if "source" in d:
        return DecisionLabel.from_dict(d)
    return LabelDefinition.from_dict(dict(d))


@dataclass(frozen=True)
class LabeledExample:
    event_id: str
    seq: int
    occurred_at: datetime
    payload: dict[str, Any]
    label: int


def _join_value(event: Any, join_field: str) -> Any:
    payload = event.payload
    if join_field not in payload:
        raise ValueError(f"{event.type} event seq={event.seq} has no {join_field!r} in its payload")
    return payload[join_field]


def label_examples(events: Iterable[Any], definition: LabelDefinition, *, as_of: datetime) -> list[LabeledExample]:
    """Labelled examples from one log range.

    `events`: the range (any types; other types are ignored). `as_of`: the end of the range in event
    time (the newest occurred_at of the range), passed explicitly so the result does not depend on which
    event types were read. An outcome counts if `outcome.occurred_at - example.occurred_at` is in
    `[0, window]` (both ends included); outcomes whose example is not in the range are ignored; an outcome
    that occurred before its example (clock skew) does not count; several outcomes for one example count
    once. Examples with `as_of - occurred_at < window` are left out (censored). An example or outcome
    event without the join field in its payload is an error (ValueError). Returned in seq order.
    """
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise ValueError("as_of must be a timezone-aware datetime")
    window = definition.window
    examples: list[Any] = []
    outcomes: dict[Any, set[datetime]] = {}
    for event in events:
        if event.type == definition.example_type:
            examples.append(event)
        elif event.type == definition.outcome_type:
            outcomes.setdefault(_join_value(event, definition.join_field), set()).add(event.occurred_at)

    labelled: list[LabeledExample] = []
    for event in sorted(examples, key=lambda e: e.seq):
        if as_of - event.occurred_at < window:
            continue  # censored: the window has not closed by as_of
        key = _join_value(event, definition.join_field)
        label = int(any(timedelta(0) <= t - event.occurred_at <= window for t in outcomes.get(key, ())))
        labelled.append(LabeledExample(str(event.event_id), event.seq, event.occurred_at, dict(event.payload), label))
    return labelled
