"""Findings -> one Comprehensive 3D SR (TID 1500 Measurement Report) per study and job.

Content (see docs/reporting.md for the tree): Device observer context for the model, Procedure
Reported for the imaging exam, an Image Library of the source images, and one TID 1501 measurement
group per image and label holding the finding, the algorithm, the probability as Certainty of
Finding in percent and the thresholded decision as Present/Absent.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import CodedConcept
from highdicom.sr.enum import RelationshipTypeValues
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from dicomnode.errors import InvalidDatasetError
from dicomnode.findings import (
    REFUSED_OUTSIDE_INTENDED_USE,
    ImageFindings,
    LabelFinding,
    StudyFindings,
    display_percent,
    refusal_kind,
)
from dicomnode.report.context import (
    BUILD_CHARACTER_SET,
    apply_source_context,
    check_same_study,
    device_observer_context,
    encodable,
    neutral_header,
    series_description,
)
from dicomnode.report.uids import derive_uid, job_key

logger = logging.getLogger(__name__)

DEFAULT_SR_SERIES_NUMBER = 9900

CERTAINTY_OF_FINDING = CodedConcept("111012", "DCM", "Certainty of Finding")
PERCENT = CodedConcept("%", "UCUM", "Percent")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
# The value of a refused image's qualitative evaluation: a code of dicomnode's private scheme (a "99"
# designator, PS3.3 8.2), as no standard code says "not analysed because out of distribution".
NOT_ANALYSED = CodedConcept("OOD", "99DICOMNODE", "Not analysed: image outside the model's intended input")
# The same for an image whose header puts it outside the model card's intended population (age, view).
NOT_ANALYSED_INTENDED_USE = CodedConcept(
    "INTENDED-USE", "99DICOMNODE", "Not analysed: outside the model's intended use"
)
# Procedure Reported must come from CID 100 (PixelMed checks it). The group has no chest code, and
# PixelMed 20220618 rejects even (43468-8, LN, "XR unspecified body region"); this one passes.
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True)
class DocumentReference:
    """An earlier SR that a new one replaces (goes into Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = Comprehensive3DSRStorage


def sr_uids(findings: StudyFindings, predecessor: DocumentReference | None = None) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the SR for ``findings``; stable across rebuilds."""
    extra = ("predecessor", predecessor.sop_instance_uid) if predecessor else ()
    key = job_key(findings, extra)
    return derive_uid(*key, "sr-series"), derive_uid(*key, "sr-instance")


def build_sr(
    study_findings: StudyFindings,
    source_datasets: Sequence[Dataset],
    *,
    predecessor: DocumentReference | Dataset | None = None,
    series_number: int = DEFAULT_SR_SERIES_NUMBER,
    instance_number: int = 1,
    manufacturer: str = "dicomnode",
    institution_name: str | None = None,
    content_datetime: datetime.datetime | None = None,
    procedure_reported: CodedConcept | None = None,
) -> Dataset:
    """Build the study's AI result SR (Comprehensive 3D SR, TID 1500), Completion COMPLETE, UNVERIFIED.

    ``source_datasets`` are the instances the model read (pixel data not needed); every image in
    ``study_findings`` must be among them, and all must belong to ``study_findings``' study. The
    returned dataset carries the source's Specific Character Set and patient/study elements verbatim.
    """
    sources = list(source_datasets)
    study_uid = check_same_study(sources)
    if study_uid != study_findings.study_instance_uid:
        raise InvalidDatasetError(
            f"source study {study_uid} differs from findings study {study_findings.study_instance_uid}"
        )
    by_sop = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [i.sop_instance_uid for i in study_findings.images if i.sop_instance_uid not in by_sop]
    if missing:
        raise InvalidDatasetError(f"no source dataset for findings on {missing}")
    if not study_findings.images:
        raise InvalidDatasetError(f"no image findings for study {study_findings.study_instance_uid}")

    reference = _as_reference(predecessor)
    series_uid, sop_uid = sr_uids(study_findings, reference)
    character_set = sources[0].get("SpecificCharacterSet") or "ISO_IR 6"
    headers = [neutral_header(ds) for ds in sources]
    first_image = by_sop[study_findings.images[0].sop_instance_uid]

    groups = [
        _measurement_group(study_findings, image, finding, sop_uid, index)
        for index, image in enumerate(study_findings.images, start=1)
        for finding in image.findings
    ] + [
        _refusal_group(study_findings, image, sop_uid, index)
        for index, image in enumerate(study_findings.images, start=1)
        if image.refusal is not None
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer_context(study_findings)
        ),
        procedure_reported=procedure_reported or IMAGING_PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    _insert_image_library(report, [by_sop[i.sop_instance_uid] for i in study_findings.images])

    now = content_datetime or datetime.datetime.now()
    model = study_findings.model
    sr = hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=[_reference_dataset(reference)] if reference else None,
        specific_character_set=BUILD_CHARACTER_SET,
        series_description=encodable(series_description(study_findings), character_set),
        manufacturer_model_name=encodable(model.display_name or model.name, character_set)[:64],
        software_versions=encodable(model.version, character_set)[:64],
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
        series_date=now.date(),
        series_time=now.time().replace(microsecond=0),
    )
    _make_containers_separate(sr)
    apply_source_context(sr, first_image)
    logger.debug(
        "built SR %s for study %s (%d groups)", sop_uid, study_findings.study_instance_uid, len(groups)
    )
    return sr


def _as_reference(predecessor: DocumentReference | Dataset | None) -> DocumentReference | None:
    if predecessor is None or isinstance(predecessor, DocumentReference):
        return predecessor
    return DocumentReference(
        study_instance_uid=str(predecessor.StudyInstanceUID),
        series_instance_uid=str(predecessor.SeriesInstanceUID),
        sop_instance_uid=str(predecessor.SOPInstanceUID),
        sop_class_uid=str(predecessor.SOPClassUID),
    )


def _reference_dataset(reference: DocumentReference) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = reference.study_instance_uid
    ds.SeriesInstanceUID = reference.series_instance_uid
    ds.SOPInstanceUID = reference.sop_instance_uid
    ds.SOPClassUID = reference.sop_class_uid
    return ds


def _measurement_group(
    findings: StudyFindings, image: ImageFindings, finding: LabelFinding, sr_sop_uid: str, index: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = CodedConcept(finding.concept.value, finding.concept.scheme_designator, finding.concept.meaning)
    frames = [image.frame_number] if image.frame_number is not None else None
    tracking = hd.sr.TrackingIdentifier(
        uid=derive_uid(sr_sop_uid, image.sop_instance_uid, str(image.frame_number), finding.label),
        identifier=f"{finding.label} image {index}"[:64],
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=findings.model.name,
        version=findings.model.version,
        parameters=[f"threshold={finding.threshold:.2f}"],
    )
    certainty = hd.sr.Measurement(
        name=CERTAINTY_OF_FINDING,
        value=display_percent(finding.probability),
        unit=PERCENT,
    )
    decision = hd.sr.QualitativeEvaluation(name=concept, value=PRESENT if finding.present else ABSENT)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[certainty],
        qualitative_evaluations=[decision],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=image.sop_class_uid,
                referenced_sop_instance_uid=image.sop_instance_uid,
                referenced_frame_numbers=frames,
            )
        ],
    )


def _refusal_group(
    findings: StudyFindings, image: ImageFindings, sr_sop_uid: str, index: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group for a refused image: no finding, no certainty, only the qualitative evaluation
    "not analysed" and why as the algorithm's parameters: :data:`NOT_ANALYSED` with the OOD gate's
    score, or :data:`NOT_ANALYSED_INTENDED_USE` with what is outside (e.g. the patient's age)."""
    frames = [image.frame_number] if image.frame_number is not None else None
    tracking = hd.sr.TrackingIdentifier(
        uid=derive_uid(sr_sop_uid, image.sop_instance_uid, str(image.frame_number), "not-analysed"),
        identifier=f"not analysed image {index}"[:64],
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=findings.model.name,
        version=findings.model.version,
        parameters=refusal_parameters(image.refusal or ""),
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=not_analysed_code(image))
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=image.sop_class_uid,
                referenced_sop_instance_uid=image.sop_instance_uid,
                referenced_frame_numbers=frames,
            )
        ],
    )


