"""The simulator's feature views and request transforms (over ``payment.authorized``).

Field names are those of the simulator's ``payment.authorized`` payload (see ``d2d/sim/payments.py``
and its contract); a test checks every one against the contract schema.
"""

from __future__ import annotations

from d2d.features.definitions import (
    LIFETIME,
    Aggregate,
    Aggregation,
    FeatureView,
    Filter,
    RequestTransform,
    days,
    hours,
    minutes,
)

__all__ = ["CARD_PAYMENTS", "CUSTOMER_PAYMENTS", "MERCHANT_PAYMENTS", "TRANSFORMS", "VIEWS"]

# payment.authorized payload fields
PAYMENT_AUTHORIZED = "payment.authorized"
CUSTOMER_ID = "customer_id"
CARD_ID = "card_id"
MERCHANT_ID = "merchant_id"
AMOUNT = "amount"
CHANNEL = "channel"
IP_COUNTRY = "ip_country"
DEVICE_ID = "device_id"

ALLOWED_LATENESS_SECONDS = 3600

COUNT = Aggregation.COUNT

CUSTOMER_PAYMENTS = FeatureView(
    name="customer_payments",
    entity="customer",
    entity_key=CUSTOMER_ID,
    source=PAYMENT_AUTHORIZED,
    aggregates=(
        Aggregate("count", COUNT, windows=(hours(1), days(1), days(7), LIFETIME)),
        Aggregate("amount_sum", Aggregation.SUM, AMOUNT, (days(1), LIFETIME)),
        Aggregate("amount_mean", Aggregation.MEAN, AMOUNT, (days(1), LIFETIME)),
        Aggregate("amount_max", Aggregation.MAX, AMOUNT, (days(1), LIFETIME)),
        Aggregate("distinct_merchants", Aggregation.DISTINCT_COUNT, MERCHANT_ID, (days(1), days(7))),
        Aggregate("distinct_devices", Aggregation.DISTINCT_COUNT, DEVICE_ID, (days(7), LIFETIME)),
        Aggregate("ecom_count", COUNT, windows=(hours(1), days(1)), where=Filter(CHANNEL, "==", "ecom")),
        Aggregate("ip_country_last", Aggregation.LAST, IP_COUNTRY, (LIFETIME,)),
    ),
    allowed_lateness_seconds=ALLOWED_LATENESS_SECONDS,
    description="A customer's authorized payments: velocity, amounts, merchants, devices, channel, IP country.",
)

MERCHANT_PAYMENTS = FeatureView(
    name="merchant_payments",
    entity="merchant",
    entity_key=MERCHANT_ID,
    source=PAYMENT_AUTHORIZED,
    aggregates=(
        Aggregate("count", COUNT, windows=(hours(1), days(1))),
        Aggregate("amount_mean", Aggregation.MEAN, AMOUNT, (days(1), LIFETIME)),
        Aggregate("distinct_customers", Aggregation.DISTINCT_COUNT, CUSTOMER_ID, (days(1),)),
    ),
    allowed_lateness_seconds=ALLOWED_LATENESS_SECONDS,
    description="A merchant's authorized payments: volume, typical amount, customer reach.",
)

CARD_PAYMENTS = FeatureView(
    name="card_payments",
    entity="card",
    entity_key=CARD_ID,
    source=PAYMENT_AUTHORIZED,
    aggregates=(
        Aggregate("count", COUNT, windows=(minutes(10), hours(1), days(1))),
        Aggregate("amount_sum", Aggregation.SUM, AMOUNT, (days(1),)),
        Aggregate("distinct_ip_countries", Aggregation.DISTINCT_COUNT, IP_COUNTRY, (days(1),)),
    ),
    allowed_lateness_seconds=ALLOWED_LATENESS_SECONDS,
    description="A card's authorized payments: short-term velocity, spend, IP countries.",
)

VIEWS: tuple[FeatureView, ...] = (CUSTOMER_PAYMENTS, MERCHANT_PAYMENTS, CARD_PAYMENTS)

# payment.chargeback payloads carry only payment_id (no entity keys), so no view folds them.

TRANSFORMS: tuple[RequestTransform, ...] = (
    RequestTransform("amount_vs_customer_mean_1d", "ratio", (f"request.{AMOUNT}", "customer_payments.amount_mean_1d")),
    RequestTransform("hour_of_day", "hour_of_day", ("request.occurred_at",)),
    # 1.0 when the request's IP country equals the customer's last one (None for a first payment).
    RequestTransform(
        "ip_country_same_as_last", "equals", (f"request.{IP_COUNTRY}", "customer_payments.ip_country_last_lifetime")
    ),
)
