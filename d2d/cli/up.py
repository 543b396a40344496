"""`d2d up` starts the platform in the foreground."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from rich.table import Table

from d2d.cli import demo
from d2d.cli.common import console, settings
from d2d.runtime.stack import Stack, running_endpoints


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("up", help="start everything in the foreground").set_defaults(func=cmd_up)

    demo.register(sub)  # `d2d demo` (d2d.cli.demo) starts a stack of its own


def cmd_up(args: argparse.Namespace) -> int:
    found = settings(args)
    if running_endpoints(found.data_dir):
        raise SystemExit(f"a platform is already running on {found.data_dir}")
    stack = Stack(found)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with console.status("starting Postgres, NATS and the services..."):
            started = stack.start()
        table = Table(title="Data2Data is up", show_header=False)
        for name, addr in started.addrs.items():
            table.add_row(f"{name} (gRPC)", addr)
        table.add_row("Postgres", started.database_url)
        table.add_row("NATS JetStream", started.nats_url)
        table.add_row("data directory", started.data_dir)
        table.add_row("service logs", str(Path(started.data_dir) / "logs"))
        table.add_row("admin API key", f"{stack.admin_key_path} (private; the CLI reads it)")
        console.print(table)
        console.print("Ctrl-C stops everything; the CLI in another shell (same data dir) talks to it.")
        while not stopping:
            for line in stack.watch_once():  # a death (how, after how long, the delay) or a restart
                console.log(f"[yellow]{line}[/yellow]")
            time.sleep(0.2)
    finally:
        console.print("stopping...")
        stack.stop()
        console.print("stopped")
    return 0