def _insert_image_library(report: hd.sr.MeasurementReport, images: list[Dataset]) -> None:
    """Add a TID 1600 Image Library before the measurements, describing only what each image has.

    highdicom's ``ImageLibrary`` demands Imager Pixel Spacing and Patient Orientation on projection
    radiographs; many CR images lack them, so the entries here carry the descriptors available.
    """
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS
    )
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence()
    seen: set[str] = set()
    for image in images:
        if str(image.SOPInstanceUID) in seen:
            continue
        seen.add(str(image.SOPInstanceUID))
        entry = hd.sr.ImageContentItem(
            name=CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=str(image.SOPClassUID),
            referenced_sop_instance_uid=str(image.SOPInstanceUID),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        entry.ContentSequence = hd.sr.ContentSequence(_entry_descriptors(image))
        group.ContentSequence.append(entry)
    library.ContentSequence = hd.sr.ContentSequence([group])
    root_items = report[0].ContentSequence
    position = next(
        (i for i, item in enumerate(root_items) if item.name == codes.DCM.ImagingMeasurements),
        len(root_items),
    )
    root_items.insert(position, library)


def _entry_descriptors(image: Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602/1603 descriptors present in ``image``: modality, size, orientation, spacing."""
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = CodedConcept("{pixels}", "UCUM", "Pixels")
    items: list[hd.sr.ContentItem] = []
    modality = _modality_code(str(image.get("Modality", "OT")))
    items.append(hd.sr.CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acq))
    if "FrameOfReferenceUID" in image:
        items.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID, value=image.FrameOfReferenceUID, relationship_type=acq
            )
        )
    items.append(
        hd.sr.NumContentItem(
            name=codes.DCM.PixelDataRows, value=int(image.Rows), unit=pixels, relationship_type=acq
        )
    )
    items.append(
        hd.sr.NumContentItem(
            name=codes.DCM.PixelDataColumns, value=int(image.Columns), unit=pixels, relationship_type=acq
        )
    )
    orientation = image.get("PatientOrientation")
    if orientation and len(orientation) == 2:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.PatientOrientationRow, value=str(orientation[0]), relationship_type=acq
            )
        )
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.PatientOrientationColumn, value=str(orientation[1]), relationship_type=acq
            )
        )
    spacing = image.get("ImagerPixelSpacing") or image.get("PixelSpacing")
    if spacing and len(spacing) == 2 and all(float(v) > 0 for v in spacing):
        items.append(
            hd.sr.NumContentItem(
                name=codes.DCM.HorizontalPixelSpacing,
                value=float(spacing[1]),
                unit=codes.UCUM.Millimeter,
                relationship_type=acq,
            )
        )
        items.append(
            hd.sr.NumContentItem(
                name=codes.DCM.VerticalPixelSpacing,
                value=float(spacing[0]),
                unit=codes.UCUM.Millimeter,
                relationship_type=acq,
            )
        )
    return items


def _modality_code(modality: str) -> CodedConcept:
    """The CID 29 Acquisition Modality code for a Modality attribute value."""
    for keyword in codes.cid29.dir():
        code = getattr(codes.cid29, keyword)
        if code.value == modality:
            return CodedConcept(code.value, code.scheme_designator, code.meaning)
    return CodedConcept(modality, "DCM", modality)


def _make_containers_separate(dataset: Dataset) -> None:
    """Set Continuity Of Content SEPARATE on every container (dsr2html drops names in CONTINUOUS)."""
    if dataset.get("ValueType") == "CONTAINER":
        dataset.ContinuityOfContent = "SEPARATE"
    for item in dataset.get("ContentSequence", []):
        _make_containers_separate(item)


def not_analysed_code(image: ImageFindings) -> CodedConcept:
    """The coded "not analysed" value for the kind of the image's refusal."""
    if refusal_kind(image.refusal or "") == REFUSED_OUTSIDE_INTENDED_USE:
        return NOT_ANALYSED_INTENDED_USE
    return NOT_ANALYSED


def refusal_parameters(refusal: str) -> list[str]:
    """The refusal as Algorithm Parameters (LO, 64 characters each): whole when it fits, else its
    kind and then each reason in parentheses as one parameter."""
    if len(refusal) <= 64:
        return [refusal]
    kind, _, detail = refusal.partition(" (")
    return [part[:64] for part in [kind, *detail.removesuffix(")").split("; ")] if part]
