"""The registry service's model store: models, immutable versions, content-addressed artifacts, aliases.

Every change is an event in the log whose projector (`d2d.projections`) writes the rows, in the
same transaction (`EventLog.recording()`): `model.registered` (a model, or a version with its spec,
evaluation, lineage, input names and the sha256 of its artifact), `model.updated` (its description),
`model.policy_set`, `model.promotion_policy_set` and `model.alias_set` (an alias moved or removed). Artifacts are a
content-addressed blob store beside them. The alias history is read back from the events.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from d2d import auth
from d2d.errors import Refusal
from d2d.eventlog import EventLog, NewEvent
from d2d.policies import policy_from_dict, with_changes

MODEL_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
ALIASES = ("production", "canary", "shadow")


@dataclass(frozen=True)
class ModelRecord:
    name: str
    description: str
    registered_seq: int
    created_at: datetime
    deployment_policy: dict[str, Any]
    promotion_policy: dict[str, Any] | None  # None: the domain's default applies
    aliases: dict[str, int]


_NO_POLICY: dict[str, Any] = {"canary_share": 0.0, "epsilon": 0.0, "threshold": 0.5, "actions": []}
FIELD = "model.deployment_policy"


def check_policy(current: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    """A complete, valid deployment policy (`canary_share` and the decision policy's dict, as
    `d2d.policies` reads it) or a Refusal naming the field, e.g. `model.deployment_policy.utilities[2].weight`.

    What `policy` leaves out (None, no actions, no utilities) keeps its `current` value
    (`d2d.policies.with_changes`), so the registry's loop can move `canary_share` alone: the platform
    names no actions of its own (a new model's come from the domain's defaults, D2D_TRAINING_DEFAULTS)."""
    merged = with_changes(current, policy)
    share = merged.get("canary_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= float(share) <= 1.0:
        raise Refusal("INVALID_ARGUMENT", f"deployment_policy.canary_share must be within 0..1, got {share!r}",
                      f"{FIELD}.canary_share")  # fmt: skip
    return {"canary_share": float(share), **policy_from_dict(merged, FIELD).to_dict()}


def read_policy(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored deployment policy in today's shape: one recorded before policies had kinds
    ({canary_share, epsilon, threshold, actions}) reads as a threshold policy with epsilon-greedy
    exploration. The events keep the bytes they were written with; only the reading upgrades them."""
    return {"canary_share": float(stored.get("canary_share", 0.0)), **policy_from_dict(stored, FIELD).to_dict()}


PROMOTION_COUNTS = ("min_decisions", "min_labels", "max_decisions")


def check_promotion_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """A complete, valid promotion policy or a Refusal naming the field: `canary_share` in (0, 1]
    (a canary with no traffic never shows anything), counts whole and not negative, `margin` within
    -1..1, and `max_decisions` at least `min_decisions` (else no canary could ever pass)."""
    checked: dict[str, Any] = {}
    share = policy.get("canary_share")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 < float(share) <= 1.0:
        raise Refusal("INVALID_ARGUMENT", f"promotion_policy.canary_share must be above 0 and at most 1, got {share!r}",
                      "model.promotion_policy.canary_share")  # fmt: skip
    checked["canary_share"] = float(share)
    for key in PROMOTION_COUNTS:
        value = policy.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise Refusal("INVALID_ARGUMENT", f"promotion_policy.{key} must be a whole number >= 0, got {value!r}",
                          f"model.promotion_policy.{key}")  # fmt: skip
        checked[key] = value
    margin = policy.get("margin")
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not -1.0 <= float(margin) <= 1.0:
        raise Refusal("INVALID_ARGUMENT", f"promotion_policy.margin (AUC) must be within -1..1, got {margin!r}",
                      "model.promotion_policy.margin")  # fmt: skip
    checked["margin"] = float(margin)
    if checked["max_decisions"] < checked["min_decisions"]:
        raise Refusal(
            "INVALID_ARGUMENT",
            f"promotion_policy.max_decisions ({checked['max_decisions']}) is below min_decisions"
            f" ({checked['min_decisions']}): no canary could pass",
            "model.promotion_policy.max_decisions",
        )
    return checked


@dataclass(frozen=True)
class VersionRecord:
    model: str
    version: int
    sha256: str
    spec: dict[str, Any]
    evaluation: dict[str, Any]
    lineage: dict[str, Any]
    feature_names: list[str]
    registered_seq: int
    created_at: datetime
    size_bytes: int

    @property
    def name(self) -> str:
        return f"models/{self.model}/versions/{self.version}"


@dataclass(frozen=True)
class AliasChange:
    alias: str
    version: int | None
    previous_version: int | None
    seq: int
    time: datetime
    reason: str


# Version 2 of these contracts carries a policy of any kind (d2d/contracts/platform/); the rest are at 1.
SCHEMA_VERSIONS = {"model.policy_set": 2, "model.registered": 2}


