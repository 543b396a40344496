"""`d2d up` starts the platform in the foreground; `d2d demo` drives it with a simulated day."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

from rich.table import Table

from d2d.cli.common import console, endpoints, print_events, settings, shown
from d2d.private import private_dir
from d2d.runtime.stack import Endpoints, Stack, running_endpoints


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("up", help="start everything in the foreground").set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="push a simulated day of payments through the platform")
    demo.add_argument("--days", type=float, default=1.0)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--broken-every", type=int, default=2500, help="corrupt every Nth event (0: none)")
    demo.set_defaults(func=cmd_demo)


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
        console.print("Ctrl-C stops everything; `d2d demo` in another shell drives it.")
        while not stopping:
            for line in stack.watch_once():  # a death (how, after how long, the delay) or a restart
                console.log(f"[yellow]{line}[/yellow]")
            time.sleep(0.2)
    finally:
        console.print("stopping...")
        stack.stop()
        console.print("stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    found = settings(args)
    stack: Stack | None = None
    try:
        try:
            where = endpoints(found)
        except SystemExit:
            stack = Stack(found)
            with console.status("no platform running: starting one for the demo..."):
                where = stack.start()
            if not os.environ.get("D2D_API_KEY"):
                os.environ["D2D_API_KEY"] = stack.admin_key  # the demo's clients use the key it made
        return asyncio.run(_demo(where, args.days, args.seed, args.broken_every))
    finally:
        if stack is not None:
            with console.status("stopping the platform the demo started..."):
                stack.stop()


async def _demo(where: Endpoints, days: float, seed: int, broken_every: int) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from d2d.client import IngestClient, make_event
    from d2d.sim import PaymentsSimulator, SimConfig, write_truth_csv

    sim = PaymentsSimulator(SimConfig(seed=seed, days=days))
    events = list(sim.events())
    truth_path = Path(where.data_dir) / "sim" / f"truth-seed{seed}.csv"
    private_dir(truth_path.parent)
    write_truth_csv(sim.truth(), truth_path)
    console.print(f"simulated {len(events):,} events over {days:g} day(s), seed {seed}; truth in {truth_path}")

    async with IngestClient(where.addr("ingest")) as ingest:
        await ingest.wait_ready()
        for spec in sim.contracts():
            await ingest.create_contract_version(
                spec.event_type, owner=spec.owner, json_schema=spec.schema, description=spec.description,
                pii_fields=spec.pii_fields, compatibility=spec.compatibility,
                allowed_lateness_seconds=spec.allowed_lateness_seconds,
            )  # fmt: skip
        broken = 0
        protos = []
        for i, e in enumerate(events, start=1):
            payload = e.payload_json()
            if broken_every and i % broken_every == 0 and e.type == "payment.authorized":
                payload = payload.replace(b'"currency":"EUR"', b'"currency":"XXX"')  # a producer bug
                broken += 1
            protos.append(make_event(e.type, e.entity_type, e.entity_id, payload, occurred_at=e.occurred_at,
                                     event_id=e.event_id, schema_version=e.schema_version,
                                     metadata={"producer": "d2d-sim"}))  # fmt: skip
        batches = [protos[i : i + 500] for i in range(0, len(protos), 500)]
        totals = {"appended": 0, "duplicates": 0, "refused": 0}
        started = time.perf_counter()
        with Progress(
            TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        ) as bar:
            task = bar.add_task("events", total=len(protos))
            for batch in batches:
                response = await ingest.append(batch)
                for r in response.results:
                    if r.WhichOneof("outcome") == "error":
                        totals["refused"] += 1
                    elif r.duplicate:
                        totals["duplicates"] += 1
                    else:
                        totals["appended"] += 1
                bar.advance(task, len(batch))
        elapsed = time.perf_counter() - started
        letters = await ingest.list_dead_letters(limit=5)
        head = (await ingest.get_event_log()).head_seq
        deadline = time.monotonic() + 30
        while (await ingest.get_event_log()).published_seq < head and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        log = await ingest.get_event_log(counts=True)
        newest, _ = await ingest.list_events(limit=5)

    console.print(
        f"ingested in {elapsed:.1f}s ({len(protos) / elapsed:,.0f} events/s): {totals['appended']:,} appended, "
        f"{totals['duplicates']:,} already in the log, {totals['refused']:,} refused "
        f"({broken} deliberately broken by the demo)"
    )
    table = Table(title="events in the log by type")
    table.add_column("type")
    table.add_column("count", justify="right")
    for type_, count in sorted(log.event_counts.items()):
        table.add_row(type_, f"{count:,}")
    console.print(table)
    table = Table(title=f"dead letters ({log.pending_dead_letters} pending; `d2d dlq list` shows all)")
    for col in ("name", "type", "event id", "reason"):
        table.add_column(col)
    for d in letters:
        table.add_row(d.name, d.event_type, d.event_id[:8] + "...", d.error.message)
    console.print(table)
    title = f"head of the log (seq {head:,}; published to JetStream up to {log.published_seq:,})"
    print_events([e for e in reversed(newest) if e.seq <= head], title)
    return await _demo_features(where, head, events)


async def _demo_features(where: Endpoints, head: int, events: list) -> int:  # noqa: ANN001
    """Online features of one customer, and the service's skew check on a sample (its online state
    against its recomputation from the log)."""
    import random

    from d2d.client import FeatureClient

    payments = [e for e in events if e.type == "payment.authorized"]
    as_of = max(e.occurred_at for e in events)
    async with FeatureClient(where.addr("features")) as online:
        deadline = time.monotonic() + 60
        while True:
            answer = await online.get_online(
                ["customer_payments.*"], [{"customer": payments[-1].payload["customer_id"]}], as_of=as_of
            )
            if answer.watermark >= head or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        customer_id = payments[-1].payload["customer_id"]
        when = f"{as_of:%Y-%m-%d %H:%M}"
        table = Table(title=f"online features of {customer_id} as of {when} (watermark {answer.watermark:,})")
        table.add_column("feature")
        table.add_column("value", justify="right")
        for name, value in answer.rows[0].items():
            table.add_row(name, shown(value))
        console.print(table)
        sample = random.Random(1).sample(payments, min(100, len(payments)))
        rows = [
            {"customer": e.payload["customer_id"], "merchant": e.payload["merchant_id"], "card": e.payload["card_id"]}
            for e in sample
        ]
        report = await online.check_skew(rows=rows, as_of=as_of)
    console.print(
        f"skew check: {report.checked_values:,} online values of {report.checked_rows} entity rows recomputed offline"
        f" at watermark {report.watermark:,}: {report.mismatch_count} mismatches"
    )
    return 1 if report.mismatch_count else 0
