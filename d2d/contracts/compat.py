"""Schema-evolution compatibility for JSON Schema (draft 2020-12) event contracts.

The modes are those of Confluent Schema Registry. Everything rests on a conservative
subschema prover: `is_subschema(narrow, wide)` lists the reasons it could not prove that
every instance valid under `narrow` is also valid under `wide`. It is sound but incomplete:
a construct it does not understand is reported as a problem, never accepted silently.

Supported: boolean schemas; `type` (integer within number); `enum`/`const` (decided value by
value); numeric bounds and `multipleOf`; string lengths; `pattern`/`format`/`content*` (must be
equal, or absent in the wide schema); `properties`/`required`/`additionalProperties`/
`patternProperties`/`min|maxProperties`/`dependentRequired`; `items`/`prefixItems`/
`min|maxItems`/`uniqueItems`; local `$ref` (JSON pointers into the same document, recursion
included), `allOf`, `anyOf`, and `oneOf` (in the narrow schema, or identical in both).
Annotations (`title`, `description`, `default`, `x-*`, ...) are ignored. Any other keyword of
the wide schema must appear unchanged in the narrow one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

__all__ = ["CompatibilityMode", "Incompatibility", "check_compatibility", "is_subschema"]


class CompatibilityMode(StrEnum):
    """Confluent Schema Registry compatibility modes."""

    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"


@dataclass(frozen=True)
class Incompatibility:
    """One reason a new schema is not compatible with a previous version."""

    field: str  # JSON pointer into the payload ("/card/bin", "/items/*/sku"); "" for the root
    reason: str
    against_version: int
    direction: str  # "BACKWARD" or "FORWARD"

    def __str__(self) -> str:
        where = self.field or "(root)"
        against = f"{self.direction} against version {self.against_version}"
        return f"field {where}: {self.reason} ({against})"


Problem = tuple[str, str]

_ANNOTATIONS = frozenset(
    "title description $comment examples default $schema $id deprecated readOnly writeOnly"
    " $defs definitions $anchor $dynamicAnchor $vocabulary".split()
)
_TYPE_NAMES = frozenset("null boolean object array number integer string".split())
_FAMILIES = frozenset("null boolean object array number string".split())
# The instance type each type-specific keyword applies to.
_FAMILY = {
    **dict.fromkeys("minimum maximum exclusiveMinimum exclusiveMaximum multipleOf".split(), "number"),
    **dict.fromkeys(
        "minLength maxLength pattern format contentEncoding contentMediaType contentSchema".split(), "string"
    ),
    **dict.fromkeys(
        "items prefixItems minItems maxItems uniqueItems contains minContains maxContains unevaluatedItems".split(),
        "array",
    ),
    **dict.fromkeys(
        "properties required additionalProperties patternProperties minProperties maxProperties"
        " dependentRequired propertyNames dependentSchemas unevaluatedProperties".split(),
        "object",
    ),
}
# Wide-schema keywords with dedicated rules; any other must be unchanged in the narrow schema.
_HANDLED = frozenset(
    "type enum const minimum maximum exclusiveMinimum exclusiveMaximum multipleOf minLength"
    " maxLength pattern format contentEncoding contentMediaType contentSchema items prefixItems"
    " minItems maxItems uniqueItems properties required additionalProperties patternProperties"
    " minProperties maxProperties dependentRequired if then else contains minContains"
    " maxContains".split()
)
# Keyword groups whose members only mean something together: all must be unchanged.
_GROUPS = (("if", "then", "else"), ("contains", "minContains", "maxContains"))
# Keywords whose meaning depends on their siblings: equal values alone prove nothing.
_CONTEXTUAL = frozenset(
    "additionalProperties items unevaluatedProperties unevaluatedItems if then else contains"
    " minContains maxContains $dynamicRef $recursiveRef".split()
)
_WHOLE_ONLY = frozenset("unevaluatedProperties unevaluatedItems $dynamicRef $recursiveRef".split())
_NUMBER_ARGS = frozenset(
    "minimum maximum exclusiveMinimum exclusiveMaximum multipleOf minLength maxLength minItems"
    " maxItems minProperties maxProperties minContains maxContains".split()
)
_LIST_ARGS = frozenset("enum required prefixItems allOf anyOf oneOf".split())
_DICT_ARGS = frozenset("properties patternProperties dependentRequired dependentSchemas".split())
_MAX_DEPTH = 100
_MAX_CALLS = 20_000


# --------------------------------------------------------------------------- public API


def is_subschema(narrow: dict[str, Any] | bool, wide: dict[str, Any] | bool) -> list[Problem]:
    """Problems (field pointer, reason) that stop us proving every instance valid under `narrow`
    is valid under `wide`. Empty list = proven."""
    return _prove(narrow, wide, "the narrow schema", "the wide schema")


def check_compatibility(
    new_schema: dict[str, Any],
    previous: list[tuple[int, dict[str, Any]]],
    mode: CompatibilityMode | str,
    *,
    upcast_to: int | None = None,
) -> list[Incompatibility]:
    """previous: (version, schema) pairs, oldest first. Empty list = compatible.

    `upcast_to`: readers read every payload of a version below it upcast to that version (an
    upcaster chain reaches it), never as written; so the BACKWARD direction (new readers, old
    data) does not compare the new schema with those versions' schemas. The registry checks the
    upcasters' output against the new schema instead. FORWARD (old readers) is unaffected."""
    mode = CompatibilityMode(str(mode).upper())
    if mode is CompatibilityMode.NONE or not previous:
        return []
    targets = previous if mode.endswith("_TRANSITIVE") else [max(previous, key=lambda p: p[0])]
    backward = mode.startswith(("BACKWARD", "FULL"))
    forward = mode.startswith(("FORWARD", "FULL"))
    out: list[Incompatibility] = []
    for version, old in targets:
        old_label = f"version {version}"
        if backward and not (upcast_to and version < upcast_to):  # new readers, old data: old ⊆ new
            out += [
                Incompatibility(f, r, version, "BACKWARD")
                for f, r in _prove(old, new_schema, old_label, "the new schema")
            ]
        if forward:  # old readers, new data: new ⊆ old
            out += [
                Incompatibility(f, r, version, "FORWARD")
                for f, r in _prove(new_schema, old, "the new schema", old_label)
            ]
    return out


