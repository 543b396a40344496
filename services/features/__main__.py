"""python -m services.features: the features deployable (online state and FeatureService)."""

from d2d.runtime.process import run_service
from services.features.server import serve

run_service("features", serve)
