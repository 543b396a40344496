"""The outcome rule engine: turns decisions and domain events, read from the log in `seq` order, into
the `outcome.recorded` drafts that outcome rules (`d2d.outcomes.OutcomeRule`) say they mean.

Pure logic, no I/O: the feedback service's log consumer feeds it and appends what it returns, and
checkpoints `to_dict()` together with its log position. Semantics, per rule:

- A decision is observed only if its action is in `observed_actions` (selective labels) and its
  `decision_key` resolves to a key; otherwise the rule ignores it entirely.
- Keys are strings; an integer key is compared as its decimal string, so `123` and `"123"` match.
  None, booleans, floats, containers and the empty string are no key and never match.
- A rule event matches every open decision with the same key whose attribution window holds it:
  `0 <= event time - decided_at <= window_seconds`. `window_seconds == 0` means no time limit: any
  later event matches, the window never closes and the otherwise terms are never used.
- The watermark is the newest event time seen (decisions and rule events). A decision's window closes
  once `watermark > decided_at + window + allowed_lateness`; `close_windows()` then gives it the
  otherwise outcome (if the rule has one) with `window_closed=True` and `occurred_at = decided_at + window`.
  An event that arrives after that (late beyond the allowed lateness) gives nothing.
- An event that arrives before its decision is kept per rule and key and joined when the decision
  arrives (earliest in `seq` order first). It is dropped once `watermark > event time + window +
  allowed_lateness`: by then any decision it could match would itself be too late, so dropping never
  changes an outcome.
- A decision that arrives after its own window has closed is too late: the rule gives it nothing (it
  can no longer tell whether an event was missed).
- A decision gets at most one outcome per rule (`rule.outcome_id(decision_id)`) and is forgotten by the
  rule once it has one. A withdrawn decision gets nothing from then on.
- Anything with a `seq` at or below the highest processed is a redelivery and changes nothing.

Cost per call: dict look-ups by (rule, key) and heaps of deadlines, never a scan of open decisions.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from d2d.outcomes import OutcomeRule, outcome_event_id, resolve

__all__ = ["OutcomeDraft", "RuleEngine"]

CHECKPOINT_FORMAT = 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class OutcomeDraft:
    """An outcome a rule gives a decision: the `outcome.recorded` payload's fields, plus its event id."""

    outcome_id: str
    decision_id: str
    label: int | None
    reward: float | None
    occurred_at: datetime
    rule: str
    cause_event_id: str | None
    window_closed: bool
    event_id: uuid.UUID
    source: str = "rule"

    def payload(self) -> dict[str, Any]:
        """The `outcome.recorded` payload (absent label, reward or cause left out)."""
        payload: dict[str, Any] = {"outcome_id": self.outcome_id, "decision_id": self.decision_id}
        if self.label is not None:
            payload["label"] = self.label
        if self.reward is not None:
            payload["reward"] = self.reward
        payload["occurred_at"] = self.occurred_at.isoformat()
        payload["source"] = self.source
        payload["rule"] = self.rule
        if self.cause_event_id is not None:
            payload["cause_event_id"] = self.cause_event_id
        payload["window_closed"] = self.window_closed
        return payload


@dataclass(frozen=True)
class _Open:
    """A decision waiting for its rule's event or its window to close."""

    key: str
    decided_us: int
    seq: int


@dataclass(frozen=True)
class _Kept:
    """A rule event kept for decisions that may still arrive."""

    seq: int
    event_id: str
    occurred_us: int


class _RuleState:
    """One rule's open decisions and kept events, indexed by key, with heaps of their deadlines."""

    def __init__(self, rule: OutcomeRule) -> None:
        self.rule = rule
        self.window_us = rule.window_seconds * 1_000_000 if rule.window_seconds else None
        self.lateness_us = rule.allowed_lateness_seconds * 1_000_000
        self.open: dict[str, _Open] = {}
        self.open_by_key: dict[str, dict[str, None]] = {}  # ordered sets of decision ids, in seq order
        self.deadlines: list[tuple[int, int, str]] = []  # (close after, seq, decision id); stale entries skipped
        self.kept: dict[str, list[_Kept]] = {}
        self.expiries: list[tuple[int, int, str]] = []  # (drop after, seq, key)

    def deadline(self, decided_us: int) -> int | None:
        """The newest watermark at which a decision is still open (None: never closes)."""
        return None if self.window_us is None else decided_us + self.window_us + self.lateness_us

    def in_window(self, decided_us: int, occurred_us: int) -> bool:
        elapsed = occurred_us - decided_us
        return elapsed >= 0 and (self.window_us is None or elapsed <= self.window_us)

    def add_open(self, decision_id: str, entry: _Open) -> None:
        self.open[decision_id] = entry
        self.open_by_key.setdefault(entry.key, {})[decision_id] = None
        deadline = self.deadline(entry.decided_us)
        if deadline is not None:
            heapq.heappush(self.deadlines, (deadline, entry.seq, decision_id))

    def forget(self, decision_id: str) -> _Open | None:
        entry = self.open.pop(decision_id, None)
        if entry is not None:
            same_key = self.open_by_key[entry.key]
            del same_key[decision_id]
            if not same_key:
                del self.open_by_key[entry.key]
        return entry

    def keep(self, key: str, event: _Kept) -> None:
        self.kept.setdefault(key, []).append(event)
        if self.window_us is not None:
            heapq.heappush(self.expiries, (event.occurred_us + self.window_us + self.lateness_us, event.seq, key))

    def drop_expired(self, watermark: int) -> None:
        while self.expiries and self.expiries[0][0] < watermark:
            _, seq, key = heapq.heappop(self.expiries)
            events = [e for e in self.kept[key] if e.seq != seq]
            if events:
                self.kept[key] = events
            else:
                del self.kept[key]


