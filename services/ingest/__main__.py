"""python -m services.ingest [serve|relay]: the ingest deployable (API and NATS intake, or the
outbox relay; `d2d up` runs both)."""

import argparse

from d2d.runtime.process import run_service
from services.ingest.server import relay, serve

parser = argparse.ArgumentParser(prog="python -m services.ingest")
parser.add_argument("role", nargs="?", default="serve", choices=["serve", "relay"])
args = parser.parse_args()
run_service("ingest" if args.role == "serve" else "ingest-relay", serve if args.role == "serve" else relay)
