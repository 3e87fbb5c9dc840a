"""Evaluate per-case probabilities against truths: per label, overall and per subgroup.

Evaluation consumes probabilities only (no torch); whoever runs the model builds one
:class:`CaseResult` per image and calls :func:`evaluate`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.lifecycle.datasets import Case
from dicomnode.lifecycle.evaluation.metrics import LabelMetrics, label_metrics
from dicomnode.lifecycle.evaluation.report import format_estimate, format_value, write_report
from dicomnode.lifecycle.evaluation.subgroups import (
    DEFAULT_AGE_EDGES,
    SubgroupAttributes,
    SubgroupSpec,
    age_in_years,
    default_subgroups,
)

logger = logging.getLogger(__name__)

# below these counts the report says plainly that the numbers are uncertain
SMALL_TEST_SET = 100
SMALL_CLASS = 30
SMALL_SUBGROUP = 30


@dataclass(frozen=True)
class CaseResult:
    """One image's probabilities, truths and subgroup attributes. No patient identifiers.

    ``patient_age`` is years (a number) or a DICOM Age String such as ``'018M'``. A truth of None means
    "not annotated": the case is left out of that label's metrics.
    """

    probabilities: Mapping[str, float]
    truths: Mapping[str, int | None]
    sop_instance_uid: str = ""
    path: str = ""
    patient_sex: str | None = None
    patient_age: str | float | None = None
    view_position: str | None = None
    manufacturer: str | None = None

    def __post_init__(self) -> None:
        if not self.sop_instance_uid and not self.path:
            raise ValueError("a CaseResult needs a sop_instance_uid or a path")

    @classmethod
    def from_case(cls, case: Case, probabilities: Mapping[str, float]) -> CaseResult:
        """Pair a dataset case with the model's probabilities for it."""
        return cls(
            probabilities=dict(probabilities),
            truths=dict(case.labels),
            sop_instance_uid=case.sop_instance_uid,
            path=str(case.path),
            patient_sex=case.patient_sex,
            patient_age=case.patient_age_years,
            view_position=case.view_position,
            manufacturer=case.manufacturer,
        )

    @property
    def attributes(self) -> SubgroupAttributes:
        """The values subgroups are formed from."""
        return SubgroupAttributes(
            patient_sex=self.patient_sex,
            patient_age_years=age_in_years(self.patient_age),
            view_position=self.view_position,
            manufacturer=self.manufacturer,
        )


@dataclass(frozen=True)
class EvaluationSettings:
    """How the numbers were computed (written into every report)."""

    n_bootstrap: int = 1000
    seed: int = 0
    n_bins: int = 10
    confidence: float = 0.95
    age_edges: tuple[float, ...] = DEFAULT_AGE_EDGES


@dataclass(frozen=True)
class SubgroupResult:
    """The metrics of every label on the cases of one group (e.g. sex = F)."""

    attribute: str
    group: str
    n_cases: int
    metrics: dict[str, LabelMetrics]


@dataclass(frozen=True)
class EvaluationResult:
    """Everything :func:`evaluate` computed; :meth:`to_dict` is JSON-able."""

    labels: tuple[str, ...]
    thresholds: dict[str, float]
    n_cases: int
    overall: dict[str, LabelMetrics]
    subgroups: dict[str, list[SubgroupResult]]  # attribute -> groups in display order
    settings: EvaluationSettings
    caveats: list[str]
    cases: tuple[CaseResult, ...] = field(default=(), repr=False)

    def to_dict(self, include_roc: bool = True) -> dict[str, Any]:
        """JSON-able summary (per-case values go to the CSV, not here)."""

        def metrics(m: LabelMetrics) -> dict[str, Any]:
            data = m.to_dict()
            if not include_roc:
                data.pop("roc_fpr")
                data.pop("roc_tpr")
            return data

        return {
            "labels": list(self.labels),
            "thresholds": dict(self.thresholds),
            "n_cases": self.n_cases,
            "settings": {**asdict(self.settings), "age_edges": list(self.settings.age_edges)},
            "overall": {label: metrics(m) for label, m in self.overall.items()},
            "subgroups": {
                attribute: [
                    {
                        "group": g.group,
                        "n_cases": g.n_cases,
                        "metrics": {label: metrics(m) for label, m in g.metrics.items()},
                    }
                    for g in groups
                ]
                for attribute, groups in self.subgroups.items()
            },
            "caveats": list(self.caveats),
        }


def _label_arrays(cases: Sequence[CaseResult], label: str) -> tuple[np.ndarray, np.ndarray]:
    probs: list[float] = []
    truths: list[int] = []
    for index, case in enumerate(cases):
        truth = case.truths.get(label)
        if truth is None:
            continue
        if label not in case.probabilities:
            raise ValueError(f"case {index} has a truth but no probability for label {label!r}")
        probs.append(float(case.probabilities[label]))
        truths.append(int(truth))
    return np.asarray(probs, dtype=float), np.asarray(truths, dtype=int)


