"""What the replay operations share: model versions as the log registered them (with their
artifacts), logged decisions joined with their outcomes, and the progress callback.

Everything is read from events (payloads upcast) and the content-addressed `artifacts` blobs a
`model.registered` event names, never from projection tables, so an answer does not depend on
any projection being right (verify checks those).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import numpy as np

from d2d.contracts.upcasting import upcast_event
from d2d.errors import Refusal
from d2d.eventlog import EventLog, StoredEvent
from d2d.training.artifacts import registered_version
from d2d.training.decisions import InputMapper, decision_time, read_all, version_inputs
from d2d.training.spec import SpecError

PAGE = 20_000
Progress = Callable[[str, int, int], None]  # (stage, done, total); total 0 when unknown


def no_progress(stage: str, done: int, total: int) -> None:
    """The default `Progress`: say nothing."""


def parse_version(name: str, field: str = "model_version") -> tuple[str, int]:
    """`models/{model}/versions/{n}` (or `{model}@{n}`, the CLI's short form) -> (model, n)."""
    if "@" in name and "/" not in name:
        model, _, number = name.partition("@")
    else:
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "models" or parts[2] != "versions":
            model, number = "", ""
        else:
            model, number = parts[1], parts[3]
    if not model or not number.isdigit():
        raise Refusal("INVALID_ARGUMENT", f"{name!r} is not 'models/{{model}}/versions/{{n}}' or 'model@n'", field)
    return model, int(number)


@dataclass(frozen=True)
class ModelVersion:
    """A version as its `model.registered` event says: spec, evaluation, lineage, input names, the
    log position it was registered at, and its artifact's bytes."""

    model: str
    version: int
    seq: int
    payload: dict[str, Any]
    artifact: bytes

    @property
    def name(self) -> str:
        return f"models/{self.model}/versions/{self.version}"

    @property
    def feature_names(self) -> list[str]:
        return list(self.payload.get("feature_names", []))

    @cached_property
    def _booster(self) -> Any:
        import xgboost as xgb

        booster = xgb.Booster(params={"nthread": 1})
        booster.load_model(bytearray(self.artifact))
        return booster

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Scores for rows of this version's inputs (its best iteration), as serving scores them."""
        import xgboost as xgb

        best = int(self._booster.attr("best_iteration") or -1)
        iteration_range = (0, best + 1) if best >= 0 else (0, 0)
        matrix = xgb.DMatrix(np.asarray(inputs, dtype=float).reshape(-1, len(self.feature_names)), missing=np.nan)
        return self._booster.predict(matrix, iteration_range=iteration_range, validate_features=False)


async def load_version(log: EventLog, name: str, *, field: str = "model_version") -> ModelVersion:
    """The version named `name` (either form of `parse_version`); NOT_FOUND naming `field` when the
    log does not hold it."""
    model, number = parse_version(name, field)
    try:
        registered, artifact = await registered_version(log, f"models/{model}/versions/{number}")
    except SpecError as exc:
        raise Refusal(exc.code, str(exc), field) from None
    return ModelVersion(model, number, registered.seq, upcast_event(registered).payload, artifact)


@dataclass(frozen=True)
class LoggedDecision:
    """A `decision.made` event with its outcome (the first `outcome.recorded` for it, if any)."""

    event: StoredEvent
    outcome: StoredEvent | None

    @property
    def payload(self) -> dict[str, Any]:
        return self.event.payload

    @property
    def decision_id(self) -> str:
        return str(self.payload["decision_id"])

    @property
    def decided_at(self) -> datetime:
        return decision_time(self.event)

    @property
    def label(self) -> int | None:
        value = self.outcome.payload.get("label") if self.outcome else None
        return None if value is None else int(value)

    @property
    def reward(self) -> float | None:
        value = self.outcome.payload.get("reward") if self.outcome else None
        return None if value is None else float(value)


async def logged_decisions(
    log: EventLog, *, model: str | None = None, after: int = 0, to_seq: int | None = None
) -> list[LoggedDecision]:
    """Decisions (of `model`, or every model) in (after, to_seq], not withdrawn, each with its
    outcome as recorded anywhere in the log up to `to_seq` (outcomes come after their decision)."""
    decisions = [
        e for e in await read_all(log, ["decision.made"], after=after, to_seq=to_seq)
        if model is None or e.payload.get("model") == model
    ]  # fmt: skip
    wanted = {str(e.payload["decision_id"]) for e in decisions}
    withdrawn: set[str] = set()
    outcomes: dict[str, StoredEvent] = {}
    for e in await read_all(log, ["decision.withdrawn", "outcome.recorded"], after=after, to_seq=to_seq):
        decision = str(e.payload.get("decision_id"))
        if decision not in wanted:
            continue
        if e.type == "decision.withdrawn":
            withdrawn.add(decision)
        else:
            outcomes.setdefault(decision, e)
    return [
        LoggedDecision(e, outcomes.get(str(e.payload["decision_id"])))
        for e in decisions
        if str(e.payload["decision_id"]) not in withdrawn
    ]


async def logged_vectors(log: EventLog, version: ModelVersion, decisions: Sequence[LoggedDecision]) -> np.ndarray:
    """The decisions' logged inputs in the order of `version`'s inputs, matched by name;
    FAILED_PRECONDITION when a deciding version did not log an input `version` takes."""
    mapper = InputMapper(version.feature_names, await version_inputs(log, None, await log.head()))
    try:
        rows = [mapper.row(d.payload) for d in decisions]
    except SpecError as exc:
        raise Refusal(exc.code, f"{version.name} cannot score the logged vectors: {exc}", "model_version") from None
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(version.feature_names))


async def decision_event(log: EventLog, decision_id: str, field: str = "name") -> StoredEvent:
    """The `decision.made` event of `decision_id` (its event id is the decision id); NOT_FOUND otherwise."""
    try:
        event_id = uuid.UUID(decision_id)
    except ValueError:
        raise Refusal("INVALID_ARGUMENT", f"{decision_id!r} is not a decision id (a UUID)", field) from None
    event = await log.get(event_id)
    if event is None or event.type != "decision.made":
        raise Refusal("NOT_FOUND", f"decisions/{decision_id} is not in the log", field)
    return upcast_event(event)
