"""Findings: what a model concluded about a study, as plain data.

These objects cross process and layer boundaries (worker -> database -> report), so they are frozen
dataclasses with a JSON round trip and no dependency on torch, pydicom or the database.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dicomnode.models.card import ModelCard


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept as DICOM uses it: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme_designator: str
    meaning: str

    @classmethod
    def parse(cls, text: str, meaning: str) -> CodedConcept:
        """Build from the compact ``"SCT:233604007"`` notation used in model cards and the CLI."""
        scheme, sep, value = text.partition(":")
        if not sep or not scheme or not value:
            raise ValueError(f"coded concept {text!r} is not of the form SCHEME:VALUE")
        return cls(value=value, scheme_designator=scheme, meaning=meaning)

    @property
    def compact(self) -> str:
        """The ``"SCT:233604007"`` notation."""
        return f"{self.scheme_designator}:{self.value}"


@dataclass(frozen=True)
class LabelFinding:
    """One label's result on one image (or on the whole study)."""

    label: str  # machine name from the model card, e.g. "pneumonia"
    display_name: str  # e.g. "Pneumonia"
    concept: CodedConcept  # the finding's code, e.g. SCT 233604007 Pneumonia
    probability: float  # 0..1
    threshold: float  # the operating point the decision used
    present: bool  # probability >= threshold

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} of {self.label!r} is outside 0..1")


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced the findings; enough for the SR's algorithm identification."""

    name: str
    version: str
    display_name: str
    manufacturer: str = "dicomnode"
    device_observer_uid: str = ""  # stable per (name, version); derived by the model package
    # the model card's flag; True (the cautious reading) for findings stored before the field existed
    not_for_clinical_use: bool = True


# The kinds of refusal (an image that gets no finding), the start of ImageFindings.refusal
REFUSED_OUT_OF_DISTRIBUTION = "refused: out-of-distribution"  # the model's OOD gate (models/ood.py)
REFUSED_OUTSIDE_INTENDED_USE = "refused: outside-intended-use"  # the card's population (work/intended.py)


def refusal_kind(refusal: str) -> str:
    """``refused: outside-intended-use`` of ``refused: outside-intended-use (view LL not in AP/PA)``."""
    return refusal.split(" (", 1)[0]


@dataclass(frozen=True)
class ImageFindings:
    """The findings on one source image (one SOP instance, optionally one frame)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    path: str  # the stored instance the model read
    findings: tuple[LabelFinding, ...]
    frame_number: int | None = None
    # label -> path of a float32 .npy heat map (rows x columns of the source image, 0..1)
    heatmaps: dict[str, str] = field(default_factory=dict)
    # why the model's findings were withheld, e.g. "refused: out-of-distribution (...)" or
    # "refused: outside-intended-use (...)"; None if not
    refusal: str | None = None


@dataclass(frozen=True)
class StudyFindings:
    """All findings one model produced for one study in one job."""

    study_instance_uid: str
    model: ModelIdentity
    images: tuple[ImageFindings, ...]
    study_findings: tuple[LabelFinding, ...]  # study-level decision per label (see docs/architecture.md)
    job_id: int | None = None

    def to_json(self) -> str:
        """Serialise for the database; :meth:`from_json` restores an equal object."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudyFindings:
        data = json.loads(text)
        return cls(
            study_instance_uid=data["study_instance_uid"],
            model=ModelIdentity(**data["model"]),
            images=tuple(_image_from_dict(i) for i in data["images"]),
            study_findings=tuple(_label_from_dict(f) for f in data["study_findings"]),
            job_id=data.get("job_id"),
        )


def _label_from_dict(data: dict[str, Any]) -> LabelFinding:
    return LabelFinding(
        label=data["label"],
        display_name=data["display_name"],
        concept=CodedConcept(**data["concept"]),
        probability=float(data["probability"]),
        threshold=float(data["threshold"]),
        present=bool(data["present"]),
    )


def _image_from_dict(data: dict[str, Any]) -> ImageFindings:
    return ImageFindings(
        sop_instance_uid=data["sop_instance_uid"],
        sop_class_uid=data["sop_class_uid"],
        series_instance_uid=data["series_instance_uid"],
        path=data["path"],
        findings=tuple(_label_from_dict(f) for f in data["findings"]),
        frame_number=data.get("frame_number"),
        heatmaps=dict(data.get("heatmaps", {})),
        refusal=data.get("refusal"),
    )


# shown probabilities never read 0 % or 100 %: a model is never certain, and the SR, the key image and
# ``dicomnode infer`` must say the same number
DISPLAY_PERCENT_MIN = 0.1
DISPLAY_PERCENT_MAX = 99.9


def display_percent(probability: float) -> float:
    """``probability`` (0..1) as the percent every output shows: one decimal, clamped to 0.1..99.9.

    0.999 -> 99.9, 0.9996 -> 99.9 (not 100.0), 0.0004 -> 0.1 (not 0.0), 0.87 -> 87.0.
    """
    percent = round(100.0 * float(probability), 1)
    return min(max(percent, DISPLAY_PERCENT_MIN), DISPLAY_PERCENT_MAX)


def format_percent(probability: float) -> str:
    """The shown text of a probability, e.g. ``"99.9 %"`` (see :func:`display_percent`)."""
    return f"{display_percent(probability):.1f} %"


def study_level(images: list[ImageFindings]) -> tuple[LabelFinding, ...]:
    """The study-level decision: per label, the image with the highest probability decides.

    A chest study with PA and lateral views is positive when any view is; the probability reported
    for the study is the maximum over its images.
    """
    best: dict[str, LabelFinding] = {}
    for image in images:
        for finding in image.findings:
            current = best.get(finding.label)
            if current is None or finding.probability > current.probability:
                best[finding.label] = finding
    return tuple(best[k] for k in sorted(best))


def findings_for(probabilities: Sequence[float] | np.ndarray, card: ModelCard) -> list[LabelFinding]:
    """One :class:`LabelFinding` per card label from one row of model probabilities.

    The threshold decision lives here, not beside the network, so deciding needs no torch."""
    row = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if row.shape[0] != len(card.labels):
        raise ValueError(f"{row.shape[0]} probabilities for {len(card.labels)} labels")
    if not np.all(np.isfinite(row)):
        raise ValueError("probabilities must be finite")
    findings = []
    for label, value in zip(card.labels, row, strict=True):
        probability = float(min(max(value, 0.0), 1.0))  # float rounding may step just outside 0..1
        findings.append(
            LabelFinding(
                label=label.name,
                display_name=label.display_name,
                concept=label.concept,
                probability=probability,
                threshold=label.threshold,
                present=probability >= label.threshold,
            )
        )
    return findings
