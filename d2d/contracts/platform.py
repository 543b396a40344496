"""The platform's own event types have contracts, like producers' (files in `d2d/contracts/platform/`).

- Every platform append is checked against them where it enters the log (`EventLog.append` and
  the group committer call `check_platform_event`), with the same checks and refusals as a
  producer's event (`d2d.contracts.validation`).
- They are registered in the same registry as domain contracts (`register_platform_contracts`, run
  by ingest at start), so `d2d contracts list` shows them and their versions are in the log.
- Their types are reserved: a producer cannot send a `decision.made` through ingest, and nobody
  can register another contract for one of them (`is_platform_type`).
- Each names the services that append it (`appended_by`): the database refuses the type from any
  other service's login (`d2d.dbroles.append_rights`), so serving cannot mint an API key.

Adding a platform event type is one JSON file here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema_rs

from d2d.contracts.files import ContractSpec, load_contract_files
from d2d.contracts.validation import check_payload
from d2d.errors import Refusal
from d2d.runtime.services import SERVICES

if TYPE_CHECKING:
    from d2d.contracts.registry import ContractRegistry
    from d2d.eventlog import NewEvent

PLATFORM_DIR = Path(__file__).parent / "platform"
# Every version of every platform contract, oldest first per type.
CONTRACTS: list[ContractSpec] = load_contract_files(PLATFORM_DIR)
_LATEST: dict[str, ContractSpec] = {c.event_type: c for c in CONTRACTS}
_VALIDATORS: dict[tuple[str, int], Any] = {
    (c.event_type, c.version): jsonschema_rs.validator_for(c.schema) for c in CONTRACTS
}


# Which services append each platform type (its newest contract says; d2d.runtime.services names).
APPENDED_BY: dict[str, tuple[str, ...]] = {t: c.appended_by for t, c in _LATEST.items()}
_unknown = {s for services in APPENDED_BY.values() for s in services} - {spec.name for spec in SERVICES}
assert not _unknown, f"platform contracts' appended_by names services that are not registered: {_unknown}"


def is_platform_type(event_type: str) -> bool:
    return event_type in _LATEST


def check_platform_event(event: NewEvent) -> None:
    """Refuse (Refusal naming the payload field) a platform event whose payload breaks its
    contract version; other types pass (ingest checked them against theirs)."""
    validator = _VALIDATORS.get((event.type, event.schema_version))
    if validator is None:
        if event.type in _LATEST:
            raise Refusal(
                "NOT_FOUND", f"platform contract {event.type} has no version {event.schema_version}", "schema_version"
            )
        return
    check_payload(validator, event.payload.encode(), _LATEST[event.type].pii_fields)


async def register_platform_contracts(registry: ContractRegistry) -> None:
    """Register every platform contract version not registered yet (an unchanged one stores nothing)."""
    for spec in CONTRACTS:
        existing = await registry.get(spec.event_type, spec.version)
        if existing is not None:
            continue
        await registry.register(
            spec.event_type, owner=spec.owner, json_schema=spec.schema, description=spec.description,
            pii_fields=spec.pii_fields, compatibility=spec.compatibility,
            allowed_lateness_seconds=spec.allowed_lateness_seconds, platform=True,
        )  # fmt: skip
