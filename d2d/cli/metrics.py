"""`d2d metrics MODEL`: live metrics per model version and arm, through FeedbackService."""

from __future__ import annotations

import argparse
import json
from datetime import datetime

from rich.table import Table

from d2d.cli.common import console, endpoints, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    metrics = sub.add_parser("metrics", help="live metrics of a model per version and arm (decisions and outcomes)")
    metrics.add_argument("model")
    metrics.add_argument("--from", dest="start", help="decisions from this event time (RFC 3339)")
    metrics.add_argument("--to", dest="end", help="decisions before this event time (RFC 3339)")
    metrics.add_argument("--positive-action", default="approve", help="the action whose rate is shown")
    metrics.add_argument("--json", action="store_true", help="print the metrics as JSON")
    metrics.set_defaults(func=cmd_metrics)


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:
        raise SystemExit(f"{option} needs a time zone, e.g. 2026-03-01T00:00:00+00:00")
    return at


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cmd_metrics(args: argparse.Namespace) -> int:
    from d2d.client import FeedbackClient

    target = endpoints(settings(args)).addr("feedback")
    start, end = _time(args.start, "--from"), _time(args.end, "--to")

    async def work() -> int:
        async with FeedbackClient(target) as feedback:
            answer = await feedback.model_metrics(
                args.model, start=start, end=end, positive_action=args.positive_action
            )
        rows = [(a.model_version, a.arm, json.loads(a.metrics_json)) for a in answer.arms]
        if args.json:
            console.print_json(json.dumps([{"model_version": v, "arm": arm, **m} for v, arm, m in rows]))
            return 0
        table = Table(title=f"{answer.name}: live metrics (the join up to log seq {answer.position:,})")
        columns = ("version", "arm", "decisions", "labelled", "coverage", "AUC", "IPS AUC", "log loss",
                   f"{args.positive_action} rate", "explored", "label delay p50 (days)")  # fmt: skip
        for column in columns:
            table.add_column(column, justify="right")
        for version, arm, m in rows:
            delay = m["label_delay_p50_seconds"]
            table.add_row(
                version.rsplit("/", 1)[1], arm, f"{m['decisions']:,}", f"{m['labelled']:,}",
                _number(m["label_coverage"], 3), _number(m["auc"]), _number(m["ips_auc"]), _number(m["log_loss"]),
                _number(m["positive_action_rate"], 3), _number(m["explored_share"], 3),
                _number(None if delay is None else delay / 86400, 1),
            )  # fmt: skip
        console.print(table)
        return 0

    return run_rpc(work())
