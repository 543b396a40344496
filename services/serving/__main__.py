"""python -m services.serving: the serving deployable (Predict, BatchPredict)."""

import asyncio
import logging

from d2d import telemetry
from d2d.config import Settings
from services.serving.server import serve

settings = Settings()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
telemetry.setup_tracing("serving", settings.data_dir)
try:
    asyncio.run(serve(settings))
finally:
    telemetry.shutdown_tracing()