class RuleEngine:
    """Applies outcome rules to the log in `seq` order; see the module docstring for the semantics."""

    def __init__(self, rules: Sequence[OutcomeRule]) -> None:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rules: names must be unique, got {names}")
        self.rules = tuple(rules)
        self._states = [_RuleState(r) for r in self.rules]
        self._by_event_type: dict[str, list[_RuleState]] = {}
        for state in self._states:
            self._by_event_type.setdefault(state.rule.event_type, []).append(state)
        self._last_seq: int | None = None
        self._watermark: int | None = None

    def add_rule(self, rule: OutcomeRule) -> None:
        """A rule registered while the engine runs: it sees the decisions and events after this point
        only (a rule applies from its registration on, so replaying the log gives the same outcomes).
        A rule already known under its name with the same terms changes nothing."""
        known = {r.name: r for r in self.rules}
        if rule.name in known:
            if known[rule.name] != rule:
                raise ValueError(f"rule {rule.name!r} is already known with other terms")
            return
        state = _RuleState(rule)
        self.rules = (*self.rules, rule)
        self._states.append(state)
        self._by_event_type.setdefault(rule.event_type, []).append(state)

    @property
    def last_seq(self) -> int | None:
        """The highest `seq` processed: anything at or below it is a redelivery."""
        return self._last_seq

    @property
    def watermark(self) -> datetime | None:
        """The newest event time seen (decisions and rule events)."""
        return None if self._watermark is None else _from_us(self._watermark)

    def on_decision(
        self, decision_id: str, payload: dict[str, Any], decided_at: datetime, seq: int
    ) -> list[OutcomeDraft]:
        """A `decision.made` (decided_at: its event time, the payload's `as_of`). Returns the outcomes of
        events that arrived before it and fall in its window."""
        if not self._accept(seq):
            return []
        decided_us = _to_us(decided_at, "decided_at")
        self._advance(decided_us)
        action = payload.get("action")
        drafts: list[OutcomeDraft] = []
        for state in self._states:
            rule = state.rule
            if not rule.observes(action if isinstance(action, str) else ""):
                continue
            key = _key(resolve(payload, rule.decision_key))
            if key is None or decision_id in state.open:
                continue
            deadline = state.deadline(decided_us)
            if deadline is not None and self._watermark is not None and self._watermark > deadline:
                continue  # too late: its window closed before it arrived
            earlier = next((e for e in state.kept.get(key, ()) if state.in_window(decided_us, e.occurred_us)), None)
            if earlier is not None:
                drafts.append(_event_outcome(rule, decision_id, earlier.event_id, earlier.occurred_us))
            else:
                state.add_open(decision_id, _Open(key, decided_us, seq))
        return drafts

    def on_withdrawn(self, decision_id: str) -> None:
        """A `decision.withdrawn`: the decision gets no outcome from any rule from now on."""
        for state in self._states:
            state.forget(decision_id)

    def on_event(
        self, event_id: str, event_type: str, payload: dict[str, Any], occurred_at: datetime, seq: int
    ) -> list[OutcomeDraft]:
        """A domain event; for a rule's event type, the outcomes it gives the open decisions on its key."""
        if not self._accept(seq):
            return []
        states = self._by_event_type.get(event_type)
        if not states:
            return []
        occurred_us = _to_us(occurred_at, "occurred_at")
        self._advance(occurred_us)
        watermark = self._watermark
        assert watermark is not None
        drafts: list[OutcomeDraft] = []
        for state in states:
            key = _key(resolve(payload, state.rule.event_key))
            if key is None:
                continue
            state.keep(key, _Kept(seq, event_id, occurred_us))
            for decision_id in list(state.open_by_key.get(key, ())):
                entry = state.open[decision_id]
                deadline = state.deadline(entry.decided_us)
                if state.in_window(entry.decided_us, occurred_us) and (deadline is None or watermark <= deadline):
                    state.forget(decision_id)
                    drafts.append(_event_outcome(state.rule, decision_id, event_id, occurred_us))
        return drafts

    def close_windows(self) -> list[OutcomeDraft]:
        """The otherwise outcomes of decisions whose window the watermark has passed (each once)."""
        watermark = self._watermark
        if watermark is None:
            return []
        drafts: list[OutcomeDraft] = []
        for state in self._states:
            rule = state.rule
            while state.deadlines and state.deadlines[0][0] < watermark:
                _, seq, decision_id = heapq.heappop(state.deadlines)
                entry = state.open.get(decision_id)
                if entry is None or entry.seq != seq:
                    continue  # already labelled by an event, or withdrawn
                state.forget(decision_id)
                if rule.otherwise_label is None and rule.otherwise_reward is None:
                    continue
                assert state.window_us is not None
                outcome_id = rule.outcome_id(decision_id)
                drafts.append(
                    OutcomeDraft(
                        outcome_id=outcome_id,
                        decision_id=decision_id,
                        label=rule.otherwise_label,
                        reward=rule.otherwise_reward,
                        occurred_at=_from_us(entry.decided_us + state.window_us),
                        rule=rule.name,
                        cause_event_id=None,
                        window_closed=True,
                        event_id=outcome_event_id(outcome_id),
                    )
                )
            state.drop_expired(watermark)
        return drafts

    def to_dict(self) -> dict[str, Any]:
        """The engine's state as JSON-ready data (times as RFC 3339 strings), for a checkpoint."""
        rules: dict[str, Any] = {}
        for state in self._states:
            rules[state.rule.name] = {
                "terms": state.rule.to_dict(),
                "open": [[d, e.key, _iso(e.decided_us), e.seq] for d, e in state.open.items()],
                "kept": [[k, e.seq, e.event_id, _iso(e.occurred_us)] for k, es in state.kept.items() for e in es],
            }
        return {
            "format": CHECKPOINT_FORMAT,
            "last_seq": self._last_seq,
            "watermark": None if self._watermark is None else _iso(self._watermark),
            "rules": rules,
        }

    @classmethod
    def from_dict(cls, rules: Sequence[OutcomeRule], d: dict[str, Any]) -> RuleEngine:
        """An engine for `rules` resuming from a `to_dict()` checkpoint. A rule that is new, or whose
        terms changed since, starts empty (it sees decisions from the checkpoint on); the state of a
        rule no longer given is discarded."""
        if d.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format: unknown rule engine checkpoint format {d.get('format')!r}")
        engine = cls(rules)
        engine._last_seq = d["last_seq"]
        engine._watermark = (
            None if d["watermark"] is None else _to_us(datetime.fromisoformat(d["watermark"]), "watermark")
        )
        saved = d["rules"]
        for state in engine._states:
            rule_state = saved.get(state.rule.name)
            if rule_state is None or rule_state["terms"] != state.rule.to_dict():
                continue
            for decision_id, key, decided_at, seq in rule_state["open"]:
                state.add_open(decision_id, _Open(key, _to_us(datetime.fromisoformat(decided_at), "decided_at"), seq))
            for key, seq, event_id, occurred_at in rule_state["kept"]:
                state.keep(key, _Kept(seq, event_id, _to_us(datetime.fromisoformat(occurred_at), "occurred_at")))
        return engine

    def _accept(self, seq: int) -> bool:
        """Whether `seq` is new; redeliveries (at or below the highest processed) are not."""
        if self._last_seq is not None and seq <= self._last_seq:
            return False
        self._last_seq = seq
        return True

    def _advance(self, event_us: int) -> None:
        if self._watermark is None or event_us > self._watermark:
            self._watermark = event_us
            for state in self._states:
                state.drop_expired(event_us)


def _event_outcome(rule: OutcomeRule, decision_id: str, event_id: str, occurred_us: int) -> OutcomeDraft:
    outcome_id = rule.outcome_id(decision_id)
    return OutcomeDraft(
        outcome_id=outcome_id,
        decision_id=decision_id,
        label=rule.label,
        reward=rule.reward,
        occurred_at=_from_us(occurred_us),
        rule=rule.name,
        cause_event_id=event_id,
        window_closed=False,
        event_id=outcome_event_id(outcome_id),
    )


def _key(value: Any) -> str | None:
    """A join key: strings as they are, integers as decimal strings; anything else is no key."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def _to_us(moment: datetime, field: str) -> int:
    """Microseconds since the epoch, exactly (floats would round at today's magnitudes)."""
    if moment.tzinfo is None:
        raise ValueError(f"{field} must be timezone-aware, got {moment!r}")
    return (moment - EPOCH) // MICROSECOND


def _from_us(us: int) -> datetime:
    return EPOCH + us * MICROSECOND


def _iso(us: int) -> str:
    return _from_us(us).isoformat()
