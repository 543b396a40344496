"""What every command group shares: the console, settings, where the platform is, RPC errors, tables."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Coroutine
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from d2d.config import Settings
from d2d.runtime.services import APIS
from d2d.runtime.stack import Endpoints, running_endpoints

if TYPE_CHECKING:
    from d2d.v1 import event_pb2

console = Console()


def settings(args: argparse.Namespace) -> Settings:
    found = Settings()
    if getattr(args, "data_dir", None):
        found = replace(found, data_dir=Path(args.data_dir))
    return found


def endpoints(found: Settings) -> Endpoints:
    """Where the platform is: the environment, else the stack `d2d up` runs on the data dir."""
    running = running_endpoints(found.data_dir)
    if found.database_url and found.nats_url:
        addrs = {
            spec.name: os.environ.get(spec.addr_env) or (running.addr(spec.name) if running else found.addr(spec.name))
            for spec in APIS
        }
        return Endpoints(found.database_url, found.nats_url, addrs, str(found.data_dir), 0)
    if running is None:
        raise SystemExit(f"no platform is running on {found.data_dir}; start one with `d2d up`")
    return running


def run_rpc(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine; a failed call prints its status code and message and exits 1."""
    import grpc

    try:
        return asyncio.run(coro)
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
        return 1


def shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.2f}"
    return "-" if value is None else str(value)


def print_events(events: list[event_pb2.Event], title: str) -> None:
    """Events as `ListEvents` answers them, one row each, payloads cut at 80 characters."""
    table = Table(title=title)
    for col in ("seq", "type", "entity", "occurred at", "payload"):
        table.add_column(col, overflow="fold")
    for e in events:
        payload = json.dumps(json.loads(e.payload), separators=(",", ":"))
        table.add_row(str(e.seq), e.type, f"{e.entity_type}/{e.entity_id}",
                      e.occurred_at.ToDatetime(tzinfo=UTC).isoformat(),
                      payload[:80] + ("..." if len(payload) > 80 else ""))  # fmt: skip
    console.print(table)
