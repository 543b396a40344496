"""Seeded, deterministic payments-domain simulator with known fraud truth.

The simulator produces reference events (customers, their cards, merchants), then
card payments spread over the simulated period with a daily cycle, and chargebacks
that arrive days after fraudulent payments. Every payment's true fraud probability is a
deterministic logistic function of features a model could learn from the event stream
(merchant category, amount, channel, IP/card country mismatch, new device, night hour,
velocity) plus hidden drivers (customer risk segment, merchant risk tier). With the drift switch
(``SimConfig.drift_day``) a new fraud pattern appears from that day on: card-present payments of
everyday amounts, benign before, turn risky, so a model trained before the drift loses on them. With
``SimConfig.drift_bursts_per_day`` the pattern also shows in the inputs: skimmed cards are run through
terminals in bursts (several card-present payments in the drift band on one card within minutes), extra
payments on top of the customers' own, so velocity counts and the amount distribution move.

Only the standard library is used; every random draw comes from ``random.Random``
generators derived from the configured seed, so the same config yields byte-identical
payloads and identical truth.
"""

from __future__ import annotations

import bisect
import csv
import heapq
import itertools
import json
import math
import os
import random
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from d2d.contracts.files import ContractSpec, load_contract_files
from d2d.eventlog import NewEvent
from d2d.private import open_private

__all__ = [
    "ContractSpec",
    "PaymentTruth",
    "PaymentsSimulator",
    "SimConfig",
    "SimEvent",
    "load_contracts",
    "write_truth_csv",
]

CONTRACTS_DIR = Path(__file__).with_name("contracts")

# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class SimEvent:
    """One simulated domain event."""

    event_id: str
    type: str
    schema_version: int
    entity_type: str
    entity_id: str
    occurred_at: datetime
    payload: dict[str, Any]

    def payload_json(self) -> bytes:
        """Compact, key-sorted UTF-8 JSON of the payload."""
        return json.dumps(self.payload, separators=(",", ":"), sort_keys=True).encode()

    def as_new_event(self) -> NewEvent:
        """The event as `EventLog.append` takes it (loading a log directly, without ingest)."""
        return NewEvent(
            uuid.UUID(self.event_id), self.type, self.schema_version, self.entity_type, self.entity_id,
            self.occurred_at, self.payload_json().decode(),
        )  # fmt: skip


@dataclass(frozen=True)
class SimConfig:
    """Simulation parameters; the same config always yields the same events and truth."""

    seed: int = 7
    customers: int = 2_000
    merchants: int = 200
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    days: float = 1.0
    payments_per_day: int = 20_000
    fraud_rate: float = 0.02
    chargeback_delay_days: tuple[float, float] = (2.0, 45.0)
    out_of_order_fraction: float = 0.0
    max_lateness_seconds: float = 600.0
    # The drift switch: from `drift_day` (days after start) on, a new fraud pattern appears: payments on
    # `drift_channel` with an amount in `drift_amount_band` (benign before: card-present, everyday
    # amounts) get `drift_logit` added to their fraud logit. None: no drift (the outputs are those of a
    # config without these fields). The intercept is calibrated on the undrifted logits, so the truth
    # before the drift day is the same as without drift.
    drift_day: float | None = None
    drift_channel: str = "pos"
    drift_amount_band: tuple[float, float] = (20.0, 80.0)
    drift_logit: float = 4.0
    # The drift's covariate part: from `drift_day` on, this many bursts a day of extra `drift_channel`
    # payments with amounts in `drift_amount_band`, `DRIFT_BURST_SIZE` payments on one card at one
    # merchant `DRIFT_BURST_GAP_SECONDS` apart; their truth is the drifted logit like every payment's.
    # They are drawn from a generator of their own and take payment ids after the customers' own, so
    # every other payment and its truth are those of a config without bursts. 0: none (pure concept drift).
    drift_bursts_per_day: float = 0.0


@dataclass(frozen=True)
class PaymentTruth:
    """Ground truth for one payment."""

    payment_id: str
    fraud_probability: float
    is_fraud: bool
    chargeback_at: datetime | None


# --------------------------------------------------------------------------- domain tables

CUSTOMER_COUNTRIES: tuple[tuple[str, float], ...] = (
    ("DE", 0.30), ("FR", 0.20), ("NL", 0.12), ("ES", 0.10), ("IT", 0.10),
    ("BE", 0.06), ("AT", 0.05), ("IE", 0.04), ("PT", 0.03),
)  # fmt: skip
HOME_COUNTRIES = tuple(c for c, _ in CUSTOMER_COUNTRIES)
FOREIGN_IP_COUNTRIES = (
    "US", "GB", "CH", "PL", "RO", "BR", "NG", "IN", "CN", "RU", "TR", "UA", "VN",
) + HOME_COUNTRIES  # fmt: skip

RISK_SEGMENTS: tuple[tuple[str, float], ...] = (("low", 0.70), ("medium", 0.22), ("high", 0.08))
RISK_TIERS: tuple[tuple[str, float], ...] = (("low", 0.70), ("medium", 0.22), ("high", 0.08))


