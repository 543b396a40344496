"""`d2d features views|frame|verify`: the views FeatureService serves, training frames, skew checks.

All three ask the service over gRPC: `frame` streams `ExportTrainingFrame` into a Parquet file (a
`--rows` CSV is turned into explicit rows here), `verify` asks `CheckFeatureSkew`, which compares
the service's online state with its recomputation from the log by the same fold.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from typing import TYPE_CHECKING

from rich.table import Table

from d2d.cli.common import console, endpoints, run_rpc, settings

if TYPE_CHECKING:
    from d2d.client import FeatureClient


def register(sub: argparse._SubParsersAction) -> None:
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


def cmd_features(args: argparse.Namespace) -> int:
    from d2d.client import FeatureClient

    where = endpoints(settings(args))

    async def work() -> int:
        async with FeatureClient(where.addr("features")) as features:
            if args.action == "views":
                table = Table(title=f"feature views served by {where.addr('features')}")
                for col in ("name", "version", "entity", "source", "features"):
                    table.add_column(col, overflow="fold")
                for v in await features.list_views():
                    table.add_row(
                        v.name.removeprefix("featureViews/"), v.version, v.entity, v.source, ", ".join(v.features)
                    )
                console.print(table)
                return 0
            if args.action == "frame":
                return await _frame(features, args)
            return await _verify(features, args)

    return run_rpc(work())


async def _frame(features: FeatureClient, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    rows = _csv_rows(args.rows, {v.entity for v in await features.list_views()}) if args.rows else ()
    written = await features.export_frame(args.out, from_event_type=args.from_events or "", limit=args.limit, rows=rows)
    elapsed = time.perf_counter() - started
    console.print(f"wrote {written.rows:,} rows x {len(written.columns)} columns to {args.out} in {elapsed:.1f}s")
    return 0


def _csv_rows(path: str, entities: set[str]) -> list[tuple[dict[str, str], datetime, int | None]]:
    """(keys, as_of, watermark or None) per CSV row: the entity columns, `as_of` (UTC unless it says
    otherwise) and optionally `watermark`."""
    import pandas as pd

    given = pd.read_csv(path)
    columns = entities & set(given.columns)
    rows = []
    for _, r in given.iterrows():
        as_of = pd.Timestamp(r["as_of"])
        as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of
        watermark = int(r["watermark"]) if "watermark" in given.columns and pd.notna(r["watermark"]) else None
        rows.append(({e: str(r[e]) for e in columns if pd.notna(r[e])}, as_of.to_pydatetime(), watermark))
    return rows


async def _verify(features: FeatureClient, args: argparse.Namespace) -> int:
    as_of = datetime.fromisoformat(args.as_of) if args.as_of else None
    report = await features.check_skew(sample=args.sample, as_of=as_of, seed=args.seed)
    console.print(
        f"checked {report.checked_values:,} values of {report.checked_rows} entity rows as of"
        f" {report.as_of.isoformat()} at watermark {report.watermark:,}: {report.mismatch_count} mismatches"
    )
    for keys, name, online_value, offline_value in report.mismatches[:20]:
        console.print(f"  [red]{name}[/red] {keys}: online {online_value!r}, offline {offline_value!r}")
    return 1 if report.mismatch_count else 0
