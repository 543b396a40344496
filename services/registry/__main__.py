"""python -m services.registry: the registry deployable (models, versions, training, aliases)."""

from d2d.runtime.process import run_service
from services.registry.server import serve

run_service("registry", serve)
