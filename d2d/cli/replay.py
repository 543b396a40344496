"""`d2d replay state|explain|rescore|ope|verify`: audit and counterfactuals through AuditService.

Each subcommand prints a readable report (or, with --json, the result document) and shows a
progress bar while a long run streams its progress.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from d2d.cli.common import console, endpoints, run_rpc, settings


def register(sub: argparse._SubParsersAction) -> None:
    replay = sub.add_parser("replay", help="state as of a point, explain, rescore, off-policy evaluation, verify")
    commands = replay.add_subparsers(dest="replay_command", required=True)

    state = commands.add_parser("state", help="derived state as of a log position or time, rebuilt from the log")
    state.add_argument("--as-of", required=True, help="a log seq, or a time (RFC 3339): the last seq recorded by then")
    state.add_argument("--entity", action="append", default=[], help="show this entity's features, e.g. customer/c-1")
    state.add_argument("--json", action="store_true", help="print the result document")
    state.set_defaults(func=cmd_state)

    explain = commands.add_parser("explain", help="one decision and everything that led to it")
    explain.add_argument("decision_id", help="the decision's id (as Predict answered it)")
    explain.add_argument("--json", action="store_true", help="print the result document")
    explain.set_defaults(func=cmd_explain)

    rescore = commands.add_parser("rescore", help="score logged decisions with another model version")
    rescore.add_argument("--model", required=True, dest="model_version", help="the version to score with: M@V")
    rescore.add_argument("--decisions-of", default="", help="decisions of this model (default: the version's)")
    rescore.add_argument("--from-seq", type=int, default=0, help="decisions after this log seq")
    rescore.add_argument("--to-seq", type=int, default=0, help="decisions up to this log seq (default: the head)")
    rescore.add_argument("--recompute-features", action="store_true", help="vectors recomputed from the log")
    rescore.add_argument("--json", action="store_true", help="print the result document")
    rescore.set_defaults(func=cmd_rescore)

    ope = commands.add_parser("ope", help="a candidate policy's value from logged decisions (IPS, SNIPS, DR)")
    ope.add_argument("--policy", required=True, metavar="M@V", help="the candidate's model version (model@n)")
    ope.add_argument("--epsilon", type=float, help="the candidate's exploration (default: each decision's logged)")
    ope.add_argument("--threshold", type=float, help="the candidate's threshold (default: each decision's logged)")
    ope.add_argument("--temperature", type=float, help="the candidate explores by softmax at this temperature")
    ope.add_argument("--decision-policy", metavar="JSON",
                     help='the candidate\'s whole policy, e.g. {"kind": "best_action", "utilities": [{"action": '
                     '"approve", "weight": -1, "bias": 0.5}, ...], "exploration": "softmax", "temperature": 0.1}; '
                     "or fields over each decision's logged policy (the flags above go over it)")  # fmt: skip
    ope.add_argument("--logged-model", default="", help="evaluate on this model's decisions (default: the candidate's)")
    ope.add_argument("--clip", type=float, default=0.0, help="raise propensities below this to it (default 0: none)")
    ope.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for the intervals (default 200)")
    ope.add_argument("--reward", help='reward table JSON, e.g. {"approve": {"0": 1, "1": -10}, "decline": 0} '
                     "(default: the outcomes' rewards)")  # fmt: skip
    ope.add_argument("--from-seq", type=int, default=1, help="decisions at or after this log position")
    ope.add_argument("--to-seq", type=int, default=0, help="decisions at or before this log position (default: all)")
    ope.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the reward model")
    ope.add_argument("--json", action="store_true", help="print the result document")
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


def _as_of(text: str) -> tuple[int | None, datetime | None]:
    """`--as-of`: a log seq (digits) or an RFC 3339 time (naive = UTC)."""
    if text.isdigit():
        return int(text), None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"--as-of {text!r} is neither a log seq nor an RFC 3339 time") from None
    return None, at if at.tzinfo else at.replace(tzinfo=UTC)


def _print_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2, sort_keys=True, default=str))


def cmd_state(args: argparse.Namespace) -> int:
    from d2d.client import AuditClient
    from d2d.replay.state import render

    seq, at = _as_of(args.as_of)
    target = _audit_target(args)

    async def work() -> int:
        async with AuditClient(target) as audit:
            state = await audit.replay_state(seq=seq, time=at, entities=args.entity)
        if args.json:
            _print_json(state)
        else:
            print(render(state), end="")
        return 0

    return run_rpc(work())


def cmd_explain(args: argparse.Namespace) -> int:
    from d2d.client import AuditClient
    from d2d.replay.explain import render

    target = _audit_target(args)

    async def work() -> int:
        async with AuditClient(target) as audit:
            answer = await audit.explain(args.decision_id.removeprefix("decisions/"))
        explanation = json.loads(answer.explanation_json)
        if args.json:
            _print_json(explanation)
        else:
            print(render(explanation), end="")
        return 0

    return run_rpc(work())


def cmd_rescore(args: argparse.Namespace) -> int:
    from d2d.client import AuditClient
    from d2d.replay.rescore import render

    target = _audit_target(args)

    async def work() -> int:
        async with AuditClient(target) as audit:
            with progress_bar() as on_progress:
                result = await audit.rescore(
                    args.model_version, model=args.decisions_of, after_seq=args.from_seq, to_seq=args.to_seq,
                    recompute_features=args.recompute_features, on_progress=on_progress,
                )  # fmt: skip
        if args.json:
            _print_json(result)
        else:
            print(render(result), end="")
        return 0

    return run_rpc(work())


def cmd_ope(args: argparse.Namespace) -> int:
    from d2d.client import AuditClient

    try:
        policy = json.loads(args.decision_policy) if args.decision_policy else {}
    except ValueError as exc:
        raise SystemExit(f"--decision-policy is not JSON: {exc}") from None
    if not isinstance(policy, dict):
        raise SystemExit("--decision-policy must be a JSON object")
    flags = (("epsilon", args.epsilon), ("threshold", args.threshold), ("temperature", args.temperature))
    policy.update({k: v for k, v in flags if v is not None})
    try:
        reward = json.loads(args.reward) if args.reward else None
    except ValueError as exc:
        raise SystemExit(f"--reward is not JSON: {exc}") from None

    async def run() -> int:
        async with AuditClient(_audit_target(args)) as audit:
            with progress_bar() as on_progress:
                result = await audit.evaluate_policy(
                    args.policy, policy=policy or None, model=args.logged_model, after_seq=max(args.from_seq - 1, 0),
                    to_seq=args.to_seq, clip=args.clip, bootstrap=args.bootstrap, reward=reward, seed=args.seed,
                    on_progress=on_progress,
                )  # fmt: skip
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            print_ope(result)
        return 0

    return run_rpc(run())


def print_ope(result: dict) -> None:
    """The estimates as a table, then what they rest on: ESS, the counts, clipping and warnings."""
    from rich.table import Table

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:,.4f}"

    names = {"ips": "IPS", "snips": "self-normalised IPS", "dr": "doubly robust"}
    policy = f" with {json.dumps(result['policy'])}" if result.get("policy") else ""
    table = Table(title=f"{result['model_version']}{policy} on the decisions of models/{result['model']} "
                  f"up to seq {result['to_seq']}")  # fmt: skip
    for column in ("estimator", "value", "95% interval", "SE"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    rows = [(names[k], v) for k, v in result["estimates"].items()] + [("logging policy (observed)", result["logging"])]
    for name, e in rows:
        table.add_row(name, number(e["value"]), f"[{number(e['ci_low'])}, {number(e['ci_high'])}]", number(e["se"]))
    console.print(table)
    counts = result["counts"]
    left_out = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in counts["left_out"].items()) or "none"
    console.print(
        f"effective sample size {result['ess']:,.1f} of {counts['used']:,} used ({counts['read']:,} read; left out: "
        f"{left_out}); max weight {number(result['max_weight'])}; clip {result['clip']} ({result['clipped']} "
        f"propensities raised); {result['bootstrap']} bootstrap resamples, seed {result['seed']}"
    )
    for warning in result.get("warnings", []):
        console.print(f"[yellow]warning[/yellow]: {warning}")


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 1 when anything recomputed from the log differs from what is stored or was logged."""
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