# --------------------------------------------------------------------------- JSON helpers


def _json_eq(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_eq(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_eq, a, b))
    return type(a) is type(b) and a == b


def _json_type(v: Any) -> str | None:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_schema(s: Any) -> bool:
    return isinstance(s, (bool, dict))


def _strip(s: dict[str, Any]) -> dict[str, Any]:
    """The schema's assertions: annotations and `x-` extensions removed (this level only)."""
    return {k: v for k, v in s.items() if k not in _ANNOTATIONS and not k.startswith("x-")}


def _accepts_all(s: Any) -> bool:
    return s is True or (isinstance(s, dict) and not _strip(s))


def _esc(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _refs_in(x: Any) -> Iterator[str | None]:
    """Every `$ref` string inside x; None for dynamic references (never provably equal)."""
    if isinstance(x, dict):
        for k, v in x.items():
            if k == "$ref":
                yield v if isinstance(v, str) else None
            elif k in ("$dynamicRef", "$recursiveRef"):
                yield None
            yield from _refs_in(v)
    elif isinstance(x, list):
        for v in x:
            yield from _refs_in(v)


class _Doc:
    """One schema document: the root that local `$ref`s resolve against."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self._embedded: bool | None = None

    def _has_embedded_id(self) -> bool:
        if self._embedded is None:

            def walk(x: Any, top: bool) -> bool:
                if isinstance(x, dict):
                    return (not top and "$id" in x) or any(walk(v, False) for v in x.values())
                return isinstance(x, list) and any(walk(v, False) for v in x)

            self._embedded = walk(self.root, True)
        return self._embedded

    def deref(self, ref: Any) -> tuple[Any, str | None]:
        """Resolve a local `$ref`; (schema, None) or (None, why not)."""
        if not isinstance(ref, str):
            return None, "a non-string $ref could not be resolved"
        base = self.root.get("$id") if isinstance(self.root, dict) else None
        doc, _, frag = ref.partition("#")
        if doc and not (isinstance(base, str) and doc == base.partition("#")[0]):
            return None, f"external $ref {ref!r} could not be proven compatible"
        if frag and not frag.startswith("/"):
            return None, f"anchor $ref {ref!r} could not be proven compatible"
        if self._has_embedded_id():
            return (None, f"$ref {ref!r} inside a schema with embedded $id could not be proven compatible")
        node = self.root
        for token in frag.split("/")[1:]:
            token = unquote(token).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                return None, f"$ref {ref!r} could not be resolved"
        return node, None


@dataclass
class _Ctx:
    n_doc: _Doc
    w_doc: _Doc
    n: str  # label of the narrow schema in messages
    w: str  # label of the wide schema
    depth: int = 0  # instance nesting (properties/items) of the current comparison
    calls: int = 0
    active: dict[tuple[int, int], int] = field(default_factory=dict)

    def same(self, a: Any, b: Any) -> bool:
        """Deep-equal, and every `$ref` reachable from it resolves to equal schemas in both docs."""
        if not _json_eq(a, b):
            return False
        pending, seen = list(_refs_in(a)), set()
        while pending:
            ref = pending.pop()
            if ref is None:
                return False
            if ref in seen:
                continue
            seen.add(ref)
            x, ex = self.n_doc.deref(ref)
            y, ey = self.w_doc.deref(ref)
            if ex or ey or not _json_eq(x, y):
                return False
            pending += _refs_in(x)
        return True


# --------------------------------------------------------------------------- the prover


def _prove(narrow: Any, wide: Any, n_label: str, w_label: str) -> list[Problem]:
    if _json_eq(narrow, wide):
        return []
    ctx = _Ctx(_Doc(narrow), _Doc(wide), n_label, w_label)
    return list(dict.fromkeys(_sub(narrow, wide, "", ctx)))


def _sub(n: Any, w: Any, path: str, c: _Ctx) -> list[Problem]:
    """n ⊆ w. Recursive schemas are handled coinductively: a comparison met again while it is
    still in progress is assumed to hold, but only if we descended into the instance since."""
    key = (id(n), id(w))
    if key in c.active:
        if c.depth > c.active[key]:
            return []
        return [(path, "a $ref cycle that never descends into the value could not be proven compatible")]
    c.calls += 1
    if len(c.active) >= _MAX_DEPTH or c.calls > _MAX_CALLS:
        return [(path, "schema too deeply nested or complex to prove compatible")]
    c.active[key] = c.depth
    try:
        return _sub_inner(n, w, path, c)
    finally:
        del c.active[key]


def _descend(n: Any, w: Any, path: str, c: _Ctx) -> list[Problem]:
    c.depth += 1
    try:
        return _sub(n, w, path, c)
    finally:
        c.depth -= 1


def _sub_inner(n0: Any, w0: Any, path: str, c: _Ctx) -> list[Problem]:
    if n0 is False or w0 is True or c.same(n0, w0):
        return []
    if not _is_schema(n0) or not _is_schema(w0):
        return [(path, "not a JSON Schema (expected an object or a boolean)")]
    if w0 is False:
        return [(path, f"{c.w} rejects every value here but {c.n} does not")]
    n = {} if n0 is True else _strip(n0)
    w = _strip(w0)
    if not w or c.same(n, w):
        return []
    if len(w) == 1:  # one unchanged independent constraint, e.g. an identical oneOf
        ((k, _),) = w.items()
        if k not in _CONTEXTUAL and k in n and c.same({k: n[k]}, w):
            return []

    # 1. The narrow schema admits finitely many values: decide each one.
    values = _finite_values(n)
    if values is not None:
        out = []
        for v in values:
            in_narrow = _Validator(c.n_doc)(v, n0)
            if in_narrow is False:
                continue
            ok = _Validator(c.w_doc)(v, w0)
            if ok is False:
                may = "is" if in_narrow else "may be"
                out.append((path, f"value {_show(v)} {may} accepted by {c.n} but not by {c.w}"))
            elif ok is None:
                out.append((path, f"value {_show(v)} could not be proven valid under {c.w}"))
        return out

    # 2. Wide conjunction (exact): n ⊆ A∧B iff n ⊆ A and n ⊆ B.
    parts = _wide_parts(w, c)
    if parts is not None:
        out = []
        for part in parts:
            out += [(path, part)] if isinstance(part, str) else _sub(n0, part, path, c)
        return out

    # A wide oneOf (now alone) is accepted only when identical, which was checked above.
    if "oneOf" in w:
        return [(path, _unproven(("oneOf",), n, w, c))]

    # 3. Narrow disjunction (exact): (A∨B) ⊆ w iff A ⊆ w and B ⊆ w; oneOf is within anyOf.
    for key in ("anyOf", "oneOf"):
        if key in n:
            branches = n[key] if isinstance(n[key], list) else [True]
            rest = {k: v for k, v in n.items() if k != key}
            out = []
            for b in branches:
                out += _sub({"allOf": [rest, b]} if rest else b, w0, path, c)
            return out

    # 4. Narrow conjunction ($ref / allOf): proving any one conjunct suffices (sound, incomplete).
    if "$ref" in n or "allOf" in n:
        conjuncts: list[Any] = [{k: v for k, v in n.items() if k not in ("$ref", "allOf")}]
        if not conjuncts[0]:
            conjuncts.pop()
        if "$ref" in n:
            target, err = c.n_doc.deref(n["$ref"])
            conjuncts.append(target if err is None else f"{err} (in {c.n})")
        if isinstance(n.get("allOf"), list):
            conjuncts += n["allOf"]
        merged = _merge(conjuncts)
        attempts = []
        for s in ([merged] if merged is not None else []) + (conjuncts or [True]):
            found = [(path, s)] if isinstance(s, str) else _sub(s, w0, path, c)
            if not found:
                return []
            attempts.append(found)
        return attempts[0]

    # 5. Wide disjunction: n ⊆ A∨B if n ⊆ A or n ⊆ B (sound, incomplete).
    if "anyOf" in w:
        types = n.get("type")
        if isinstance(types, list) and len(types) > 1:  # split a type union first (exact)
            return [p for t in types for p in _sub({**n, "type": t}, w0, path, c)]
        branches = w["anyOf"]
        if not isinstance(branches, list) or not branches:
            return [(path, f"'anyOf' of {c.w} is not a non-empty list")]
        attempts = []
        for b in branches:
            found = _sub(n0, b, path, c)
            if not found:
                return []
            attempts.append(found)
        return min(attempts, key=len)

    # 6. Plain schemas: keyword by keyword.
    return _keywords(n, w, path, c)


def _finite_values(n: dict[str, Any]) -> list[Any] | None:
    """The candidate values when `const`, `enum` or a null/boolean type bounds the narrow schema."""
    values: list[Any] | None = None
    if "const" in n:
        values = [n["const"]]
    if isinstance(n.get("enum"), list):
        enum = n["enum"]
        values = enum if values is None else [v for v in values if any(_json_eq(v, e) for e in enum)]
    types = n.get("type")
    types = [types] if isinstance(types, str) else types
    if values is None and isinstance(types, list) and types and set(types) <= {"null", "boolean"}:
        values = [None] * ("null" in types) + [True, False] * ("boolean" in types)
    return values


def _merge(conjuncts: list[Any]) -> dict[str, Any] | None:
    """One schema accepting at least the conjunction: the union of keywords when no keyword
    (nor part of an if/then/else or contains group) appears in two conjuncts. None otherwise."""
    if len(conjuncts) < 2:
        return None
    merged: dict[str, Any] = {}
    owner: dict[str, int] = {}
    for i, part in enumerate(conjuncts):
        if part is True:
            continue
        if not isinstance(part, dict):
            return None
        part = _strip(part)
        if "$ref" in part or "allOf" in part or merged.keys() & part.keys():
            return None
        for group in _GROUPS:
            if any(k in part for k in group):
                if owner.setdefault(group[0], i) != i:
                    return None
        merged.update(part)
    return merged


def _wide_parts(w: dict[str, Any], c: _Ctx) -> list[Any] | None:
    """Conjuncts of a wide schema with $ref/allOf (or anyOf/oneOf beside other keywords).

    A str entry is a problem (an unresolvable part). None when there is nothing to split."""
    combinators = ("$ref", "allOf", "anyOf", "oneOf")
    if "$ref" not in w and "allOf" not in w and not (len(w) > 1 and ("anyOf" in w or "oneOf" in w)):
        return None
    rest = {k: v for k, v in w.items() if k not in combinators}
    parts: list[Any] = [rest] if rest else []
    if "$ref" in w:
        target, err = c.w_doc.deref(w["$ref"])
        parts.append(target if err is None else f"{err} (in {c.w})")
    if "allOf" in w:
        parts += w["allOf"] if isinstance(w["allOf"], list) else [f"'allOf' of {c.w} is not a list"]
    parts += [{k: w[k]} for k in ("anyOf", "oneOf") if k in w]
    return parts


def _types(s: dict[str, Any]) -> tuple[set[str] | None, bool]:
    """(allowed type names or None for any, well-formed?)."""
    t = s.get("type")
    if t is None:
        return None, True
    names = [t] if isinstance(t, str) else t
    if not isinstance(names, list) or not all(isinstance(x, str) and x in _TYPE_NAMES for x in names):
        return None, False
    return set(names), True


def _family(t: str) -> str:
    return "number" if t == "integer" else t


def _keywords(n: dict[str, Any], w: dict[str, Any], path: str, c: _Ctx) -> list[Problem]:
    """Compare two plain schemas (no combinators left in the wide one)."""
    out: list[Problem] = []
    nt, _ = _types(n)  # a malformed narrow type is dropped: dropping a narrow constraint is sound
    wt, w_ok = _types(w)
    if not w_ok:
        out.append((path, f"'type' of {c.w} is not understood"))
    if wt is not None:
        if nt is None:
            out.append((path, f"{c.w} only accepts type {sorted(wt)} but {c.n} accepts any type"))
        else:
            for t in sorted(nt):
                if t not in wt and not (t == "integer" and "number" in wt):
                    out.append((path, f"type {t!r} is accepted by {c.n} but not by {c.w}"))
    fams = ({_family(t) for t in nt} if nt is not None else set(_FAMILIES)) & (
        {_family(t) for t in wt} if wt is not None else set(_FAMILIES)
    )

    if "enum" in w or "const" in w:
        out.append((path, f"{c.w} restricts the allowed values (enum/const) but {c.n} does not"))
    if "number" in fams:
        out += _numeric(n, w, nt, path, c)
    if "string" in fams:
        out += _counts(n, w, "minLength", "maxLength", path, c)
        for k in ("pattern", "format", "contentEncoding", "contentMediaType", "contentSchema"):
            if k in w and not (k in n and c.same(n[k], w[k])):
                was = f"{k} {_show(n[k])}" if k in n else f"no {k}"
                out.append((path, f"{c.w} requires {k} {_show(w[k])} but {c.n} has {was}"))
    if "array" in fams:
        out += _array(n, w, path, c)
    if "object" in fams:
        out += _object(n, w, path, c)

    for group in _GROUPS:
        if group[0] == "contains" and "array" not in fams:
            continue
        if any(k in w for k in group) and not all(c.same(n.get(k), w.get(k)) for k in group):
            out.append((path, _unproven(group, n, w, c)))
    for k in w:
        if k in _HANDLED or (k in _FAMILY and _FAMILY[k] not in fams):
            continue
        if k in _WHOLE_ONLY:
            out.append((path, f"keyword {k!r} could not be proven compatible (only identical schemas are)"))
        elif not (k in n and c.same(n[k], w[k])):
            out.append((path, _unproven((k,), n, w, c)))
    return out


def _unproven(keys: tuple[str, ...], n: dict[str, Any], w: dict[str, Any], c: _Ctx) -> str:
    """Why a keyword (group) of the wide schema, accepted only when unchanged, is a problem."""
    name = "keyword " + "/".join(repr(k) for k in keys if k in w)
    if not any(k in n for k in keys):
        return f"{name} of {c.w} is absent from {c.n} and could not be proven compatible"
    if all(_json_eq(n.get(k), w.get(k)) for k in keys):
        return f"{name} is unchanged but a schema it refers to ($ref) changed; not proven compatible"
    return f"{name} of {c.w} differs in {c.n} and could not be proven compatible"


def _bound(s: dict[str, Any], lower: bool, int_only: bool) -> tuple[float, bool] | None:
    """The tightest (value, exclusive) lower or upper bound; inclusive integers when int_only."""
    keys = ("minimum", "exclusiveMinimum") if lower else ("maximum", "exclusiveMaximum")
    cands = [(s[k], k.startswith("exclusive")) for k in keys if _is_num(s.get(k))]
    if int_only:
        if lower:
            cands = [(math.floor(v) + 1 if ex else math.ceil(v), False) for v, ex in cands]
        else:
            cands = [(math.ceil(v) - 1 if ex else math.floor(v), False) for v, ex in cands]
    if not cands:
        return None
    return max(cands) if lower else min(cands, key=lambda b: (b[0], not b[1]))


def _bdesc(bound: tuple[float, bool], op: str) -> str:
    return f"values {op}{'' if bound[1] else '='} {bound[0]}"


def _numeric(n: dict[str, Any], w: dict[str, Any], nt: set[str] | None, path: str, c: _Ctx) -> list[Problem]:
    out: list[Problem] = []
    for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        if k in w and not _is_num(w[k]):
            out.append((path, f"{k} of {c.w} is not a number"))
    int_only = nt is not None and "number" not in nt
    for lower, op in ((True, ">"), (False, "<")):
        nb, wb = _bound(n, lower, int_only), _bound(w, lower, int_only)
        if wb is None:
            continue
        if nb is not None:
            (nv, ne), (wv, we) = nb, wb
            if (nv > wv if lower else nv < wv) or (nv == wv and (ne or not we)):
                continue
        side = "lower" if lower else "upper"
        has = f"only requires {_bdesc(nb, op)}" if nb else f"has no {side} bound"
        out.append((path, f"{c.w} requires {_bdesc(wb, op)} but {c.n} {has}"))
    wm = w.get("multipleOf")
    if _is_num(wm) and wm > 0:
        nm = n.get("multipleOf")
        try:
            ok = (_is_num(nm) and nm > 0 and (Fraction(str(nm)) / Fraction(str(wm))).denominator == 1) or (
                int_only and (1 / Fraction(str(wm))).denominator == 1
            )
        except (ValueError, ZeroDivisionError):
            ok = False
        if not ok:
            out.append((path, f"{c.w} requires multipleOf {wm} but {c.n} does not guarantee it"))
    return out


def _counts(n: dict[str, Any], w: dict[str, Any], lo: str, hi: str, path: str, c: _Ctx) -> list[Problem]:
    """Length/size bounds: the narrow range must lie within the wide range."""
    out: list[Problem] = []
    for k, default, tighter in ((lo, 0, lambda a, b: a >= b), (hi, math.inf, lambda a, b: a <= b)):
        if k not in w:
            continue
        if not _is_num(w[k]):
            out.append((path, f"{k} of {c.w} is not a number"))
            continue
        nv = n[k] if _is_num(n.get(k)) else default
        if not tighter(nv, w[k]):
            has = f"{k} {nv}" if k in n else f"no {k}"
            out.append((path, f"{c.w} has {k} {w[k]} but {c.n} has {has}"))
    return out


def _array(n: dict[str, Any], w: dict[str, Any], path: str, c: _Ctx) -> list[Problem]:
    w_pre, w_items = w.get("prefixItems", []), w.get("items", True)
    if not isinstance(w_pre, list) or not _is_schema(w_items):
        return [(path, f"'items'/'prefixItems' of {c.w} are not understood")]
    n_pre, n_items = n.get("prefixItems", []), n.get("items", True)
    if not isinstance(n_pre, list) or not _is_schema(n_items):
        n_pre, n_items = [], True  # dropping both narrow constraints is sound
    n_max = n["maxItems"] if _is_num(n.get("maxItems")) else math.inf
    if n_items is False:
        n_max = min(n_max, len(n_pre))
    out: list[Problem] = []
    span = max(len(n_pre), len(w_pre))
    for i in range(span):
        if i >= n_max:
            break
        out += _descend(
            n_pre[i] if i < len(n_pre) else n_items, w_pre[i] if i < len(w_pre) else w_items, f"{path}/{i}", c
        )
    if n_max > span:
        out += _descend(n_items, w_items, f"{path}/*", c)
    out += _counts(n if n_max == math.inf else {**n, "maxItems": n_max}, w, "minItems", "maxItems", path, c)
    if not isinstance(w.get("uniqueItems", False), bool):
        out.append((path, f"'uniqueItems' of {c.w} is not a boolean"))
    elif w.get("uniqueItems") and n.get("uniqueItems") is not True and n_max > 1:
        out.append((path, f"{c.w} requires unique items but {c.n} does not"))
    return out


def _object(n: dict[str, Any], w: dict[str, Any], path: str, c: _Ctx) -> list[Problem]:
    out: list[Problem] = []
    w_props, w_add, w_pat = (
        w.get("properties", {}),
        w.get("additionalProperties", True),
        w.get("patternProperties", {}),
    )
    if not isinstance(w_props, dict) or not isinstance(w_pat, dict) or not _is_schema(w_add):
        return [(path, f"'properties'/'patternProperties'/'additionalProperties' of {c.w} are not understood")]
    n_props, n_add, n_pat = (
        n.get("properties", {}),
        n.get("additionalProperties", True),
        n.get("patternProperties", {}),
    )
    if not isinstance(n_props, dict) or not isinstance(n_pat, dict) or not _is_schema(n_add):
        n_props, n_add, n_pat = {}, True, {}  # dropping all three narrow constraints is sound

    # Which names count as "additional" depends on patternProperties; only identical patterns over
    # identical property names are understood (narrow patterns beside an open narrow schema are
    # just one more narrow constraint, which may be dropped).
    pattern_trouble = bool(w_pat or (n_pat and not _accepts_all(n_add)))
    if pattern_trouble and not c.same(n_pat, w_pat):
        out.append((path, f"'patternProperties' of {c.w} and {c.n} differ and could not be proven compatible"))
    elif pattern_trouble and n_props.keys() != w_props.keys():
        out.append((path, "properties changed beside 'patternProperties' could not be proven compatible"))
    else:
        for name, ns in n_props.items():
            p = f"{path}/{_esc(name)}"
            if name in w_props:
                out += _descend(ns, w_props[name], p, c)
            elif w_add is False:
                if ns is not False:
                    out.append(
                        (p, f"property {name!r} is allowed by {c.n} but not by {c.w} (additionalProperties is false)")
                    )
            else:
                out += _descend(ns, w_add, p, c)
        for name, ws in w_props.items():
            if name in n_props:
                continue
            p = f"{path}/{_esc(name)}"
            if _accepts_all(n_add):
                if not _accepts_all(ws):
                    out.append((p, f"property {name!r} is unconstrained in {c.n} but constrained in {c.w}"))
            else:
                out += _descend(n_add, ws, p, c)
        if w_add is False and n_add is not False:
            out.append((f"{path}/*", f"{c.w} forbids additional properties but {c.n} allows them"))
        else:
            out += _descend(n_add, w_add, f"{path}/*", c)

    w_req, n_req = w.get("required", []), n.get("required", [])
    if not isinstance(w_req, list):
        out.append((path, f"'required' of {c.w} is not a list"))
        w_req = []
    n_req = set(n_req) if isinstance(n_req, list) and all(isinstance(x, str) for x in n_req) else set()
    for name in w_req:
        if name not in n_req:
            out.append((f"{path}/{_esc(str(name))}", f"property {name!r} is required by {c.w} but not by {c.n}"))
    w_dep, n_dep = w.get("dependentRequired", {}), n.get("dependentRequired", {})
    if not isinstance(w_dep, dict):
        out.append((path, f"'dependentRequired' of {c.w} is not an object"))
        w_dep = {}
    n_dep = n_dep if isinstance(n_dep, dict) else {}
    for name, deps in w_dep.items():
        have = n_req | set(n_dep.get(name, []) if isinstance(n_dep.get(name), list) else [])
        ok_deps = isinstance(deps, list) and all(isinstance(d, str) for d in deps)
        missing = [d for d in deps if d not in have] if ok_deps else [f"(malformed {_show(deps)})"]
        if missing:
            out.append(
                (f"{path}/{_esc(name)}", f"{c.w} requires {missing} whenever {name!r} is present but {c.n} does not")
            )
    out += _counts(n, w, "minProperties", "maxProperties", path, c)
    return out


# --------------------------------------------------------------------------- three-valued validator


def _all(results: Any) -> bool | None:
    seen_none = False
    for r in results:
        if r is False:
            return False
        seen_none |= r is None
    return None if seen_none else True


def _any(results: Any) -> bool | None:
    seen_none = False
    for r in results:
        if r is True:
            return True
        seen_none |= r is None
    return None if seen_none else False


class _Validator:
    """Three-valued validation against one document: True/False when decided, None when a
    keyword is not understood, a $ref cycle makes no progress, or the work budget runs out."""

    def __init__(self, doc: _Doc) -> None:
        self.doc = doc
        self.active: set[tuple[int, int]] = set()
        self.steps = 0

    def __call__(self, v: Any, s: Any) -> bool | None:
        if isinstance(s, bool):
            return s
        key = (id(v), id(s))
        self.steps += 1
        if not isinstance(s, dict) or key in self.active or self.steps > _MAX_CALLS:
            return None
        self.active.add(key)
        try:
            return _all(self._keyword(k, a, v, s) for k, a in _strip(s).items())
        finally:
            self.active.discard(key)

    def _keyword(self, k: str, a: Any, v: Any, s: dict[str, Any]) -> bool | None:
        try:
            return _check_kw(k, a, v, s, self.doc, self)
        except (TypeError, ValueError, AttributeError, ZeroDivisionError, RecursionError, re.error):
            return None


def _check_kw(k: str, a: Any, v: Any, s: dict[str, Any], doc: _Doc, sub: Any) -> bool | None:  # noqa: C901
    if (
        (k in _NUMBER_ARGS and not _is_num(a))
        or (k in _LIST_ARGS and not isinstance(a, list))
        or (k in _DICT_ARGS and not isinstance(a, dict))
        or (k == "uniqueItems" and not isinstance(a, bool))
    ):
        return None  # malformed keyword value
    jt = _json_type(v)
    fam = _FAMILY.get(k)
    if fam is not None and _family(jt or "") != fam:
        return True  # the keyword does not apply to this instance type
    if k == "type":
        names = [a] if isinstance(a, str) else a
        return None if not isinstance(names, list) else (jt in names or (jt == "integer" and "number" in names))
    if k == "const":
        return _json_eq(v, a)
    if k == "enum":
        return any(_json_eq(v, e) for e in a)
    if k == "minimum":
        return v >= a
    if k == "maximum":
        return v <= a
    if k == "exclusiveMinimum":
        return v > a
    if k == "exclusiveMaximum":
        return v < a
    if k == "multipleOf":
        return (Fraction(str(v)) / Fraction(str(a))).denominator == 1
    if k == "minLength":
        return len(v) >= a
    if k == "maxLength":
        return len(v) <= a
    if k == "pattern":
        return re.search(a, v) is not None
    if k == "minItems":
        return len(v) >= a
    if k == "maxItems":
        return len(v) <= a
    if k == "uniqueItems":
        return not a or all(not _json_eq(x, y) for i, x in enumerate(v) for y in v[i + 1 :])
    if k == "prefixItems":
        return _all(sub(x, ps) for x, ps in zip(v, a, strict=False))
    if k == "items":
        return _all(sub(x, a) for x in v[len(s.get("prefixItems", [])) :])
    if k == "contains":
        rs = [sub(x, a) for x in v]
        yes, maybe = rs.count(True), rs.count(None)
        lo, hi = s.get("minContains", 1), s.get("maxContains", math.inf)
        if lo <= yes and yes + maybe <= hi:
            return True
        return False if yes + maybe < lo or yes > hi else None
    if k in ("minContains", "maxContains", "then", "else"):
        return True  # evaluated with contains / if
    if k == "required":
        return all(name in v for name in a)
    if k == "minProperties":
        return len(v) >= a
    if k == "maxProperties":
        return len(v) <= a
    if k == "properties":
        return _all(sub(v[name], ps) for name, ps in a.items() if name in v)
    if k == "patternProperties":
        return _all(sub(v[name], ps) for pat, ps in a.items() for name in v if re.search(pat, name))
    if k == "additionalProperties":
        props, pats = s.get("properties", {}), s.get("patternProperties", {})
        extra = [name for name in v if name not in props and not any(re.search(p, name) for p in pats)]
        return _all(sub(v[name], a) for name in extra)
    if k == "propertyNames":
        return _all(sub(name, a) for name in v)
    if k == "dependentRequired":
        return all(d in v for name, deps in a.items() if name in v for d in deps)
    if k == "dependentSchemas":
        return _all(sub(v, ds) for name, ds in a.items() if name in v)
    if k == "allOf":
        return _all(sub(v, x) for x in a)
    if k == "anyOf":
        return _any(sub(v, x) for x in a)
    if k == "oneOf":
        rs = [sub(v, x) for x in a]
        if rs.count(True) > 1:
            return False
        return None if None in rs else rs.count(True) == 1
    if k == "not":
        r = sub(v, a)
        return None if r is None else not r
    if k == "if":
        r = sub(v, a)
        return None if r is None else sub(v, s.get("then" if r else "else", True))
    if k == "$ref":
        target, err = doc.deref(a)
        return None if err else sub(v, target)
    return None  # format, content*, unevaluated*, unknown keywords: undecided
