"""What a model version is trained from, as data: the training spec and the model's input vector.

`model_inputs` turns one example's feature values and request context into the model's input
vector. Training calls it for every row of the point-in-time frame; serving calls it for every
request, so a model sees the same vector online as it was trained on.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from d2d.features.definitions import Aggregation, FeatureView, RequestTransform
from d2d.training.labels import Label, label_from_dict

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "eval_metric": "logloss",
    "tree_method": "hist",
    "max_depth": 4,
    "eta": 0.1,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 1.0,
    # One thread: the artifact is then the same bytes on any machine with the same library versions.
    "nthread": 1,
}


class SpecError(ValueError):
    """A training spec that cannot be used; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TrainingSpec:
    """Views, label and request inputs are the domain's to name; the defaults here name none of them
    (the simulator's default spec is `d2d.sim.training.default_spec`, which `d2d models train` uses
    through `D2D_TRAINING_DEFAULTS`)."""

    views: tuple[tuple[str, str], ...]  # (feature view name, version)
    label: Label  # a LabelDefinition (events) or a DecisionLabel (logged decisions and their outcomes)
    after_seq: int = 0  # the log range used: after_seq < seq <= to_seq
    to_seq: int = 0  # 0: the log's head when the run starts (the stored spec holds the number)
    params: tuple[tuple[str, Any], ...] = tuple(sorted(DEFAULT_PARAMS.items()))
    num_boost_round: int = 300
    early_stopping_rounds: int = 30
    seed: int = 7
    request_numbers: tuple[str, ...] = ()  # request fields used as numbers
    request_flags: tuple[tuple[str, str], ...] = ()  # 1.0 when field == value
    transforms: tuple[RequestTransform, ...] = ()
    slice_fields: tuple[str, ...] = ()  # example payload fields to slice the evaluation by
    # Slices looked up in the log: (name, event type, key field shared with the example, value field),
    # e.g. the merchant's category from merchant.onboarded.
    slice_lookups: tuple[tuple[str, str, str, str], ...] = ()
    # Where the true probabilities are known (the simulator writes them beside the log): a CSV with a
    # `truth_key` column (joined with the example payload's field of that name) and a `truth_column` of
    # probabilities; the evaluation then reports the truth's own AUC on the same held-out rows.
    # Empty: not known.
    truth_path: str = ""
    truth_key: str = ""
    truth_column: str = ""
    train_share: float = 0.7
    validation_share: float = 0.15
    # `models/{model}/versions/{n}`: boost on from that version's trees (up to its best iteration)
    # instead of from nothing; it must take the same inputs. Empty: a fresh model.
    init_model: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "label":
                value = value.to_dict()
            elif f.name == "params":
                value = dict(value)
            elif f.name == "transforms":
                value = [{"name": t.name, "op": t.op, "inputs": list(t.inputs)} for t in value]
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            if f.name == "init_model" and not value:
                continue  # a fresh model: the spec reads as it did before the field existed
            d[f.name] = value
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainingSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError("INVALID_ARGUMENT", f"training spec: unknown field(s) {', '.join(unknown)}")
        if not d.get("views"):
            raise SpecError("INVALID_ARGUMENT", "training spec: views (name, version pairs) are required")
        if not d.get("label"):
            raise SpecError(
                "INVALID_ARGUMENT", "training spec: label (example_type, outcome_type, join_field, window_seconds)"
                " is required (or, to learn from logged decisions, source \"decisions\", model, weighting)",
            )  # fmt: skip
        if d.get("truth_path") and not (d.get("truth_key") and d.get("truth_column")):
            raise SpecError(
                "INVALID_ARGUMENT",
                "training spec: truth_path needs truth_key (the column to join on) and truth_column (the probability)",
            )
        try:
            return cls(
                views=tuple((str(n), str(v)) for n, v in d["views"]),
                label=label_from_dict(d["label"]),
                after_seq=int(d.get("after_seq", 0)),
                to_seq=int(d.get("to_seq", 0)),
                params=tuple(sorted({**DEFAULT_PARAMS, **d.get("params", {})}.items())),
                num_boost_round=int(d.get("num_boost_round", 300)),
                early_stopping_rounds=int(d.get("early_stopping_rounds", 30)),
                seed=int(d.get("seed", 7)),
                request_numbers=tuple(d.get("request_numbers", ())),
                request_flags=tuple((str(k), str(v)) for k, v in d.get("request_flags", ())),
                transforms=tuple(
                    RequestTransform(t["name"], t["op"], tuple(t["inputs"])) for t in d.get("transforms", ())
                ),
                slice_fields=tuple(d.get("slice_fields", ())),
                slice_lookups=tuple(tuple(x) for x in d.get("slice_lookups", ())),
                truth_path=str(d.get("truth_path", "")),
                truth_key=str(d.get("truth_key", "")),
                truth_column=str(d.get("truth_column", "")),
                train_share=float(d.get("train_share", 0.7)),
                validation_share=float(d.get("validation_share", 0.15)),
                init_model=str(d.get("init_model", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError("INVALID_ARGUMENT", f"training spec: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> TrainingSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError("INVALID_ARGUMENT", f"training spec is not JSON: {exc}") from exc


def numeric_features(views: Sequence[FeatureView]) -> list[str]:
    """The `{view}.{feature}` values a model takes as numbers (LAST may be text: not an input)."""
    return list(_numeric_features(tuple(views)))


@functools.lru_cache(maxsize=256)
def _numeric_features(views: tuple[FeatureView, ...]) -> tuple[str, ...]:
    names: list[str] = []
    for view in views:
        for aggregate in view.aggregates:
            if aggregate.aggregation is Aggregation.LAST:
                continue
            names.extend(f"{view.name}.{name}" for name in aggregate.feature_names())
    return tuple(names)


def input_names(spec: TrainingSpec, views: Sequence[FeatureView]) -> list[str]:
    return [
        *numeric_features(views),
        *(f"transform.{t.name}" for t in spec.transforms),
        *(f"request.{name}" for name in spec.request_numbers),
        *(f"request.{name}=={value}" for name, value in spec.request_flags),
    ]


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def model_inputs(
    spec: TrainingSpec, views: Sequence[FeatureView], features: Mapping[str, Any], request: Mapping[str, Any]
) -> list[float]:
    """One input vector, in `input_names` order; NaN marks a missing value."""
    vector = [_number(features.get(name)) for name in _numeric_features(tuple(views))]
    vector += [_number(t.compute(request, features)) for t in spec.transforms]
    vector += [_number(request.get(name)) for name in spec.request_numbers]
    vector += [1.0 if request.get(name) == value else 0.0 for name, value in spec.request_flags]
    return vector
