"""Logged decisions scored again by another model version: where would its actions have differed?

Each decision is scored on its logged input vector (mapped by input name onto the version's
inputs, as retraining on decisions maps them), or, with `recompute_features`, on a vector rebuilt
from the log at the decision's entities, time and feature watermark (the training frame, equal by
construction to what the online path answered) plus its request context. The new action is the
greedy action of the decision's own logged policy (of either kind, d2d.policies) for the new score,
compared with the greedy action the logged score gave under that policy: exploration draws are not
replayed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.features.offline import FrameRow, training_frame
from d2d.policies import Policy, policy_from_dict
from d2d.replay.explain import log_views
from d2d.replay.log import (
    LoggedDecision,
    ModelVersion,
    Progress,
    load_version,
    logged_decisions,
    logged_vectors,
    no_progress,
)  # fmt: skip
from d2d.training.evaluation import roc_auc
from d2d.training.spec import TrainingSpec, model_inputs

LISTED = 50  # decisions whose action differs, listed with both scores


def _auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    try:
        return roc_auc(labels, scores)
    except ValueError:  # one class only
        return None


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or float(np.std(a)) == 0.0 or float(np.std(b)) == 0.0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


async def recomputed_vectors(log: EventLog, version: ModelVersion, decisions: Sequence[LoggedDecision]) -> np.ndarray:
    """The version's input vectors rebuilt from the log at each decision's (entities, time,
    feature watermark), with its logged request context."""
    spec = TrainingSpec.from_dict(version.payload["spec"])
    registered = await log_views(log)
    missing = [f"{n}@{v}" for n, v in spec.views if (n, v) not in registered]
    if missing:
        raise Refusal(
            "FAILED_PRECONDITION", f"{version.name} reads view versions the log never registered: {', '.join(missing)}",
            "model_version",
        )  # fmt: skip
    views = [registered[key][1] for key in spec.views]
    rows = [
        FrameRow(dict(d.payload.get("entities", {})), d.decided_at, int(d.payload.get("feature_watermark") or 0))
        for d in decisions
    ]  # fmt: skip
    frame = await training_frame(log, views, rows)
    columns = [f"{v.name}.{f}" for v in views for f in v.feature_names()]
    records = frame[columns].to_dict(orient="records")
    vectors = [
        model_inputs(spec, views, _plain(features), d.payload.get("context") or {})
        for features, d in zip(records, decisions, strict=True)
    ]  # fmt: skip
    return np.asarray(vectors, dtype=np.float64).reshape(len(vectors), len(version.feature_names))


def _plain(features: dict[str, Any]) -> dict[str, Any]:
    """Frame cells as the online answer has them: NaN (pandas' empty numeric cell) as None."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in features.items()}


def _same_vector(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


async def rescore(
    log: EventLog, model_version: str, *, model: str | None = None, after_seq: int = 0, to_seq: int | None = None,
    recompute_features: bool = False, progress: Progress = no_progress,
) -> dict[str, Any]:  # fmt: skip
    """Decisions of `model` (default: the version's own) in (after_seq, to_seq] scored by
    `model_version`: counts, where greedy actions differ (by action pair, and the first `LISTED`
    with both scores), how the scores compare, and AUC of both on the labelled decisions.
    NOT_FOUND naming `model_version` for a version the log does not hold."""
    if after_seq < 0:
        raise Refusal("INVALID_ARGUMENT", f"after_seq must not be negative, got {after_seq}", "after_seq")
    if to_seq is not None and to_seq < after_seq:
        raise Refusal("INVALID_ARGUMENT", f"to_seq {to_seq} is before after_seq {after_seq}", "to_seq")
    version = await load_version(log, model_version)
    model = model or version.model
    decisions = await logged_decisions(log, model=model, after=after_seq, to_seq=to_seq)
    progress("decisions", 0, len(decisions))
    result: dict[str, Any] = {
        "model_version": version.name, "model": model, "after_seq": after_seq, "to_seq": to_seq,
        "recompute_features": recompute_features, "decisions": len(decisions),
    }  # fmt: skip
    if not decisions:
        return {**result, "labelled": 0, "actions_differ": 0, "by_action_pair": {}, "differing": []}
    if recompute_features:
        vectors = await recomputed_vectors(log, version, decisions)
    else:
        vectors = await logged_vectors(log, version, decisions)
    new_scores = version.predict(vectors) if len(vectors) else np.zeros(0)
    progress("decisions", len(decisions), len(decisions))

    old = np.asarray([float(d.payload["score"]) for d in decisions])
    new = np.asarray([float(s) for s in new_scores])
    pairs: Counter[str] = Counter()
    differing: list[dict[str, Any]] = []
    differ = 0
    read: dict[bytes, Policy] = {}  # decisions share a few distinct policies: each read once
    for d, old_score, new_score in zip(decisions, old, new, strict=True):
        key = orjson.dumps(d.payload["policy"], option=orjson.OPT_SORT_KEYS)
        policy = read.get(key) or read.setdefault(key, policy_from_dict(d.payload["policy"]))
        before = d.payload.get("greedy_action") or policy.greedy(float(old_score))
        after = policy.greedy(float(new_score))
        pairs[f"{before} -> {after}"] += 1
        if before != after:
            differ += 1
            if len(differing) < LISTED:
                differing.append({
                    "decision_id": d.decision_id, "seq": d.event.seq, "decided_by": d.payload["model_version"],
                    "score": float(old_score), "new_score": float(new_score), "greedy_action": before,
                    "new_greedy_action": after, "action": d.payload["action"], "label": d.label,
                })  # fmt: skip
    labelled = [i for i, d in enumerate(decisions) if d.label is not None]
    labels = [decisions[i].label for i in labelled]
    result.update({
        "decided_by": dict(sorted(Counter(d.payload["model_version"] for d in decisions).items())),
        "labelled": len(labelled),
        "actions_differ": differ,
        "actions_differ_share": differ / len(decisions),
        "by_action_pair": dict(sorted(pairs.items())),
        "scores": {
            "mean_logged": float(old.mean()), "mean_new": float(new.mean()),
            "mean_difference": float((new - old).mean()), "mean_absolute_difference": float(np.abs(new - old).mean()),
            "correlation": _correlation(old, new),
        },
        "auc": {
            "logged": _auc(labels, old[labelled].tolist()) if labelled else None,
            "new": _auc(labels, new[labelled].tolist()) if labelled else None,
        },
        "differing": differing,
        "differing_listed": len(differing),
    })  # fmt: skip
    if recompute_features:
        result["vectors_differing_from_logged"] = await _vectors_differing(log, version, decisions, vectors)
    return result


async def _vectors_differing(
    log: EventLog, version: ModelVersion, decisions: Sequence[LoggedDecision], vectors: np.ndarray
) -> int | None:
    """How many recomputed vectors differ from the logged ones (None when the logged vectors do not
    hold every input of the version)."""
    try:
        logged = await logged_vectors(log, version, decisions)
    except Refusal:
        return None
    return sum(not _same_vector(a, b) for a, b in zip(logged, vectors, strict=True))


def render(result: dict[str, Any]) -> str:
    """The result as a report a person reads (at most 100 columns)."""
    span = f"({result['after_seq']}, {result['to_seq'] if result['to_seq'] is not None else 'head'}]"
    source = "vectors recomputed from the log" if result["recompute_features"] else "the logged vectors"
    lines = [
        f"Rescored {result['decisions']:,} decisions of models/{result['model']} in log seqs {span}",
        f"  with {result['model_version']} on {source}",
    ]
    if not result["decisions"]:
        return "\n".join(lines) + "\n"
    decided = ", ".join(f"{v.rsplit('/', 1)[1]}: {n:,}" for v, n in result["decided_by"].items())
    lines.append(f"  decided by versions {decided}; {result['labelled']:,} labelled")
    if "vectors_differing_from_logged" in result:
        lines.append(f"  recomputed vectors differing from the logged ones: {result['vectors_differing_from_logged']}")
    s, auc = result["scores"], result["auc"]
    lines += [
        "",
        f"Greedy actions differ on {result['actions_differ']:,} ({result['actions_differ_share']:.1%})",
        *(f"  {pair:<40} {n:>10,}" for pair, n in result["by_action_pair"].items()),
        "",
        f"Scores: mean logged {s['mean_logged']:.4f}, new {s['mean_new']:.4f} (difference {s['mean_difference']:+.4f},"
        f" mean absolute {s['mean_absolute_difference']:.4f}), correlation {_num(s['correlation'])}",
        f"AUC on labelled decisions: logged {_num(auc['logged'])}, new {_num(auc['new'])}",
    ]
    if result["differing"]:
        lines += ["", f"Decisions whose action differs (first {result['differing_listed']}):"]
        lines.append(f"  {'decision':<36} {'seq':>9} {'score':>8} {'new':>8}  {'greedy -> new':<22} label")
        for d in result["differing"]:
            change = f"{d['greedy_action']} -> {d['new_greedy_action']}"
            label = "-" if d["label"] is None else str(d["label"])
            scores = f"{d['score']:>8.4f} {d['new_score']:>8.4f}"
            lines.append(f"  {d['decision_id']:<36} {d['seq']:>9} {scores}  {change:<22} {label}")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


__all__ = ["rescore", "render"]
