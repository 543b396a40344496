"""`d2d demo`: the platform's whole story (d2d.sim.story) on a fresh embedded stack, a progress bar
per stage, then a summary. The stack is its own (under the data dir's `demo/`, started for the run
and stopped after it): the story needs an empty log and its own service settings (a one-day label
window, a quick canary), so a platform `d2d up` runs is left alone."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from d2d.cli.common import console, settings
from d2d.runtime.stack import Stack, running_endpoints
from d2d.sim.story import DEMO, STAGES, Story, StoryConfig, StoryResult

if TYPE_CHECKING:  # plotly is imported only when the page is drawn
    from d2d.report.figures import Section

DEMO_DIR = "demo"


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="the whole loop on a fresh stack in a few minutes: traffic, a model, drift, retraining, canary"
    )
    demo.add_argument("--seed", type=int, default=DEMO.sim.seed, help="the simulator's seed")
    demo.add_argument(
        "--broken-every", type=int, default=DEMO.broken_every, help="corrupt every Nth history event (0: none)"
    )
    demo.add_argument("--verify", action="store_true", help="at the end, recompute everything derived from the log")
    demo.add_argument(
        "--report", default=None, help="where the story's `d2d report` page goes (default: <data dir>/demo-report.html)"
    )
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    found = settings(args)
    data_dir = Path(found.data_dir).resolve() / DEMO_DIR
    if running_endpoints(data_dir):
        raise SystemExit(f"a platform is already running on {data_dir}")
    config = dataclasses.replace(
        DEMO, sim=dataclasses.replace(DEMO.sim, seed=args.seed), broken_every=args.broken_every, verify=args.verify
    )
    shutil.rmtree(data_dir, ignore_errors=True)  # the story starts from an empty log
    os.environ.update(config.service_env())  # the services' settings for the story
    stack = Stack(dataclasses.replace(found, data_dir=str(data_dir), database_url="", nats_url=""))
    try:
        with console.status("starting Postgres, NATS and the services for the demo..."):
            where = stack.start()
        os.environ["D2D_API_KEY"] = stack.admin_key  # the story's clients use the key the stack made
        console.print(f"platform up in {time.monotonic() - started:.0f}s (data in {data_dir})")
        result = run_story(config, where.addrs, where.database_url, console)
        page = Path(args.report) if args.report else data_dir.parent / "demo-report.html"
        with console.status("drawing the report of the story (d2d report)..."):
            asyncio.run(write_story_report(page, where.addrs, result, config))
    finally:
        with console.status("stopping the demo's platform..."):
            stack.stop()
    print_summary(result, config, console)
    console.print(f"the story in plots: {page} (opens in a browser with no network)")
    console.print(f"{'done' if result.ok else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return 0 if result.ok else 1


async def write_story_report(
    path: Path, addrs: Mapping[str, str], result: StoryResult, config: StoryConfig
) -> list[Section]:
    """`d2d report`'s page of the story, before its platform stops: its policies valued with the
    story's rewards, its lineage the decision the story explained. The sections drawn."""
    from d2d.report import write_report

    decision = result.explained.get("decision_id")
    _, _, sections = await write_report(path, addrs, decision=decision, reward=dict(config.reward))
    return sections


def run_story(config: StoryConfig, addrs: Mapping[str, str], database_url: str, out: Console) -> StoryResult:
    """The story with a bar per stage on `out`; each bar ends ticked, or crossed with why."""
    columns = (
        TextColumn("{task.description}", style="bold"), BarColumn(bar_width=24), TaskProgressColumn(),
        TimeElapsedColumn(),
    )  # fmt: skip
    stages = STAGES if config.verify else STAGES[:-1]
    with Progress(*columns, console=out) as bar:
        tasks: dict[str, TaskID] = {
            name: bar.add_task(f"  {name:<22}", total=1, start=False) for name in stages
        }  # fmt: skip
        current: list[str] = []

        def report(stage: str, completed: float, total: float) -> None:
            if not current or current[-1] != stage:
                if current:
                    _close(bar, tasks[current[-1]], current[-1], story.result)
                current.append(stage)
                bar.start_task(tasks[stage])
            bar.update(tasks[stage], completed=completed, total=total)

        story = Story(config, addrs, database_url, report)
        result = asyncio.run(story.run())
        if current:
            _close(bar, tasks[current[-1]], current[-1], result)
        for name in stages[len(current) :]:
            bar.update(tasks[name], description=f"[dim]- {name:<22}[/dim]")
    return result


