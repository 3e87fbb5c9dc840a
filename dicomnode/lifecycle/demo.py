"""The demonstration dataset: the 16 chest radiographs shipped in pneumonia_model_package, as DICOM.

Each JPEG becomes a Computed Radiography instance (their acquisition is not documented; CR is the
image IOD whose requirements the JPEG exports can meet truthfully) whose pixel data are the original JPEG
bytes (JPEG Baseline transfer syntax, nothing re-encoded), one patient and study per image, plus a
``labels.csv`` in the ``dicomnode.lifecycle.datasets`` format. Used to measure the default model through the
node's own path (``dicomnode evaluate``) and to try the node without patient data.
"""

from __future__ import annotations

import csv
import importlib.util
import uuid
from pathlib import Path

from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEGBaseline8Bit

COMPUTED_RADIOGRAPHY = UID("1.2.840.10008.5.1.4.1.1.1")


def demo_images_dir() -> Path:
    """The folder of the 16 shipped JPEGs (NORMAL* and person*_bacteria_*)."""
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pneumonia_model_package is not installed (dicomnode models install-default)")
    return Path(spec.origin).parent / "datasets" / "pneumonia-data" / "val"


def _uid(*parts: str) -> str:
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "dicomnode-demo/" + "/".join(parts)).int)


def jpeg_to_dicom(jpeg_path: Path, index: int) -> Dataset:
    """Wrap one JPEG radiograph (its bytes unchanged) as a CR instance."""
    with Image.open(jpeg_path) as image:
        mode, (columns, rows) = image.mode, image.size
        if image.format != "JPEG" or image.info.get("progressive") or image.info.get("progression"):
            raise ValueError(f"{jpeg_path.name} is not a baseline JPEG")
    samples = 1 if mode == "L" else 3
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = COMPUTED_RADIOGRAPHY
    ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid(jpeg_path.name, "instance"))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = COMPUTED_RADIOGRAPHY
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(jpeg_path.name, "study")
    ds.SeriesInstanceUID = _uid(jpeg_path.name, "series")
    ds.PatientName = f"Demo^Patient{index + 1:02d}"
    ds.PatientID = f"DEMO{index + 1:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = "20180101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{index + 1}"
    ds.StudyDescription = "Chest radiograph (demonstration)"
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "unknown (JPEG export, Kermany et al. 2018)"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "YBR_FULL_422"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.WindowCenter = 127.5
    ds.WindowWidth = 256
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg_path.read_bytes()])
    ds["PixelData"].VR = "OB"
    return ds


def write_demo_dataset(out_dir: Path) -> Path:
    """Write the 16 radiographs as DICOM and ``labels.csv`` (column ``pneumonia``); return the CSV path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, jpeg in enumerate(sorted(demo_images_dir().glob("*.jpeg"))):
        ds = jpeg_to_dicom(jpeg, index)
        name = f"{jpeg.stem}.dcm"
        ds.save_as(out_dir / name, enforce_file_format=True)
        rows.append({"path": name, "pneumonia": 0 if jpeg.name.startswith("NORMAL") else 1})
    csv_path = out_dir / "labels.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "pneumonia"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
