"""`d2d`: run the platform and talk to it.

d2d up                      start Postgres, NATS and the services; Ctrl-C stops them
d2d demo                    the whole loop on a fresh stack in about 2 minutes: traffic, features,
                            a model, decisions, drift, retraining, canary, off-policy, explain
d2d contracts list|show|register
d2d dlq list|redrive        dead letters
d2d log head                the newest events
d2d features views|frame|verify
d2d models list|show|train|promote|rollback|reproduce
d2d predict MODEL           one decision
d2d outcomes record|rules   outcomes of decisions, outcome rules
d2d metrics MODEL           live metrics per version and arm
d2d replay state|explain|rescore|ope|verify   audit and counterfactuals, from the log
d2d keys create|list|revoke|bootstrap   API keys (admin)
d2d migrate                 apply database migrations
d2d forget SUBJECT          destroy a data subject's personal data key (crypto-shredding)
d2d report                  one HTML page of plots (opens with no network)

Every command but `up`, `migrate` and `forget` talks to the services over gRPC (training frames and skew
checks too: the features service recomputes them from the log; `models reproduce` asks the
registry to retrain, recording nothing). A command
group is one module here with a `register(subparsers)` function, listed once in GROUPS.

Every call carries an API key: D2D_API_KEY, else the admin key `d2d up` wrote in the data
directory (`admin.key`).
"""

from __future__ import annotations

import argparse
import logging
import os

import d2d.cli.report as report  # its own line: the group list below grows by addition
from d2d import auth
from d2d.cli import contracts, dlq, features, forget, keys, log, metrics, migrate, models, outcomes, predict, replay, up
from d2d.cli.common import settings
from d2d.private import PRIVATE_UMASK
from d2d.runtime.stack import StartFailed

GROUPS = (up, contracts, dlq, log, features, models, predict, outcomes, metrics, replay, keys, migrate, forget)
GROUPS += (report,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", help="data directory (default $D2D_DATA_DIR or ./.d2d)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)  # what the CLI and the servers and services it starts write is the owner's only
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    if not os.environ.get("D2D_API_KEY"):  # the clients' key: the environment's, else the data dir's admin key
        if admin_key := auth.read_key_file(settings(args).data_dir / auth.ADMIN_KEY_FILE):
            os.environ["D2D_API_KEY"] = admin_key
    try:
        return args.func(args)
    except StartFailed as exc:  # `d2d up` / `d2d demo`: what failed and the end of its log, no traceback
        raise SystemExit(f"d2d {args.command}: the platform did not start: {exc}") from None
