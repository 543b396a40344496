"""python -m services.serving: the serving deployable (Predict, BatchPredict)."""

from d2d.runtime.process import run_service
from services.serving.server import serve

run_service("serving", serve)
