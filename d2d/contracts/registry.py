"""Data contracts: versioned JSON Schemas per event type, and validation of payloads against them.

A new version is checked against earlier ones by its compatibility mode before it is stored; the
registration is recorded as a `contract.registered` event, whose projector writes the row
(`EventLog.recording()`).
Validators are compiled once (jsonschema-rs) and cached per (type, version).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import jsonschema_rs
import orjson

from d2d import auth
from d2d.contracts.compat import CompatibilityMode, check_compatibility
from d2d.contracts.platform import is_platform_type
from d2d.contracts.upcasting import UPCASTERS, UpcastError, upcast, upgraded_by
from d2d.contracts.validation import check_payload
from d2d.errors import Refusal
from d2d.eventlog import EventLog, NewEvent
from d2d.personal import envelopes

EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
__all__ = ["Contract", "ContractRegistry", "Refusal", "check_payload"]
DEFAULT_MAX_FUTURE_SKEW_SECONDS = 3600
DEFAULT_MAX_AGE_SECONDS = 3652 * 86_400


@dataclass(frozen=True)
class Contract:
    event_type: str
    version: int
    owner: str
    json_schema: dict[str, Any]
    description: str = ""
    pii_fields: tuple[str, ...] = ()
    compatibility: CompatibilityMode = CompatibilityMode.BACKWARD
    allowed_lateness_seconds: int = 0
    null_rate_limits: dict[str, float] = field(default_factory=dict)
    created_at: datetime | None = None
    registered_seq: int = 0
    max_future_skew_seconds: int = DEFAULT_MAX_FUTURE_SKEW_SECONDS
    max_age_seconds: int = DEFAULT_MAX_AGE_SECONDS

    def check_time(self, occurred_at: datetime, received_at: datetime) -> None:
        """Refuse an event time outside the contract's bounds around the time it was received."""
        ahead = (occurred_at - received_at).total_seconds()
        if ahead > self.max_future_skew_seconds:
            raise Refusal(
                "INVALID_ARGUMENT",
                f"occurred_at {occurred_at.isoformat()} is {ahead:.0f} s ahead of the time it was received;"
                f" contract {self.event_type} v{self.version} allows {self.max_future_skew_seconds} s",
                "occurred_at",
            )
        if -ahead > self.max_age_seconds:
            raise Refusal(
                "INVALID_ARGUMENT",
                f"occurred_at {occurred_at.isoformat()} is {-ahead:.0f} s older than the time it was received;"
                f" contract {self.event_type} v{self.version} allows {self.max_age_seconds} s",
                "occurred_at",
            )

    @property
    def name(self) -> str:
        return f"contracts/{self.event_type}/versions/{self.version}"


_COLUMNS = (
    "event_type, version, owner, json_schema, description, pii_fields, compatibility,"
    " allowed_lateness_seconds, null_rate_limits, created_at, registered_seq, max_future_skew_seconds,"
    " max_age_seconds"
)


def _contract(row: asyncpg.Record) -> Contract:
    return Contract(
        event_type=row["event_type"],
        version=row["version"],
        owner=row["owner"],
        json_schema=row["json_schema"],
        description=row["description"],
        pii_fields=tuple(row["pii_fields"]),
        compatibility=CompatibilityMode(row["compatibility"]),
        allowed_lateness_seconds=row["allowed_lateness_seconds"],
        null_rate_limits=row["null_rate_limits"],
        created_at=row["created_at"],
        registered_seq=row["registered_seq"],
        max_future_skew_seconds=row["max_future_skew_seconds"],
        max_age_seconds=row["max_age_seconds"],
    )


