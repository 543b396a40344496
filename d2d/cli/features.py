"""`d2d features views|frame|verify`: the views FeatureService serves, training frames, skew checks.

`views` asks the service. `frame` and `verify` take the served views' definitions from the service
too, then recompute them offline: they read the log through the library, because recomputing from
the log independently of the service is their point.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from rich.table import Table

from d2d.cli.common import console, endpoints, run_rpc, settings

if TYPE_CHECKING:
    from d2d.features.definitions import FeatureView


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
    from d2d import eventlog
    from d2d.client import FeatureClient

    where = endpoints(settings(args))

    async def work() -> int:
        async with FeatureClient(where.addr("features")) as online:
            if args.action == "views":
                table = Table(title=f"feature views served by {where.addr('features')}")
                for col in ("name", "version", "entity", "source", "features"):
                    table.add_column(col, overflow="fold")
                for v in await online.list_views():
                    table.add_row(
                        v.name.removeprefix("featureViews/"), v.version, v.entity, v.source, ", ".join(v.features)
                    )
                console.print(table)
                return 0
            views = await online.view_definitions()
            pool = await eventlog.create_pool(where.database_url, max_size=2)
            try:
                log = eventlog.EventLog(pool)
                if args.action == "frame":
                    return await _frame(log, views, args)
                return await _verify(log, online, views, args)
            finally:
                await pool.close()

    return run_rpc(work())


async def _frame(log, views: Sequence[FeatureView], args: argparse.Namespace) -> int:  # noqa: ANN001
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


async def _verify(log, online, views: Sequence[FeatureView], args: argparse.Namespace) -> int:  # noqa: ANN001
    from d2d.features.offline import rows_from_events
    from d2d.features.skew import verify

    candidates = await rows_from_events(log, views[0].source, views)
    if not candidates:
        console.print("the log has no events for these views yet")
        return 1
    rows = [r.keys for r in random.Random(args.seed).sample(candidates, min(args.sample, len(candidates)))]
    as_of = datetime.fromisoformat(args.as_of) if args.as_of else max(r.as_of for r in candidates)
    report = await verify(log, online, views, rows, as_of)
    console.print(
        f"checked {report.checked_values:,} values of {report.checked_rows} entity rows as of {as_of.isoformat()}"
        f" at watermark {report.watermark:,}: {len(report.mismatches)} mismatches"
    )
    for keys, name, online_value, offline_value in report.mismatches[:20]:
        console.print(f"  [red]{name}[/red] {keys}: online {online_value!r}, offline {offline_value!r}")
    return 1 if report.mismatches else 0
