"""`d2d report`: one self-contained HTML page of plots (opens with no network), from the services."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from d2d.cli.common import console, endpoints, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="write an HTML page of plots: events, features, models, decisions, OPE")
    report.add_argument("--out", default="report.html", help="the page to write (default report.html)")
    report.add_argument("--decision", metavar="REQUEST_OR_DECISION_ID",
                        help="the decision whose lineage is drawn (default: the newest with an outcome)")  # fmt: skip
    report.add_argument("--reward", help='OPE reward table JSON, e.g. {"approve": {"0": 1, "1": -10}, "decline": 0} '
                        "(default: the domain's default_reward(), else the outcomes' rewards)")  # fmt: skip
    report.add_argument("--max-events", type=int, default=100_000, help="the newest events read (default 100000)")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from d2d.report import write_report

    try:
        reward = json.loads(args.reward) if args.reward else None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--reward is not JSON: {exc}") from None
    if args.max_events < 1:
        raise SystemExit("--max-events must be at least 1")
    if reward is None:  # the domain's, where its training defaults name one (as they name a default policy)
        defaults = importlib.import_module(settings(args).training_defaults_module)
        reward = getattr(defaults, "default_reward", lambda: None)()
    found = endpoints(settings(args))
    addrs = {name: found.addr(name) for name in ("ingest", "registry", "feedback", "features", "audit")}

    async def work() -> int:
        with console.status("gathering from the platform..."):
            path, _, sections = await write_report(
                Path(args.out), addrs, decision=args.decision, reward=reward, max_events=args.max_events
            )
        for s in sections:
            shown = "[green]plotted[/green]" if s.figure is not None else f"[yellow]no data yet[/yellow]: {s.missing}"
            console.print(f"  {s.title}: {shown}", highlight=False)
        console.print(f"wrote {path.resolve()}")
        return 0

    return run_rpc(work())