def _check_schema(schema: Any) -> None:
    if not isinstance(schema, dict):
        raise Refusal("INVALID_ARGUMENT", "json_schema must be a JSON object", "json_schema")
    declared = schema.get("$schema", DRAFT_2020_12)
    if declared.rstrip("#") != DRAFT_2020_12:
        raise Refusal(
            "INVALID_ARGUMENT", f"json_schema must be draft 2020-12 ($schema {DRAFT_2020_12}), got {declared}",
            "json_schema.$schema",
        )  # fmt: skip
    if schema.get("type") != "object":
        raise Refusal("INVALID_ARGUMENT", 'a payload schema must have "type": "object"', "json_schema.type")
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        raise Refusal(
            "INVALID_ARGUMENT", f"json_schema is not a valid JSON Schema: {exc.message}", "json_schema"
        ) from exc


class ContractRegistry:
    """Stores contract versions and validates payloads against them."""

    def __init__(self, event_log: EventLog) -> None:
        self.log = event_log
        self._contracts: dict[tuple[str, int], Contract] = {}
        self._latest: dict[str, int] = {}
        self._validators: dict[tuple[str, int], Any] = {}

    # -- registration -------------------------------------------------------------------------

    async def register(
        self,
        event_type: str,
        *,
        owner: str,
        json_schema: dict[str, Any],
        description: str = "",
        pii_fields: tuple[str, ...] | list[str] = (),
        compatibility: CompatibilityMode | str = CompatibilityMode.BACKWARD,
        allowed_lateness_seconds: int = 0,
        null_rate_limits: dict[str, float] | None = None,
        max_future_skew_seconds: int = DEFAULT_MAX_FUTURE_SKEW_SECONDS,
        max_age_seconds: int = DEFAULT_MAX_AGE_SECONDS,
        validate_only: bool = False,
        platform: bool = False,
    ) -> Contract:
        """Register the next version of `event_type`'s contract.

        A schema equal to the latest version's (with equal metadata) returns that version and
        stores nothing. Raises Refusal(FAILED_PRECONDITION) naming the field that breaks the mode.
        """
        if not EVENT_TYPE_RE.match(event_type):
            raise Refusal(
                "INVALID_ARGUMENT",
                f"event type {event_type!r} must be lower-case and dotted, like 'payment.authorized'",
                "parent",
            )
        if is_platform_type(event_type) and not platform:
            raise Refusal(
                "PERMISSION_DENIED", f"{event_type} is a platform event type: its contract is the platform's own",
                "parent",
            )  # fmt: skip
        if not owner:
            raise Refusal("INVALID_ARGUMENT", "owner is required", "contract_version.owner")
        try:
            mode = CompatibilityMode(str(compatibility).upper())
        except ValueError as exc:
            raise Refusal(
                "INVALID_ARGUMENT", f"unknown compatibility mode {compatibility!r}", "contract_version.compatibility"
            ) from exc
        _check_schema(json_schema)
        if max_future_skew_seconds < 0 or max_age_seconds <= 0:
            raise Refusal(
                "INVALID_ARGUMENT", "max_future_skew must be >= 0 and max_age > 0", "contract_version.max_age"
            )
        for pointer in pii_fields:
            if not pointer.startswith("/"):
                raise Refusal(
                    "INVALID_ARGUMENT",
                    f"pii field {pointer!r} must be a JSON pointer like '/email'",
                    "contract_version.pii_fields",
                )
        async with self.log.recording() as tx:
            rows = await tx.conn.fetch(
                f"SELECT {_COLUMNS} FROM contracts WHERE event_type = $1 ORDER BY version", event_type
            )
            previous = [_contract(r) for r in rows]
            candidate = Contract(
                event_type=event_type,
                version=(previous[-1].version + 1) if previous else 1,
                owner=owner,
                json_schema=json_schema,
                description=description,
                pii_fields=tuple(pii_fields),
                compatibility=mode,
                allowed_lateness_seconds=allowed_lateness_seconds,
                null_rate_limits=dict(null_rate_limits or {}),
                max_future_skew_seconds=max_future_skew_seconds,
                max_age_seconds=max_age_seconds,
            )
            if previous and _same_terms(previous[-1], candidate):
                return previous[-1]
            upcast_to = UPCASTERS.latest_version(event_type) if upgraded_by(event_type, candidate.version) else None
            problems = check_compatibility(
                json_schema, [(c.version, c.json_schema) for c in previous], mode, upcast_to=upcast_to
            )
            if problems:
                first = problems[0]
                detail = "; ".join(str(p) for p in problems)
                raise Refusal(
                    "FAILED_PRECONDITION",
                    f"contract {event_type} version {candidate.version} is not {mode.value}-compatible: {detail}",
                    f"json_schema{first.field.replace('/', '.') if first.field else ''}",
                )
            if upcast_to:
                await self._check_upcast_samples(tx.conn, candidate, upcast_to)
            await self._check_no_view_reads_personal_fields(tx.conn, candidate)
            if validate_only:
                return candidate
            payload = {
                "event_type": event_type, "version": candidate.version, "owner": owner,
                "compatibility": mode.value, "pii_fields": list(pii_fields), "json_schema": json_schema,
                "description": description, "allowed_lateness_seconds": allowed_lateness_seconds,
                "null_rate_limits": candidate.null_rate_limits,
                "max_future_skew_seconds": max_future_skew_seconds, "max_age_seconds": max_age_seconds,
            }  # fmt: skip
            if upcaster := upgraded_by(event_type, candidate.version):  # the code that reads older payloads as this
                payload["upcaster"] = upcaster
            await tx.append(
                NewEvent(uuid.uuid4(), "contract.registered", 1, "contract", event_type, datetime.now(UTC),
                         orjson.dumps(payload).decode(), auth.actor_metadata())
            )  # fmt: skip
            row = await tx.conn.fetchrow(
                f"SELECT {_COLUMNS} FROM contracts WHERE event_type = $1 AND version = $2", event_type,
                candidate.version,
            )  # fmt: skip
        contract = _contract(row)
        self._remember(contract)
        return contract

    UPCAST_SAMPLE = 200  # newest stored events per older version run through the upcasters

    @staticmethod
    async def _check_upcast_samples(conn: asyncpg.Connection, candidate: Contract, upcast_to: int) -> None:
        """With an upcaster to `candidate`, its schema is not compared with the versions readers only
        see upcast; instead the newest stored events of each of those versions, upcast, must pass
        it (the upcaster's promise, tried on real data). A failure names the event and the field."""
        validator = jsonschema_rs.validator_for(candidate.json_schema)
        rows = await conn.fetch(
            "SELECT seq, schema_version, payload FROM ("
            "  SELECT seq, schema_version, payload,"
            "   row_number() OVER (PARTITION BY schema_version ORDER BY seq DESC) AS n"
            "  FROM events WHERE type = $1 AND schema_version < $2) s"
            " WHERE n <= $3 ORDER BY seq",
            candidate.event_type, upcast_to, ContractRegistry.UPCAST_SAMPLE,
        )  # fmt: skip
        for row in rows:
            where = f"event seq {row['seq']} (version {row['schema_version']})"
            try:
                _, upcast_payload = upcast(candidate.event_type, row["schema_version"], row["payload"])
                sealed = tuple(pointer for pointer, _ in envelopes(upcast_payload))  # stored as ciphertext
                check_payload(validator, orjson.dumps(upcast_payload), sealed=sealed)
            except (UpcastError, Refusal) as exc:
                raise Refusal(
                    "FAILED_PRECONDITION",
                    f"contract {candidate.event_type} version {candidate.version}: {where}, upcast, does not"
                    f" pass the new schema: {exc}",
                    exc.field if isinstance(exc, Refusal) else "json_schema",
                ) from exc

    @staticmethod
    async def _check_no_view_reads_personal_fields(conn: asyncpg.Connection, candidate: Contract) -> None:
        """Refuse marking a field personal that a registered feature view reads: its fold would see
        ciphertext from now on (d2d.personal); views reading personal fields are refused too."""
        from d2d.features.definitions import FeatureView
        from d2d.features.store import check_reads_no_personal_data

        if not candidate.pii_fields:
            return
        rows = await conn.fetch(
            "SELECT definition FROM feature_views WHERE definition->>'source' = $1", candidate.event_type
        )
        for row in rows:
            view = FeatureView.from_dict(row["definition"])
            try:
                check_reads_no_personal_data(view, candidate.pii_fields)
            except Refusal as exc:
                raise Refusal(
                    "FAILED_PRECONDITION",
                    f"contract {candidate.event_type} version {candidate.version} marks a field personal that a"
                    f" registered feature view reads: {exc.message}",
                    "contract_version.pii_fields",
                ) from exc

    # -- reading ------------------------------------------------------------------------------

    async def get(self, event_type: str, version: int | None = None) -> Contract | None:
        """A version, or the latest with version None. Cached; the database is asked on a miss."""
        if version is None or version <= 0:
            latest = self._latest.get(event_type)
            if latest is None:
                await self.refresh(event_type)
                latest = self._latest.get(event_type)
            return self._contracts.get((event_type, latest)) if latest else None
        found = self._contracts.get((event_type, version))
        if found is None:
            await self.refresh(event_type)
            found = self._contracts.get((event_type, version))
        return found

    async def refresh(self, event_type: str | None = None) -> None:
        async with self.log.pool.acquire() as conn:
            if event_type is None:
                rows = await conn.fetch(f"SELECT {_COLUMNS} FROM contracts")
            else:
                rows = await conn.fetch(f"SELECT {_COLUMNS} FROM contracts WHERE event_type = $1", event_type)
        for row in rows:
            self._remember(_contract(row))

    async def list(
        self, event_type: str | None = None, *, after: tuple[str, int] = ("", 0), limit: int = 100
    ) -> list[Contract]:
        """Versions ordered by (event_type, version), starting after the `after` key."""
        async with self.log.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM contracts WHERE ($1::text IS NULL OR event_type = $1)"
                " AND (event_type, version) > ($2, $3) ORDER BY event_type, version LIMIT $4",
                event_type, after[0], after[1], limit,
            )  # fmt: skip
        return [_contract(r) for r in rows]

    def _remember(self, contract: Contract) -> None:
        key = (contract.event_type, contract.version)
        self._contracts[key] = contract
        if contract.version > self._latest.get(contract.event_type, 0):
            self._latest[contract.event_type] = contract.version

    # -- validation ---------------------------------------------------------------------------

    async def validate(
        self, event_type: str, schema_version: int, payload: bytes, *,
        occurred_at: datetime | None = None, received_at: datetime | None = None,
    ) -> tuple[int, str]:  # fmt: skip
        """Check one payload (and, with `occurred_at`, its event time against the contract's bounds
        around `received_at`, default now); returns (the version it was checked against, its JSON text).

        Raises Refusal: NOT_FOUND for an unknown type or version, INVALID_ARGUMENT naming the
        field for bytes that are not one JSON object, break the schema, or an event time out of bounds.
        A refusal never repeats a value the contract marks as personal data.
        """
        version = schema_version if schema_version > 0 else self._latest.get(event_type, 0)
        compiled = self._validators.get((event_type, version))
        if compiled is None:
            contract = await self.get(event_type, schema_version)
            if contract is None:
                if schema_version > 0 and await self.get(event_type) is not None:
                    raise Refusal(
                        "NOT_FOUND", f"contract {event_type} has no version {schema_version}", "schema_version"
                    )
                raise Refusal("NOT_FOUND", f"no contract is registered for event type {event_type!r}", "type")
            version = contract.version
            compiled = (jsonschema_rs.validator_for(contract.json_schema), contract)
            self._validators[(event_type, version)] = compiled
        validator, contract = compiled
        if occurred_at is not None:
            contract.check_time(occurred_at, received_at or datetime.now(UTC))
        return version, check_payload(validator, payload, contract.pii_fields)


def _same_terms(a: Contract, b: Contract) -> bool:
    keys = ("owner", "json_schema", "description", "pii_fields", "compatibility",
            "allowed_lateness_seconds", "null_rate_limits", "max_future_skew_seconds", "max_age_seconds")  # fmt: skip
    return all(getattr(a, k) == getattr(b, k) for k in keys)
