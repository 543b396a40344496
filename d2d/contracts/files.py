"""The contract file: one JSON document per contract version, as the simulator ships its contracts
(`d2d/sim/contracts/`), the platform ships its own (`d2d/contracts/platform/`) and `d2d contracts
register FILE` reads them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ContractSpec:
    """A data contract for one event type: owner, payload JSON Schema and PII pointers."""

    event_type: str
    version: int
    owner: str
    schema: dict[str, Any]
    pii_fields: tuple[str, ...]
    compatibility: str = "BACKWARD"
    allowed_lateness_seconds: int = 3600
    description: str = ""
    # Platform contracts only: the services (d2d.runtime.services names) whose database logins may
    # append this type (d2d.dbroles.append_rights); none: only the database's owner (a CLI command).
    appended_by: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON file representation (as shipped in ``d2d/sim/contracts``)."""
        return {
            "event_type": self.event_type,
            "version": self.version,
            "owner": self.owner,
            "description": self.description,
            "compatibility": self.compatibility,
            "allowed_lateness_seconds": self.allowed_lateness_seconds,
            "pii_fields": list(self.pii_fields),
            "schema": self.schema,
            **({"appended_by": list(self.appended_by)} if self.appended_by else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContractSpec:
        """Parse the JSON file representation."""
        return cls(
            event_type=d["event_type"],
            version=int(d["version"]),
            owner=d["owner"],
            schema=d["schema"],
            pii_fields=tuple(d.get("pii_fields", ())),
            compatibility=d.get("compatibility", "BACKWARD"),
            allowed_lateness_seconds=int(d.get("allowed_lateness_seconds", 3600)),
            description=d.get("description", ""),
            appended_by=tuple(d.get("appended_by", ())),
        )

    @property
    def file_name(self) -> str:
        return f"{self.event_type}.v{self.version}.json"


def load_contract_files(directory: Path) -> list[ContractSpec]:
    """Every `*.json` contract file in `directory`, sorted by (event type, version)."""
    specs = [ContractSpec.from_dict(json.loads(p.read_text("utf-8"))) for p in Path(directory).glob("*.json")]
    return sorted(specs, key=lambda s: (s.event_type, s.version))