def _metrics_for(
    cases: Sequence[CaseResult],
    labels: Sequence[str],
    thresholds: Mapping[str, float],
    settings: EvaluationSettings,
) -> dict[str, LabelMetrics]:
    out = {}
    for label in labels:
        probs, truths = _label_arrays(cases, label)
        out[label] = label_metrics(
            label,
            probs,
            truths,
            thresholds[label],
            n_bootstrap=settings.n_bootstrap,
            seed=settings.seed,
            n_bins=settings.n_bins,
        )
    return out


def _caveats(
    result_overall: dict[str, LabelMetrics], n_cases: int, subgroups: dict[str, list[SubgroupResult]]
) -> list[str]:
    caveats: list[str] = []
    if n_cases < SMALL_TEST_SET:
        caveats.append(
            f"{n_cases} images: the confidence intervals are wide; treat every number as a rough estimate."
        )
    for label, m in result_overall.items():
        if m.auroc is None:
            caveats.append(f"{label}: the test set holds only one class, so AUROC is undefined.")
        small = [
            name
            for name, count in (("positive", m.n_positive), ("negative", m.n_negative))
            if count < SMALL_CLASS
        ]
        for name in small:
            count = m.n_positive if name == "positive" else m.n_negative
            measure = "sensitivity" if name == "positive" else "specificity"
            ci = m.sensitivity_ci if name == "positive" else m.specificity_ci
            span = f" (95% CI {ci.low:.2f}–{ci.high:.2f})" if ci is not None else ""
            caveats.append(f"{label}: only {count} {name} case(s); {measure} is uncertain{span}.")
        if m.bootstrap_skipped:
            caveats.append(
                f"{label}: {m.bootstrap_skipped} of {m.bootstrap_resamples} bootstrap resamples held one "
                "class and were skipped."
            )
    tiny = [
        f"{attribute}={g.group} (n={g.n_cases})"
        for attribute, groups in subgroups.items()
        for g in groups
        if g.n_cases < SMALL_SUBGROUP
    ]
    if tiny:
        caveats.append(
            f"Subgroups with fewer than {SMALL_SUBGROUP} images ({', '.join(tiny)}): their numbers are "
            "anecdotal; a difference between subgroups is not evidence of bias or of its absence."
        )
    return caveats


def evaluate(
    cases: Sequence[CaseResult],
    labels: Sequence[str],
    thresholds: Mapping[str, float] | float,
    out_dir: str | Path | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
    age_edges: Sequence[float] = DEFAULT_AGE_EDGES,
    subgroups: Sequence[SubgroupSpec] | None = None,
) -> EvaluationResult:
    """Metrics per label for all cases and per subgroup; with ``out_dir``, also write the report there.

    ``thresholds`` is one operating point per label (or one for all); a case is called positive when its
    probability is >= the threshold. Cases whose truth for a label is None are left out of that label.
    Subgroups are sex, age band (lower edges ``age_edges``), view position and manufacturer unless
    ``subgroups`` names others.
    """
    labels = tuple(labels)
    if not labels:
        raise ValueError("no labels to evaluate")
    if isinstance(thresholds, int | float):
        threshold_map = {label: float(thresholds) for label in labels}
    else:
        missing = [label for label in labels if label not in thresholds]
        if missing:
            raise ValueError(f"no threshold for label(s) {missing}")
        threshold_map = {label: float(thresholds[label]) for label in labels}
    settings = EvaluationSettings(
        n_bootstrap=n_bootstrap, seed=seed, n_bins=n_bins, age_edges=tuple(age_edges)
    )
    specs = tuple(subgroups) if subgroups is not None else default_subgroups(settings.age_edges)
    cases = tuple(cases)

    overall = _metrics_for(cases, labels, threshold_map, settings)
    by_attribute: dict[str, list[SubgroupResult]] = {}
    for spec in specs:
        members: dict[str, list[CaseResult]] = defaultdict(list)
        for case in cases:
            members[spec.group_of(case.attributes)].append(case)
        by_attribute[spec.name] = [
            SubgroupResult(
                attribute=spec.name,
                group=group,
                n_cases=len(members[group]),
                metrics=_metrics_for(members[group], labels, threshold_map, settings),
            )
            for group in sorted(members, key=spec.sort_key)
        ]
    result = EvaluationResult(
        labels=labels,
        thresholds=threshold_map,
        n_cases=len(cases),
        overall=overall,
        subgroups=by_attribute,
        settings=settings,
        caveats=_caveats(overall, len(cases), by_attribute),
        cases=cases,
    )
    for label, m in overall.items():
        logger.info(
            "%s: n=%d AUROC %s sensitivity %s specificity %s",
            label,
            m.n,
            format_estimate(m.auroc, m.auroc_ci),
            format_value(m.sensitivity),
            format_value(m.specificity),
        )
    if out_dir is not None:
        write_report(result, out_dir)
    return result
