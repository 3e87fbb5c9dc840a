"""DICOM datasets the tests make themselves (real, valid objects written with pydicom)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.node.services import Services
from dicomnode.queue.jobs import InstanceRecord

DIGITAL_XRAY_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def ct_like(
    study_instance_uid: str,
    series_instance_uid: str,
    index: int,
    size: int = 64,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """A CT image of ``size``² 16-bit pixels, valid enough for any PACS."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid) if sop_instance_uid else generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    rng = np.random.default_rng(index)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def store_as_own_study(services: Services, path: Path, *, patient_id: str | None = "TEST-0001") -> str:
    """Store one file as a study of its own (new study and series UIDs), as the listener would, and
    record it; returns its Study Instance UID."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    store = services.store()
    relative = store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    stored = store.write(relative, buffer.getvalue())
    services.queue.record_instance(
        InstanceRecord(
            str(ds.SOPInstanceUID),
            str(ds.SOPClassUID),
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.file_meta.TransferSyntaxUID),
            relative,
            stored.size_bytes,
            patient_id=patient_id,
            modality=str(ds.Modality),
        )
    )
    return str(ds.StudyInstanceUID)
