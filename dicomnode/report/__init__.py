"""Reporting: findings -> DICOM objects for the PACS (TID 1500 SR, Secondary Capture key image).

No torch here; inputs are :class:`dicomnode.findings.StudyFindings`, pydicom datasets and arrays.
"""

from __future__ import annotations

from dicomnode.report.key_image import DEFAULT_KEY_IMAGE_SERIES_NUMBER, build_key_image, key_image_uids
from dicomnode.report.key_object import DEFAULT_KOS_SERIES_NUMBER, build_key_object_selection
from dicomnode.report.sr import DEFAULT_SR_SERIES_NUMBER, DocumentReference, build_sr, sr_uids
from dicomnode.report.uids import derive_uid, device_observer_uid

__all__ = [
    "DEFAULT_KEY_IMAGE_SERIES_NUMBER",
    "DEFAULT_KOS_SERIES_NUMBER",
    "DEFAULT_SR_SERIES_NUMBER",
    "DocumentReference",
    "build_key_image",
    "build_key_object_selection",
    "build_sr",
    "derive_uid",
    "device_observer_uid",
    "key_image_uids",
    "sr_uids",
]
