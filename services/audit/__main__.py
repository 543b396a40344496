"""python -m services.audit: the audit deployable (replay, explain, rescore, off-policy evaluation, verify)."""

from d2d.runtime.process import run_service
from services.audit.server import serve

run_service("audit", serve)
