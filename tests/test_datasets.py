"""Labelled datasets: CSV + DICOM headers, the dataset check, and the patient-level split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from dicomnode.lifecycle.datasets import (
    LabelledDataset,
    age_from_dates,
    check_dataset,
    load_labelled_dataset,
    parse_patient_age,
    split_by_patient,
)

DX_IMAGE_STORAGE = DigitalXRayImageStorageForPresentation


def make_dicom(path: Path, *, patient_id: str, **attributes: str) -> str:
    """Write a tiny 8x8 DX image with the given header attributes; return its SOP Instance UID."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = f"Test^{patient_id}"
    ds.Modality = "DX"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = 8, 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).reshape(8, 8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uid


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("004Y", 4.0),
        ("018M", 1.5),
        ("010W", 70 / 365.25),
        ("003D", 3 / 365.25),
        ("065Y", 65.0),
        ("", None),
        ("abc", None),
        ("12Q", None),
        (None, None),
    ],
)
def test_parse_patient_age(text: str | None, years: float | None) -> None:
    """DICOM Age Strings in each unit become years; anything else is None."""
    if years is None:
        assert parse_patient_age(text) is None
    else:
        assert parse_patient_age(text) == pytest.approx(years)


def test_age_from_dates() -> None:
    """Age from birth and study date; a study before birth or a malformed date gives None."""
    assert age_from_dates("20000101", "20100101") == 10.0
    assert age_from_dates("20190301", "20200301") == 1.0  # first birthday, across a leap day
    assert age_from_dates("20000229", "20010228") == 1.0  # leap-day birthday in a common year
    assert age_from_dates("20000101", "20000702") == pytest.approx(183 / 366)
    assert age_from_dates("20100101", "20000101") is None
    assert age_from_dates("2000", "20100101") is None
    assert age_from_dates("20001301", "20100101") is None


def test_load_by_path_reads_labels_and_header(tmp_path: Path) -> None:
    """Label columns are found by their 0/1 values; header attributes and ages come from the files."""
    make_dicom(
        tmp_path / "img" / "a.dcm",
        patient_id="P1",
        PatientSex="F",
        PatientAge="018M",
        ViewPosition="PA",
        Manufacturer="Acme",
    )
    make_dicom(
        tmp_path / "img" / "b.dcm",
        patient_id="P2",
        PatientSex="M",
        PatientBirthDate="20000615",
        StudyDate="20200615",
        ViewPosition="AP",
        Manufacturer="Other",
    )
    csv_path = write_csv(
        tmp_path / "labels.csv",
        ["path", "pneumonia", "effusion", "split", "comment"],
        [["img/a.dcm", 1, "", "train", "left lower lobe"], ["img/b.dcm", 0, 1, "test", "n/a"]],
    )
    ds = load_labelled_dataset(csv_path)
    assert ds.labels == ("pneumonia", "effusion")  # "comment" is not 0/1, "split" is reserved
    assert ds.unreadable == []
    a, b = ds.cases
    assert a.path == tmp_path / "img" / "a.dcm"
    assert a.labels == {"pneumonia": 1, "effusion": None}
    assert (a.patient_id, a.patient_sex, a.view_position, a.manufacturer, a.modality, a.split) == (
        "P1",
        "F",
        "PA",
        "Acme",
        "DX",
        "train",
    )
    assert a.patient_age_years == pytest.approx(1.5)
    assert b.labels == {"pneumonia": 0, "effusion": 1}
    assert b.patient_sex == "M"
    assert b.patient_age_years == 20.0  # from birth date and study date
    assert "P1" not in repr(a)  # the patient ID stays out of repr (and so out of logs)


def test_load_by_sop_instance_uid_scans_the_folder(tmp_path: Path) -> None:
    """A CSV naming SOP Instance UIDs is resolved by scanning the headers under the CSV's folder."""
    uid_a = make_dicom(tmp_path / "x" / "y" / "1", patient_id="P1", PatientSex="F")
    uid_b = make_dicom(tmp_path / "2.dcm", patient_id="P2", PatientSex="M")
    csv_path = write_csv(
        tmp_path / "labels.csv",
        ["sop_instance_uid", "nodule"],
        [[uid_b, 1], [uid_a, 0], ["1.2.3.999", 1]],
    )
    ds = load_labelled_dataset(csv_path)
    assert [(c.sop_instance_uid, c.path, c.labels["nodule"]) for c in ds.cases] == [
        (uid_b, tmp_path / "2.dcm", 1),
        (uid_a, tmp_path / "x" / "y" / "1", 0),
    ]
    assert [u.path for u in ds.unreadable] == ["1.2.3.999"]


def test_csv_without_key_column_is_rejected(tmp_path: Path) -> None:
    """A CSV with neither path nor sop_instance_uid cannot be used."""
    csv_path = write_csv(tmp_path / "labels.csv", ["file", "pneumonia"], [["a.dcm", 1]])
    with pytest.raises(ValueError, match="path"):
        load_labelled_dataset(csv_path)


