"""python -m services.feedback: the feedback deployable (outcomes, outcome rules, the decision/outcome join)."""

from d2d.runtime.process import run_service
from services.feedback.server import serve

run_service("feedback", serve)
