"""A Key Object Selection document flagging the SR and key images, so viewers list the AI result.

Optional companion: some PACS show KOS-flagged objects in a study's "key images" view.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from dicomnode.errors import InvalidDatasetError
from dicomnode.findings import StudyFindings
from dicomnode.report.context import (
    BUILD_CHARACTER_SET,
    REFERENCE_OMITS,
    apply_source_context,
    device_observer_context,
    encodable,
    neutral_header,
    series_description,
)
from dicomnode.report.uids import derive_uid, job_key

logger = logging.getLogger(__name__)

DEFAULT_KOS_SERIES_NUMBER = 9902
OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")  # CID 7010 Key Object Selection Document Title


def build_key_object_selection(
    study_findings: StudyFindings,
    referenced: Sequence[Dataset],
    *,
    series_number: int = DEFAULT_KOS_SERIES_NUMBER,
    instance_number: int = 1,
    manufacturer: str = "dicomnode",
) -> Dataset:
    """Build a KOS (title "Of Interest") referencing ``referenced`` (the SR and key images).

    Patient/study context and Specific Character Set come from ``referenced[0]``, which dicomnode
    built from the source.
    """
    objects = list(referenced)
    if not objects:
        raise InvalidDatasetError(f"nothing to reference for study {study_findings.study_instance_uid}")
    key = job_key(study_findings, sorted(str(ds.SOPInstanceUID) for ds in objects))
    character_set = objects[0].get("SpecificCharacterSet") or "ISO_IR 6"
    # highdicom reads the UIDs, Rows/Columns (image or not) and the first one's patient/study
    # module from these; the content trees of the SR it need not copy
    headers = [neutral_header(ds, REFERENCE_OMITS) for ds in objects]
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=headers,
        observer_device_context=device_observer_context(study_findings),
        description=encodable(
            f"AI result of {study_findings.model.name} {study_findings.model.version} — not verified",
            character_set,
        ),
    )
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=headers,
        content=content,
        series_instance_uid=derive_uid(*key, "kos-series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(*key, "kos-instance"),
        instance_number=instance_number,
        manufacturer=manufacturer,
        specific_character_set=BUILD_CHARACTER_SET,
        series_description=encodable(series_description(study_findings, "KOS"), character_set),
    )
    # TID 2010 forbids a concept name (Purpose of Reference) on the referenced items; highdicom writes
    # (260753009, SCT, "Source"), which PixelMed reports as an error.
    for item in document.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    apply_source_context(document, objects[0])
    return document
