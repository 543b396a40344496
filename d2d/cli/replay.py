"""`d2d replay state|explain|rescore|ope|verify`: audit and counterfactuals through AuditService.

Each subcommand prints a readable report (or, with --json, the result document) and shows a
progress bar while a long run streams its progress.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

from d2d.cli.common import console, endpoints, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    replay = sub.add_parser("replay", help="state as of a point, explain, rescore, off-policy evaluation, verify")
    commands = replay.add_subparsers(dest="replay_command", required=True)

    state = commands.add_parser("state", help="derived state as of a log position or time, rebuilt from the log")
    state.set_defaults(func=cmd_state)

    explain = commands.add_parser("explain", help="one decision and everything that led to it")
    explain.set_defaults(func=cmd_explain)

    rescore = commands.add_parser("rescore", help="score logged decisions with another model version")
    rescore.set_defaults(func=cmd_rescore)

    ope = commands.add_parser("ope", help="a candidate policy's value from logged decisions (IPS, SNIPS, DR)")
    ope.set_defaults(func=cmd_ope)

    verify = commands.add_parser("verify", help="recompute every derived state and logged vector from the log")
    verify.add_argument("--workers", type=int, default=0, help="worker processes (default: every core)")
    verify.add_argument("--skip-projections", action="store_true", help="skip the projection rebuild")
    verify.add_argument("--json", action="store_true", help="print the result document")
    verify.set_defaults(func=cmd_verify)


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A bar following a streamed run: pass what it yields as `on_progress`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def show(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        yield show


def _audit_target(args: argparse.Namespace) -> str:
    return endpoints(settings(args)).addr("audit")


def cmd_state(args: argparse.Namespace) -> int:
    raise SystemExit("d2d replay state is not built yet")


def cmd_explain(args: argparse.Namespace) -> int:
    raise SystemExit("d2d replay explain is not built yet")


def cmd_rescore(args: argparse.Namespace) -> int:
    raise SystemExit("d2d replay rescore is not built yet")


def cmd_ope(args: argparse.Namespace) -> int:
    raise SystemExit("d2d replay ope is not built yet")


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 1 when anything recomputed from the log differs from what is stored or was logged."""
    import json

    from d2d.client import AuditClient

    async def run() -> int:
        async with AuditClient(_audit_target(args)) as audit:
            with progress_bar() as show:
                result = await audit.verify(
                    workers=args.workers, skip_projections=args.skip_projections, on_progress=show
                )
        if args.json:
            console.print_json(json.dumps(result, default=str))
        else:
            for difference in result["differences"]:
                console.print(_difference_line(difference), highlight=False, soft_wrap=True)
            counts = ", ".join(f"{k} {v}" for k, v in result["checked"].items() if isinstance(v, int))
            verdict = (
                "[green]verified[/green]" if result["ok"] else f"[red]{len(result['differences'])} differences[/red]"
            )
            console.print(f"{verdict}: log head {result['head']}; {counts}; {result['seconds']:.1f}s")
        return 0 if result["ok"] else 1

    return run_rpc(run())


def _difference_line(d: dict) -> str:
    if d["kind"] == "projection":
        return (
            f"projection {d['table']} {d['key']}: {d['column']} stored {d['stored']!r}, recomputed {d['recomputed']!r}"
        )
    if d["kind"] == "feature_state":
        return (f"feature state ({d['consumer']}) {d['view']} {d['entity']}: {d['field']} online {d['online']!r},"
                f" recomputed {d['recomputed']!r}")  # fmt: skip
    return f"decision {d['decision_id']}: {d['feature']} logged {d['logged']!r}, recomputed {d['recomputed']!r}"


__all__ = ["register", "progress_bar", "run_rpc"]
