"""Features: definitions as data, and the fold shared by the online and offline paths."""

from d2d.features.definitions import (
    LIFETIME,
    Aggregate,
    Aggregation,
    FeatureView,
    Filter,
    RequestTransform,
    Window,
    days,
    hours,
    minutes,
    seconds,
    views_by_name,
)
from d2d.features.fold import FoldEvent, StaleQueryError, ViewState, fold_all, posix_seconds

__all__ = [
    "LIFETIME",
    "Aggregate",
    "Aggregation",
    "FeatureView",
    "Filter",
    "FoldEvent",
    "RequestTransform",
    "StaleQueryError",
    "ViewState",
    "Window",
    "days",
    "fold_all",
    "hours",
    "minutes",
    "posix_seconds",
    "seconds",
    "views_by_name",
]
