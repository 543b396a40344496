"""A small domain for tests/test_upcasting.py, loaded by the features service as its views module
(`D2D_FEATURE_VIEWS`) and upcasters module (`D2D_UPCASTERS`): `meter.reading` v1 carries `kwh`
at the top level; v2 restructures it as `reading: {value, unit}`, with an upcaster from v1."""

from __future__ import annotations

from typing import Any

from d2d.contracts.upcasting import upcaster, without
from d2d.features.definitions import LIFETIME, Aggregate, Aggregation, FeatureView, days

METER_READING = "meter.reading"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

SCHEMA_V1: dict[str, Any] = {
    "$schema": DRAFT,
    "type": "object",
    "properties": {"meter_id": {"type": "string"}, "kwh": {"type": "number"}},
    "required": ["meter_id", "kwh"],
    "additionalProperties": False,
}
SCHEMA_V2: dict[str, Any] = {
    "$schema": DRAFT,
    "type": "object",
    "properties": {
        "meter_id": {"type": "string"},
        "reading": {
            "type": "object",
            "properties": {"value": {"type": "number"}, "unit": {"enum": ["kWh"]}},
            "required": ["value", "unit"],
            "additionalProperties": False,
        },
    },
    "required": ["meter_id", "reading"],
    "additionalProperties": False,
}


@upcaster(METER_READING, from_version=1)
def meter_reading_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    return {**without(payload, "kwh"), "reading": {"value": payload["kwh"], "unit": "kWh"}}


METER_USAGE = FeatureView(
    name="meter_usage",
    entity="meter",
    entity_key="meter_id",
    source=METER_READING,
    aggregates=(
        Aggregate("readings", Aggregation.COUNT, windows=(days(1), LIFETIME)),
        Aggregate("kwh_sum", Aggregation.SUM, "reading.value", (days(1), LIFETIME)),
        Aggregate("kwh_max", Aggregation.MAX, "reading.value", (LIFETIME,)),
        Aggregate("unit_last", Aggregation.LAST, "reading.unit", (LIFETIME,)),
    ),
    allowed_lateness_seconds=3600,
    description="A meter's readings, in the v2 shape (reading.value in kWh).",
)

VIEWS: tuple[FeatureView, ...] = (METER_USAGE,)
