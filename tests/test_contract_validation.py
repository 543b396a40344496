"""Contract validation (`check_payload`, compiled by jsonschema-rs) against the independent pure-Python
`jsonschema` validator, on instances generated from each schema (hypothesis-jsonschema) and on
mutations of them: both accept the same payloads, and a refusal names a field the other validator
also finds at fault."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import jsonschema_rs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from d2d.contracts.registry import Refusal, check_payload
from d2d.sim import load_contracts

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)

HAND_WRITTEN: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "order": {
                "type": "object",
                "properties": {
                    "lines": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 4,
                        "items": {
                            "type": "object",
                            "properties": {"sku": {"type": "string", "minLength": 1}, "qty": {"type": "integer"}},
                            "required": ["sku", "qty"],
                            "additionalProperties": False,
                        },
                    },
                    "total": {"type": "number", "minimum": 0, "exclusiveMaximum": 1e6},
                },
                "required": ["lines"],
            },
        },
        "required": ["order"],
    },
    "alternatives": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["card", "bank", None]},
            "ref": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "maxLength": 5}]},
            "flag": {"const": True},
            "tags": {"type": "array", "uniqueItems": True, "items": {"type": ["string", "null"]}},
        },
        "required": ["kind"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "multipleOf": 3, "maximum": 2**53},
            "x": {"type": "number", "exclusiveMinimum": -1.5, "maximum": 1.5},
            "count": {"type": "integer", "minimum": 0},
        },
        "minProperties": 1,
        "maxProperties": 2,
    },
}

SCHEMAS = {c.event_type: c.schema for c in load_contracts()} | HAND_WRITTEN

# Python's `re.search` lets `$` match before a final newline; ECMA 262, which JSON Schema names for
# `pattern` and jsonschema-rs follows, does not. The reference applies patterns the ECMA way.
_Reference = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {
        "pattern": lambda validator, pattern, instance, schema: (
            None
            if not validator.is_type(instance, "string") or re.search(_ecma(pattern), instance)
            else [jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")]
        )
    },
)


def _ecma(pattern: str) -> str:
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern


def _field(parts: list[Any]) -> str:
    return "payload" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def exact_in_64_bits(value: Any) -> bool:
    """orjson, which reads payloads, reads integers beyond 64 bits as (rounded) floats."""
    if isinstance(value, dict):
        return all(exact_in_64_bits(v) for v in value.values())
    if isinstance(value, list):
        return all(exact_in_64_bits(v) for v in value)
    return not isinstance(value, int) or -(2**63) <= value < 2**64


def check_both(schema: dict[str, Any], instance: dict[str, Any]) -> bool:
    """Validate with both; assert they agree (and that a refusal names a field at fault). Valid?"""
    reference = _Reference(schema)
    errors = list(reference.iter_errors(instance))
    payload = json.dumps(instance).encode()  # as a producer sends it
    try:
        text = check_payload(jsonschema_rs.validator_for(schema), payload)
    except Refusal as refusal:
        assert errors, f"jsonschema-rs refused what jsonschema accepts: {refusal.message} for {instance!r}"
        assert refusal.code == "INVALID_ARGUMENT"
        # The named field is where an error of the reference lies, or a property just below it
        # (the missing or unexpected one).
        at_fault: set[str] = set()
        for e in errors:
            below = set(e.instance) if isinstance(e.instance, dict) else set()
            if e.validator == "required":
                below |= set(e.validator_value)
            at_fault |= {_field([*e.absolute_path, *extra]) for extra in [[], *([k] for k in below)]}
        assert refusal.field in at_fault, (refusal.field, sorted(at_fault), instance)
        return False
    assert not errors, f"jsonschema-rs accepted what jsonschema refuses: {errors[0].message} for {instance!r}"
    assert json.loads(text) == instance
    return True


@st.composite
def mutated(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, Any]:
    """A valid instance with one property dropped, replaced by any JSON value, or added."""
    instance = dict(draw(from_schema(schema)))
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=5,
    )
    how = draw(st.sampled_from(["drop", "replace", "add"]))
    if how == "add" or not instance:
        instance[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    else:
        key = draw(st.sampled_from(sorted(instance)))
        if how == "drop":
            del instance[key]
        else:
            instance[key] = draw(json_values)
    return instance


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_generated_valid_payloads_are_accepted_by_both(name: str) -> None:
    schema = SCHEMAS[name]

    @SETTINGS
    @given(from_schema(schema))
    def accepted(instance: dict[str, Any]) -> None:
        assume(exact_in_64_bits(instance))
        assert check_both(schema, instance), instance

    accepted()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_mutated_payloads_get_the_same_verdict_from_both(name: str) -> None:
    schema = SCHEMAS[name]
    verdicts: list[bool] = []

    @SETTINGS
    @given(mutated(schema))
    def same_verdict(instance: dict[str, Any]) -> None:
        assume(exact_in_64_bits(instance))
        verdicts.append(check_both(schema, instance))

    same_verdict()
    assert False in verdicts, "the mutations produced no invalid payload: the comparison saw only one side"


def test_an_integer_beyond_64_bits_is_checked_exactly() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 2**64}}}
    assert not check_both(schema, {"n": 2**64 + 1})
