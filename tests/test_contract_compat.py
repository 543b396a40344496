"""Unit tests for schema-evolution compatibility checks (d2d.contracts.compat)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from d2d.contracts.compat import CompatibilityMode, Incompatibility, check_compatibility, is_subschema


def obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or [], **extra}


STR = {"type": "string"}
NUM = {"type": "number"}
INT = {"type": "integer"}
PAYMENT = obj({"id": STR, "amount": NUM}, ["id", "amount"])


def where(problems: list[Incompatibility]) -> set[tuple[str, str, int]]:
    return {(p.field, p.direction, p.against_version) for p in problems}


def test_adding_optional_field_is_backward_and_forward_compatible() -> None:
    # additional properties must be strings, so a new optional string field is covered both ways
    old = obj({"id": STR}, ["id"], additionalProperties=STR)
    new = obj({"id": STR, "note": STR}, ["id"], additionalProperties=STR)
    assert check_compatibility(new, [(1, old)], CompatibilityMode.FULL) == []


def test_adding_optional_field_to_closed_schema_is_backward_but_not_forward_compatible() -> None:
    old = obj({"id": STR}, ["id"], additionalProperties=False)
    new = obj({"id": STR, "note": STR}, ["id"], additionalProperties=False)
    assert check_compatibility(new, [(1, old)], "BACKWARD") == []
    assert where(check_compatibility(new, [(1, old)], "FORWARD")) == {("/note", "FORWARD", 1)}


def test_adding_constrained_optional_field_to_open_schema_breaks_backward() -> None:
    # old data may carry any value under "note"; the new schema insists on a string
    new = obj({"id": STR, "amount": NUM, "note": STR}, ["id", "amount"])
    problems = check_compatibility(new, [(1, PAYMENT)], "BACKWARD")
    assert where(problems) == {("/note", "BACKWARD", 1)}
    assert "constrained" in problems[0].reason


def test_adding_required_field_breaks_backward_and_names_the_field() -> None:
    new = obj({"id": STR, "amount": NUM, "currency": STR}, ["id", "amount", "currency"])
    problems = check_compatibility(new, [(1, PAYMENT)], "BACKWARD")
    assert {p.field for p in problems} == {"/currency"}
    assert all(p.direction == "BACKWARD" and p.against_version == 1 for p in problems)
    assert any("'currency' is required by the new schema" in p.reason for p in problems)


def test_adding_required_field_is_forward_compatible() -> None:
    new = obj({"id": STR, "amount": NUM, "currency": STR}, ["id", "amount", "currency"])
    assert check_compatibility(new, [(1, PAYMENT)], "FORWARD") == []


def test_removing_required_field_breaks_forward() -> None:
    new = obj({"id": STR}, ["id"])
    problems = check_compatibility(new, [(1, PAYMENT)], "FORWARD")
    assert where(problems) == {("/amount", "FORWARD", 1)}
    assert any("'amount' is required by version 1 but not by the new schema" in p.reason for p in problems)


def test_removing_property_breaks_backward_when_new_schema_is_closed() -> None:
    old = obj({"id": STR, "legacy": STR}, ["id"], additionalProperties=False)
    new = obj({"id": STR}, ["id"], additionalProperties=False)
    problems = check_compatibility(new, [(3, old)], "BACKWARD")
    assert where(problems) == {("/legacy", "BACKWARD", 3)}


def test_narrowing_number_to_integer_breaks_backward_naming_the_field() -> None:
    new = obj({"id": STR, "amount": INT}, ["id", "amount"])
    problems = check_compatibility(new, [(1, PAYMENT)], "BACKWARD")
    assert where(problems) == {("/amount", "BACKWARD", 1)}
    assert "type 'number'" in problems[0].reason


def test_widening_integer_to_number_is_backward_compatible_but_breaks_forward() -> None:
    old = obj({"qty": INT}, ["qty"])
    new = obj({"qty": NUM}, ["qty"])
    assert check_compatibility(new, [(1, old)], "BACKWARD") == []
    assert where(check_compatibility(new, [(1, old)], "FORWARD")) == {("/qty", "FORWARD", 1)}


def test_enum_gaining_a_value_is_backward_compatible_but_breaks_forward() -> None:
    old = obj({"channel": {"type": "string", "enum": ["ecom", "pos"]}})
    new = obj({"channel": {"type": "string", "enum": ["ecom", "pos", "moto"]}})
    assert check_compatibility(new, [(1, old)], "BACKWARD") == []
    problems = check_compatibility(new, [(1, old)], "FORWARD")
    assert where(problems) == {("/channel", "FORWARD", 1)}
    assert '"moto"' in problems[0].reason


def test_full_reports_both_directions() -> None:
    old = obj({"qty": INT, "sku": STR}, ["qty", "sku"])
    new = obj({"qty": NUM, "sku": STR, "lot": STR}, ["qty", "sku", "lot"])  # widened qty, added required lot
    problems = check_compatibility(new, [(1, old)], CompatibilityMode.FULL)
    assert where(problems) == {("/qty", "FORWARD", 1), ("/lot", "BACKWARD", 1)}


def test_full_is_compatible_when_both_directions_are() -> None:
    old = obj({"sku": {"type": "string", "maxLength": 10}}, ["sku"])
    new = obj({"sku": {"type": "string", "maxLength": 10, "description": "stock keeping unit"}}, ["sku"])
    assert check_compatibility(new, [(1, old)], "FULL") == []


def test_transitive_mode_catches_break_against_older_version() -> None:
    closed = {"additionalProperties": False}
    v1 = obj({"id": STR}, ["id"], **closed)
    v2 = obj({"id": STR, "currency": STR}, ["id", "currency"], **closed)  # registered while the mode was NONE
    v3 = obj({"id": STR, "currency": STR, "note": STR}, ["id", "currency"], **closed)
    history = [(1, v1), (2, v2)]
    assert check_compatibility(v3, history, "BACKWARD") == []
    problems = check_compatibility(v3, history, CompatibilityMode.BACKWARD_TRANSITIVE)
    assert where(problems) == {("/currency", "BACKWARD", 1)}


def test_forward_transitive_checks_every_previous_version() -> None:
    v1 = obj({"id": STR, "ref": STR}, ["id", "ref"])
    v2 = obj({"id": STR, "ref": STR}, ["id"])
    v3 = obj({"id": STR, "ref": STR}, ["id"])
    assert check_compatibility(v3, [(1, v1), (2, v2)], "FORWARD") == []
    assert where(check_compatibility(v3, [(1, v1), (2, v2)], "FORWARD_TRANSITIVE")) == {("/ref", "FORWARD", 1)}


def test_nested_object_field_pointer() -> None:
    old = obj({"card": obj({"bin": {"type": "string", "maxLength": 8}})})
    new = obj({"card": obj({"bin": {"type": "string", "maxLength": 6}})})
    problems = check_compatibility(new, [(2, old)], "BACKWARD")
    assert where(problems) == {("/card/bin", "BACKWARD", 2)}
    assert "maxLength 6" in problems[0].reason


def test_array_items_field_pointer() -> None:
    old = obj({"items": {"type": "array", "items": obj({"sku": STR}, ["sku"])}})
    new = obj({"items": {"type": "array", "items": obj({"sku": STR, "qty": INT}, ["sku", "qty"])}})
    assert where(check_compatibility(new, [(1, old)], "BACKWARD")) == {("/items/*/qty", "BACKWARD", 1)}


def test_lowering_max_items_breaks_backward() -> None:
    old = {"type": "array", "items": STR, "maxItems": 10}
    new = {"type": "array", "items": STR, "maxItems": 5}
    assert where(check_compatibility(new, [(1, old)], "BACKWARD")) == {("", "BACKWARD", 1)}
    assert check_compatibility(new, [(1, old)], "FORWARD") == []


def test_raising_minimum_breaks_backward() -> None:
    old = obj({"amount": {"type": "number", "minimum": 0}})
    new = obj({"amount": {"type": "number", "minimum": 1}})
    assert where(check_compatibility(new, [(1, old)], "BACKWARD")) == {("/amount", "BACKWARD", 1)}
    assert check_compatibility(new, [(1, old)], "FORWARD") == []


def test_none_mode_accepts_anything() -> None:
    assert check_compatibility({"type": "string"}, [(1, PAYMENT)], CompatibilityMode.NONE) == []
    assert check_compatibility(False, [(1, PAYMENT)], "NONE") == []  # type: ignore[arg-type]


def test_no_previous_versions_is_compatible() -> None:
    assert check_compatibility(PAYMENT, [], "FULL_TRANSITIVE") == []


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError):
        check_compatibility(PAYMENT, [(1, PAYMENT)], "SIDEWAYS")


def test_differing_one_of_is_reported_not_accepted() -> None:
    card, bank = obj({"pan": STR}, ["pan"]), obj({"iban": STR}, ["iban"])
    old = obj({"method": {"oneOf": [card, bank]}})
    new = obj({"method": {"oneOf": [card, bank, obj({"wallet": STR}, ["wallet"])]}})
    problems = check_compatibility(new, [(1, old)], "BACKWARD")
    assert where(problems) == {("/method", "BACKWARD", 1)}
    assert "oneOf" in problems[0].reason and "could not be proven" in problems[0].reason


def test_unknown_keyword_added_is_reported() -> None:
    old = obj({"code": STR})
    new = obj({"code": {"type": "string", "fancyConstraint": 3}})
    problems = check_compatibility(new, [(1, old)], "BACKWARD")
    assert where(problems) == {("/code", "BACKWARD", 1)}
    assert "'fancyConstraint'" in problems[0].reason


def test_unchanged_one_of_is_compatible() -> None:
    method = {"oneOf": [obj({"pan": STR}, ["pan"]), obj({"iban": STR}, ["iban"])]}
    old = obj({"method": method})
    new = obj({"method": method, "note": {}})
    assert check_compatibility(new, [(1, old)], "FULL") == []


def test_identical_schemas_are_always_compatible() -> None:
    weird = {
        "type": "object",
        "unevaluatedProperties": False,
        "dependentSchemas": {"a": {"not": {}}},
        "$dynamicRef": "#meta",
        "properties": {"x": {"if": {"type": "string"}, "then": {"minLength": 1}}},
    }
    for mode in CompatibilityMode:
        assert check_compatibility(copy.deepcopy(weird), [(1, weird), (2, weird)], mode) == []


def test_annotation_only_changes_are_compatible() -> None:
    old = obj({"id": {"type": "string", "description": "payment id"}}, ["id"], title="Payment")
    new = obj(
        {
            "id": {
                "type": "string",
                "description": "the payment id",
                "examples": ["pay_1"],
                "x-pii": False,
                "deprecated": True,
                "$comment": "renamed soon",
            }
        },
        ["id"],
        title="Payment v2",
        description="A payment.",
        **{"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )
    assert check_compatibility(new, [(1, old)], "FULL_TRANSITIVE") == []


def test_nullable_type_list_widening_is_backward_only() -> None:
    old = obj({"email": STR})
    new = obj({"email": {"type": ["string", "null"]}})
    assert check_compatibility(new, [(1, old)], "BACKWARD") == []
    problems = check_compatibility(new, [(1, old)], "FORWARD")
    assert where(problems) == {("/email", "FORWARD", 1)}
    assert "'null'" in problems[0].reason


def test_local_refs_are_resolved() -> None:
    defs = {"Card": obj({"bin": {"type": "string", "maxLength": 8}}, ["bin"])}
    old = {"$defs": defs, **obj({"card": {"$ref": "#/$defs/Card"}})}
    new_defs = {"Card": obj({"bin": {"type": "string", "maxLength": 6}}, ["bin"])}
    new = {"$defs": new_defs, **obj({"card": {"$ref": "#/$defs/Card"}})}
    assert where(check_compatibility(new, [(1, old)], "FULL")) == {("/card/bin", "BACKWARD", 1)}


def test_optional_via_any_of_null_is_backward_compatible() -> None:
    defs = {"Card": obj({"bin": STR}, ["bin"])}
    old = {"$defs": defs, **obj({"card": {"$ref": "#/$defs/Card"}})}
    new = {"$defs": defs, **obj({"card": {"anyOf": [{"$ref": "#/$defs/Card"}, {"type": "null"}], "default": None}})}
    assert check_compatibility(new, [(1, old)], "BACKWARD") == []
    assert where(check_compatibility(new, [(1, old)], "FORWARD")) == {("/card", "FORWARD", 1)}


def test_recursive_schemas_are_compared_coinductively() -> None:
    def tree(value_type: str) -> dict[str, Any]:
        node = obj({"v": {"type": value_type}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}})
        return {"$defs": {"Node": node}, "$ref": "#/$defs/Node"}

    assert check_compatibility(tree("number"), [(1, tree("integer"))], "BACKWARD") == []
    assert where(check_compatibility(tree("number"), [(1, tree("integer"))], "FORWARD")) == {("/v", "FORWARD", 1)}


def test_is_subschema_handles_boolean_schemas() -> None:
    assert is_subschema(False, {"type": "string"}) == []
    assert is_subschema({"type": "string"}, True) == []
    assert is_subschema(True, {}) == []
    assert [f for f, _ in is_subschema(True, False)] == [""]


def test_is_subschema_accepts_integer_within_number() -> None:
    assert is_subschema({"type": "integer", "exclusiveMinimum": 0}, {"type": "number", "minimum": 1}) == []
    assert is_subschema({"type": "number"}, {"type": "integer"}) != []


def test_is_subschema_requires_equal_pattern_and_format() -> None:
    assert is_subschema({"type": "string", "pattern": "^a$", "format": "uuid"}, {"type": "string"}) == []
    assert [f for f, _ in is_subschema({"type": "string"}, {"type": "string", "format": "uuid"})] == [""]
    assert is_subschema({"type": "string", "pattern": "^a"}, {"type": "string", "pattern": "^b"}) != []


def test_incompatibility_str_names_field_direction_and_version() -> None:
    problem = Incompatibility("/currency", "property 'currency' became required", 2, "BACKWARD")
    assert str(problem) == "field /currency: property 'currency' became required (BACKWARD against version 2)"
    assert str(Incompatibility("", "x", 1, "FORWARD")).startswith("field (root): x")


def test_unchanged_one_of_whose_ref_target_changed_is_reported() -> None:
    def schema(pan_max: int) -> dict[str, Any]:
        defs = {
            "Card": obj({"pan": {"type": "string", "maxLength": pan_max}}, ["pan"]),
            "Bank": obj({"iban": STR}, ["iban"]),
        }
        method = {"oneOf": [{"$ref": "#/$defs/Card"}, {"$ref": "#/$defs/Bank"}]}
        return {"$defs": defs, **obj({"method": method})}

    problems = check_compatibility(schema(16), [(1, schema(19))], "BACKWARD")
    assert where(problems) == {("/method", "BACKWARD", 1)}
    assert "$ref" in problems[0].reason


def test_required_alternatives_via_any_of_are_understood() -> None:
    contact = {"email": STR, "phone": STR}
    either = {"anyOf": [{"required": ["email"]}, {"required": ["phone"]}]}
    old = {**obj(contact), **either}
    new = {**obj({**contact, "name": {}}), **either}
    assert check_compatibility(new, [(1, old)], "FULL") == []
    email_only = obj(contact, ["email"])
    assert check_compatibility(email_only, [(1, old)], "FORWARD") == []
    assert where(check_compatibility(email_only, [(1, old)], "BACKWARD")) == {("/email", "BACKWARD", 1)}


def test_prefix_items_are_compared_by_position() -> None:
    old = {"type": "array", "prefixItems": [STR, NUM], "items": False}
    new = {"type": "array", "prefixItems": [STR, INT], "items": False}
    assert where(check_compatibility(new, [(1, old)], "FULL")) == {("/1", "BACKWARD", 1)}


def test_versions_read_only_upcast_are_not_compared_backward_but_still_forward() -> None:
    old = {"type": "object", "properties": {"kwh": {"type": "number"}}, "required": ["kwh"]}
    new = {"type": "object", "properties": {"reading": {"type": "number"}}, "required": ["reading"]}
    assert {p.direction for p in check_compatibility(new, [(1, old)], "BACKWARD")} == {"BACKWARD"}
    assert check_compatibility(new, [(1, old)], "BACKWARD", upcast_to=2) == []
    # Old readers of new data are not helped by an upcaster: FULL still compares forward.
    assert {p.direction for p in check_compatibility(new, [(1, old)], "FULL", upcast_to=2)} == {"FORWARD"}
    # Transitive: only the versions below the upcaster's target are read upcast.
    mid = {"type": "object", "properties": {"reading": {"type": "string"}}, "required": ["reading"]}
    problems = check_compatibility(new, [(1, old), (2, mid)], "BACKWARD_TRANSITIVE", upcast_to=2)
    assert problems and {(p.against_version, p.direction) for p in problems} == {(2, "BACKWARD")}