def _event(type_: str, model: str, payload: dict[str, Any]) -> NewEvent:
    """A registry event; its metadata names the API key that asked for it (`actor`), if a caller did."""
    version = SCHEMA_VERSIONS.get(type_, 1)
    return NewEvent(
        uuid.uuid4(), type_, version, "model", model, datetime.now(UTC), orjson.dumps(payload).decode(),
        auth.actor_metadata(),
    )  # fmt: skip


_VERSION_COLUMNS = (
    "v.model, v.version, v.sha256, v.spec, v.evaluation, v.lineage, v.feature_names, v.registered_seq,"
    " v.created_at, a.size_bytes"
)


class ModelStore:
    def __init__(
        self,
        log: EventLog,
        *,
        default_policy: dict[str, Any] | None = None,
        default_promotion_policy: dict[str, Any] | None = None,
    ) -> None:
        self.log = log
        # How a model without a promotion policy of its own promotes a retrained candidate (None: it
        # is not promoted automatically).
        self.default_promotion_policy = (
            check_promotion_policy(default_promotion_policy) if default_promotion_policy else None
        )
        # A new model's policy where its creator names none (None: the creator must name one).
        self.default_policy = check_policy(default_policy, {}) if default_policy else None
        self.pool: asyncpg.Pool = log.pool

    async def create_model(
        self, model: str, description: str = "", policy: dict[str, Any] | None = None
    ) -> ModelRecord:
        """Record a new model with its deployment policy: `policy` completed by the domain's default,
        which is all of it when `policy` is None. Its model.registered event carries the policy."""
        if not MODEL_ID.match(model):
            raise Refusal(
                "INVALID_ARGUMENT", f"model id {model!r} must be lower case letters, digits and '-'", "model_id"
            )
        if self.default_policy is None and not (policy or {}).get("actions") and not (policy or {}).get("utilities"):
            raise Refusal(
                "INVALID_ARGUMENT",
                "a new model needs its deployment policy's actions: set them, or give the domain a"
                " default_policy() (D2D_TRAINING_DEFAULTS)",
                "model.deployment_policy.actions",
            )
        policy = check_policy(self.default_policy or _NO_POLICY, policy or {})
        async with self.log.recording() as tx:
            if await tx.conn.fetchval("SELECT 1 FROM models WHERE name = $1", model):
                raise Refusal("ALREADY_EXISTS", f"models/{model} already exists", "model_id")
            payload: dict[str, Any] = {"model": model, "description": description, "policy": policy}
            await tx.append(_event("model.registered", model, payload))
        return await self.get_model(model)

    async def get_model(self, model: str) -> ModelRecord:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT name, description, registered_seq, created_at, deployment_policy, promotion_policy FROM models"
                " WHERE name = $1",
                model,
            )
            if row is None:
                raise Refusal("NOT_FOUND", f"models/{model} does not exist", "name")
            aliases = await conn.fetch("SELECT alias, version FROM model_aliases WHERE model = $1", model)
        name, description, registered_seq, created_at, deployment_policy, promotion_policy = row.values()
        return ModelRecord(
            name, description, registered_seq, created_at, read_policy(deployment_policy), promotion_policy,
            aliases={a["alias"]: a["version"] for a in aliases},
        )  # fmt: skip

    def promotion_policy(self, record: ModelRecord) -> dict[str, Any] | None:
        """The model's promotion policy: its own, else the domain's default (None: neither)."""
        return record.promotion_policy or self.default_promotion_policy

    async def update_model(
        self,
        model: str,
        *,
        description: str | None = None,
        policy: dict[str, Any] | None = None,
        promotion_policy: dict[str, Any] | None = None,
    ) -> ModelRecord:
        """Change the description, the deployment policy (a `model.policy_set` event) and/or the
        promotion policy (a `model.promotion_policy_set` event), all or none."""
        record = await self.get_model(model)
        if policy is not None:
            policy = check_policy(record.deployment_policy, policy)
        if promotion_policy is not None:
            promotion_policy = check_promotion_policy(promotion_policy)
        async with self.log.recording() as tx:
            if description is not None:
                await tx.append(_event("model.updated", model, {"model": model, "description": description}))
            if policy is not None:
                await tx.append(_event("model.policy_set", model, {"model": model, "policy": policy}))
            if promotion_policy is not None:
                payload = {"model": model, "policy": promotion_policy}
                await tx.append(_event("model.promotion_policy_set", model, payload))
        return await self.get_model(model)

    async def list_models(self) -> list[ModelRecord]:
        async with self.pool.acquire() as conn:
            names = [r[0] for r in await conn.fetch("SELECT name FROM models ORDER BY name")]
        return [await self.get_model(n) for n in names]

    async def add_version(
        self,
        model: str,
        artifact: bytes,
        spec: dict[str, Any],
        feature_names: list[str],
        evaluation: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> VersionRecord:
        await self.get_model(model)
        sha = hashlib.sha256(artifact).hexdigest()
        lineage, held_out = stored_lineage(lineage or {})
        async with self.log.recording() as tx:
            version = await tx.conn.fetchval(
                "SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE model = $1", model
            )
            await _store_blob(tx.conn, artifact)
            if held_out is not None:
                await _store_blob(tx.conn, held_out)
            payload = {
                "model": model, "version": version, "sha256": sha, "spec": spec, "evaluation": evaluation or {},
                "lineage": lineage, "feature_names": list(feature_names),
            }  # fmt: skip
            await tx.append(_event("model.registered", model, payload))
        return await self.get_version(model, str(version))

    async def test_examples(self, record: VersionRecord) -> list[list[Any]]:
        """The version's held-out rows, [event id, label] each ([] for a version registered without)."""
        sha = record.lineage.get("test_examples_sha256")
        return orjson.loads(await self.artifact(sha)) if sha else []

    async def get_version(self, model: str, version: str) -> VersionRecord:
        """A version by number or by alias."""
        record = await self.get_model(model)
        if version in record.aliases:
            number = record.aliases[version]
        elif version.isdigit():
            number = int(version)
        else:
            raise Refusal("NOT_FOUND", f"models/{model} has no version or alias {version!r}", "name")
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN artifacts a USING (sha256)"
                " WHERE v.model = $1 AND v.version = $2",
                model,
                number,
            )
        if row is None:
            raise Refusal("NOT_FOUND", f"models/{model}/versions/{version} does not exist", "name")
        return VersionRecord(*row.values())

    async def artifact_of(self, model: str, version: str) -> tuple[str, bytes]:
        """(sha256, bytes) of a version's artifact, by number or alias, without its lineage."""
        record = await self.get_model(model)
        number = record.aliases.get(version) or (int(version) if version.isdigit() else None)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT v.sha256, a.data FROM model_versions v JOIN artifacts a USING (sha256)"
                " WHERE v.model = $1 AND v.version = $2",
                model,
                number,
            )
        if row is None:
            raise Refusal("NOT_FOUND", f"models/{model}/versions/{version} does not exist", "name")
        return row["sha256"], row["data"]

    async def list_versions(self, model: str) -> list[VersionRecord]:
        await self.get_model(model)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN artifacts a USING (sha256)"
                " WHERE v.model = $1 ORDER BY v.version",
                model,
            )
        return [VersionRecord(*r.values()) for r in rows]

    async def versions_with_lineage(self, model: str, key: str, value: str) -> list[VersionRecord]:
        """The model's versions whose lineage has `key` = `value` (e.g. the retrain request they answer)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN artifacts a USING (sha256)"
                " WHERE v.model = $1 AND v.lineage ->> $2 = $3 ORDER BY v.version",
                model, key, value,
            )  # fmt: skip
        return [VersionRecord(*r.values()) for r in rows]

    async def artifact(self, sha256: str) -> bytes:
        async with self.pool.acquire() as conn:
            data = await conn.fetchval("SELECT data FROM artifacts WHERE sha256 = $1", sha256)
        if data is None:
            raise Refusal("NOT_FOUND", f"no artifact {sha256}")
        return data

    async def set_alias(self, model: str, alias: str, version: int | None, reason: str = "") -> AliasChange:
        """Point `alias` at `version` (None removes it), recorded as a `model.alias_set` event."""
        if alias not in ALIASES:
            raise Refusal("INVALID_ARGUMENT", f"alias {alias!r} is not one of {', '.join(ALIASES)}", "alias")
        record = await self.get_model(model)
        if version is not None:
            await self.get_version(model, str(version))
        previous = record.aliases.get(alias)
        payload = {"model": model, "alias": alias, "version": version, "previous_version": previous, "reason": reason}
        async with self.log.recording() as tx:
            [event] = await tx.append(_event("model.alias_set", model, payload))
        return AliasChange(alias, version, previous, event.seq, event.recorded_at, reason)

    async def alias_history(self, model: str) -> list[AliasChange]:
        """Every alias change of the model, oldest first, read from the log."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT seq, recorded_at, payload FROM events WHERE type = 'model.alias_set' AND entity_type = 'model'"
                " AND entity_id = $1 ORDER BY seq",
                model,
            )
        return [
            AliasChange(
                r["payload"]["alias"],
                r["payload"]["version"],
                r["payload"]["previous_version"],
                r["seq"],
                r["recorded_at"],
                r["payload"].get("reason", ""),
            )  # fmt: skip
            for r in rows
        ]


def stored_lineage(lineage: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """A training lineage as a version stores it, and the blob of its held-out rows (None without them).

    One row per held-out example is too much for an event: the rows are a blob, which the stored
    lineage names by its sha256 (`test_examples_sha256`)."""
    lineage = dict(lineage)
    held_out = lineage.pop("test_examples", None)
    if held_out is None:
        return lineage, None
    blob = orjson.dumps(held_out)
    lineage["test_examples_sha256"] = hashlib.sha256(blob).hexdigest()
    return lineage, blob


async def _store_blob(conn: asyncpg.Connection, data: bytes) -> str:
    """Keep `data` in the content-addressed blob store (once); returns its sha256."""
    sha = hashlib.sha256(data).hexdigest()
    await conn.execute(
        "INSERT INTO artifacts (sha256, data, size_bytes) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING",
        sha, data, len(data),
    )  # fmt: skip
    return sha
