"""The report's plots, one plotly figure per section, built from gathered data alone (no I/O).

A section with nothing to draw carries the reason instead of a figure, so the page says "no data yet"
and why rather than an empty chart.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import plotly.graph_objects as go

from d2d.report.gather import DRIFT_WINDOW, LoggedEvent, ReportData, decision_payloads
from d2d.training.baseline import MAJOR_ABOVE, STABLE_BELOW, psi

log = logging.getLogger(__name__)
LINEAGE_FEATURES = 24  # features drawn one by one in the lineage; the rest as one node
PLOTTED_POINTS = 5000  # at most this many decisions drawn one by one (evenly spaced)
TIME_BINS = 60  # spans of time the events per type are counted in


@dataclass(frozen=True)
class Section:
    key: str  # the plot container's stable `data-plot` name
    title: str
    about: str  # what the plot shows and where it comes from
    figure: go.Figure | None = None
    missing: str | None = None  # why there is no figure


def _layout(figure: go.Figure, **extra: Any) -> go.Figure:
    figure.update_layout(**{"template": "plotly_white", "height": 420, "margin": {"l": 60, "r": 20, "t": 40, "b": 60},
                            **extra})  # fmt: skip
    return figure


def _version_name(model_version: str) -> str:
    """`models/fraud/versions/2` -> `fraud v2`."""
    parts = model_version.split("/")
    return f"{parts[1]} v{parts[3]}" if len(parts) == 4 else model_version


def events_per_type(data: ReportData) -> Section:
    about = "Events in the log per type, bucketed by event time (occurred_at) or log time (recorded_at)."
    if data.truncated:
        about += f" The newest {len(data.events):,} of {sum(data.event_counts.values()):,} events."
    if not data.events:
        return Section("events_per_type", "Events per type over time", about, missing="the log holds no event")
    types = sorted({e.type for e in data.events})
    figure = go.Figure()
    for clock in ("occurred_at", "recorded_at"):
        for t, (starts, counts, width) in binned(data.events, types, clock).items():
            figure.add_trace(go.Bar(
                x=starts, y=counts, width=width, offset=0, name=t, legendgroup=t,
                visible=clock == "occurred_at", showlegend=clock == "occurred_at",
            ))  # fmt: skip
    n = len(types)
    buttons = [
        {"label": label, "method": "update",
         "args": [{"visible": [i // n == k for i in range(2 * n)], "showlegend": [i // n == k for i in range(2 * n)]},
                  {"xaxis.title.text": label}]}
        for k, label in enumerate(("event time", "log time"))
    ]  # fmt: skip
    menu = {"buttons": buttons, "type": "buttons", "direction": "right", "x": 0, "y": 1.12, "xanchor": "left"}
    return Section("events_per_type", "Events per type over time", about, _layout(
        figure, barmode="stack", bargap=0, xaxis_title="event time", yaxis_title="events", updatemenus=[menu],
    ))  # fmt: skip


def binned(
    events: list[LoggedEvent], types: list[str], clock: str, bins: int = TIME_BINS
) -> dict[str, tuple[list[datetime], list[int], float]]:
    """Events per type counted in `bins` equal spans of time by `clock` (occurred_at or recorded_at):
    type -> (each span's start, its count, the span in milliseconds). Counted here, so the page holds
    a few numbers per type rather than every event's time."""
    seconds = np.array([getattr(e, clock).timestamp() for e in events])
    low, high = float(seconds.min()), float(seconds.max())
    width = max((high - low) / bins, 1.0)
    index = np.minimum(((seconds - low) // width).astype(int), bins - 1)
    starts = [datetime.fromtimestamp(low + k * width, UTC) for k in range(bins)]
    kinds = np.array([e.type for e in events])
    return {t: (starts, np.bincount(index[kinds == t], minlength=bins).tolist(), width * 1000) for t in types}


def feature_freshness(data: ReportData) -> Section:
    about = (
        "For each decision, how many log events its features had not folded yet: the decision's position minus "
        "the feature watermark it was served at (an upper bound: events appended while it was decided count too). "
        "Red dotted lines: feature_freshness alerts."
    )
    if data.features_watermark is not None:
        about += (
            f" Now the features service has folded up to seq {data.features_watermark:,} of {data.head_seq:,} "
            f"({data.head_seq - data.features_watermark:,} behind)."
        )
    decisions = [(e, p) for e, p in decision_payloads(data.events) if isinstance(p.get("feature_watermark"), int)]
    if not decisions and data.features_watermark is not None:  # no decision yet: how far behind it is now
        behind = go.Indicator(mode="number", value=max(data.head_seq - data.features_watermark, 0),
                              title={"text": "events the features service has not folded yet"})  # fmt: skip
        return Section("feature_freshness", "Feature freshness", about, _layout(go.Figure(behind), height=260))
    if not decisions:
        why = data.missing.get("features", "the features service has no feature view")
        return Section("feature_freshness", "Feature freshness", about,
                       missing=f"no decision yet, and {why}: freshness is measured on the decisions served "
                       "and on the features service's watermark")  # fmt: skip
    step = max(len(decisions) // PLOTTED_POINTS, 1)  # SVG, not WebGL: it renders without a GPU
    shown = decisions[::step]
    figure = go.Figure(go.Scatter(
        x=[e.recorded_at for e, _ in shown], y=[max(e.seq - p["feature_watermark"], 0) for e, p in shown],
        mode="markers", marker={"size": 4}, name="decisions" if step == 1 else f"every {step}th decision",
    ))  # fmt: skip
    alerts = [
        e for e in data.events if e.type == "quality.alert" and (e.payload or {}).get("kind") == "feature_freshness"
    ]
    for e in alerts:
        figure.add_vline(x=e.recorded_at, line_dash="dot", line_color="red")
    return Section("feature_freshness", "Feature freshness", about, _layout(
        figure, xaxis_title="decided at (log time)", yaxis_title="events behind the log",
    ))  # fmt: skip


def live_auc(data: ReportData) -> Section:
    about = (
        "AUC of each model version and arm on its labelled decisions (feedback's live metrics), the same weighted "
        "by 1 / propensity (IPS, for the whole population under selective labels), and the AUC it had on held-out "
        "data at training."
    )
    rows = [a for arms in data.metrics.values() for a in arms if a.get("auc") is not None]
    if not rows:
        return Section("live_auc", "Live AUC per model version", about, missing=_no_labels(data))
    heldout = {f"models/{v.model}/versions/{v.version}": v.heldout_auc for v in data.versions}
    names = [f"{_version_name(a['model_version'])} {a['arm']}" for a in rows]
    figure = go.Figure([
        go.Bar(x=names, y=[a["auc"] for a in rows], name="live AUC",
               text=[f"{a['labelled']:,} labelled" for a in rows]),
        go.Bar(x=names, y=[a.get("ips_auc") for a in rows], name="live IPS AUC"),
        go.Bar(x=names, y=[heldout.get(a["model_version"]) for a in rows], name="held-out AUC at training"),
    ])  # fmt: skip
    return Section("live_auc", "Live AUC per model version", about, _layout(
        figure, barmode="group", yaxis={"title": "AUC", "range": [0, 1]},
    ))  # fmt: skip


def _no_model(data: ReportData) -> str:
    return data.missing.get("registry") or "no model has been registered yet"


def _no_labels(data: ReportData) -> str:
    """Why there are no live metrics to draw."""
    if "metrics" in data.missing:
        return data.missing["metrics"]
    if not data.versions:
        return _no_model(data)
    return "no decision has a label yet (outcomes arrive after their decisions)"


def calibration(data: ReportData) -> Section:
    about = (
        "Observed outcome rate against the mean predicted score, in ten score bins, per model version and arm "
        "(feedback's live metrics). A calibrated model lies on the diagonal."
    )
    rows = [a for arms in data.metrics.values() for a in arms if a.get("calibration")]
    if not rows:
        return Section("calibration", "Calibration per model version", about, missing=_no_labels(data))
    figure = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="calibrated", line={"dash": "dot"}))
    for a in rows:
        bins = [b for b in a["calibration"] if b.get("count")]
        figure.add_trace(go.Scatter(
            x=[b["mean_predicted"] for b in bins], y=[b["observed_rate"] for b in bins], mode="lines+markers",
            name=f"{_version_name(a['model_version'])} {a['arm']}", text=[f"{b['count']:,} decisions" for b in bins],
        ))  # fmt: skip
    return Section("calibration", "Calibration per model version", about, _layout(
        figure, xaxis={"title": "mean predicted score", "range": [0, 1]},
        yaxis={"title": "observed rate", "range": [0, 1]},
    ))  # fmt: skip


def drift_psi(data: ReportData) -> Section:
    about = (
        f"Population stability index of each input and of the score over each version's newest {DRIFT_WINDOW:,} "
        f"decisions against its training baseline (the measure feedback's drift alerts use). Below {STABLE_BELOW} "
        f"stable, above {MAJOR_ABOVE} a major shift."
    )
    by_version: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _, p in decision_payloads(data.events):
        version = str(p.get("model_version", "")).rsplit("/", 1)[-1]
        if version.isdigit():
            by_version.setdefault((p["model"], int(version)), []).append(p)
    figure = go.Figure()
    for v in data.versions:
        decided = by_version.get((v.model, v.version), [])[-DRIFT_WINDOW:]
        if not decided or not v.baseline:
            continue
        values: dict[str, float] = {}
        if "score" in v.baseline:
            values["score"] = psi(v.baseline["score"], [p["score"] for p in decided])
        for j, name in enumerate(v.feature_names):
            entry = v.baseline.get("inputs", {}).get(name)
            column = [_number(p.get("inputs", [])[j]) if j < len(p.get("inputs", [])) else None for p in decided]
            if entry is not None:
                values[name] = psi(entry, column)
        figure.add_trace(go.Bar(x=list(values), y=list(values.values()), name=f"{v.model} v{v.version}"))
    if not figure.data:
        why = "no model version with a training baseline has made a decision yet" if data.versions else _no_model(data)
        return Section("drift_psi", "Drift (PSI) per input", about, missing=why)
    figure.add_hline(y=STABLE_BELOW, line_dash="dot", line_color="orange")
    figure.add_hline(y=MAJOR_ABOVE, line_dash="dot", line_color="red")
    return Section("drift_psi", "Drift (PSI) per input", about, _layout(figure, barmode="group", yaxis_title="PSI"))


def _number(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def decisions_per_arm(data: ReportData) -> Section:
    about = "Decisions that took effect per model version and arm (decision.made, less withdrawn ones), by action."
    counts = Counter(
        (f"{_version_name(str(p.get('model_version')))} {p.get('arm')}", str(p.get("action")))
        for _, p in decision_payloads(data.events)
    )
    if not counts:
        return Section("decisions_per_arm", "Decisions per arm", about, missing="no decision in the log yet")
    arms = sorted({arm for arm, _ in counts})
    figure = go.Figure([
        go.Bar(x=arms, y=[counts.get((arm, action), 0) for arm in arms], name=action)
        for action in sorted({action for _, action in counts})
    ])  # fmt: skip
    return Section("decisions_per_arm", "Decisions per arm", about,
                   _layout(figure, barmode="stack", yaxis_title="decisions"))  # fmt: skip


def alias_history(data: ReportData) -> Section:
    about = "The version each alias pointed at over time (model.alias_set events); a gap is an alias removed."
    moves = [e for e in data.events if e.type == "model.alias_set" and e.payload]
    if not moves:
        return Section("alias_history", "Alias history", about, missing="no alias has been set yet")
    figure = go.Figure()
    for model, alias in sorted({(e.payload["model"], e.payload["alias"]) for e in moves}):
        mine = [e for e in moves if (e.payload["model"], e.payload["alias"]) == (model, alias)]
        figure.add_trace(go.Scatter(
            x=[e.recorded_at for e in mine] + [data.generated_at], y=[e.payload["version"] for e in mine] + [
                mine[-1].payload["version"]], mode="lines+markers", line_shape="hv", name=f"{model} {alias}",
            text=[e.payload.get("reason") or f"seq {e.seq}" for e in mine] + ["now"],
        ))  # fmt: skip
    return Section("alias_history", "Alias history", about, _layout(
        figure, xaxis_title="log time", yaxis={"title": "version", "dtick": 1},
    ))  # fmt: skip


def ope(data: ReportData) -> Section:
    about = (
        "The value each model version's policy would have had on the logged decisions, estimated off-policy by "
        "IPS, self-normalised IPS and doubly robust, with bootstrap 95% intervals, beside the logging policy's "
        "own average reward (audit's EvaluatePolicy)."
    )
    results = [r for found in data.ope.values() for r in found]
    if not results:
        refused = "; ".join(f"{name}: {reason}" for name, reason in sorted(data.ope_refused.items()))
        why = (
            refused
            or data.missing.get("audit")
            or ("no model has logged decisions to evaluate on yet" if data.versions else _no_model(data))
        )
        return Section("ope", "Off-policy estimates", about, missing=why)
    figure = go.Figure()
    estimators = sorted({name for r in results for name in r["estimates"]}, key=("ips", "snips", "dr").index)
    for r in results:
        figure.add_trace(_estimate_bars(_version_name(r["model_version"]), estimators, r["estimates"]))
    logging = results[0]["logging"]
    figure.add_trace(_estimate_bars("logging policy", ["logged"], {"logged": logging}))
    if data.ope_refused:
        about += " Not estimated: " + "; ".join(f"{n}: {why}" for n, why in sorted(data.ope_refused.items()))
    return Section("ope", "Off-policy estimates", about, _layout(
        figure, barmode="group", yaxis_title="estimated value (average reward)",
    ))  # fmt: skip


def _estimate_bars(name: str, estimators: list[str], estimates: dict[str, dict[str, Any]]) -> go.Bar:
    """Bars of the estimates with asymmetric error bars reaching exactly the interval's bounds."""
    values = [estimates[e]["value"] for e in estimators]
    ups = [_reach(estimates[e].get("ci_high"), v) for e, v in zip(estimators, values, strict=True)]
    downs = [_reach(v, estimates[e].get("ci_low")) for e, v in zip(estimators, values, strict=True)]
    return go.Bar(
        x=estimators, y=values, name=name,
        error_y={"type": "data", "symmetric": False, "array": ups, "arrayminus": downs},
    )  # fmt: skip


def _reach(high: float | None, low: float | None) -> float | None:
    return None if high is None or low is None else max(high - low, 0.0)


def lineage(data: ReportData) -> Section:
    about = "One decision traced back and forward: the events that fed its features, the features, the model version, the decision and its outcome (audit's ExplainDecision)."  # noqa: E501
    x = data.explanation
    if x is None:
        why = data.missing.get("lineage") or data.missing.get("audit") or "no decision in the log yet"
        return Section("lineage", "Lineage of one decision", about, missing=why)
    d = x["decision"]
    labels: list[str] = []
    sources: list[int] = []
    targets: list[int] = []
    values: list[float] = []

    def node(label: str) -> int:
        labels.append(label)
        return len(labels) - 1

    def link(a: int, b: int, value: float = 1.0) -> None:
        sources.append(a)
        targets.append(b)
        values.append(value)

    model = node(f"{_version_name(d['model_version'])}<br>trained on seq {_range(x['model_version'].get('log_range'))}")
    score = d.get("score")
    decision = node(f"decision: {d['action']}<br>score {score:.3g}, p {d.get('propensity')}<br>arm {d['arm']}"
                    if isinstance(score, int | float) else f"decision: {d['action']}")  # fmt: skip
    link(model, decision)
    # what the decision read: its logged feature vector and the model's inputs (request fields, transforms)
    read = [*((x.get("vector") or {}).get("features") or {}), *(x["model_version"].get("feature_names") or [])]
    names = list(dict.fromkeys(read))
    shown, rest = names[:LINEAGE_FEATURES], names[LINEAGE_FEATURES:]
    fed_by = {}  # view name -> its events' node
    for view_name, view in (x.get("views") or {}).items():
        fed_by[view_name] = node(f"{len(view['events'])} events of {view['entity']}<br>{view['entity_id']}")
    for name in shown:
        feature = node(f"feature {name}")
        explained = (x.get("features") or {}).get(name)
        view_name = name.split(".", 1)[0]
        if explained is not None and view_name in fed_by:
            link(fed_by[view_name], feature, max(len(explained.get("events", [])), 1))
        link(feature, model)
    if rest:
        link(node(f"{len(rest)} more features"), model, len(rest))
    outcome = x.get("outcome")
    if outcome is not None:
        label = outcome.get("label", outcome.get("reward"))
        link(decision, node(f"outcome: {label}<br>{outcome.get('source', 'recorded')}, seq {outcome['seq']}"))
    else:
        link(decision, node("outcome:<br>not yet known"))
    figure = go.Figure(go.Sankey(
        node={"label": labels, "pad": 18, "thickness": 14},
        link={"source": sources, "target": targets, "value": values},
    ))  # fmt: skip
    about += f" Decision {d['decision_id']} at seq {d['seq']}; trace {x.get('trace_id') or '-'}."
    return Section("lineage", "Lineage of one decision", about, _layout(figure, height=max(480, 26 * len(shown))))


def _range(log_range: Any) -> str:
    if isinstance(log_range, dict):
        return f"{log_range.get('after_seq', 0)}..{log_range.get('to_seq', '?')}"
    if isinstance(log_range, list | tuple) and len(log_range) == 2:
        return f"{log_range[0]}..{log_range[1]}"
    return "?"


BUILDERS = (events_per_type, feature_freshness, live_auc, calibration, drift_psi, decisions_per_arm, alias_history,
            ope, lineage)  # fmt: skip


def sections(data: ReportData) -> list[Section]:
    """Every section of the page, in reading order. A section that cannot be drawn (data of a shape
    it does not know) says so with the error; the rest of the page still stands."""
    drawn = []
    for build in BUILDERS:
        try:
            drawn.append(build(data))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            log.warning("report: %s not drawn", build.__name__, exc_info=True)
            drawn.append(Section(build.__name__, build.__name__.replace("_", " "), "", missing=f"not drawn: {exc!r}"))
    return drawn
