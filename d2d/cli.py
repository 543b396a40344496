"""`d2d`: run the platform and talk to it.

d2d up                      start Postgres, NATS and the services; Ctrl-C stops them
d2d demo                    push a simulated day of payments through ingest and show the log
d2d contracts list|show|register
d2d dlq list|redrive        dead letters
d2d log head                the newest events
d2d migrate                 apply database migrations
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from d2d.config import Settings
from d2d.private import PRIVATE_UMASK, private_dir
from d2d.runtime.stack import Endpoints, Stack, running_endpoints

console = Console()


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings()
    if getattr(args, "data_dir", None):
        settings = replace(settings, data_dir=Path(args.data_dir))
    return settings


def _endpoints(settings: Settings) -> Endpoints:
    """Where the platform is: the environment, else the stack `d2d up` runs on the data dir."""
    running = running_endpoints(settings.data_dir)
    if settings.database_url and settings.nats_url:
        return Endpoints(
            settings.database_url, settings.nats_url,
            os.environ.get("D2D_INGEST_ADDR") or (running.ingest if running else settings.ingest_addr),
            os.environ.get("D2D_FEATURES_ADDR") or (running.features if running else settings.features_addr),
            os.environ.get("D2D_REGISTRY_ADDR") or (running.registry if running else settings.registry_addr),
            os.environ.get("D2D_SERVING_ADDR") or (running.serving if running else settings.serving_addr),
            str(settings.data_dir), 0,
        )  # fmt: skip
    if running is None:
        raise SystemExit(f"no platform is running on {settings.data_dir}; start one with `d2d up`")
    return running


# -- up -----------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if running_endpoints(settings.data_dir):
        raise SystemExit(f"a platform is already running on {settings.data_dir}")
    stack = Stack(settings)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with console.status("starting Postgres, NATS and the services..."):
            endpoints = stack.start()
        table = Table(title="Data2Data is up", show_header=False)
        table.add_row("ingest (gRPC)", endpoints.ingest)
        table.add_row("features (gRPC)", endpoints.features)
        table.add_row("registry (gRPC)", endpoints.registry)
        table.add_row("serving (gRPC)", endpoints.serving)
        table.add_row("Postgres", endpoints.database_url)
        table.add_row("NATS JetStream", endpoints.nats_url)
        table.add_row("data directory", endpoints.data_dir)
        table.add_row("service logs", str(Path(endpoints.data_dir) / "logs"))
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


# -- demo ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    stack: Stack | None = None
    try:
        try:
            endpoints = _endpoints(settings)
        except SystemExit:
            stack = Stack(settings)
            with console.status("no platform running: starting one for the demo..."):
                endpoints = stack.start()
        return asyncio.run(_demo(endpoints, args.days, args.seed, args.broken_every))
    finally:
        if stack is not None:
            with console.status("stopping the platform the demo started..."):
                stack.stop()


async def _demo(endpoints: Endpoints, days: float, seed: int, broken_every: int) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from d2d import eventlog
    from d2d.bus import Topology
    from d2d.client import IngestClient, make_event
    from d2d.deadletters import DeadLetters
    from d2d.sim import PaymentsSimulator, SimConfig, write_truth_csv

    sim = PaymentsSimulator(SimConfig(seed=seed, days=days))
    events = list(sim.events())
    truth_path = Path(endpoints.data_dir) / "sim" / f"truth-seed{seed}.csv"
    private_dir(truth_path.parent)
    write_truth_csv(sim.truth(), truth_path)
    console.print(f"simulated {len(events):,} events over {days:g} day(s), seed {seed}; truth in {truth_path}")

    async with IngestClient(endpoints.ingest) as ingest:
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

    pool = await eventlog.create_pool(endpoints.database_url, max_size=2)
    try:
        log = eventlog.EventLog(pool)
        head = await log.head()
        relay_name = f"relay:{Topology().events_stream}"
        deadline = time.monotonic() + 30
        while await log.position(relay_name) < head and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        published = await log.position(relay_name)
        counts = await log.count_by_type()
        newest = await log.read(max(0, head - 5), 5)
        pending = await DeadLetters(pool).count()
    finally:
        await pool.close()

    console.print(
        f"ingested in {elapsed:.1f}s ({len(protos) / elapsed:,.0f} events/s): {totals['appended']:,} appended, "
        f"{totals['duplicates']:,} already in the log, {totals['refused']:,} refused "
        f"({broken} deliberately broken by the demo)"
    )
    table = Table(title="events in the log by type")
    table.add_column("type")
    table.add_column("count", justify="right")
    for type_, count in counts:
        table.add_row(type_, f"{count:,}")
    console.print(table)
    table = Table(title=f"dead letters ({pending} pending; `d2d dlq list` shows all)")
    for col in ("name", "type", "event id", "reason"):
        table.add_column(col)
    for d in letters:
        table.add_row(d.name, d.event_type, d.event_id[:8] + "...", d.error.message)
    console.print(table)
    _print_events(newest, f"head of the log (seq {head:,}; published to JetStream up to {published:,})")
    return await _demo_features(endpoints, head, events)


async def _demo_features(endpoints: Endpoints, head: int, events: list) -> int:  # noqa: ANN001
    """Online features of one customer, and the skew check on a sample."""
    import random

    from d2d import eventlog
    from d2d.client import FeatureClient
    from d2d.features.skew import verify
    from d2d.sim.views import VIEWS

    payments = [e for e in events if e.type == "payment.authorized"]
    as_of = max(e.occurred_at for e in events)
    pool = await eventlog.create_pool(endpoints.database_url, max_size=2)
    try:
        async with FeatureClient(endpoints.features) as online:
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
                table.add_row(name, _shown(value))
            console.print(table)
            sample = random.Random(1).sample(payments, min(100, len(payments)))
            rows = [
                {
                    "customer": e.payload["customer_id"],
                    "merchant": e.payload["merchant_id"],
                    "card": e.payload["card_id"],
                }
                for e in sample
            ]
            report = await verify(eventlog.EventLog(pool), online, VIEWS, rows, as_of)
    finally:
        await pool.close()
    console.print(
        f"skew check: {report.checked_values:,} online values of {report.checked_rows} entity rows recomputed offline"
        f" at watermark {report.watermark:,}: {len(report.mismatches)} mismatches"
    )
    return 1 if report.mismatches else 0


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.2f}"
    return "-" if value is None else str(value)


def _print_events(events: list, title: str) -> None:  # noqa: ANN001
    table = Table(title=title)
    for col in ("seq", "type", "entity", "occurred at", "payload"):
        table.add_column(col, overflow="fold")
    for e in events:
        payload = json.dumps(e.payload, separators=(",", ":"))
        table.add_row(str(e.seq), e.type, f"{e.entity_type}/{e.entity_id}", e.occurred_at.isoformat(),
                      payload[:80] + ("..." if len(payload) > 80 else ""))  # fmt: skip
    console.print(table)


# -- contracts, dead letters, log ----------------------------------------------------------------


async def _with_ingest(settings: Settings, work):  # noqa: ANN001, ANN202
    from d2d.client import IngestClient

    async with IngestClient(_endpoints(settings).ingest) as ingest:
        return await work(ingest)


def cmd_contracts(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def work(ingest) -> int:  # noqa: ANN001
        if args.action == "list":
            table = Table(title="contracts")
            for col in ("name", "owner", "compatibility", "pii fields", "registered at seq"):
                table.add_column(col)
            for c in await ingest.list_contract_versions():
                table.add_row(
                    c.name, c.owner, _mode_name(c.compatibility), ", ".join(c.pii_fields), str(c.registered_seq)
                )
            console.print(table)
        elif args.action == "show":
            c = await ingest.get_contract_version(args.type, args.version)
            console.print(f"[bold]{c.name}[/bold] owner {c.owner}, {_mode_name(c.compatibility)}")
            console.print_json(c.json_schema)
        else:
            spec = json.loads(Path(args.file).read_text())  # noqa: ASYNC240 - a small local file
            c = await ingest.create_contract_version(
                spec["event_type"], owner=spec["owner"], json_schema=spec["schema"],
                description=spec.get("description", ""), pii_fields=spec.get("pii_fields", []),
                compatibility=spec.get("compatibility", "BACKWARD"),
                allowed_lateness_seconds=int(spec.get("allowed_lateness_seconds", 0)),
            )  # fmt: skip
            console.print(f"registered {c.name}")
        return 0

    return _run_rpc(_with_ingest(settings, work))


def _mode_name(mode: int) -> str:
    from d2d.v1 import ingest_pb2

    return ingest_pb2.CompatibilityMode.Name(mode)


def cmd_dlq(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def work(ingest) -> int:  # noqa: ANN001
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

    return _run_rpc(_with_ingest(settings, work))


def cmd_log(args: argparse.Namespace) -> int:
    from d2d import eventlog

    endpoints = _endpoints(_settings(args))

    async def work() -> int:
        pool = await eventlog.create_pool(endpoints.database_url, max_size=2)
        try:
            log = eventlog.EventLog(pool)
            head = await log.head()
            _print_events(
                await log.read(max(0, head - args.n), args.n), f"the newest {args.n} events (head seq {head:,})"
            )
        finally:
            await pool.close()
        return 0

    return asyncio.run(work())


def _views(settings: Settings):  # noqa: ANN202
    import importlib

    return tuple(importlib.import_module(settings.feature_views_module).VIEWS)


def cmd_features(args: argparse.Namespace) -> int:
    from d2d import eventlog

    settings = _settings(args)
    endpoints = _endpoints(settings)
    views = _views(settings)

    async def work() -> int:
        pool = await eventlog.create_pool(endpoints.database_url, max_size=2)
        try:
            log = eventlog.EventLog(pool)
            if args.action == "views":
                table = Table(title=f"feature views ({settings.feature_views_module})")
                for col in ("name", "version", "entity", "source", "features"):
                    table.add_column(col, overflow="fold")
                for v in views:
                    table.add_row(v.name, v.version, v.entity, v.source, ", ".join(v.feature_names()))
                console.print(table)
                return 0
            if args.action == "frame":
                return await _frame(log, views, args)
            return await _verify(log, views, endpoints, args)
        finally:
            await pool.close()

    return _run_rpc(work())


async def _frame(log, views, args: argparse.Namespace) -> int:  # noqa: ANN001
    import pandas as pd

    from d2d.features.offline import FrameRow, rows_from_events, training_frame

    started = time.perf_counter()
    if args.rows:
        given = pd.read_csv(args.rows)
        entities = {v.entity for v in views} & set(given.columns)
        rows = [
            FrameRow(
                {e: str(r[e]) for e in entities if pd.notna(r[e])},
                pd.Timestamp(r["as_of"]).tz_localize("UTC") if pd.Timestamp(r["as_of"]).tzinfo is None
                else pd.Timestamp(r["as_of"]).to_pydatetime(),
                int(r["watermark"]) if "watermark" in given.columns and pd.notna(r["watermark"]) else None,
            )
            for _, r in given.iterrows()
        ]  # fmt: skip
    else:
        rows = await rows_from_events(log, args.from_events, views, limit=args.limit)
    frame = await training_frame(log, views, rows)
    frame.to_parquet(args.out, index=False)
    elapsed = time.perf_counter() - started
    console.print(f"wrote {len(frame):,} rows x {frame.shape[1]} columns to {args.out} in {elapsed:.1f}s")
    return 0


async def _verify(log, views, endpoints: Endpoints, args: argparse.Namespace) -> int:  # noqa: ANN001
    import random
    from datetime import datetime

    from d2d.client import FeatureClient
    from d2d.features.offline import rows_from_events
    from d2d.features.skew import verify

    candidates = await rows_from_events(log, views[0].source, views)
    if not candidates:
        console.print("the log has no events for these views yet")
        return 1
    rows = [r.keys for r in random.Random(args.seed).sample(candidates, min(args.sample, len(candidates)))]
    as_of = datetime.fromisoformat(args.as_of) if args.as_of else max(r.as_of for r in candidates)
    async with FeatureClient(endpoints.features) as online:
        report = await verify(log, online, views, rows, as_of)
    console.print(
        f"checked {report.checked_values:,} values of {report.checked_rows} entity rows as of {as_of.isoformat()}"
        f" at watermark {report.watermark:,}: {len(report.mismatches)} mismatches"
    )
    for keys, name, online_value, offline_value in report.mismatches[:20]:
        console.print(f"  [red]{name}[/red] {keys}: online {online_value!r}, offline {offline_value!r}")
    return 1 if report.mismatches else 0


def cmd_models(args: argparse.Namespace) -> int:
    from d2d.client import RegistryClient

    settings = _settings(args)
    endpoints = _endpoints(settings)

    async def work() -> int:
        async with RegistryClient(endpoints.registry) as registry:
            handler = {
                "list": _models_list, "show": _models_show, "train": _models_train, "promote": _models_promote,
                "rollback": _models_rollback, "reproduce": _models_reproduce,
            }[args.action]  # fmt: skip
            return await handler(registry, args, settings, endpoints)

    return _run_rpc(work())


async def _models_list(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    table = Table(title="models")
    for col in ("model", "versions", "aliases", "latest AUC"):
        table.add_column(col)
    for model in await registry.list_models():
        name = model.name.removeprefix("models/")
        versions = await registry.list_versions(name)
        latest = json.loads(versions[-1].evaluation_json).get("auc") if versions else None
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(model.aliases.items()))
        table.add_row(name, str(len(versions)), aliases, f"{latest:.4f}" if latest is not None else "")
    console.print(table)
    return 0


async def _models_show(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    model = await registry.get_model(args.model)
    versions = await registry.list_versions(args.model)
    by_version = {}
    for alias, version in model.aliases.items():
        by_version.setdefault(version, []).append(alias)
    table = Table(title=f"{model.name}: {model.description}")
    for col in ("version", "aliases", "sha256", "AUC", "log loss", "Brier", "test rows", "log range", "created"):
        table.add_column(col)
    for v in versions:
        number = v.name.rsplit("/", 1)[1]
        ev, lineage = json.loads(v.evaluation_json), json.loads(v.lineage_json)
        table.add_row(
            number, ", ".join(by_version.get(number, [])), v.sha256[:12],
            f"{ev.get('auc') or 0:.4f}", f"{ev.get('log_loss', 0):.4f}", f"{ev.get('brier', 0):.4f}",
            str(lineage.get("rows", {}).get("test", "")), "..".join(str(x) for x in lineage.get("log_range", [])),
            v.create_time.ToDatetime().isoformat(timespec="seconds"),
        )  # fmt: skip
    console.print(table)
    history = Table(title="alias history (from the log)")
    for col in ("seq", "alias", "from", "to", "reason"):
        history.add_column(col)
    for c in model.alias_history:
        history.add_row(str(c.seq), c.alias, c.previous_version or "-", c.version or "(removed)", c.reason)
    console.print(history)
    if args.version:
        v = await registry.get_version(args.model, args.version)
        ev = json.loads(v.evaluation_json)
        calibration = Table(title=f"{v.name}: calibration on the held-out test split")
        for col in ("bin", "rows", "mean predicted", "observed rate"):
            calibration.add_column(col, justify="right")
        for b in ev.get("calibration", []):
            if b["count"]:
                calibration.add_row(
                    f"{b['bin_lower']:.1f}-{b['bin_upper']:.1f}", str(b["count"]),
                    f"{b['mean_predicted']:.4f}", f"{b['observed_rate']:.4f}",
                )  # fmt: skip
        console.print(calibration)
        slices = Table(title="per slice")
        for col in ("slice", "value", "rows", "positives", "AUC", "log loss"):
            slices.add_column(col)
        for name, values in ev.get("slices", {}).items():
            for value, m in values.items():
                auc = f"{m['auc']:.4f}" if m.get("auc") is not None else "-"
                slices.add_row(name, value, str(m["rows"]), str(m["positives"]), auc, f"{m['log_loss']:.4f}")
        console.print(slices)
        if (ev.get("truth") or {}).get("auc") is not None:
            console.print(f"truth: AUC {ev['truth']['auc']:.4f} on the same {ev['truth']['rows']} held-out rows")
        console.print("spec:")
        console.print_json(v.spec_json)
    return 0


def _default_spec(settings: Settings, rounds: int | None, truth: str | None = None) -> str:
    import importlib

    from d2d.training.spec import TrainingSpec

    module = importlib.import_module(settings.feature_views_module)
    spec = TrainingSpec(
        views=tuple((v.name, v.version) for v in module.VIEWS), transforms=tuple(getattr(module, "TRANSFORMS", ()))
    )
    d = spec.to_dict()
    if rounds:
        d["num_boost_round"] = rounds
    if truth:
        d["truth_path"] = str(Path(truth).resolve())
    return json.dumps(d)


async def _models_train(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    import grpc
    from rich.progress import BarColumn, Progress, TextColumn

    spec = Path(args.spec).read_text() if args.spec else _default_spec(settings, args.rounds, args.truth)  # noqa: ASYNC240
    try:
        await registry.get_model(args.model)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        await registry.create_model(args.model, args.description)
    with Progress(TextColumn("{task.description}"), BarColumn(), console=console) as bar:
        task = bar.add_task("training", total=1.0)

        def show(update) -> None:  # noqa: ANN001
            bar.update(task, completed=update.fraction, description=f"{update.stage}: {update.message}"[:70])

        version = await registry.train(args.model, spec, on_progress=show)
    ev = json.loads(version.evaluation_json)
    console.print(
        f"registered {version.name}: sha256 {version.sha256[:16]}..., test AUC {ev['auc']:.4f}, "
        f"log loss {ev['log_loss']:.4f} (base rate {ev['base_rate_log_loss']:.4f}), Brier {ev['brier']:.4f}"
    )
    if (ev.get("truth") or {}).get("auc") is not None:
        console.print(
            f"the true probabilities score AUC {ev['truth']['auc']:.4f} on the same {ev['truth']['rows']} rows"
        )
    return 0


async def _models_promote(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    margin = None if args.no_gate else args.margin
    model = await registry.set_alias(
        args.model, args.alias, args.version, require_improvement=margin, reason=args.reason
    )
    console.print(f"{args.alias} of {model.name} is version {model.aliases[args.alias]}")
    return 0


async def _models_rollback(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    model = await registry.get_model(args.model)
    changes = [c for c in model.alias_history if c.alias == args.alias]
    if not changes or not changes[-1].previous_version:
        console.print(f"[red]{args.alias} of {model.name} has no earlier version to roll back to[/red]")
        return 1
    target = changes[-1].previous_version
    model = await registry.set_alias(args.model, args.alias, target, reason=f"rollback from {changes[-1].version}")
    console.print(f"{args.alias} of {model.name} rolled back to version {target}")
    return 0


async def _models_reproduce(registry, args, settings, endpoints) -> int:  # noqa: ANN001
    from d2d import eventlog
    from d2d.features.definitions import FeatureView
    from d2d.training.pipeline import train
    from d2d.training.spec import TrainingSpec

    version = await registry.get_version(args.model, args.version)
    spec = TrainingSpec.from_json(version.spec_json)
    pool = await eventlog.create_pool(endpoints.database_url, max_size=2)
    try:
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT name, version, definition FROM feature_views")
        known = {(r["name"], r["version"]): FeatureView.from_dict(r["definition"]) for r in rows}
        views = [known[v] for v in spec.views]
        started = time.perf_counter()
        again = await train(eventlog.EventLog(pool), spec, views)
    finally:
        await pool.close()
    same = again.sha256 == version.sha256
    verdict = "[green]identical[/green]" if same else "[red]DIFFERENT[/red]"
    console.print(
        f"retrained {version.name} from its stored spec in {time.perf_counter() - started:.1f}s: "
        f"sha256 {again.sha256[:16]}... vs stored {version.sha256[:16]}...: {verdict}"
    )
    return 0 if same else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from d2d.client import ServingClient

    endpoints = _endpoints(_settings(args))
    entities = dict(pair.split("=", 1) for pair in args.entity)
    context = json.loads(args.context) if args.context else {}

    async def work() -> int:
        async with ServingClient(endpoints.serving) as serving:
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

    return _run_rpc(work())


def cmd_migrate(args: argparse.Namespace) -> int:
    from d2d import eventlog

    applied = asyncio.run(eventlog.migrate(_endpoints(_settings(args)).database_url))
    console.print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")
    return 0


def _run_rpc(coro) -> int:  # noqa: ANN001
    import grpc

    try:
        return asyncio.run(coro)
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
        return 1


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", help="data directory (default $D2D_DATA_DIR or ./.d2d)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("up", help="start everything in the foreground").set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="push a simulated day of payments through the platform")
    demo.add_argument("--days", type=float, default=1.0)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--broken-every", type=int, default=2500, help="corrupt every Nth event (0: none)")
    demo.set_defaults(func=cmd_demo)

    contracts = sub.add_parser("contracts", help="data contracts")
    csub = contracts.add_subparsers(dest="action", required=True)
    csub.add_parser("list")
    show = csub.add_parser("show")
    show.add_argument("type")
    show.add_argument("--version", default="latest")
    register = csub.add_parser("register", help="register a version from a JSON file")
    register.add_argument("file")
    contracts.set_defaults(func=cmd_contracts)

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

    log = sub.add_parser("log", help="the event log")
    lsub = log.add_subparsers(dest="action", required=True)
    head = lsub.add_parser("head", help="the newest events")
    head.add_argument("-n", type=int, default=10)
    log.set_defaults(func=cmd_log)

    features = sub.add_parser("features", help="feature views, training frames, skew checks")
    fsub = features.add_subparsers(dest="action", required=True)
    fsub.add_parser("views", help="the views served")
    frame = fsub.add_parser("frame", help="write a point-in-time training frame as Parquet")
    frame.add_argument("--out", required=True, help="Parquet file to write")
    source = frame.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-events", metavar="TYPE", help="one row per event of TYPE, state just before it")
    source.add_argument("--rows", metavar="CSV", help="CSV with entity columns, as_of and optionally watermark")
    frame.add_argument("--limit", type=int)
    verify = fsub.add_parser("verify", help="compare online answers with the offline recomputation")
    verify.add_argument("--sample", type=int, default=200)
    verify.add_argument("--as-of", help="event time (ISO 8601); default: the newest source event")
    verify.add_argument("--seed", type=int, default=1)
    features.set_defaults(func=cmd_features)

    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="action", required=True)
    msub.add_parser("list")
    mshow = msub.add_parser("show", help="versions, aliases and their history; with VERSION its evaluation")
    mshow.add_argument("model")
    mshow.add_argument("version", nargs="?")
    mtrain = msub.add_parser("train", help="train a new version from the log (creates the model if needed)")
    mtrain.add_argument("model")
    mtrain.add_argument("--spec", help="training spec JSON file (default: the served views, default parameters)")
    mtrain.add_argument("--rounds", type=int, help="boosting rounds for the default spec")
    mtrain.add_argument("--description", default="")
    mtrain.add_argument("--truth", help="CSV of true probabilities (the simulator's), to evaluate against")
    mpromote = msub.add_parser("promote", help="point an alias at a version (production: gated by default)")
    mpromote.add_argument("model")
    mpromote.add_argument("version")
    mpromote.add_argument("--alias", default="production", choices=["production", "canary", "shadow"])
    mpromote.add_argument("--margin", type=float, default=0.0, help="AUC the candidate must gain over the target")
    mpromote.add_argument("--no-gate", action="store_true")
    mpromote.add_argument("--reason", default="")
    mroll = msub.add_parser("rollback", help="point an alias back at the version it had before")
    mroll.add_argument("model")
    mroll.add_argument("--alias", default="production")
    mrepro = msub.add_parser("reproduce", help="retrain a version from its stored spec and compare sha256")
    mrepro.add_argument("model")
    mrepro.add_argument("version")
    models.set_defaults(func=cmd_models)

    predict = sub.add_parser("predict", help="ask serving for one decision")
    predict.add_argument("model")
    predict.add_argument("--entity", action="append", default=[], help="TYPE=ID, e.g. customer=cus_000001 (repeat)")
    predict.add_argument("--context", help='request fields as JSON, e.g. \'{"amount": 120.5, "channel": "ecom"}\'')
    predict.add_argument("--unit", help="routing unit id (default: the first entity id)")
    predict.add_argument("--request-id")
    predict.add_argument("--timeout", type=float, default=10.0)
    predict.set_defaults(func=cmd_predict)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)  # what the CLI and the servers and services it starts write is the owner's only
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
