"""Training a model version from a spec against the log, deterministically.

labels (from the log's upcast payloads, by the label definition) -> point-in-time features (the offline frame, the
same fold as online) -> model inputs -> time-based split -> XGBoost (fixed seed, one thread) ->
evaluation on the held-out test split. The same spec against the same log gives the same
artifact bytes, which `reproduce` checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from d2d.contracts.upcasting import upcast_event
from d2d.eventlog import EventLog
from d2d.features.definitions import FeatureView
from d2d.features.offline import FrameRow
from d2d.replay.partition import training_frame_on_every_core
from d2d.training.artifacts import registered_version
from d2d.training.baseline import baseline, column_baseline
from d2d.training.decisions import decision_examples, logged_inputs
from d2d.training.evaluation import evaluate, roc_auc
from d2d.training.labels import DecisionLabel, LabeledExample, label_examples
from d2d.training.spec import SpecError, TrainingSpec, input_names, model_inputs
from d2d.training.split import time_split

Progress = Callable[[str, str, float], None]
PAGE = 20_000


@dataclass(frozen=True)
class TrainedModel:
    spec: TrainingSpec  # with to_seq resolved
    artifact: bytes
    sha256: str
    feature_names: list[str]
    evaluation: dict[str, Any]
    lineage: dict[str, Any]


def _quiet(stage: str, message: str, fraction: float) -> None:
    pass


async def labeled_examples(log: EventLog, spec: TrainingSpec) -> list[LabeledExample]:
    """The examples of the spec's log range with their labels; FAILED_PRECONDITION if there are none."""
    label = spec.label
    events = []
    after = spec.after_seq
    while after < spec.to_seq:
        page = await log.read(after, PAGE, types=[label.example_type, label.outcome_type])
        page = [upcast_event(e) for e in page if e.seq <= spec.to_seq]
        events.extend(page)
        if len(page) < PAGE:
            break
        after = page[-1].seq
    if not any(e.type == label.example_type for e in events):
        raise SpecError(
            "FAILED_PRECONDITION",
            f"the log range ({spec.after_seq}, {spec.to_seq}] holds no {label.example_type} events to learn from",
        )
    as_of = max(e.occurred_at for e in events)
    examples = label_examples(events, label, as_of=as_of)
    if not examples:
        raise SpecError(
            "FAILED_PRECONDITION",
            f"every {label.example_type} event in ({spec.after_seq}, {spec.to_seq}] is younger than the label window "
            f"({label.window_seconds} s before {as_of.isoformat()}): no example has a known outcome yet",
        )
    classes = {e.label for e in examples}
    if len(classes) < 2:
        raise SpecError(
            "FAILED_PRECONDITION",
            f"the label definition yields only class {classes.pop()} in {len(examples)} examples "
            f"({label.outcome_type} within {label.window_seconds} s of {label.example_type}): nothing to learn",
        )
    return examples


def request_context(example: LabeledExample) -> dict[str, Any]:
    return {**example.payload, "occurred_at": example.occurred_at.isoformat()}


async def build_inputs(
    log: EventLog, spec: TrainingSpec, views: Sequence[FeatureView], examples: Sequence[LabeledExample]
) -> np.ndarray:
    """The model inputs of each example: features as of just before it, and its own request."""
    keyed = [v for v in views if v.source == spec.label.example_type]
    rows = [
        FrameRow(
            {v.entity: str(e.payload[v.entity_key]) for v in keyed if v.entity_key in e.payload},
            e.occurred_at,
            e.seq - 1,
            e.event_id,
        )
        for e in examples
    ]
    frame = await training_frame_on_every_core(log, views, rows)
    names = [c for c in frame.columns if "." in c]
    records = frame[names].to_dict("records")
    matrix = [
        model_inputs(spec, views, {k: (None if v != v else v) for k, v in record.items()}, request_context(example))
        for record, example in zip(records, examples, strict=True)
    ]
    return np.asarray(matrix, dtype=np.float64)


