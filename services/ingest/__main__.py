"""python -m services.ingest [serve|relay]: the ingest deployable (API and NATS intake, or the
outbox relay; `d2d up` runs both)."""

import argparse
import asyncio
import logging

from d2d import telemetry
from d2d.config import Settings
from services.ingest.server import relay, serve

parser = argparse.ArgumentParser(prog="python -m services.ingest")
parser.add_argument("role", nargs="?", default="serve", choices=["serve", "relay"])
args = parser.parse_args()
settings = Settings()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
telemetry.setup_tracing("ingest" if args.role == "serve" else "ingest-relay", settings.data_dir)
try:
    asyncio.run(serve(settings) if args.role == "serve" else relay(settings))
finally:
    telemetry.shutdown_tracing()
