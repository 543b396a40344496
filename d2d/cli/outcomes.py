"""`d2d outcomes record|rules`: outcomes of decisions and the outcome rules, through FeedbackService."""

from __future__ import annotations

import argparse
from datetime import datetime

from rich.table import Table

from d2d.cli.common import console, endpoints, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    outcomes = sub.add_parser("outcomes", help="record outcomes of decisions; show outcome rules")
    commands = outcomes.add_subparsers(dest="outcomes_command", required=True)
    record = commands.add_parser("record", help="record the outcome of one decision (idempotent by --id)")
    record.add_argument("decision", help="the decision id Predict answered")
    record.add_argument("--label", type=int, help="0 or 1")
    record.add_argument("--reward", type=float)
    record.add_argument("--at", help="when it happened, RFC 3339 (default: now)")
    record.add_argument("--id", default="", help="the outcome id (default: api:<decision>)")
    record.set_defaults(func=cmd_record)
    rules = commands.add_parser("rules", help="the registered outcome rules")
    rules.set_defaults(func=cmd_rules)


def cmd_record(args: argparse.Namespace) -> int:
    from d2d.client import FeedbackClient

    target = endpoints(settings(args)).addr("feedback")
    at = datetime.fromisoformat(args.at) if args.at else None
    if at is not None and at.tzinfo is None:
        raise SystemExit("--at needs a time zone, e.g. 2026-03-01T12:00:00+00:00")

    async def work() -> int:
        async with FeedbackClient(target) as feedback:
            o = await feedback.record_outcome(
                args.decision, label=args.label, reward=args.reward, occurred_at=at, outcome_id=args.id
            )
        terms = [
            f"label {o.label}" if o.HasField("label") else "",
            f"reward {o.reward}" if o.HasField("reward") else "",
        ]
        console.print(f"{o.name}: {', '.join(t for t in terms if t)} (log seq {o.seq:,})")
        return 0

    return run_rpc(work())


def cmd_rules(args: argparse.Namespace) -> int:
    from d2d.client import FeedbackClient

    target = endpoints(settings(args)).addr("feedback")

    async def work() -> int:
        async with FeedbackClient(target) as feedback:
            rules = await feedback.list_rules()
        table = Table(title="outcome rules")
        for column in ("name", "event", "joins", "label / reward", "window", "otherwise", "observed actions", "seq"):
            table.add_column(column, overflow="fold")
        for r in rules:
            means = " / ".join(str(getattr(r, t)) if r.HasField(t) else "-" for t in ("label", "reward"))
            otherwise = " / ".join(
                str(getattr(r, t)) if r.HasField(t) else "-" for t in ("otherwise_label", "otherwise_reward")
            )
            table.add_row(
                r.name.removeprefix("outcomeRules/"), r.event_type, f"{r.event_key} = decision.{r.decision_key}",
                means, f"{r.window.seconds / 86400:g} d (+{r.allowed_lateness.seconds} s late)", otherwise,
                ", ".join(r.observed_actions) or "all", str(r.registered_seq),
            )  # fmt: skip
        console.print(table)
        return 0

    return run_rpc(work())
