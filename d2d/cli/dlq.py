"""`d2d dlq list|redrive`: dead letters, through IngestService."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from d2d.cli.common import console, endpoints, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    dlq = sub.add_parser("dlq", help="dead letters")
    dsub = dlq.add_subparsers(dest="action", required=True)
    dlist = dsub.add_parser("list")
    dlist.add_argument("--type")
    dlist.add_argument("--all", action="store_true", help="include redriven ones")
    dlist.add_argument("--limit", type=int, default=50)
    redrive = dsub.add_parser("redrive", help="re-validate and append (all pending, or the named ones)")
    redrive.add_argument("names", nargs="*", help="deadLetters/{id}")
    redrive.add_argument("--type")
    redrive.add_argument("--payload", help="file with a corrected JSON payload (one name only)")
    dlq.set_defaults(func=cmd_dlq)


def cmd_dlq(args: argparse.Namespace) -> int:
    from d2d.client import IngestClient

    target = endpoints(settings(args)).addr("ingest")

    async def work() -> int:
        async with IngestClient(target) as ingest:
            if args.action == "list":
                letters = await ingest.list_dead_letters(
                    event_type=args.type or "", show_redriven=args.all, limit=args.limit
                )
                table = Table(title=f"dead letters ({len(letters)} shown)")
                for col in ("name", "received", "source", "type", "event id", "state", "reason"):
                    table.add_column(col, overflow="fold")
                for d in letters:
                    state = "REDRIVEN" if d.state == d.REDRIVEN else "PENDING"
                    table.add_row(d.name, d.receive_time.ToDatetime().isoformat(timespec="seconds"), d.source,
                                  d.event_type, d.event_id, state, d.error.message)  # fmt: skip
                console.print(table)
                return 0
            payload = Path(args.payload).read_bytes() if args.payload else b""  # noqa: ASYNC240 - a small local file
            response = await ingest.redrive_dead_letters(args.names, event_type=args.type or "", payload=payload)
        for r in response.results:
            if r.WhichOneof("outcome") == "seq":
                console.print(f"[green]appended[/green] {r.dead_letter} as seq {r.seq}")
            else:
                console.print(f"[red]still refused[/red] {r.dead_letter}: {r.error.message}")
        console.print(f"{response.redriven_count} of {len(response.results)} redriven")
        return 0 if response.redriven_count == len(response.results) else 1

    return run_rpc(work())
