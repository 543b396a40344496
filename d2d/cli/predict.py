"""`d2d predict`: one decision, through ServingService."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from d2d.cli.common import console, endpoints, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="ask serving for one decision")
    predict.add_argument("model")
    predict.add_argument("--entity", action="append", default=[], help="TYPE=ID, e.g. customer=cus_000001 (repeat)")
    predict.add_argument("--context", help='request fields as JSON, e.g. \'{"amount": 120.5, "channel": "ecom"}\'')
    predict.add_argument("--unit", help="routing unit id (default: the first entity id)")
    predict.add_argument("--request-id")
    predict.add_argument("--timeout", type=float, default=10.0)
    predict.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from d2d.client import ServingClient

    target = endpoints(settings(args)).addr("serving")
    entities = dict(pair.split("=", 1) for pair in args.entity)
    context = json.loads(args.context) if args.context else {}

    async def work() -> int:
        async with ServingClient(target) as serving:
            r = await serving.predict(
                args.model, entities, context, unit_id=args.unit or next(iter(entities.values()), "cli"),
                request_id=args.request_id or "", timeout=args.timeout,
            )  # fmt: skip
        table = Table(title=f"decision {r.decision_id} (log seq {r.seq:,})", show_header=False)
        table.add_row("action", f"{r.action} (propensity {r.propensity:.3f}{', explored' if r.explored else ''})")
        table.add_row("score", f"{r.score:.6f}")
        table.add_row("model", f"{r.model_version} ({r.arm})")
        table.add_row("features as of log seq", f"{r.feature_watermark:,}")
        if r.unknown_entities:
            table.add_row("unknown entities (defaults)", ", ".join(r.unknown_entities))
        for shadow in r.shadow_scores:
            table.add_row("shadow", f"{shadow.model_version}: {shadow.score:.6f}")
        console.print(table)
        return 0

    return run_rpc(work())
