"""Model training: labels from the log, time-based splits and evaluation (pure logic)."""

from d2d.training.evaluation import Evaluation, brier, calibration_table, evaluate, log_loss, roc_auc
from d2d.training.labels import DecisionLabel, LabelDefinition, LabeledExample, label_examples
from d2d.training.split import Split, time_split

__all__ = [
    "DecisionLabel",
    "Evaluation",
    "LabelDefinition",
    "LabeledExample",
    "Split",
    "brier",
    "calibration_table",
    "evaluate",
    "label_examples",
    "log_loss",
    "roc_auc",
    "time_split",
]
