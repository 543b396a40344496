"""What every service process does the same way."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from d2d import telemetry
from d2d.config import Settings
from d2d.private import PRIVATE_UMASK


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: services finish what they hold, then exit 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_service(name: str, main: Callable[[Settings], Awaitable[None]]) -> None:
    """What a service's `__main__` does: settings from the environment, logging, tracing, run."""
    os.umask(PRIVATE_UMASK)  # its traces (and anything else it writes) are the owner's only
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Each service checks the schema at start (eventlog.migrate): Alembic's INFO lines about its
    # plugins would open every log, and every start failure's tail, with the same nine lines.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    telemetry.setup_tracing(name, settings.data_dir)
    try:
        asyncio.run(main(settings))
    finally:
        telemetry.shutdown_tracing()
