"""`d2d migrate`: apply the database migrations (the one command besides `up` that needs the database)."""

from __future__ import annotations

import argparse
import asyncio

from d2d.cli.common import console, endpoints, settings


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from d2d import eventlog

    applied = asyncio.run(eventlog.migrate(endpoints(settings(args)).database_url))
    console.print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")
    return 0
