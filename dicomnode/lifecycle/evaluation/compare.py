"""Compare two models on the node's own traffic: the results of jobs where both ran (a route's
reporting model and its shadow, or two models over time), read from the ``results`` table.

Per label both models have: how many images and studies were compared, how often the positive
decisions agree (each at its own card threshold), Cohen's kappa, the Pearson and Spearman
correlation of the probabilities, their mean absolute difference, and each model's AUROC where
labels are given. Images either model refused (out of distribution) are counted apart. No torch.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Result
from dicomnode.errors import DicomNodeError
from dicomnode.findings import ImageFindings, StudyFindings
from dicomnode.lifecycle.evaluation.metrics import auroc

SINCE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhm])\s*$", re.IGNORECASE)
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
LABEL_KEYS = ("sop_instance_uid", "study_instance_uid")


class CompareError(DicomNodeError, ValueError):
    """A comparison that cannot be made as asked (a bad --since, a labels CSV without a key)."""


def parse_since(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m`` as a timedelta."""
    found = SINCE_PATTERN.match(text)
    if not found:
        raise CompareError(f"--since {text!r}: give a number and a unit d, h or m (7d, 12h, 30m)")
    return timedelta(**{_UNITS[found.group(2).lower()]: float(found.group(1))})


@dataclass(frozen=True)
class ModelRef:
    """A model as the operator names it: ``NAME`` (any version) or ``NAME@VERSION``."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, sep, version = text.strip().partition("@")
        if not name or (sep and not version):
            raise CompareError(f"model {text!r}: give NAME or NAME@VERSION")
        return cls(name, version or None)

    def matches(self, row: Result) -> bool:
        return row.model_name == self.name and (self.version is None or row.model_version == self.version)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class LabelComparison:
    """One label's agreement between model A and model B, and each one's AUROC when labelled."""

    label: str
    images: int
    studies: int
    agreement: float | None
    kappa: float | None  # None when undefined (both models made the same one decision throughout)
    pearson: float | None
    spearman: float | None
    mean_absolute_difference: float | None
    positives_a: int
    positives_b: int
    labelled_images: int
    auroc_a: float | None
    auroc_b: float | None


@dataclass
class Comparison:
    """Everything ``dicomnode compare`` prints."""

    model_a: str
    model_b: str
    since: str
    jobs: int  # jobs where both models have results
    versions_a: list[str] = field(default_factory=list)
    versions_b: list[str] = field(default_factory=list)
    refused_a: int = 0  # images compared only by name: A refused them (out of distribution)
    refused_b: int = 0
    refused_both: int = 0
    unmatched_images: int = 0  # an image only one of the two read
    labels_file: str | None = None
    labels: list[LabelComparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick(rows: list[Result], ref: ModelRef, other: ModelRef) -> Result | None:
    """A job's row for ``ref`` (not the one ``other`` names exactly): the reporting one first, else
    the newest."""
    candidates = [r for r in rows if ref.matches(r) and not (other.version and other.matches(r))]
    if not candidates:
        return None
    return sorted(candidates, key=lambda r: (r.role == "reporting", r.id))[-1]


def paired_results(
    sessions: sessionmaker[Session], a: ModelRef, b: ModelRef, since: datetime
) -> list[tuple[StudyFindings, StudyFindings]]:
    """Per job since ``since``, the findings of A and of B where both ran without error."""
    names = {a.name, b.name}
    with sessions() as session:
        rows = list(
            session.scalars(
                select(Result)
                .where(Result.created_at >= since, Result.model_name.in_(names), Result.error.is_(None))
                .order_by(Result.id)
            )
        )
        by_job: dict[int, list[Result]] = defaultdict(list)
        for row in rows:
            by_job[row.job_id].append(row)
        pairs = []
        for job_rows in by_job.values():
            row_a, row_b = _pick(job_rows, a, b), _pick(job_rows, b, a)
            if row_a is not None and row_b is not None and row_a.id != row_b.id:
                pairs.append(
                    (
                        StudyFindings.from_json(row_a.findings_json),
                        StudyFindings.from_json(row_b.findings_json),
                    )
                )
    return pairs


def load_labels(path: Path) -> dict[str, dict[str, int]]:
    """A labels CSV: a ``sop_instance_uid`` or ``study_instance_uid`` column and 0/1 label columns
    (an empty cell: not labelled); returns UID -> label -> 0/1."""
    if not path.is_file():
        raise CompareError(
            f"{path}: no such file; give a labels CSV ({' or '.join(LABEL_KEYS)} and 0/1 columns)"
        )
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [name.strip() for name in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    key = next((k for k in LABEL_KEYS if k in fields), None)
    if key is None:
        raise CompareError(
            f"{path}: the CSV needs a {' or '.join(LABEL_KEYS)} column; its columns are {fields}"
        )
    columns = [f for f in fields if f not in LABEL_KEYS and all(r.get(f, "") in ("0", "1", "") for r in rows)]
    labels: dict[str, dict[str, int]] = {}
    for row in rows:
        if row.get(key):
            labels[row[key]] = {c: int(row[c]) for c in columns if row.get(c)}
    return labels


def _by_image(findings: StudyFindings) -> dict[str, ImageFindings]:
    return {image.sop_instance_uid: image for image in findings.images}


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.clip(np.corrcoef(x, y)[0, 1], -1.0, 1.0))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (as Spearman's coefficient needs)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Agreement beyond chance of two yes/no raters; None when chance agreement is 1 (undefined)."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if len(x) == 0:
        return None
    observed = float(np.mean(x == y))
    expected = float(x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean()))
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def compare(
    pairs: Sequence[tuple[StudyFindings, StudyFindings]],
    model_a: str,
    model_b: str,
    since: str,
    labels: Mapping[str, Mapping[str, int]] | None = None,
    labels_file: str | None = None,
) -> Comparison:
    """The comparison of A and B over matched images (see the module's docstring)."""
    result = Comparison(model_a, model_b, since, jobs=len(pairs), labels_file=labels_file)
    result.versions_a = sorted({fa.model.version for fa, _ in pairs})
    result.versions_b = sorted({fb.model.version for _, fb in pairs})
    # label -> per image: (study uid, sop uid, p_a, present_a, p_b, present_b)
    rows: dict[str, list[tuple[str, str, float, bool, float, bool]]] = defaultdict(list)
    for findings_a, findings_b in pairs:
        images_a, images_b = _by_image(findings_a), _by_image(findings_b)
        result.unmatched_images += len(images_a.keys() ^ images_b.keys())
        for sop, image_a in images_a.items():
            image_b = images_b.get(sop)
            if image_b is None:
                continue
            if image_a.refusal or image_b.refusal:
                if image_a.refusal and image_b.refusal:
                    result.refused_both += 1
                elif image_a.refusal:
                    result.refused_a += 1
                else:
                    result.refused_b += 1
                continue
            by_label_b = {f.label: f for f in image_b.findings}
            for finding_a in image_a.findings:
                finding_b = by_label_b.get(finding_a.label)
                if finding_b is not None:
                    rows[finding_a.label].append(
                        (
                            findings_a.study_instance_uid,
                            sop,
                            finding_a.probability,
                            finding_a.present,
                            finding_b.probability,
                            finding_b.present,
                        )
                    )
    for label, items in sorted(rows.items()):
        result.labels.append(_label_comparison(label, items, labels))
    return result


def _label_comparison(
    label: str,
    items: list[tuple[str, str, float, bool, float, bool]],
    labels: Mapping[str, Mapping[str, int]] | None,
) -> LabelComparison:
    p_a = np.array([i[2] for i in items], dtype=np.float64)
    p_b = np.array([i[4] for i in items], dtype=np.float64)
    d_a = [i[3] for i in items]
    d_b = [i[5] for i in items]
    truths: list[tuple[float, float, int]] = []
    if labels is not None:
        for study, sop, prob_a, _, prob_b, _ in items:
            truth = (labels.get(sop) or labels.get(study) or {}).get(label)
            if truth is not None:
                truths.append((prob_a, prob_b, truth))
    y = np.array([t[2] for t in truths], dtype=np.int_)
    both_classes = len(set(y.tolist())) == 2

    def roc(column: int) -> float | None:
        return auroc(np.array([t[column] for t in truths]), y) if both_classes else None

    return LabelComparison(
        label=label,
        images=len(items),
        studies=len({i[0] for i in items}),
        agreement=float(np.mean(np.array(d_a) == np.array(d_b))),
        kappa=cohen_kappa(d_a, d_b),
        pearson=_pearson(p_a, p_b),
        spearman=_pearson(_ranks(p_a), _ranks(p_b)),
        mean_absolute_difference=float(np.mean(np.abs(p_a - p_b))),
        positives_a=sum(d_a),
        positives_b=sum(d_b),
        labelled_images=len(truths),
        auroc_a=roc(0),
        auroc_b=roc(1),
    )


def format_comparison(result: Comparison) -> str:
    """The text ``dicomnode compare`` prints."""

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"{result.model_a} (versions {', '.join(result.versions_a) or '-'}) against "
        f"{result.model_b} (versions {', '.join(result.versions_b) or '-'}), since {result.since}: "
        f"{result.jobs} jobs where both have results",
        f"refused (out of distribution): {result.refused_a} by A only, {result.refused_b} by B only, "
        f"{result.refused_both} by both (not compared); {result.unmatched_images} images read by one only",
    ]
    if not result.labels:
        lines.append("no image with findings of both models")
    for item in result.labels:
        lines += [
            f"{item.label}: {item.images} images, {item.studies} studies compared",
            f"  agreement of the positive decision {num(item.agreement)} "
            f"(positive: A {item.positives_a}, B {item.positives_b}); Cohen's kappa {num(item.kappa)}",
            f"  probability: Pearson {num(item.pearson)}, Spearman {num(item.spearman)}, "
            f"mean absolute difference {num(item.mean_absolute_difference)}",
        ]
        if result.labels_file is None:
            lines.append("  AUROC: no labels (give --labels CSV)")
        elif item.auroc_a is None:
            lines.append(f"  AUROC: n/a ({item.labelled_images} labelled images; both classes are needed)")
        else:
            lines.append(
                f"  AUROC on {item.labelled_images} labelled images: "
                f"A {num(item.auroc_a)}, B {num(item.auroc_b)}"
            )
    return "\n".join(lines)