def test_check_dataset_counts_and_finds_problems(tmp_path: Path) -> None:
    """Per-label counts, patients, an unreadable file, a missing file and a duplicate SOP instance."""
    make_dicom(tmp_path / "p1a.dcm", patient_id="SECRET-ID-1", PatientSex="F")
    make_dicom(tmp_path / "p1b.dcm", patient_id="SECRET-ID-1", PatientSex="F")
    make_dicom(tmp_path / "p2.dcm", patient_id="SECRET-ID-2", PatientSex="M")
    make_dicom(tmp_path / "p3.dcm", patient_id="SECRET-ID-3", PatientSex="M")
    (tmp_path / "broken.dcm").write_bytes(b"this is not DICOM" * 20)
    csv_path = write_csv(
        tmp_path / "labels.csv",
        ["path", "pneumonia", "effusion", "split"],
        [
            ["p1a.dcm", 1, 0, "train"],
            ["p1b.dcm", 1, "", "test"],  # the same patient in two splits: a leak
            ["p2.dcm", 0, 0, "train"],
            ["p3.dcm", 0, 1, "test"],
            ["p3.dcm", 0, 1, "test"],  # listed twice: a duplicate SOP instance
            ["broken.dcm", 1, 1, "train"],
            ["missing.dcm", 0, 0, "train"],
        ],
    )
    report = check_dataset(load_labelled_dataset(csv_path))
    assert report.n_cases == 5
    assert report.labels == {
        "pneumonia": {"positives": 2, "negatives": 3, "missing": 0},
        "effusion": {"positives": 2, "negatives": 2, "missing": 1},
    }
    assert report.n_patients == 3
    assert report.cases_per_patient_histogram == {1: 1, 2: 2}  # P2 once; P1 twice; P3 listed twice
    assert report.cases_per_patient == {"min": 1.0, "median": 2.0, "mean": pytest.approx(5 / 3), "max": 2.0}
    reasons = {Path(u.path).name: u.reason for u in report.unreadable}
    assert reasons == {"broken.dcm": "not a DICOM file (no DICM prefix)", "missing.dcm": "file not found"}
    assert len(report.duplicate_sop_instances) == 1
    assert next(iter(report.duplicate_sop_instances.values())) == [str(tmp_path / "p3.dcm")] * 2
    assert report.splits == {"test": 3, "train": 2}
    assert report.patients_in_several_splits == 1  # P1 is in train and test
    assert any("leaks" in w for w in report.warnings)
    text = str(report)
    data = json.dumps(report.to_dict())
    assert "broken.dcm" in text and "not a DICOM file" in text
    assert "pneumonia: 2 positive, 3 negative" in text
    assert "SECRET-ID" not in text and "SECRET-ID" not in data  # no patient IDs in the report


def test_split_by_patient_never_leaks_and_is_deterministic(tmp_path: Path) -> None:
    """Every patient's images land in one split; splits are stratified and reproducible."""
    rng = np.random.default_rng(42)
    rows = []
    for patient in range(60):
        positive = patient % 4 == 0  # 15 positive patients
        for image in range(int(rng.integers(1, 4))):
            name = f"p{patient}_{image}.dcm"
            make_dicom(tmp_path / name, patient_id=f"PAT{patient}")
            rows.append([name, int(positive), int(rng.integers(0, 2))])
    ds = load_labelled_dataset(write_csv(tmp_path / "labels.csv", ["path", "pneumonia", "effusion"], rows))
    parts = split_by_patient(ds, (0.7, 0.15, 0.15), seed=0)

    assert all(isinstance(p, LabelledDataset) for p in parts)
    patients = [{c.patient_id for c in p.cases} for p in parts]
    assert (
        not (patients[0] & patients[1])
        and not (patients[0] & patients[2])
        and not (patients[1] & patients[2])
    )
    assert sorted(str(c.path) for p in parts for c in p.cases) == sorted(str(c.path) for c in ds.cases)
    n = len(ds.cases)
    sizes = [len(p.cases) for p in parts]
    assert abs(sizes[0] - 0.7 * n) <= 4 and all(abs(s - 0.15 * n) <= 4 for s in sizes[1:])
    for p in parts:  # stratified: each split holds positives and negatives
        report = check_dataset(p)
        assert report.labels["pneumonia"]["positives"] > 0 and report.labels["pneumonia"]["negatives"] > 0

    again = split_by_patient(ds, (0.7, 0.15, 0.15), seed=0)
    assert [[c.path for c in p.cases] for p in again] == [[c.path for c in p.cases] for p in parts]
    other = split_by_patient(ds, (0.7, 0.15, 0.15), seed=1)
    assert [[c.path for c in p.cases] for p in other] != [[c.path for c in p.cases] for p in parts]


def test_split_rejects_bad_fractions(tmp_path: Path) -> None:
    """Fractions must be non-negative and sum to one."""
    ds = LabelledDataset(csv_path=tmp_path / "x.csv", labels=("a",), cases=[])
    with pytest.raises(ValueError):
        split_by_patient(ds, (0.5, 0.2))
    with pytest.raises(ValueError):
        split_by_patient(ds, (1.2, -0.2))


def test_headers_are_read_without_pixels(tmp_path: Path) -> None:
    """A file whose pixel data is truncated still loads: only the header is read."""
    path = tmp_path / "a.dcm"
    make_dicom(path, patient_id="P1")
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    ds = load_labelled_dataset(write_csv(tmp_path / "l.csv", ["path", "x"], [["a.dcm", 1]]))
    assert len(ds.cases) == 1
    assert pydicom.dcmread(path, stop_before_pixels=True).PatientID == "P1"
