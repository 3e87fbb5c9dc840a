"""One job's result objects for one model, built and encoded in one call: SR, key images, KOS.

Pure: no database, no files. The worker runs it in a report process (:class:`dicomnode.sandbox.DecodePool`
with the ``"report"`` operation) so that building the objects, which is Python-bound, runs beside the
model and the next batch's bookkeeping instead of sharing their interpreter lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.findings import StudyFindings
from dicomnode.report.key_image import DEFAULT_KEY_IMAGE_SERIES_NUMBER, build_key_image
from dicomnode.report.key_object import build_key_object_selection
from dicomnode.report.sr import DocumentReference, build_sr

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass(frozen=True)
class KeyImageInput:
    """What one key image is made of: the image's index in the findings, its display image, a map."""

    index: int
    display: np.ndarray  # uint8 (rows, columns) or (rows, columns, 3)
    heatmap: np.ndarray | None


@dataclass(frozen=True)
class EncodedObject:
    """A built object as a DICOM file's bytes, with what the worker records about it."""

    kind: str  # "sr", "key-image" or "kos"
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    data: bytes


def build_result_objects(
    findings: StudyFindings,
    sources: Sequence[Dataset],
    key_images: Sequence[KeyImageInput],
    predecessor: DocumentReference | None = None,
) -> list[EncodedObject]:
    """The SR, one key image per entry of ``key_images`` and the KOS, encoded as DICOM files.

    ``sources[i]`` is the header of ``findings.images[i]``.
    """
    sr = build_sr(findings, sources, predecessor=predecessor)
    built: list[Dataset] = [sr]
    for number, item in enumerate(key_images, start=1):
        built.append(
            build_key_image(
                findings,
                findings.images[item.index],
                sources[item.index],
                item.display,
                item.heatmap,
                series_number=DEFAULT_KEY_IMAGE_SERIES_NUMBER,
                instance_number=number,
            )
        )
    built.append(build_key_object_selection(findings, built))
    encoded = []
    for ds in built:
        sop_class = str(ds.SOPClassUID)
        kind = {SR_STORAGE: "sr", KOS_STORAGE: "kos"}.get(sop_class, "key-image")
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        encoded.append(
            EncodedObject(
                kind, str(ds.SOPInstanceUID), sop_class, str(ds.SeriesInstanceUID), buffer.getvalue()
            )
        )
    return encoded


def warm_up() -> None:
    """Build and encode one throwaway result, so that a new report process loads what highdicom,
    matplotlib and the font loader load lazily before its first real job, not during it."""
    from pydicom.uid import generate_uid

    from dicomnode.findings import CodedConcept, ImageFindings, LabelFinding, ModelIdentity, study_level

    source = Dataset()
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    source.SOPInstanceUID, source.StudyInstanceUID, source.SeriesInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    source.Modality, source.Rows, source.Columns = "CR", 64, 64
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        setattr(source, keyword, "")
    source.StudyID, source.StudyDate, source.StudyTime, source.ReferringPhysicianName = "", "", "", ""
    finding = LabelFinding(
        "warm-up", "Warm-up", CodedConcept("404684003", "SCT", "Clinical finding"), 0.9, 0.5, True
    )
    image = ImageFindings(
        str(source.SOPInstanceUID), str(source.SOPClassUID), str(source.SeriesInstanceUID), "", (finding,)
    )
    findings = StudyFindings(
        str(source.StudyInstanceUID), ModelIdentity("warm-up", "0", "Warm-up"), (image,), study_level([image])
    )
    heat = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    build_result_objects(findings, [source], [KeyImageInput(0, np.zeros((64, 64), np.uint8), heat)])
