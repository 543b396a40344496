"""What the feedback service watches for, as pure logic fed in log order: drift of a model's inputs
and score against its training baseline, a drop in its live AUC, new labels, and contract SLAs (null
rates, lateness) of domain events.

Every check runs at a point fixed by the log (every `drift_every` decisions of a version, every
`performance_every` labels, every `sla_every` events of a type), never by the clock, so the same log
gives the same findings at the same positions: a finding's events get ids derived from its position,
and a consumer that re-reads events after a restart appends none twice.

A breach is reported once: a check that finds what the one before it found (the same kind, about
the same version or event type) stays quiet until a check passes again, so a lasting breach is one
alert, not one per window.

A finding may ask for a retrain. At most one retrain is asked per model until its production version
changes (a new one, or the same one set again): the request stands until the registry acts on it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

from d2d.training.baseline import psi
from d2d.training.evaluation import weighted_metrics

FINDING_NAMESPACE = uuid.UUID("5c0e7d1a-2b9f-4c43-9a57-0d2d0d2d0f1d")


@dataclass(frozen=True)
class MonitorSettings:
    """What the monitor checks and how often. `drift_inputs_exclude` names inputs (or "score") PSI is
    not computed on, as shell-style patterns (`fnmatch`, e.g. "*_lifetime", "*_7d"): inputs whose
    distribution moves with the age of the log rather than with the world. A lifetime total or a
    window longer than the log so far keeps growing while the log is young, and a first model's
    training baseline comes from the log's first days, so against it such an input reads as drift
    whatever the traffic does, and the alert would ask for a retrain that fixes nothing."""

    drift_window: int = 2000  # newest decisions of a version the PSI is computed over (PSI on fewer than
    # about 500 values is mostly sampling noise: 100 uniform draws against their own baseline read up to 0.25)
    drift_every: int = 500  # computed each time a version has this many more decisions
    drift_threshold: float = 0.25  # PSI above which an input or the score has drifted ("major")
    performance_window: int = 500  # newest labelled decisions of the production version
    performance_every: int = 250  # computed each time it has this many more labels
    performance_drop: float = 0.05  # live AUC below the version's held-out AUC by more than this
    labels_for_retrain: int = 0  # ask for a retrain after this many new labels (0: never)
    sla_window: int = 1000  # events of a type the null rates and lateness are computed over
    sla_every: int = 1000
    late_share_limit: float = 0.01  # share of a window's events later than the contract allows
    drift_inputs_exclude: tuple[str, ...] = ()  # patterns of names PSI is not computed on (see above)

    def __post_init__(self) -> None:
        patterns = self.drift_inputs_exclude
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"drift_inputs_exclude must be a list of name patterns, got {patterns!r}")
        object.__setattr__(self, "drift_inputs_exclude", tuple(patterns))  # JSON gives a list

    def drift_checked(self, name: str) -> bool:
        """Whether PSI is computed on the input (or "score") called `name`."""
        return not any(fnmatchcase(name, p) for p in self.drift_inputs_exclude)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MonitorSettings:
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> MonitorSettings:
        """Settings from `D2D_FEEDBACK_MONITOR` (a JSON object of the fields to change; empty: defaults);
        SystemExit naming what is wrong, since a service cannot start on settings it cannot read."""
        try:
            return cls(**json.loads(text)) if text.strip() else cls()
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"D2D_FEEDBACK_MONITOR is not a JSON object of MonitorSettings fields: {exc}") from exc


@dataclass(frozen=True)
class Finding:
    kind: str  # drift | performance_drop | new_labels | null_rate | lateness
    at_seq: int  # the log position it was computed at
    source: str  # what it is about: models/{m}/versions/{v}, or an event type
    details: dict[str, Any]
    model: str | None = None
    retrain: bool = False  # whether it asks for a retrain of `model`

    def alert_event_id(self) -> uuid.UUID:
        return uuid.uuid5(FINDING_NAMESPACE, f"alert/{self.kind}/{self.source}/{self.at_seq}")

    def retrain_event_id(self) -> uuid.UUID:
        return uuid.uuid5(FINDING_NAMESPACE, f"retrain/{self.kind}/{self.source}/{self.at_seq}")

    def alert_payload(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "at_seq": self.at_seq, **self.details}

    def retrain_payload(self) -> dict[str, Any]:
        numbers = {k: v for k, v in self.details.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        reason = {"drift": "drift", "performance_drop": "performance", "new_labels": "new_labels"}[self.kind]
        return {"model": self.model, "reason": reason, "details": numbers, "alert_event_id": str(self.alert_event_id())}


@dataclass
class _Version:
    """What the monitor keeps of one model version."""

    baseline: dict[str, Any] | None
    feature_names: list[str]
    heldout_auc: float | None
    decisions: int = 0
    inputs: deque = field(default_factory=deque)  # (inputs, score) of the newest decisions
    labels: int = 0
    labelled: deque = field(default_factory=deque)  # (score, label, propensity) of the newest labels


class Monitor:
    def __init__(self, settings: MonitorSettings | None = None) -> None:
        self.settings = settings or MonitorSettings()
        self._versions: dict[tuple[str, int], _Version] = {}
        self._production: dict[str, int] = {}  # model -> its production version
        self._retrain_asked: set[str] = set()  # models with a request standing
        self._labels_since: dict[str, int] = {}  # model -> labels since its production was set
        self._sla: dict[str, dict[str, Any]] = {}  # event type -> {"seen", "window": deque}
        self._contracts: dict[str, tuple[dict[str, float], int]] = {}
        self._breached: set[tuple[str, str]] = set()  # (kind, source) of breaches already reported

    # -- what the monitor is told ---------------------------------------------------------------

    def know_version(
        self, model: str, version: int, *, baseline: dict[str, Any] | None, feature_names: list[str],
        heldout_auc: float | None,
    ) -> None:  # fmt: skip
        """A version's training baseline, input names and held-out AUC (from its model.registered)."""
        if (model, version) not in self._versions:
            self._versions[(model, version)] = _Version(baseline, list(feature_names), heldout_auc)

    def know_contract(self, event_type: str, null_rate_limits: dict[str, float], allowed_lateness_seconds: int) -> None:
        self._contracts[event_type] = (dict(null_rate_limits), int(allowed_lateness_seconds))

    def production_set(self, model: str, version: int | None) -> None:
        """`production` of `model` moved (to `version`, or removed): a standing request is answered."""
        if version is None:
            self._production.pop(model, None)
        else:
            self._production[model] = version
        self._retrain_asked.discard(model)
        self._labels_since[model] = 0
        self._breached = {b for b in self._breached if not b[1].startswith(f"models/{model}/")}  # look afresh

    # -- the checks -----------------------------------------------------------------------------

    def on_decision(
        self, seq: int, model: str, version: int, inputs: list[float | None], score: float
    ) -> list[Finding]:
        v = self._versions.get((model, version))
        if v is None:
            return []
        s = self.settings
        v.decisions += 1
        v.inputs.append((list(inputs), float(score)))
        while len(v.inputs) > s.drift_window:
            v.inputs.popleft()
        if v.baseline is None or v.decisions % s.drift_every or len(v.inputs) < s.drift_window:
            return []
        columns = list(zip(*(i for i, _ in v.inputs), strict=True)) if v.inputs[0][0] else []
        scores = [sc for _, sc in v.inputs]
        values = (
            {"score": psi(v.baseline["score"], scores)} if "score" in v.baseline and s.drift_checked("score") else {}
        )
        for name, column in zip(v.feature_names, columns, strict=False):
            entry = v.baseline.get("inputs", {}).get(name)
            if entry is not None and s.drift_checked(name):
                values[name] = psi(entry, [None if x is None or math.isnan(x) else x for x in column])
        if not values:
            return []
        worst = max(values, key=lambda k: (values[k], k))
        if not self._begins("drift", f"models/{model}/versions/{version}", values[worst] > s.drift_threshold):
            return []
        drifted = sorted((k for k in values if values[k] > s.drift_threshold), key=lambda k: (-values[k], k))
        details = {
            "psi_max": round(values[worst], 6), "worst": worst, "threshold": s.drift_threshold,
            "window_decisions": len(v.inputs), "drifted": drifted[:10],
            "psi": {k: round(values[k], 6) for k in drifted[:10]},
        }  # fmt: skip
        return [self._finding("drift", seq, model, version, details)]

    def on_outcome(
        self, seq: int, model: str, version: int, score: float, label: int | None, propensity: float
    ) -> list[Finding]:
        """A labelled outcome joined to a decision of `model`@`version`."""
        v = self._versions.get((model, version))
        if v is None or label is None:
            return []
        s = self.settings
        findings: list[Finding] = []
        v.labels += 1
        v.labelled.append((float(score), int(label), float(propensity)))
        while len(v.labelled) > s.performance_window:
            v.labelled.popleft()
        if self._production.get(model) == version:
            since = self._labels_since[model] = self._labels_since.get(model, 0) + 1
            if s.labels_for_retrain and since == s.labels_for_retrain:
                details = {"new_labels": since}
                findings.append(self._finding("new_labels", seq, model, version, details))
        if v.heldout_auc is None or v.labels % s.performance_every or len(v.labelled) < s.performance_window:
            return findings
        scores = np.array([x[0] for x in v.labelled])
        labels = np.array([x[1] for x in v.labelled])
        weights = np.array([1.0 / max(x[2], 0.01) for x in v.labelled])
        live = weighted_metrics(labels, scores, weights)["auc"]
        dropped = live is not None and v.heldout_auc - live > s.performance_drop
        if live is None or not self._begins("performance_drop", f"models/{model}/versions/{version}", dropped):
            return findings
        details = {
            "live_auc": round(live, 6), "heldout_auc": round(v.heldout_auc, 6), "drop": round(v.heldout_auc - live, 6),
            "allowed_drop": s.performance_drop, "window_labels": len(v.labelled),
        }  # fmt: skip
        findings.append(self._finding("performance_drop", seq, model, version, details))
        return findings

    def on_event(
        self, seq: int, event_type: str, payload: dict[str, Any], occurred_at: datetime, recorded_at: datetime
    ) -> list[Finding]:
        """A domain event: its contract's null-rate limits and allowed lateness, over windows."""
        terms = self._contracts.get(event_type)
        if terms is None:
            return []
        limits, lateness = terms
        s = self.settings
        state = self._sla.setdefault(event_type, {"seen": 0, "window": deque()})
        state["seen"] += 1
        nulls = tuple(_is_null(payload, pointer) for pointer in sorted(limits))
        late = (recorded_at - occurred_at).total_seconds() > lateness
        state["window"].append((nulls, late))
        while len(state["window"]) > s.sla_window:
            state["window"].popleft()
        if state["seen"] % s.sla_every:
            return []
        n = len(state["window"])
        findings = []
        rates = {p: sum(w[0][i] for w in state["window"]) / n for i, p in enumerate(sorted(limits))}
        broken = {p: round(r, 6) for p, r in rates.items() if r > limits[p]}
        if self._begins("null_rate", event_type, bool(broken)):
            details = {"window_events": n, "null_rates": broken, "limits": {p: limits[p] for p in broken}}
            findings.append(Finding("null_rate", seq, event_type, details))
        late_share = sum(w[1] for w in state["window"]) / n
        if self._begins("lateness", event_type, late_share > s.late_share_limit):
            details = {"window_events": n, "late_share": round(late_share, 6), "allowed_lateness_seconds": lateness,
                       "late_share_limit": s.late_share_limit}  # fmt: skip
            findings.append(Finding("lateness", seq, event_type, details))
        return findings

    def _begins(self, kind: str, source: str, breached: bool) -> bool:
        """Whether a check that found `breached` starts a breach (one to report)."""
        key = (kind, source)
        if not breached:
            self._breached.discard(key)
            return False
        if key in self._breached:
            return False
        self._breached.add(key)
        return True

    def _finding(self, kind: str, seq: int, model: str, version: int, details: dict[str, Any]) -> Finding:
        """A finding about a version; it asks for a retrain when the version is in production and no
        request for the model stands."""
        asks = self._production.get(model) == version and model not in self._retrain_asked
        if asks:
            self._retrain_asked.add(model)
        return Finding(kind, seq, f"models/{model}/versions/{version}", details, model, asks)

    # -- checkpoints ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "settings": asdict(self.settings),
            "versions": [
                {"model": m, "version": ver, "baseline": v.baseline, "feature_names": v.feature_names,
                 "heldout_auc": v.heldout_auc, "decisions": v.decisions, "inputs": list(v.inputs),
                 "labels": v.labels, "labelled": list(v.labelled)}
                for (m, ver), v in sorted(self._versions.items())
            ],
            "production": self._production, "retrain_asked": sorted(self._retrain_asked),
            "labels_since": self._labels_since, "breached": sorted(list(b) for b in self._breached),
            "sla": {t: {"seen": s["seen"], "window": [[list(n), late] for n, late in s["window"]]}
                    for t, s in sorted(self._sla.items())},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], settings: MonitorSettings | None = None) -> Monitor:
        """The monitor a checkpoint holds, with `settings` (the checkpoint's when None). Windows
        taken under other settings are kept: they are trimmed as new values arrive."""
        if d.get("format") != 1:
            raise ValueError(f"monitor checkpoint format {d.get('format')!r} is not 1")
        monitor = cls(settings or MonitorSettings.from_dict(d["settings"]))
        for x in d["versions"]:
            v = _Version(x["baseline"], x["feature_names"], x["heldout_auc"], x["decisions"],
                         deque((list(i), s) for i, s in x["inputs"]), x["labels"],
                         deque(tuple(t) for t in x["labelled"]))  # fmt: skip
            monitor._versions[(x["model"], x["version"])] = v
        monitor._production = dict(d["production"])
        monitor._retrain_asked = set(d["retrain_asked"])
        monitor._labels_since = dict(d["labels_since"])
        monitor._breached = {(k, s) for k, s in d["breached"]}
        monitor._sla = {
            t: {"seen": s["seen"], "window": deque((tuple(n), late) for n, late in s["window"])}
            for t, s in d["sla"].items()
        }
        return monitor


def _is_null(payload: dict[str, Any], pointer: str) -> bool:
    """Whether the JSON pointer's value is missing or null."""
    value: Any = payload
    for part in pointer.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return True
        if value is None:
            return True
    return False