async def train(
    log: EventLog, spec: TrainingSpec, views: Sequence[FeatureView], progress: Progress = _quiet
) -> TrainedModel:
    import xgboost as xgb

    if spec.to_seq <= 0:
        spec = TrainingSpec(**{**spec.__dict__, "to_seq": await log.head()})
    names = input_names(spec, views)
    weights: np.ndarray | None = None
    decisions: dict[str, Any] = {}
    if isinstance(spec.label, DecisionLabel):
        # The logged decisions and their outcomes: inputs as served, weights by the label's weighting.
        where = f"models/{spec.label.model} in ({spec.after_seq}, {spec.to_seq}]"
        progress("labels", f"joining the decisions of {where} with their outcomes", 0.05)
        found = await decision_examples(log, spec, names)
        examples, inputs, weights = found.examples, found.inputs, found.weights
        decisions = {"decisions": found.counts, "weighting": spec.label.weighting}
        positives = sum(e.label for e in examples)
    else:
        progress("labels", f"labelling {spec.label.example_type} events in ({spec.after_seq}, {spec.to_seq}]", 0.05)
        examples = await labeled_examples(log, spec)
        positives = sum(e.label for e in examples)
        progress("features", f"{len(examples):,} examples ({positives:,} positive): point-in-time features", 0.15)
        inputs = await build_inputs(log, spec, views, examples)
    labels = np.asarray([e.label for e in examples], dtype=np.float64)
    split = time_split([e.occurred_at for e in examples], train=spec.train_share, validation=spec.validation_share)
    for part, rows in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        if len({int(labels[i]) for i in rows}) < 2:
            raise SpecError(
                "FAILED_PRECONDITION",
                f"the {part} split ({len(rows)} examples) has only one class: the log range is too short to learn from",
            )
    progress("training", f"XGBoost on {len(split.train):,} rows, {len(names)} inputs", 0.5)
    params = {**dict(spec.params), "seed": spec.seed}

    def matrix(rows: list[int]) -> Any:
        weight = weights[rows] if weights is not None else None
        return xgb.DMatrix(inputs[rows], label=labels[rows], weight=weight, feature_names=names, missing=np.nan)

    train_m, valid_m = matrix(split.train), matrix(split.validation)
    parent = await _parent_booster(log, spec, names) if spec.init_model else None

    def fit() -> Any:  # in a thread: a service keeps answering while it trains
        return xgb.train(
            params,
            train_m,
            num_boost_round=spec.num_boost_round,
            evals=[(valid_m, "validation")],
            early_stopping_rounds=spec.early_stopping_rounds,
            verbose_eval=False,
            xgb_model=parent,
        )

    booster = await asyncio.to_thread(fit)
    artifact = bytes(booster.save_raw(raw_format="ubj"))
    progress("evaluation", "scoring the held-out test split", 0.85)
    scores = predict(artifact, inputs[split.test])
    test_labels = [int(labels[i]) for i in split.test]
    slices = {f: [examples[i].payload.get(f) for i in split.test] for f in spec.slice_fields}
    for name, event_type, key, value_field in spec.slice_lookups:
        lookup = await _lookup(log, event_type, key, value_field, spec.to_seq)
        slices[name] = [lookup.get(examples[i].payload.get(key)) for i in split.test]
    evaluation = evaluate(test_labels, scores.tolist(), slices=slices).to_dict()
    if spec.truth_path:
        evaluation["truth"] = _against_truth(spec, [examples[i] for i in split.test], test_labels, evaluation["auc"])
    lineage = {
        "libraries": {"xgboost": xgb.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "examples": len(examples),
        "positives": positives,
        "rows": {"train": len(split.train), "validation": len(split.validation), "test": len(split.test)},
        "best_iteration": int(booster.best_iteration),
        "views": [list(v) for v in spec.views],
        "log_range": [spec.after_seq, spec.to_seq],
        **({"init_model": spec.init_model, "init_trees": parent.num_boosted_rounds()} if parent is not None else {}),
        "test_examples": [[examples[i].event_id, test_labels[k]] for k, i in enumerate(split.test)],
        "baseline": training_baseline(artifact, inputs[split.train], names),
        **decisions,
    }
    return TrainedModel(spec, artifact, hashlib.sha256(artifact).hexdigest(), names, evaluation, lineage)


async def _parent_booster(log: EventLog, spec: TrainingSpec, names: Sequence[str]) -> Any:
    """The trees of `spec.init_model` up to its best iteration, to boost on from: the same inputs in
    the same order, or FAILED_PRECONDITION."""
    import xgboost as xgb

    registered, artifact = await registered_version(log, spec.init_model)
    if list(registered.payload.get("feature_names", [])) != list(names):
        raise SpecError(
            "FAILED_PRECONDITION", f"init_model {spec.init_model} takes other inputs than this spec gives; a model"
            " can only boost on from a version with the same inputs in the same order",
        )  # fmt: skip
    booster = xgb.Booster(params={"nthread": 1})
    booster.load_model(bytearray(artifact))
    best = int(booster.attr("best_iteration") or -1)
    return booster[: best + 1] if best >= 0 else booster


def training_baseline(artifact: bytes, train_inputs: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """What live drift is measured against (`d2d.training.baseline`): the distribution of every input
    and of the model's score over the training rows. Kept in the lineage, not the artifact, so the
    artifact's bytes do not depend on it."""
    columns = {name: train_inputs[:, j] for j, name in enumerate(names)}
    return {
        "inputs": baseline(columns),
        "score": column_baseline(predict(artifact, train_inputs).astype(np.float64)),
    }


async def _lookup(log: EventLog, event_type: str, key: str, value_field: str, to_seq: int) -> dict[Any, Any]:
    """key -> value from the newest event of a type (up to to_seq), e.g. merchant_id -> category."""
    found: dict[Any, Any] = {}
    after = 0
    while True:
        page = await log.read(after, PAGE, types=[event_type])
        for e in map(upcast_event, page):
            if e.seq <= to_seq and key in e.payload:
                found[e.payload[key]] = e.payload.get(value_field)
        if len(page) < PAGE or page[-1].seq >= to_seq:
            return found
        after = page[-1].seq


def _against_truth(
    spec: TrainingSpec, examples: Sequence[LabeledExample], labels: list[int], model_auc: float | None
) -> dict[str, Any]:
    """The truth's own AUC on the held-out rows: the best any model could do on them."""
    import csv

    try:
        with open(spec.truth_path, newline="", encoding="utf-8") as fh:
            truth = {row[spec.truth_key]: float(row[spec.truth_column]) for row in csv.DictReader(fh)}
    except (OSError, KeyError, ValueError) as exc:
        return {"error": f"truth not readable: {exc!r}"}
    known = [(label, truth[e.payload[spec.truth_key]]) for e, label in zip(examples, labels, strict=True)
             if e.payload.get(spec.truth_key) in truth]  # fmt: skip
    if len({label for label, _ in known}) < 2:
        return {"rows": len(known), "auc": None}
    truth_auc = roc_auc([label for label, _ in known], [p for _, p in known])
    return {"rows": len(known), "auc": truth_auc, "model_auc_minus_truth_auc": (model_auc or 0.0) - truth_auc}


def predict(artifact: bytes, inputs: np.ndarray) -> np.ndarray:
    """Scores of a stored model for rows of model inputs (its best iteration)."""
    import xgboost as xgb

    booster = xgb.Booster(params={"nthread": 1})
    booster.load_model(bytearray(artifact))
    best = int(booster.attr("best_iteration") or -1)
    iteration_range = (0, best + 1) if best >= 0 else (0, 0)
    return booster.predict(
        xgb.DMatrix(inputs, missing=np.nan), iteration_range=iteration_range, validate_features=False
    )


async def compare_on_rows(
    log: EventLog,
    rows: Sequence[tuple[str, int]],
    candidate: tuple[TrainingSpec, Sequence[FeatureView], bytes],
    incumbent: tuple[TrainingSpec, Sequence[FeatureView], bytes],
) -> tuple[float, float, int]:
    """AUC of two models on the same held-out examples (event id, label): (candidate, incumbent, n).

    Examples of a model trained on decisions are decisions: both models score the inputs they logged."""
    wanted = {event_id: label for event_id, label in rows}
    events = []
    after = 0
    decided = candidate[0].label
    while len(events) < len(wanted):
        page = await log.read(after, PAGE, types=[decided.example_type])
        if not page:
            break
        events.extend(e for e in map(upcast_event, page) if str(e.event_id) in wanted)
        after = page[-1].seq
    examples = [
        LabeledExample(str(e.event_id), e.seq, e.occurred_at, e.payload, wanted[str(e.event_id)]) for e in events
    ]
    labels = [e.label for e in examples]
    aucs = []
    for spec, views, artifact in (candidate, incumbent):
        if isinstance(decided, DecisionLabel):
            inputs = await logged_inputs(log, decided, input_names(spec, views), events, candidate[0].to_seq)
        else:
            inputs = await build_inputs(log, spec, views, examples)
        aucs.append(roc_auc(labels, predict(artifact, inputs).tolist()))
    return aucs[0], aucs[1], len(examples)
