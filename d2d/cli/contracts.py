"""`d2d contracts list|show|register`: data contracts, through IngestService."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from d2d.cli.common import console, endpoints, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    contracts = sub.add_parser("contracts", help="data contracts")
    csub = contracts.add_subparsers(dest="action", required=True)
    csub.add_parser("list")
    show = csub.add_parser("show")
    show.add_argument("type")
    show.add_argument("--version", default="latest")
    register_ = csub.add_parser("register", help="register a version from a JSON file")
    register_.add_argument("file")
    contracts.set_defaults(func=cmd_contracts)


def _mode_name(mode: int) -> str:
    from d2d.v1 import ingest_pb2

    return ingest_pb2.CompatibilityMode.Name(mode)


def cmd_contracts(args: argparse.Namespace) -> int:
    from d2d.client import IngestClient

    target = endpoints(settings(args)).addr("ingest")

    async def work() -> int:
        async with IngestClient(target) as ingest:
            if args.action == "list":
                table = Table(title="contracts")
                for col in ("name", "owner", "compatibility", "pii fields", "registered at seq"):
                    table.add_column(col)
                for c in await ingest.list_contract_versions():
                    table.add_row(
                        c.name, c.owner, _mode_name(c.compatibility), ", ".join(c.pii_fields), str(c.registered_seq)
                    )
                console.print(table)
            elif args.action == "show":
                c = await ingest.get_contract_version(args.type, args.version)
                console.print(f"[bold]{c.name}[/bold] owner {c.owner}, {_mode_name(c.compatibility)}")
                console.print_json(c.json_schema)
            else:
                spec = json.loads(Path(args.file).read_text())  # noqa: ASYNC240 - a small local file
                c = await ingest.create_contract_version(
                    spec["event_type"], owner=spec["owner"], json_schema=spec["schema"],
                    description=spec.get("description", ""), pii_fields=spec.get("pii_fields", []),
                    compatibility=spec.get("compatibility", "BACKWARD"),
                    allowed_lateness_seconds=int(spec.get("allowed_lateness_seconds", 0)),
                )  # fmt: skip
                console.print(f"registered {c.name}")
        return 0

    return run_rpc(work())
