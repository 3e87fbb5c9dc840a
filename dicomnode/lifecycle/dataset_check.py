"""What ``dicomnode dataset check`` reports on a labelled dataset, before it is used.

Counts per label (positives, negatives, missing), patients and images per patient, the files that
could not be read, SOP Instance UIDs met more than once and patients whose images sit in more than
one split (a leak), each with a warning. Apart from :mod:`dicomnode.lifecycle.datasets` (the
dataset, reading it and splitting it by patient) because this only looks at a dataset already
loaded; ``datasets`` re-exports :func:`check_dataset` and :class:`DatasetReport`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dicomnode.lifecycle.datasets import LabelledDataset, UnreadableFile


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`check_dataset` found; printable with ``str()`` and JSON-able with :meth:`to_dict`."""

    csv_path: str
    n_cases: int
    labels: dict[str, dict[str, int]]  # label -> {"positives", "negatives", "missing"}
    n_patients: int
    n_cases_without_patient_id: int
    cases_per_patient: dict[str, float]  # min, median, mean, max
    cases_per_patient_histogram: dict[int, int]  # images per patient -> number of patients
    unreadable: list[UnreadableFile]
    duplicate_sop_instances: dict[str, list[str]]  # SOP Instance UID -> paths
    splits: dict[str, int]  # split column value -> cases
    patients_in_several_splits: int
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dictionary (histogram keys become strings)."""
        return {
            "csv_path": self.csv_path,
            "n_cases": self.n_cases,
            "labels": self.labels,
            "n_patients": self.n_patients,
            "n_cases_without_patient_id": self.n_cases_without_patient_id,
            "cases_per_patient": self.cases_per_patient,
            "cases_per_patient_histogram": {str(k): v for k, v in self.cases_per_patient_histogram.items()},
            "unreadable": [{"path": u.path, "reason": u.reason} for u in self.unreadable],
            "duplicate_sop_instances": self.duplicate_sop_instances,
            "splits": self.splits,
            "patients_in_several_splits": self.patients_in_several_splits,
            "warnings": self.warnings,
        }

    def to_text(self) -> str:
        """A plain-text summary for the terminal."""
        lines = [f"Dataset {self.csv_path}", f"  cases: {self.n_cases}"]
        lines.append(
            f"  patients: {self.n_patients} ({self.n_cases_without_patient_id} cases without Patient ID)"
        )
        if self.cases_per_patient:
            c = self.cases_per_patient
            lines.append(
                f"  cases per patient: min {c['min']:g}, median {c['median']:g}, "
                f"mean {c['mean']:.2f}, max {c['max']:g}"
            )
        lines.append("  labels:")
        for label, counts in self.labels.items():
            lines.append(
                f"    {label}: {counts['positives']} positive, {counts['negatives']} negative, "
                f"{counts['missing']} missing"
            )
        if self.splits:
            lines.append("  splits: " + ", ".join(f"{k}={v}" for k, v in self.splits.items()))
        lines.append(f"  unreadable files: {len(self.unreadable)}")
        lines.extend(f"    {u.path}: {u.reason}" for u in self.unreadable)
        lines.append(f"  duplicate SOP instances: {len(self.duplicate_sop_instances)}")
        for uid, paths in self.duplicate_sop_instances.items():
            lines.append(f"    {uid}: {', '.join(paths)}")
        lines.extend(f"  WARNING: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def check_dataset(ds: LabelledDataset) -> DatasetReport:
    """Counts per label and patient, unreadable files, duplicate SOP instances and split leaks."""
    label_counts = {
        label: {
            "positives": sum(1 for c in ds.cases if c.labels.get(label) == 1),
            "negatives": sum(1 for c in ds.cases if c.labels.get(label) == 0),
            "missing": sum(1 for c in ds.cases if c.labels.get(label) is None),
        }
        for label in ds.labels
    }
    per_patient = Counter(c.patient_key for c in ds.cases)
    sizes = np.array(sorted(per_patient.values()), dtype=float)
    summary = (
        {
            "min": float(sizes.min()),
            "median": float(np.median(sizes)),
            "mean": float(sizes.mean()),
            "max": float(sizes.max()),
        }
        if sizes.size
        else {}
    )
    by_uid: dict[str, list[str]] = defaultdict(list)
    for case in ds.cases:
        by_uid[case.sop_instance_uid].append(str(case.path))
    duplicates = {uid: paths for uid, paths in sorted(by_uid.items()) if len(paths) > 1}
    splits = Counter(c.split for c in ds.cases if c.split)
    patient_splits: dict[str, set[str]] = defaultdict(set)
    for case in ds.cases:
        if case.split:
            patient_splits[case.patient_key].add(case.split)
    leaks = sum(1 for s in patient_splits.values() if len(s) > 1)

    warnings: list[str] = []
    if ds.unreadable:
        warnings.append(f"{len(ds.unreadable)} file(s) could not be read and are left out")
    if duplicates:
        warnings.append(f"{len(duplicates)} SOP Instance UID(s) appear more than once")
    if leaks:
        warnings.append(f"{leaks} patient(s) appear in more than one split (the split leaks)")
    for label, counts in label_counts.items():
        if counts["positives"] == 0 or counts["negatives"] == 0:
            warnings.append(f"label {label!r} has only one class: AUROC is undefined")
    return DatasetReport(
        csv_path=str(ds.csv_path),
        n_cases=len(ds.cases),
        labels=label_counts,
        n_patients=len(per_patient),
        n_cases_without_patient_id=sum(1 for c in ds.cases if not c.patient_id),
        cases_per_patient=summary,
        cases_per_patient_histogram=dict(sorted(Counter(per_patient.values()).items())),
        unreadable=list(ds.unreadable),
        duplicate_sop_instances=duplicates,
        splits=dict(sorted(splits.items())),
        patients_in_several_splits=leaks,
        warnings=warnings,
    )
