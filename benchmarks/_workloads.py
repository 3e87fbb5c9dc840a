"""Synthetic DICOM workloads for the benchmarks: CT-like series and DX-like radiographs.

Headers look like a modality's (patient, study, series, geometry, windowing); pixel data is a smooth
phantom plus a little noise, so it is neither all zeros nor incompressible. Everything is written
explicit VR little endian, uncompressed, as a real sender would most often send it. The patient is
invented (``BENCHMARK^INGEST``); nothing here comes from a real person.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_FOR_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass(frozen=True)
class Workload:
    """A folder of generated instances and what a benchmark needs to know about it."""

    name: str
    directory: Path
    files: tuple[Path, ...]
    total_bytes: int
    study_count: int

    @property
    def count(self) -> int:
        return len(self.files)

    def split(self, groups: int) -> list[list[Path]]:
        """The files dealt round-robin into ``groups`` lists (one per parallel association)."""
        return [list(self.files[i::groups]) for i in range(groups)]


def _phantom(rows: int, columns: int, background: int, peak: int) -> np.ndarray:
    """A smooth body-like ellipse with a few inserts: compressible, yet not trivially so."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    cy, cx = rows / 2, columns / 2
    body = ((x - cx) / (0.42 * columns)) ** 2 + ((y - cy) / (0.36 * rows)) ** 2 < 1.0
    image = np.full((rows, columns), background, dtype=np.float32)
    image[body] = peak * 0.5 + 0.1 * peak * np.sin(x[body] / 17.0) * np.cos(y[body] / 23.0)
    for fx, fy, r, level in ((0.35, 0.45, 0.08, 0.9), (0.62, 0.5, 0.06, 0.7), (0.5, 0.3, 0.04, 1.0)):
        insert = (x - fx * columns) ** 2 + (y - fy * rows) ** 2 < (r * columns) ** 2
        image[insert] = peak * level
    return image


def _base_dataset(modality: str, sop_class_uid: str, rows: int, columns: int) -> Dataset:
    now = datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = now.strftime("%H%M%S")
    ds.SeriesTime = ds.StudyTime
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = modality
    ds.Manufacturer = "dicomnode benchmark"
    ds.InstitutionName = "Benchmark Hospital"
    ds.ReferringPhysicianName = "REFERRER^BENCHMARK"
    ds.StationName = "BENCH01"
    ds.StudyDescription = "CT CHEST" if modality == "CT" else "XR CHEST 2 VIEWS"
    ds.ManufacturerModelName = "Synthetic"
    ds.PatientName = "BENCHMARK^INGEST"
    ds.PatientID = "BENCH-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SoftwareVersions = "1.0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    region = Dataset()
    region.CodeValue = "51185008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Thorax"
    ds.AnatomicRegionSequence = [region]
    if modality == "CT":
        ds.AcquisitionNumber = 1
        ds.KVP = "120"
        ds.SliceThickness = "1.0"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
        ds.PixelSpacing = [0.7, 0.7]
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    else:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.KVP = "110"
        ds.ImagerPixelSpacing = [0.143, 0.143]
        ds.PixelSpacing = [0.143, 0.143]
        ds.PatientOrientation = ["P", "F"]
        ds.BitsStored = 14
        ds.HighBit = 13
        ds.PixelRepresentation = 0
        ds.WindowCenter = "8192"
        ds.WindowWidth = "16384"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
    return ds


def _write(ds: Dataset, path: Path) -> int:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    dcmwrite(path, ds, enforce_file_format=True)
    return path.stat().st_size


def generate_ct(
    directory: Path, count: int, *, size: int = 512, per_series: int = 250, seed: int = 0
) -> Workload:
    """One CT study of ``count`` axial slices, ``per_series`` slices a series, 16-bit signed."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phantom = _phantom(size, size, background=0, peak=2000)
    ds = _base_dataset("CT", CT_IMAGE_STORAGE, size, size)
    ds.StudyInstanceUID = generate_uid()
    ds.StudyID = "1"
    files: list[Path] = []
    total = 0
    for index in range(count):
        if index % per_series == 0:
            ds.SeriesInstanceUID = generate_uid()
            ds.SeriesNumber = index // per_series + 1
            ds.SeriesDescription = f"Axial 1.0 mm series {ds.SeriesNumber}"
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = index % per_series + 1
        z = -300.0 + (index % per_series) * 1.0
        ds.ImagePositionPatient = [-179.2, -179.2, z]
        ds.SliceLocation = z
        noise = rng.integers(-12, 13, size=(size, size), dtype=np.int16)
        pixels = (phantom * (0.9 + 0.2 * (index % 50) / 50)).astype(np.int16) + noise
        ds.PixelData = pixels.tobytes()
        path = directory / f"CT{index:05d}.dcm"
        total += _write(ds, path)
        files.append(path)
    return Workload("CT", directory, tuple(files), total, 1)


def generate_dx(
    directory: Path, count: int, *, size: int = 2048, per_study: int = 2, seed: int = 1
) -> Workload:
    """Chest radiographs, ``per_study`` views (PA, LATERAL) a study, Digital X-Ray For Presentation."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phantom = _phantom(size, size, background=800, peak=12000)
    ds = _base_dataset("DX", DX_FOR_PRESENTATION_STORAGE, size, size)
    files: list[Path] = []
    total = 0
    studies = 0
    for index in range(count):
        if index % per_study == 0:
            studies += 1
            ds.StudyInstanceUID = generate_uid()
            ds.StudyID = str(studies)
            ds.AccessionNumber = f"BENCH{studies:04d}"
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = index % per_study + 1
        view = "PA" if index % per_study == 0 else "LL"
        ds.ViewPosition = view
        ds.SeriesDescription = f"Chest {view}"
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = 1
        noise = rng.integers(0, 64, size=(size, size), dtype=np.uint16)
        pixels = (phantom * (0.95 + 0.1 * rng.random())).astype(np.uint16) + noise
        ds.PixelData = pixels.tobytes()
        path = directory / f"DX{index:05d}.dcm"
        total += _write(ds, path)
        files.append(path)
    return Workload("DX", directory, tuple(files), total, studies)


def generate_workloads(root: Path, *, ct_count: int = 500, dx_count: int = 50) -> list[Workload]:
    """Both workloads under ``root`` (CT first); prints how long generating took."""
    started = time.perf_counter()
    workloads = [generate_ct(root / "ct", ct_count), generate_dx(root / "dx", dx_count)]
    elapsed = time.perf_counter() - started
    for w in workloads:
        print(f"generated {w.name}: {w.count} instances, {w.total_bytes / 1e6:.0f} MB in {w.directory}")
    print(f"(generation took {elapsed:.1f} s)")
    return workloads
