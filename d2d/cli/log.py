"""`d2d log head`: the newest events, through IngestService.ListEvents."""

from __future__ import annotations

import argparse

from d2d.cli.common import endpoints, print_events, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    log = sub.add_parser("log", help="the event log")
    lsub = log.add_subparsers(dest="action", required=True)
    head = lsub.add_parser("head", help="the newest events")
    head.add_argument("-n", type=int, default=10)
    head.add_argument("--type", default="", help="only events of this type")
    head.add_argument("--entity", default="", metavar="TYPE[/ID]", help="only events about this entity (type)")
    log.set_defaults(func=cmd_log)


def cmd_log(args: argparse.Namespace) -> int:
    from d2d.client import IngestClient

    target = endpoints(settings(args)).addr("ingest")
    entity_type, _, entity_id = args.entity.partition("/")

    async def work() -> int:
        async with IngestClient(target) as ingest:
            newest, head = await ingest.list_events(
                limit=args.n, event_type=args.type, entity_type=entity_type, entity_id=entity_id
            )
        print_events(newest[::-1], f"the newest {args.n} events (head seq {head:,})")
        return 0

    return run_rpc(work())