@dataclass(frozen=True)
class _Category:
    mcc: str
    share: float  # share of merchants
    amount_median: float
    amount_sigma: float
    ecom_share: float
    risk: float  # logit contribution
    names: tuple[str, ...] = field(default=())


CATEGORIES: dict[str, _Category] = {
    "grocery": _Category("5411", 0.22, 35.0, 0.7, 0.12, -0.9, ("Market", "Grocer", "Foods")),
    "fuel": _Category("5541", 0.10, 55.0, 0.4, 0.02, -0.6, ("Fuel", "Petrol", "Energy")),
    "restaurants": _Category("5812", 0.18, 30.0, 0.6, 0.20, -0.7, ("Bistro", "Kitchen", "Cafe")),
    "digital_goods": _Category("5818", 0.10, 12.0, 0.8, 0.98, 0.5, ("Apps", "Media", "Stream")),
    "electronics": _Category("5732", 0.12, 180.0, 0.9, 0.55, 0.7, ("Electronics", "Tech")),
    "travel": _Category("4722", 0.10, 320.0, 0.8, 0.85, 0.5, ("Travel", "Tours", "Flights")),
    "gaming": _Category("7994", 0.08, 25.0, 0.9, 0.90, 0.9, ("Games", "Arcade", "Play")),
    "jewelry": _Category("5944", 0.05, 400.0, 0.9, 0.35, 1.1, ("Jewels", "Gold", "Gems")),
}
CATEGORY_BY_MCC = {c.mcc: name for name, c in CATEGORIES.items()}

FIRST_NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hugo", "Ines", "Jonas",
    "Karin", "Luca", "Marie", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sofia", "Tom",
    "Ute", "Victor", "Wim", "Xenia", "Yara", "Zoe", "Lea", "Marco", "Chloe", "Pedro",
)  # fmt: skip
LAST_NAMES = (
    "Muller", "Schmidt", "Martin", "Bernard", "de Vries", "Jansen", "Garcia", "Lopez",
    "Rossi", "Russo", "Peeters", "Maes", "Gruber", "Huber", "Murphy", "Kelly", "Silva",
    "Santos", "Fischer", "Weber", "Dubois", "Moreau", "Bakker", "Visser", "Romano",
)  # fmt: skip
MERCHANT_ADJECTIVES = (
    "Blue", "Green", "Royal", "City", "Sunny", "North", "Golden", "Rapid", "Prime", "Urban",
    "Euro", "Alpine", "Coastal", "Bright", "Grand", "Metro",
)  # fmt: skip
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")

# Relative payment intensity per UTC hour (the daily cycle: more payments by day).
HOURLY_WEIGHTS = (
    0.22, 0.14, 0.10, 0.09, 0.11, 0.20, 0.45, 0.75, 1.00, 1.10, 1.15, 1.20,
    1.30, 1.25, 1.20, 1.20, 1.25, 1.35, 1.45, 1.40, 1.20, 0.95, 0.70, 0.42,
)  # fmt: skip
NIGHT_HOURS = frozenset(range(0, 6))

# Fraud logit weights (an intercept is calibrated so the mean probability = fraud_rate).
W_TIER = {"low": 0.0, "medium": 0.3, "high": 0.9}
W_SEGMENT = {"low": -0.7, "medium": 0.2, "high": 1.5}
W_LOG_AMOUNT = 0.55  # per unit of ln(amount / 50)
W_ECOM = 0.9
W_IP_MISMATCH = 1.5
W_NEW_DEVICE = 1.4
W_NIGHT = 0.8
W_VELOCITY = 0.35  # per payment of the customer in the previous hour
LN50 = math.log(50.0)
VELOCITY_CAP = 6

# Hidden-segment behaviour (makes the segment partly observable).
P_NEW_DEVICE = {"low": 0.02, "medium": 0.05, "high": 0.15}
P_FOREIGN_IP = {"low": 0.04, "medium": 0.08, "high": 0.25}
P_BURST = {"low": 0.06, "medium": 0.10, "high": 0.30}

DRIFT_BURST_SIZE = (4, 10)  # payments per burst, inclusive
DRIFT_BURST_GAP_SECONDS = (10.0, 60.0)

FRAUD_REASON_ECOM = ("10.4", "10.4", "10.4", "10.5")
FRAUD_REASON_POS = ("10.3", "10.3", "10.1", "10.2")

REFERENCE_WINDOW = timedelta(hours=1)  # reference events occur in [start - 1h, start)
CHARGEBACK_NAMESPACE = uuid.UUID("5e0c6a0b-2c1d-4b8e-9f3a-0d2d0d2dcb00")  # ids of `chargeback()` events

# --------------------------------------------------------------------------- contracts

_SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
_TS = {
    "type": "string",
    "format": "date-time",
    "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z$",
}
_COUNTRY = {"type": "string", "pattern": "^[A-Z]{2}$"}
_CUSTOMER_ID = {"type": "string", "pattern": "^cus_[0-9]{6,}$"}
_MERCHANT_ID = {"type": "string", "pattern": "^mer_[0-9]{4,}$"}
_CARD_ID = {"type": "string", "pattern": "^card_[0-9]{6,}_[0-9]+$"}
_PAYMENT_ID = {"type": "string", "pattern": "^pay_[0-9]{8,}$"}
_AMOUNT = {"type": "number", "exclusiveMinimum": 0, "maximum": 1_000_000}
_LEVELS = ["low", "medium", "high"]


def _object(id_: str, title: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": _SCHEMA_URI,
        "$id": f"https://schemas.data2data.example/sim/{id_}.json",
        "title": title,
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def _builtin_contracts() -> list[ContractSpec]:
    return [
        ContractSpec(
            event_type="customer.registered",
            version=1,
            owner="team-customers",
            description="A customer account was registered (reference snapshot).",
            allowed_lateness_seconds=86_400,
            pii_fields=("/name", "/email"),
            schema=_object(
                "customer.registered.v1",
                "customer.registered payload",
                {
                    "customer_id": _CUSTOMER_ID,
                    "name": {"type": "string", "minLength": 1, "maxLength": 200},
                    "email": {
                        "type": "string",
                        "format": "email",
                        "pattern": r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$",
                        "maxLength": 254,
                    },
                    "country": _COUNTRY,
                    "registered_at": _TS,
                    "risk_segment": {"type": "string", "enum": _LEVELS},
                },
            ),
        ),
        ContractSpec(
            event_type="card.issued",
            version=1,
            owner="team-cards",
            description="A payment card was issued to a customer.",
            allowed_lateness_seconds=86_400,
            pii_fields=(),
            schema=_object(
                "card.issued.v1",
                "card.issued payload",
                {
                    "card_id": _CARD_ID,
                    "customer_id": _CUSTOMER_ID,
                    "bin": {"type": "string", "pattern": "^[0-9]{6}$"},
                    "card_country": _COUNTRY,
                    "issued_at": _TS,
                },
            ),
        ),
        ContractSpec(
            event_type="merchant.onboarded",
            version=1,
            owner="team-merchants",
            description="A merchant was onboarded for card acceptance.",
            allowed_lateness_seconds=86_400,
            pii_fields=(),
            schema=_object(
                "merchant.onboarded.v1",
                "merchant.onboarded payload",
                {
                    "merchant_id": _MERCHANT_ID,
                    "name": {"type": "string", "minLength": 1, "maxLength": 200},
                    "mcc": {"type": "string", "pattern": "^[0-9]{4}$"},
                    "category": {"type": "string", "enum": sorted(CATEGORIES)},
                    "country": _COUNTRY,
                    "risk_tier": {"type": "string", "enum": _LEVELS},
                },
            ),
        ),
        ContractSpec(
            event_type="payment.authorized",
            version=1,
            owner="team-payments",
            description="A card payment was authorized.",
            allowed_lateness_seconds=3600,
            pii_fields=(),
            schema=_object(
                "payment.authorized.v1",
                "payment.authorized payload",
                {
                    "payment_id": _PAYMENT_ID,
                    "customer_id": _CUSTOMER_ID,
                    "card_id": _CARD_ID,
                    "merchant_id": _MERCHANT_ID,
                    "amount": _AMOUNT,
                    "currency": {"type": "string", "enum": ["EUR"]},
                    "channel": {"type": "string", "enum": ["ecom", "pos"]},
                    "ip_country": _COUNTRY,
                    "device_id": {"type": "string", "pattern": "^dev_[0-9a-f]{12}$"},
                },
            ),
        ),
        ContractSpec(
            event_type="payment.chargeback",
            version=1,
            owner="team-disputes",
            description="A fraud chargeback was received for an earlier payment.",
            allowed_lateness_seconds=3600,
            pii_fields=(),
            schema=_object(
                "payment.chargeback.v1",
                "payment.chargeback payload",
                {
                    "payment_id": _PAYMENT_ID,
                    "chargeback_id": {"type": "string", "pattern": "^cb_[0-9]{8,}$"},
                    "reason_code": {
                        "type": "string",
                        "enum": ["10.1", "10.2", "10.3", "10.4", "10.5"],
                    },
                    "amount": _AMOUNT,
                },
            ),
        ),
    ]


def load_contracts(directory: str | os.PathLike[str] | None = None) -> list[ContractSpec]:
    """Read the shipped contract files (``d2d/sim/contracts/*.json``), sorted by event type."""
    return load_contract_files(Path(directory) if directory is not None else CONTRACTS_DIR)


def _write_contract_files(directory: str | os.PathLike[str] | None = None) -> None:
    """(Re)generate the contract files from the built-in definitions."""
    d = Path(directory) if directory is not None else CONTRACTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    for spec in _builtin_contracts():
        text = json.dumps(spec.to_dict(), indent=2, ensure_ascii=False) + "\n"
        (d / spec.file_name).write_text(text, "utf-8")


# --------------------------------------------------------------------------- helpers


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _cum(weights: list[float] | tuple[float, ...]) -> list[float]:
    out, acc = [], 0.0
    for w in weights:
        acc += w
        out.append(acc)
    return out


def _pick(rng: random.Random, items: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([i for i, _ in items], weights=[w for _, w in items])[0]


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _calibrate_intercept(logits: list[float], target: float) -> float:
    """Newton solve for b with mean(sigmoid(b + x)) == target."""
    if not logits:
        return 0.0
    n = len(logits)
    b = math.log(target / (1.0 - target)) - sum(logits) / n
    for _ in range(100):
        s = d = 0.0
        for x in logits:
            p = _sigmoid(b + x)
            s += p
            d += p * (1.0 - p)
        f = s / n - target
        if abs(f) < 1e-12 or d <= 0.0:
            break
        step = f / (d / n)
        b -= max(-2.0, min(2.0, step))
    return b


@dataclass
class _Customer:
    id: str
    country: str
    segment: str
    card_ids: list[str]
    card_countries: list[str]
    devices: list[str]
    favourites: list[int]


@dataclass
class _Merchant:
    id: str
    category: str
    country: str
    tier: str


# payment record: (t_us, payment_id, customer_id, card_id, merchant_id, amount, channel,
#                  ip_country, device_id)
_Payment = tuple[int, str, str, str, str, float, str, str, str]


# --------------------------------------------------------------------------- simulator


class PaymentsSimulator:
    """Deterministic generator of payments-domain events with known fraud truth."""

    def __init__(self, config: SimConfig = SimConfig()) -> None:
        _validate(config)
        self.config = config
        self._ref: list[tuple[str, str, str, dict[str, Any]]] | None = None
        self._customers: list[_Customer] = []
        self._merchants: list[_Merchant] = []
        self._payments: list[_Payment] | None = None
        self._truth: dict[str, PaymentTruth] | None = None
        self._index: dict[str, int] | None = None

    # ---- public API

    def contracts(self) -> list[ContractSpec]:
        """Contracts for all emitted event types (same content as ``load_contracts()``)."""
        return sorted(_builtin_contracts(), key=lambda s: (s.event_type, s.version))

    def truth(self) -> dict[str, PaymentTruth]:
        """payment_id -> ground truth, in payment order (includes future chargebacks)."""
        self._ensure_payments()
        assert self._truth is not None
        return dict(self._truth)

    def payment_events(self) -> Iterator[SimEvent]:
        """The `payment.authorized` events of `events()`, in the same order with the same ids."""
        return (e for e in self.events() if e.type == "payment.authorized")

    def reference_events(self) -> list[SimEvent]:
        """The reference events `events()` starts with (customers, cards, merchants)."""
        self._ensure_payments()
        assert self._ref is not None
        return list(itertools.islice(self.events(), len(self._ref)))

    def chargeback(self, payment_id: str) -> SimEvent | None:
        """The chargeback of a fraudulent payment at its truth's `chargeback_at` (None for a genuine one),
        whether or not it falls inside the simulated period; its event id is derived from the payment id.
        The closed loop sends it only for payments that were approved (`d2d.sim.loop`)."""
        self._ensure_payments()
        assert self._payments is not None and self._truth is not None
        truth = self._truth.get(payment_id)
        if truth is None or truth.chargeback_at is None:
            return None
        index = self._payment_index().get(payment_id)
        assert index is not None
        event_id = str(uuid.uuid5(CHARGEBACK_NAMESPACE, payment_id))
        payload = _chargeback_payload(self._payments[index])
        return SimEvent(event_id, "payment.chargeback", 1, "payment", payment_id, truth.chargeback_at, payload)

    def _payment_index(self) -> dict[str, int]:
        if self._index is None:
            assert self._payments is not None
            self._index = {p[1]: i for i, p in enumerate(self._payments)}
        return self._index

    def events(self) -> Iterator[SimEvent]:
        """All events in ARRIVAL order.

        Reference events (customers each followed by their cards, then merchants) come
        first, with occurred_at in ``[start - 1h, start)``. Then payments and chargebacks:
        arrival order equals occurred_at order except for ``out_of_order_fraction`` of them,
        which arrive up to ``max_lateness_seconds`` late. Chargebacks after start+days are
        not emitted (they remain in the truth).
        """
        cfg = self.config
        self._ensure_payments()
        assert self._ref is not None and self._payments is not None and self._truth is not None
        id_rng = random.Random(f"d2d-sim:{cfg.seed}:event-ids")

        def new_id() -> str:
            return str(uuid.UUID(int=id_rng.getrandbits(128), version=4))

        n_ref = len(self._ref)
        window_us = int(REFERENCE_WINDOW.total_seconds() * 1_000_000)
        step_us = max(1, window_us // max(1, n_ref))
        ref_start = cfg.start - REFERENCE_WINDOW
        for k, (etype, entity_type, entity_id, payload) in enumerate(self._ref):
            yield SimEvent(
                new_id(),
                etype,
                1,
                entity_type,
                entity_id,
                ref_start + timedelta(microseconds=k * step_us),
                payload,
            )

        # Dynamic stream in occurred_at order, then the bounded lateness reorder.
        late_rng = random.Random(f"d2d-sim:{cfg.seed}:lateness")
        frac = cfg.out_of_order_fraction
        max_late_us = int(cfg.max_lateness_seconds * 1_000_000)
        heap: list[tuple[int, int, SimEvent]] = []
        for seq, (t_us, ev) in enumerate(self._ordered_dynamic(new_id)):
            delay = 0
            if frac > 0.0 and late_rng.random() < frac:
                delay = late_rng.randint(1, max_late_us) if max_late_us > 0 else 0
            heapq.heappush(heap, (t_us + delay, seq, ev))
            while heap and heap[0][0] <= t_us:
                yield heapq.heappop(heap)[2]
        while heap:
            yield heapq.heappop(heap)[2]

    # ---- generation

    def _ordered_dynamic(self, new_id: Any) -> Iterator[tuple[int, SimEvent]]:
        """Payments and (in-period) chargebacks merged in occurred_at order."""
        cfg = self.config
        assert self._payments is not None and self._truth is not None
        start = cfg.start
        end_us = int(round(cfg.days * 86_400 * 1_000_000))
        truth = self._truth

        chargebacks: list[tuple[int, int]] = []  # (t_us, payment index)
        for i, pay in enumerate(self._payments):
            cb_at = truth[pay[1]].chargeback_at
            if cb_at is not None:
                cb_us = _us_between(start, cb_at)
                if cb_us < end_us:
                    chargebacks.append((cb_us, i))
        chargebacks.sort()

        pays = ((p[0], 0, i) for i, p in enumerate(self._payments))
        cbs = ((t, 1, i) for t, i in chargebacks)
        for t_us, kind, i in heapq.merge(pays, cbs):
            p = self._payments[i]
            occurred = start + timedelta(microseconds=t_us)
            if kind == 0:
                payload = {
                    "payment_id": p[1],
                    "customer_id": p[2],
                    "card_id": p[3],
                    "merchant_id": p[4],
                    "amount": p[5],
                    "currency": "EUR",
                    "channel": p[6],
                    "ip_country": p[7],
                    "device_id": p[8],
                }
                ev = SimEvent(new_id(), "payment.authorized", 1, "payment", p[1], occurred, payload)
            else:
                ev = SimEvent(new_id(), "payment.chargeback", 1, "payment", p[1], occurred, _chargeback_payload(p))
            yield t_us, ev

    def _ensure_payments(self) -> None:
        if self._payments is None:
            self._build_reference()
            self._build_payments()

    def _build_reference(self) -> None:
        cfg = self.config
        rng = random.Random(f"d2d-sim:{cfg.seed}:reference")
        start = cfg.start

        # Merchants first (customers' favourites refer to them); emitted after customers.
        cat_names = list(CATEGORIES)
        cat_w = [CATEGORIES[c].share for c in cat_names]
        merchants: list[_Merchant] = []
        merchant_events: list[tuple[str, str, str, dict[str, Any]]] = []
        for j in range(1, cfg.merchants + 1):
            cat = rng.choices(cat_names, weights=cat_w)[0]
            spec = CATEGORIES[cat]
            m = _Merchant(
                id=f"mer_{j:04d}",
                category=cat,
                country=_pick(rng, CUSTOMER_COUNTRIES),
                tier=_pick(rng, RISK_TIERS),
            )
            merchants.append(m)
            name = f"{rng.choice(MERCHANT_ADJECTIVES)} {rng.choice(spec.names)} {j}"
            merchant_events.append(
                (
                    "merchant.onboarded",
                    "merchant",
                    m.id,
                    {
                        "merchant_id": m.id,
                        "name": name,
                        "mcc": spec.mcc,
                        "category": cat,
                        "country": m.country,
                        "risk_tier": m.tier,
                    },
                )
            )
        # Zipf-like popularity with shuffled ranks.
        ranks = list(range(1, cfg.merchants + 1))
        rng.shuffle(ranks)
        popularity = [1.0 / r**0.8 for r in ranks]
        self._merchant_cum = _cum(popularity)
        by_country: dict[str, list[int]] = {}
        for idx, m in enumerate(merchants):
            by_country.setdefault(m.country, []).append(idx)

        customers: list[_Customer] = []
        ref: list[tuple[str, str, str, dict[str, Any]]] = []
        activity: list[float] = []
        for i in range(1, cfg.customers + 1):
            cid = f"cus_{i:06d}"
            country = _pick(rng, CUSTOMER_COUNTRIES)
            segment = _pick(rng, RISK_SEGMENTS)
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            local = f"{first}.{last}".lower().replace(" ", "")
            email = f"{local}.{i}@{rng.choice(EMAIL_DOMAINS)}"
            registered = start - timedelta(seconds=rng.randint(30 * 86_400, 5 * 365 * 86_400))
            ref.append(
                (
                    "customer.registered",
                    "customer",
                    cid,
                    {
                        "customer_id": cid,
                        "name": f"{first} {last}",
                        "email": email,
                        "country": country,
                        "registered_at": _iso(registered),
                        "risk_segment": segment,
                    },
                )
            )
            n_cards = 2 if rng.random() < 0.35 else 1
            card_ids, card_countries = [], []
            for k in range(1, n_cards + 1):
                card_id = f"card_{i:06d}_{k}"
                if rng.random() < 0.95:
                    card_country = country
                else:
                    card_country = rng.choice([c for c in HOME_COUNTRIES if c != country])
                if rng.random() < 0.6:
                    bin_ = f"4{rng.randrange(100_000):05d}"
                else:
                    bin_ = f"5{rng.randint(1, 5)}{rng.randrange(10_000):04d}"
                span = max(1, int((start - registered).total_seconds()) - 3600)
                issued = registered + timedelta(seconds=rng.randint(0, span))
                card_ids.append(card_id)
                card_countries.append(card_country)
                ref.append(
                    (
                        "card.issued",
                        "card",
                        card_id,
                        {
                            "card_id": card_id,
                            "customer_id": cid,
                            "bin": bin_,
                            "card_country": card_country,
                            "issued_at": _iso(issued),
                        },
                    )
                )
            devices = [f"dev_{rng.getrandbits(48):012x}" for _ in range(rng.randint(1, 2))]
            favourites: list[int] = []
            local_merchants = by_country.get(country, [])
            for _ in range(rng.randint(3, 7)):
                if local_merchants and rng.random() < 0.85:
                    favourites.append(rng.choice(local_merchants))
                else:
                    favourites.append(self._global_merchant(rng))
            customers.append(_Customer(cid, country, segment, card_ids, card_countries, devices, favourites))
            activity.append(rng.lognormvariate(0.0, 0.8))

        self._customers = customers
        self._merchants = merchants
        self._customer_cum = _cum(activity)
        self._ref = ref + merchant_events

    def _global_merchant(self, rng: random.Random) -> int:
        cum = self._merchant_cum
        return bisect.bisect_right(cum, rng.random() * cum[-1], hi=len(cum) - 1)

    def _build_payments(self) -> None:
        cfg = self.config
        customers, merchants = self._customers, self._merchants
        total_us = int(round(cfg.days * 86_400 * 1_000_000))
        n_target = int(round(cfg.payments_per_day * cfg.days))
        start = cfg.start
        day_offset = start.hour * 3600 + start.minute * 60 + start.second

        # 1) Sessions: start times follow the daily cycle; some sessions are bursts.
        srng = random.Random(f"d2d-sim:{cfg.seed}:sessions")
        wmax = max(HOURLY_WEIGHTS)
        ccum = self._customer_cum
        slots: list[tuple[int, int, int]] = []  # (t_us, seq, customer index)
        seq = 0
        while len(slots) < n_target:
            while True:
                t_us = srng.randrange(total_us) if total_us > 0 else 0
                hour = ((day_offset + t_us // 1_000_000) // 3600) % 24
                if srng.random() * wmax < HOURLY_WEIGHTS[hour]:
                    break
            ci = bisect.bisect_right(ccum, srng.random() * ccum[-1], hi=len(ccum) - 1)
            size = 1
            if srng.random() < P_BURST[customers[ci].segment]:
                size = 2
                while size < 8 and srng.random() < 0.55:
                    size += 1
            for _ in range(size):
                if t_us >= total_us or len(slots) >= n_target:
                    break
                slots.append((t_us, seq, ci))
                seq += 1
                t_us += int(srng.uniform(15.0, 900.0) * 1_000_000)
        slots.sort()

        # 2) Payments in time order: features and the fraud logit (without intercept).
        prng = random.Random(f"d2d-sim:{cfg.seed}:payments")
        recent: dict[int, deque[int]] = {}
        payments: list[_Payment] = []
        logits: list[float] = []
        hour_us = 3600 * 1_000_000
        width = max(8, len(str(n_target)))
        for n, (t_us, _, ci) in enumerate(slots, start=1):
            c = customers[ci]
            if prng.random() < 0.7:
                mi = c.favourites[prng.randrange(len(c.favourites))]
            else:
                mi = self._global_merchant(prng)
            m = merchants[mi]
            spec = CATEGORIES[m.category]
            k = 0 if len(c.card_ids) == 1 or prng.random() < 0.75 else 1
            card_id, card_country = c.card_ids[k], c.card_countries[k]
            amount = prng.lognormvariate(math.log(spec.amount_median), spec.amount_sigma)
            amount = round(min(50_000.0, max(0.5, amount)), 2)
            if m.country != c.country:
                ecom = prng.random() < 0.9
            else:
                ecom = prng.random() < spec.ecom_share
            if ecom:
                if prng.random() < P_FOREIGN_IP[c.segment]:
                    ip = prng.choice(FOREIGN_IP_COUNTRIES)
                    if ip == c.country:
                        ip = "US"
                else:
                    ip = c.country
            else:
                ip = m.country
            if prng.random() < P_NEW_DEVICE[c.segment]:
                device = f"dev_{prng.getrandbits(48):012x}"
                c.devices.append(device)
                new_device = True
            else:
                device = c.devices[prng.randrange(len(c.devices))]
                new_device = False
            dq = recent.get(ci)
            if dq is None:
                dq = recent[ci] = deque()
            while dq and dq[0] <= t_us - hour_us:
                dq.popleft()
            velocity = len(dq)
            dq.append(t_us)
            hour = ((day_offset + t_us // 1_000_000) // 3600) % 24

            x = _logit(m, c, amount, ecom, ip != card_country, new_device, hour, velocity)
            logits.append(x)
            payments.append(
                (
                    t_us,
                    f"pay_{n:0{width}d}",
                    c.id,
                    card_id,
                    m.id,
                    amount,
                    "ecom" if ecom else "pos",
                    ip,
                    device,
                )
            )

        # 3) Truth: calibrated probabilities, Bernoulli draws, chargeback delays.
        b = _calibrate_intercept(logits, cfg.fraud_rate)
        truth = self._truth_of(payments, logits, b, random.Random(f"d2d-sim:{cfg.seed}:truth"))

        # 4) The drift's bursts, after the intercept is fixed and from a generator of their own.
        if cfg.drift_day is not None and cfg.drift_bursts_per_day > 0:
            drng = random.Random(f"d2d-sim:{cfg.seed}:drift-bursts")
            bursts, burst_logits = self._drift_bursts(drng, payments, n_target, width)
            truth.update(self._truth_of(bursts, burst_logits, b, drng))
            payments = sorted(payments + bursts, key=lambda p: p[0])  # stable: a tie keeps the customer's first
            truth = {p[1]: truth[p[1]] for p in payments}

        self._payments = payments
        self._truth = truth

    def _truth_of(
        self, payments: list[_Payment], logits: list[float], b: float, rng: random.Random
    ) -> dict[str, PaymentTruth]:
        """Each payment's fraud probability (the drift's logit added where it applies), its Bernoulli
        draw and, for a fraud, its chargeback time."""
        cfg = self.config
        lo, hi = cfg.chargeback_delay_days
        truth: dict[str, PaymentTruth] = {}
        for pay, x in zip(payments, logits, strict=True):
            if cfg.drift_day is not None and _drifted(cfg, pay):
                x += cfg.drift_logit
            p = _sigmoid(b + x)
            is_fraud = rng.random() < p
            cb_at = None
            if is_fraud:
                delay_days = lo + (hi - lo) * rng.betavariate(1.6, 4.0)
                cb_at = cfg.start + timedelta(microseconds=pay[0] + int(delay_days * 86_400e6))
            truth[pay[1]] = PaymentTruth(pay[1], p, is_fraud, cb_at)
        return truth

    def _drift_bursts(
        self, rng: random.Random, payments: list[_Payment], numbered: int, width: int
    ) -> tuple[list[_Payment], list[float]]:
        """The drift's bursts (see `SimConfig.drift_bursts_per_day`) and their logits. Burst starts are
        uniform in event time from the drift day on; a payment's velocity counts the customer's
        payments, their own and the bursts', in the hour before it."""
        cfg = self.config
        assert cfg.drift_day is not None
        first_us = math.ceil(cfg.drift_day * 86_400e6)
        total_us = int(round(cfg.days * 86_400 * 1_000_000))
        if first_us >= total_us:
            return [], []
        cents = (max(1, math.ceil(cfg.drift_amount_band[0] * 100)), math.ceil(cfg.drift_amount_band[1] * 100))
        ecom = cfg.drift_channel == "ecom"
        bursts: list[tuple[int, int, int, int, float]] = []  # (t_us, customer, card, merchant, amount)
        day_offset = cfg.start.hour * 3600 + cfg.start.minute * 60 + cfg.start.second
        wmax = max(HOURLY_WEIGHTS)
        for _ in range(int(round(cfg.drift_bursts_per_day * (total_us - first_us) / 86_400e6))):
            while True:  # the daily cycle of the customers' own payments, so the bursts' share is steady
                t_us = rng.randrange(first_us, total_us)
                if rng.random() * wmax < HOURLY_WEIGHTS[((day_offset + t_us // 1_000_000) // 3600) % 24]:
                    break
            ci = rng.randrange(len(self._customers))
            k = rng.randrange(len(self._customers[ci].card_ids))
            mi = self._global_merchant(rng)
            for _ in range(rng.randint(*DRIFT_BURST_SIZE)):
                if t_us >= total_us:
                    break
                bursts.append((t_us, ci, k, mi, rng.randrange(*cents) / 100))
                t_us += int(rng.uniform(*DRIFT_BURST_GAP_SECONDS) * 1_000_000)
        bursts.sort()

        # The customers' payments in time order, to count the velocity each burst payment sees.
        hour_us = 3_600_000_000
        index = {c.id: ci for ci, c in enumerate(self._customers)}
        own = [(p[0], index[p[2]]) for p in payments if p[0] >= first_us - hour_us]
        recent: dict[int, deque[int]] = {}
        out: list[_Payment] = []
        logits: list[float] = []
        i = 0
        for n, (t_us, ci, k, mi, amount) in enumerate(bursts, start=numbered + 1):
            while i < len(own) and own[i][0] < t_us:
                recent.setdefault(own[i][1], deque()).append(own[i][0])
                i += 1
            dq = recent.setdefault(ci, deque())
            while dq and dq[0] <= t_us - hour_us:
                dq.popleft()
            velocity = len(dq)
            dq.append(t_us)
            c, m = self._customers[ci], self._merchants[mi]
            hour = ((day_offset + t_us // 1_000_000) // 3600) % 24
            card_id, card_country = c.card_ids[k], c.card_countries[k]
            ip = c.country if ecom else m.country
            device = c.devices[rng.randrange(len(c.devices))]
            logits.append(_logit(m, c, amount, ecom, ip != card_country, False, hour, velocity))
            out.append((t_us, f"pay_{n:0{width}d}", c.id, card_id, m.id, amount, cfg.drift_channel, ip, device))
        return out, logits


def _logit(
    m: _Merchant, c: _Customer, amount: float, ecom: bool, ip_mismatch: bool, new_device: bool, hour: int,
    velocity: int,
) -> float:  # fmt: skip
    """A payment's fraud logit before the calibrated intercept (and the drift's term)."""
    return (
        CATEGORIES[m.category].risk
        + W_TIER[m.tier]
        + W_SEGMENT[c.segment]
        + W_LOG_AMOUNT * (math.log(amount) - LN50)
        + (W_ECOM if ecom else 0.0)
        + (W_IP_MISMATCH if ip_mismatch else 0.0)
        + (W_NEW_DEVICE if new_device else 0.0)
        + (W_NIGHT if hour in NIGHT_HOURS else 0.0)
        + W_VELOCITY * min(velocity, VELOCITY_CAP)
    )


def _drifted(cfg: SimConfig, pay: _Payment) -> bool:
    """Whether a payment falls under the drift's new fraud pattern (on or after the drift day)."""
    assert cfg.drift_day is not None
    lo, hi = cfg.drift_amount_band
    return pay[0] >= cfg.drift_day * 86_400e6 and pay[6] == cfg.drift_channel and lo <= pay[5] < hi


def _chargeback_payload(p: _Payment) -> dict[str, Any]:
    reasons = FRAUD_REASON_ECOM if p[6] == "ecom" else FRAUD_REASON_POS
    num = p[1][4:]
    return {
        "payment_id": p[1],
        "chargeback_id": f"cb_{num}",
        "reason_code": reasons[int(num) % len(reasons)],
        "amount": p[5],
    }


def _us_between(a: datetime, b: datetime) -> int:
    d = b - a
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _validate(cfg: SimConfig) -> None:
    if cfg.start.tzinfo is None or cfg.start.utcoffset() != timedelta(0):
        raise ValueError("start must be timezone-aware UTC")
    if cfg.customers < 1 or cfg.merchants < 1:
        raise ValueError("customers and merchants must be >= 1")
    if cfg.days <= 0 or cfg.payments_per_day < 0:
        raise ValueError("days must be > 0 and payments_per_day >= 0")
    if not 0.0 < cfg.fraud_rate < 1.0:
        raise ValueError("fraud_rate must be in (0, 1)")
    lo, hi = cfg.chargeback_delay_days
    if not 0.0 <= lo <= hi:
        raise ValueError("chargeback_delay_days must satisfy 0 <= lo <= hi")
    if not 0.0 <= cfg.out_of_order_fraction <= 1.0:
        raise ValueError("out_of_order_fraction must be in [0, 1]")
    if cfg.max_lateness_seconds < 0:
        raise ValueError("max_lateness_seconds must be >= 0")
    if cfg.drift_day is not None and cfg.drift_day < 0:
        raise ValueError("drift_day must be >= 0 (days after start) or None")
    if cfg.drift_channel not in ("ecom", "pos"):
        raise ValueError("drift_channel must be 'ecom' or 'pos'")
    if not 0.0 <= cfg.drift_amount_band[0] < cfg.drift_amount_band[1]:
        raise ValueError("drift_amount_band must satisfy 0 <= lo < hi")
    if cfg.drift_bursts_per_day < 0:
        raise ValueError("drift_bursts_per_day must be >= 0")


def write_truth_csv(truth: dict[str, PaymentTruth], path: str | os.PathLike[str]) -> None:
    """Write ``payment_id,fraud_probability,is_fraud,chargeback_at`` (ISO-8601 UTC or empty)."""
    with open_private(Path(path), "w", newline="", encoding="utf-8") as fh:  # owner-only: it is the answer key
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["payment_id", "fraud_probability", "is_fraud", "chargeback_at"])
        for t in truth.values():
            cb = _iso(t.chargeback_at) if t.chargeback_at is not None else ""
            w.writerow([t.payment_id, repr(t.fraud_probability), int(t.is_fraud), cb])


if __name__ == "__main__":  # regenerate the shipped contract files
    _write_contract_files()