def _close(bar: Progress, task: TaskID, name: str, result: StoryResult) -> None:
    outcome = next((s for s in result.stages if s.name == name), None)
    if outcome is not None and outcome.ok:
        bar.update(task, description=f"[green]✓[/green] {name:<22}", completed=1, total=1)
    else:
        bar.update(task, description=f"[red]✗ {name:<22}[/red]")
    bar.stop_task(task)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary(result: StoryResult, config: StoryConfig) -> list[Table]:
    """The summary's tables: the stages, the figures, the versions, the policies compared, the
    explained decision."""
    tables = []
    stages = Table(title="stages", title_justify="left", expand=False)
    for column, justify in (("stage", "left"), ("", "left"), ("s", "right"), ("what happened", "left")):
        stages.add_column(column, justify=justify)  # type: ignore[arg-type]
    for s in result.stages:
        mark = "[green]ok[/green]" if s.ok else "[red]FAILED[/red]"
        stages.add_row(s.name, mark, f"{s.seconds:.0f}", s.detail)
    done = {s.name for s in result.stages}
    for name in STAGES if config.verify else STAGES[:-1]:
        if name not in done:
            stages.add_row(name, "[red]not run[/red]", "", "an earlier stage failed")
    tables.append(stages)

    figures = Table(title="the story in figures", title_justify="left", show_header=False)
    figures.add_column("what")
    figures.add_column("value", justify="right")
    c = result.counts
    rows: list[tuple[str, str]] = [
        ("events in the log", f"{result.head:,}"),
        ("history events through ingest", f"{result.history_events:,}"),
        ("refused to dead letters", f"{result.dead_letters:,}"),
        ("skew check: values, mismatches", f"{result.skew_checked:,}, {max(result.skew_mismatches, 0)}"),
        ("payments decided live", f"{c.get('payments', 0):,}"),
        ("approved / declined", f"{c.get('approved', 0):,} / {c.get('declined', 0):,}"),
        ("explored share", f"{result.explored_share:.1%}"),
        ("chargebacks sent", f"{c.get('chargebacks', 0):,}"),
        ("outcomes recorded", f"{result.event_counts.get('outcome.recorded', 0):,}"),
        ("quality alerts", ", ".join(f"{n} {kind}" for kind, n in sorted(result.alerts.items())) or "0"),
    ]
    if result.request is not None:
        drift_day = config.sim.drift_day or 0.0
        rows.append(("retrain requested", f"{(result.noticed_day - drift_day) * 24:.1f} h after the drift"))
    for what, value in rows:
        figures.add_row(what, value)
    tables.append(figures)

    if result.versions:
        versions = Table(title="model versions", title_justify="left")
        for column in ("version", "role", "held-out AUC", "live AUC", "labelled", "decisions"):
            versions.add_column(column, justify="left" if column == "role" else "right")
        for v in result.versions:
            versions.add_row(
                str(v.version), v.role, _number(v.heldout_auc), _number(v.live_auc), f"{v.labelled:,}",
                f"{v.decisions:,}",
            )  # fmt: skip
        tables.append(versions)

    if result.ope:
        ope = Table(
            title="off-policy value on the post-drift decisions (reward per decision, 95% interval)",
            title_justify="left",
        )
        ope.add_column("estimator")
        numbers = sorted(result.ope)
        for n in numbers:
            ope.add_column(f"version {n} ({'old' if n == numbers[0] else 'new'})", justify="right")
        names = {"ips": "IPS", "snips": "self-normalised IPS", "dr": "doubly robust"}
        for key, name in names.items():
            ope.add_row(name, *(_estimate(result.ope[n]["estimates"].get(key)) for n in numbers))
        first = result.ope[numbers[0]]
        ope.add_row("logged (observed)", _estimate(first["logging"]), "")
        ope.caption = f"{first['counts']['used']:,} decisions with a known reward"
        tables.append(ope)

    if result.explained:
        e = result.explained
        label = {None: "no outcome yet", 1: "charged back", 0: "no chargeback"}.get(e["label"], str(e["label"]))
        explained = Table(
            title=f"decision {e['decision_id']} explained: {e['action']}"
            f"{' (explored)' if e['explored'] else ''} at score {e['score']:.3f} by {e['model_version']}, {label}",
            title_justify="left",
        )
        explained.add_column("top inputs")
        explained.add_column("value", justify="right")
        explained.add_column("to the score (log-odds)", justify="right")
        for name, value, contribution in e["top_inputs"]:
            explained.add_row(name, "-" if value is None else f"{value:,.4g}", f"{contribution:+.3f}")
        explained.caption = "every input recomputed from the log: " + (
            "reproduced" if e["features_reproduced"] else "DIFFERS"
        )
        tables.append(explained)
    return tables


def _estimate(e: Mapping[str, Any] | None) -> str:
    if not e or e.get("value") is None:
        return "-"
    return f"{e['value']:.3f} [{_number(e.get('ci_low'))}, {_number(e.get('ci_high'))}]"


def print_summary(result: StoryResult, config: StoryConfig, out: Console) -> None:
    for table in summary(result, config):
        out.print(table)
