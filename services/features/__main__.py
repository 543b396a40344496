"""python -m services.features: the features deployable (online state and FeatureService)."""

import asyncio
import logging

from d2d import telemetry
from d2d.config import Settings
from services.features.server import serve

settings = Settings()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
telemetry.setup_tracing("features", settings.data_dir)
try:
    asyncio.run(serve(settings))
finally:
    telemetry.shutdown_tracing()
