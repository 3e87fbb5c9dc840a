"""Findings -> a Secondary Capture key image: the radiograph, the heat map blended in, the result in a band.

Many viewers do not render TID 1500 SRs without image coordinates, so this RGB image travels alongside
the SR (never instead of it). Burned In Annotation is YES: the text is part of the pixels.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicomnode.errors import InvalidDatasetError
from dicomnode.findings import (
    REFUSED_OUTSIDE_INTENDED_USE,
    ImageFindings,
    LabelFinding,
    ModelIdentity,
    StudyFindings,
    format_percent,
    refusal_kind,
)
from dicomnode.imaging.overlay import add_result_band, blend_heatmap
from dicomnode.report.context import (
    BUILD_CHARACTER_SET,
    apply_source_context,
    encodable,
    series_description,
)
from dicomnode.report.uids import derive_uid, job_key

logger = logging.getLogger(__name__)

DEFAULT_KEY_IMAGE_SERIES_NUMBER = 9901
DEFAULT_MAX_SIZE = 1024


def key_image_uids(findings: StudyFindings, image: ImageFindings) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the key image for ``image``; stable across rebuilds."""
    key = job_key(findings)
    return (
        derive_uid(*key, "key-image-series"),
        derive_uid(*key, "key-image", image.sop_instance_uid, str(image.frame_number)),
    )


def caution_text(model: ModelIdentity) -> str:
    """The first burned-in line: what this is, and that nobody verified it (and the card's clinical flag)."""
    if model.not_for_clinical_use:
        return "AI result — not verified — not for clinical use"
    return "AI result — not verified"


NOT_ANALYSED_TEXT = "AI: not analysed — image outside the model's intended input"
NOT_ANALYSED_INTENDED_USE_TEXT = "AI: not analysed — outside the model's intended use"


def refusal_lines(refusal: str) -> list[str]:
    """The burned-in lines for a refused image: that it was not analysed, and (for the intended use)
    what is outside, e.g. ``patient age 34 y outside 1-6 y``; never a number from the model."""
    if refusal_kind(refusal) != REFUSED_OUTSIDE_INTENDED_USE:
        return [NOT_ANALYSED_TEXT]
    detail = refusal.partition(" (")[2].removesuffix(")")
    return [NOT_ANALYSED_INTENDED_USE_TEXT, *[part for part in detail.split("; ") if part]]


def result_text(finding: LabelFinding) -> str:
    """The burned-in line for one label, e.g. ``"Pneumonia 87.3 % (present at threshold 0.50)"``.

    The percent is :func:`dicomnode.findings.format_percent`'s, the number the SR holds.
    """
    decision = "present" if finding.present else "absent"
    shown = format_percent(finding.probability)
    return f"{finding.display_name} {shown} ({decision} at threshold {finding.threshold:.2f})"


def build_key_image(
    study_findings: StudyFindings,
    image_findings: ImageFindings,
    source_dataset: Dataset,
    display_image: np.ndarray,
    heatmap: np.ndarray | str | Path | None,
    *,
    series_number: int = DEFAULT_KEY_IMAGE_SERIES_NUMBER,
    instance_number: int = 1,
    manufacturer: str = "dicomnode",
    max_size: int = DEFAULT_MAX_SIZE,
    content_datetime: datetime.datetime | None = None,
) -> Dataset:
    """Build the Secondary Capture key image (RGB, 8 bit) for one source image.

    ``display_image`` is the source as displayed (uint8, grey ``(rows, columns)`` or RGB
    ``(rows, columns, 3)``); ``heatmap`` is a float map in 0..1 of any size (or a ``.npy`` path),
    blended where it reaches half its maximum. The radiograph is downscaled so its longest side is at
    most ``max_size``; a band added below it (so Rows exceed the radiograph's) holds the caution line,
    one line per label and, with a heat map, its legend.
    """
    if str(source_dataset.SOPInstanceUID) != image_findings.sop_instance_uid:
        raise InvalidDatasetError(
            f"source {source_dataset.SOPInstanceUID} is not the image {image_findings.sop_instance_uid}"
        )
    # a grey image is shrunk (Pillow resamples each band alike) and blended as one channel
    grey = _downscale(_checked_display(display_image), max_size)
    rgb = _to_rgb(grey)
    if heatmap is not None:
        heat = np.load(heatmap) if isinstance(heatmap, str | Path) else np.asarray(heatmap)
        rgb = blend_heatmap(rgb, heat, grey if grey.ndim == 2 else None)
    lines = [caution_text(study_findings.model)]
    lines += [result_text(f) for f in sorted(image_findings.findings, key=lambda f: -f.probability)]
    if image_findings.refusal is not None:  # findings withheld (OOD gate, intended use): say so, no number
        lines += refusal_lines(image_findings.refusal)
    # below the radiograph, never over it: the film's own markers stay visible
    rgb = add_result_band(rgb, lines, legend=heatmap is not None)

    series_uid, sop_uid = key_image_uids(study_findings, image_findings)
    character_set = source_dataset.get("SpecificCharacterSet") or "ISO_IR 6"
    now = content_datetime or datetime.datetime.now()
    image = hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source_dataset.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_orientation=("L", "F"),  # placeholder; replaced by the source's value below
        specific_character_set=BUILD_CHARACTER_SET,
        series_description=encodable(series_description(study_findings, "key image"), character_set),
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
    )
    image.BurnedInAnnotation = "YES"
    image.ConversionType = "WSD"  # workstation-made, not a digitised film or video (highdicom writes DI)
    image.RecognizableVisualFeatures = "NO"
    image.ImageComments = encodable("; ".join(lines), character_set)
    image.PatientOrientation = list(source_dataset.get("PatientOrientation") or [])
    if source_dataset.get("BodyPartExamined"):
        image.BodyPartExamined = source_dataset.BodyPartExamined
    laterality = _laterality(source_dataset)
    if laterality:
        image.Laterality = laterality
    image.DerivationDescription = encodable(
        f"{study_findings.model.name} {study_findings.model.version} heat map and result burned in",
        character_set,
    )[:1024]
    image.SourceImageSequence = DicomSequence([_source_reference(image_findings)])
    apply_source_context(image, source_dataset)
    return image


def _laterality(source: Dataset) -> str | None:
    """The source's (0020,0060) Laterality, or its Image Laterality when that names one side."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword) or "")
        if value in ("L", "R"):
            return value
    return None


def _source_reference(image: ImageFindings) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.sop_class_uid
    item.ReferencedSOPInstanceUID = image.sop_instance_uid
    if image.frame_number is not None:
        item.ReferencedFrameNumber = image.frame_number
    return item


def _checked_display(display_image: np.ndarray) -> np.ndarray:
    array = np.asarray(display_image)
    if array.dtype != np.uint8:
        raise ValueError(f"display image must be uint8, not {array.dtype}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3):
        return array
    raise ValueError(f"display image must be (rows, columns) or (rows, columns, 3), not {array.shape}")


def _to_rgb(display_image: np.ndarray) -> np.ndarray:
    array = _checked_display(display_image)
    if array.ndim == 2:
        return np.repeat(array[:, :, np.newaxis], 3, axis=2)
    return np.ascontiguousarray(array)


def _downscale(image: np.ndarray, max_size: int) -> np.ndarray:
    """Shrink a grey or RGB uint8 image (Lanczos) so its longest side is at most ``max_size``."""
    rows, columns = image.shape[:2]
    scale = max_size / max(rows, columns)
    if scale >= 1.0:
        return np.ascontiguousarray(image)
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
