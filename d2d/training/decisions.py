"""Examples from the platform's own decisions: `decision.made` events of one model joined with their
recorded outcomes, the inputs each decision logged, and a weight per example.

Labels are selective: only approved payments ever show whether they were fraud, so the labelled
decisions are the ones the old policy (plus its exploration) approved. Weighting each by the inverse
of the propensity the policy gave its action lets the few explored approvals of would-be declines
stand for all of them, so a model retrained on them is not biased toward the old policy.

Pure reads of the log range (after_seq, to_seq] (payloads upcast), so the same spec against the same
log gives the same examples, inputs and weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from d2d.contracts.upcasting import upcast_event
from d2d.eventlog import EventLog, StoredEvent
from d2d.training.labels import DecisionLabel, LabeledExample
from d2d.training.spec import SpecError, TrainingSpec

PAGE = 20_000
DECISION_MADE = "decision.made"
DECISION_WITHDRAWN = "decision.withdrawn"
OUTCOME_RECORDED = "outcome.recorded"
MODEL_REGISTERED = "model.registered"


@dataclass(frozen=True)
class DecisionExamples:
    """Labelled decisions in seq order: `examples[i]` (event id = the decision's event id, occurred_at =
    the decision's event time, payload = its request context), `inputs[i]` in the spec's input order,
    `weights[i]`; `counts` says how many decisions were read, withdrawn, censored (younger than the
    label's window), unlabelled and kept."""

    examples: list[LabeledExample]
    inputs: np.ndarray
    weights: np.ndarray
    counts: dict[str, int]


def decision_time(event: StoredEvent) -> datetime:
    """A decision's event time: its payload's `as_of` (the request's occurred_at), else the event's."""
    as_of = event.payload.get("as_of")
    if isinstance(as_of, str) and as_of:
        try:
            parsed = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
        except ValueError:
            return event.occurred_at
        if parsed.tzinfo is not None:
            return parsed
    return event.occurred_at


async def read_all(
    log: EventLog, types: Sequence[str], *, after: int = 0, to_seq: int | None = None
) -> list[StoredEvent]:
    """Events of `types` in (after, to_seq] (to_seq None: to the head), payloads upcast, in seq order."""
    events: list[StoredEvent] = []
    while to_seq is None or after < to_seq:
        page = await log.read(after, PAGE, types=list(types))
        events.extend(upcast_event(e) for e in page if to_seq is None or e.seq <= to_seq)
        if len(page) < PAGE:
            break
        after = page[-1].seq
    return events


async def version_inputs(log: EventLog, model: str | None, to_seq: int) -> dict[str, list[str]]:
    """`models/{model}/versions/{n}` -> the input names that version scored (from `model.registered`),
    for the versions of `model` (None: of every model)."""
    names: dict[str, list[str]] = {}
    for event in await read_all(log, [MODEL_REGISTERED], to_seq=to_seq):
        payload = event.payload
        if (model is None or payload.get("model") == model) and "version" in payload:
            names[f"models/{payload['model']}/versions/{payload['version']}"] = list(payload.get("feature_names", []))
    return names


class InputMapper:
    """Logged input vectors in the order of `names`, whichever version logged them (by input name)."""

    def __init__(self, names: Sequence[str], versions: dict[str, list[str]]) -> None:
        self.names = list(names)
        self.versions = versions
        self._index: dict[str, list[int]] = {}

    def row(self, payload: dict[str, Any]) -> list[float]:
        version = payload["model_version"]
        index = self._index.get(version)
        if index is None:
            logged = self.versions.get(version)
            if logged is None:
                raise SpecError(
                    "FAILED_PRECONDITION", f"decision {payload['decision_id']} was made by {version}, which is not "
                    "registered in the log range read: its input names are unknown",
                )  # fmt: skip
            position = {name: i for i, name in enumerate(logged)}
            missing = [name for name in self.names if name not in position]
            if missing:
                raise SpecError(
                    "FAILED_PRECONDITION",
                    f"{version} did not log the input(s) {', '.join(missing[:5])} the spec asks for: a model "
                    "retrained on its decisions can only use the inputs they logged",
                )
            index = self._index[version] = [position[name] for name in self.names]
        inputs = payload["inputs"]
        return [_number(inputs[i]) if i < len(inputs) else math.nan for i in index]


def _number(value: Any) -> float:
    return math.nan if value is None or isinstance(value, bool) else float(value)


async def decision_examples(log: EventLog, spec: TrainingSpec, names: Sequence[str]) -> DecisionExamples:
    """The labelled decisions of the spec's model in its log range; FAILED_PRECONDITION if none.

    A decision counts once it is not withdrawn, not younger than the label's window at the end of the
    range, and its first `outcome.recorded` (by seq) carries a label; outcomes of decisions outside the
    range are ignored."""
    label = spec.label
    assert isinstance(label, DecisionLabel)
    events = await read_all(
        log, [DECISION_MADE, DECISION_WITHDRAWN, OUTCOME_RECORDED], after=spec.after_seq, to_seq=spec.to_seq
    )
    decisions: list[StoredEvent] = []
    withdrawn: set[str] = set()
    outcomes: dict[str, dict[str, Any]] = {}
    for event in events:
        payload = event.payload
        if event.type == DECISION_MADE:
            if payload.get("model") == label.model:
                decisions.append(event)
        elif event.type == DECISION_WITHDRAWN:
            withdrawn.add(str(payload["decision_id"]))
        else:
            outcomes.setdefault(str(payload["decision_id"]), payload)  # the first outcome wins
    if not decisions:
        raise SpecError(
            "FAILED_PRECONDITION",
            f"the log range ({spec.after_seq}, {spec.to_seq}] holds no decisions of models/{label.model} to learn from",
        )
    mapper = InputMapper(names, await version_inputs(log, label.model, spec.to_seq))
    examples: list[LabeledExample] = []
    rows: list[list[float]] = []
    weights: list[float] = []
    counts = {"decisions": len(decisions), "withdrawn": 0, "censored": 0, "unlabelled": 0, "labelled": 0}
    # The end of the range in event time: the newest decision or outcome (a decision event's own
    # occurred_at is when serving logged it, not the request's time).
    as_of = max([decision_time(e) for e in decisions] + [e.occurred_at for e in events if e.type == OUTCOME_RECORDED])
    for event in decisions:
        payload = event.payload
        decision = str(payload["decision_id"])
        if decision in withdrawn:
            counts["withdrawn"] += 1
            continue
        if label.window_seconds and as_of - decision_time(event) < label.window:
            counts["censored"] += 1  # its outcome could still come
            continue
        outcome = outcomes.get(decision)
        if outcome is None or outcome.get("label") is None:
            counts["unlabelled"] += 1
            continue
        counts["labelled"] += 1
        context = payload.get("context") or {}
        examples.append(
            LabeledExample(str(event.event_id), event.seq, decision_time(event), dict(context), int(outcome["label"]))
        )
        rows.append(mapper.row(payload))
        weights.append(label.weight(float(payload["propensity"])))
    if not examples:
        raise SpecError(
            "FAILED_PRECONDITION",
            f"none of the {counts['decisions']} decisions of models/{label.model} in ({spec.after_seq}, "
            f"{spec.to_seq}] has a recorded outcome label yet ({counts['withdrawn']} withdrawn, {counts['censored']} "
            "younger than the label window)",
        )
    inputs = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(mapper.names))
    return DecisionExamples(examples, inputs, np.asarray(weights, dtype=np.float64), counts)


async def logged_inputs(
    log: EventLog, label: DecisionLabel, names: Sequence[str], events: Sequence[StoredEvent], to_seq: int
) -> np.ndarray:
    """The logged inputs of decision events in the order of `names` (comparing models on held-out decisions)."""
    mapper = InputMapper(names, await version_inputs(log, label.model, to_seq))
    rows = [mapper.row(e.payload) for e in events]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(mapper.names))
