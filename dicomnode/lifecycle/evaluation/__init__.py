"""Evaluation of a classifier's probabilities against labelled truth: metrics, subgroups, plots, report.

No torch here: the caller runs the model and hands over one :class:`CaseResult` per image.
"""

from dicomnode.lifecycle.evaluation.core import (
    CaseResult,
    EvaluationResult,
    EvaluationSettings,
    SubgroupResult,
    evaluate,
)
from dicomnode.lifecycle.evaluation.metrics import Interval, LabelMetrics, ReliabilityBin, choose_threshold
from dicomnode.lifecycle.evaluation.report import ReportFiles, write_report

__all__ = [
    "CaseResult",
    "EvaluationResult",
    "EvaluationSettings",
    "Interval",
    "LabelMetrics",
    "ReliabilityBin",
    "ReportFiles",
    "SubgroupResult",
    "choose_threshold",
    "evaluate",
    "write_report",
]
