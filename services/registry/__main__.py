"""python -m services.registry: the registry deployable (models, versions, training, aliases)."""

import asyncio
import logging

from d2d import telemetry
from d2d.config import Settings
from services.registry.server import serve

settings = Settings()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
telemetry.setup_tracing("registry", settings.data_dir)
try:
    asyncio.run(serve(settings))
finally:
    telemetry.shutdown_tracing()
