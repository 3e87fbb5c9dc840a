"""Reporting: TID 1500 SR and Secondary Capture key image from real files, checked by real validators."""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.errors import InvalidDatasetError
from dicomnode.findings import (
    CodedConcept,
    ImageFindings,
    LabelFinding,
    ModelIdentity,
    StudyFindings,
    study_level,
)
from dicomnode.imaging.overlay import blend_heatmap
from dicomnode.report.bundle import KeyImageInput, build_result_objects
from dicomnode.report.key_image import build_key_image
from dicomnode.report.key_object import build_key_object_selection
from dicomnode.report.sr import DocumentReference, build_sr, sr_uids
from dicomnode.report.uids import derive_uid

try:
    from tests.corpus import find
except ImportError:  # tests/ run as rootdir without package
    from corpus import find  # type: ignore[no-redef]

CHARSET_DIR = Path(pydicom.__file__).parent / "data" / "charset_files"


def _pneumonia_jpegs() -> list[Path]:
    """The package's real paediatric radiographs, located without importing it (it needs pydantic)."""
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "pneumonia-data" / "val"
    return sorted(folder.glob("person*_bacteria*.jpeg"))


PNEUMONIA_JPEGS = _pneumonia_jpegs()
needs_jpegs = pytest.mark.skipif(len(PNEUMONIA_JPEGS) < 2, reason="pneumonia_model_package is not installed")
PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
EFFUSION = CodedConcept("60046008", "SCT", "Pleural effusion")
MODEL = ModelIdentity(
    name="pneumonia-xception",
    version="0.3.0",
    display_name="Pneumonia Xception",
    device_observer_uid=derive_uid("test-device", "pneumonia-xception", "0.3.0"),
)
JAVA_OPTS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# PixelMed's DicomSRValidator takes one file per run; this runs its public validate() over many in one JVM.
SR_BATCH_JAVA = """
public class SRBatch {
    public static void main(String[] args) throws Exception {
        com.pixelmed.validate.DicomSRValidator validator = new com.pixelmed.validate.DicomSRValidator();
        for (String name : args) {
            System.out.println("=== FILE " + name);
            System.out.println(validator.validate(name));
        }
    }
}
"""


# --- inputs -------------------------------------------------------------------------------------


def rg1() -> Dataset:
    """The real adult chest CR (MONOCHROME1, ISO_IR 100) from pydicom-data."""
    return pydicom.dcmread(find("RG1_UNCR.dcm"))


def wrap_jpeg(jpeg: Path, *, study: Dataset | None, view: str, instance: int) -> Dataset:
    """A CR dataset holding a real paediatric pneumonia radiograph (JPEG pixels, 8 bit grey)."""
    pixels = np.asarray(Image.open(jpeg).convert("L"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyInstanceUID = study.StudyInstanceUID if study else generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Müller^Jörg"
    ds.PatientID = "PNEU-1"
    ds.PatientBirthDate = "20180101"
    ds.PatientSex = "M"
    ds.StudyDate = "20240101"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "CR"
    ds.Manufacturer = "test"
    ds.SeriesNumber = instance
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if view == "PA" else ["R", "F"]
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def display_image(ds: Dataset) -> np.ndarray:
    """The image as displayed (uint8, 0 = black), standing in for dicomnode.imaging.read_display_image."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    values = (values - values.min()) / max(float(np.ptp(values)), 1e-9)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = 1.0 - values
    return np.rint(values * 255).astype(np.uint8)


def label(concept: CodedConcept, probability: float, threshold: float = 0.5) -> LabelFinding:
    return LabelFinding(
        label=concept.meaning.lower().replace(" ", "_"),
        display_name=concept.meaning,
        concept=concept,
        probability=probability,
        threshold=threshold,
        present=probability >= threshold,
    )


def image_findings(
    ds: Dataset, *findings: LabelFinding, heatmaps: dict[str, str] | None = None
) -> ImageFindings:
    return ImageFindings(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        path="unused",
        findings=findings,
        heatmaps=heatmaps or {},
    )


def study(*images: ImageFindings, uid: str) -> StudyFindings:
    return StudyFindings(
        study_instance_uid=uid, model=MODEL, images=images, study_findings=study_level(list(images))
    )


def save(ds: Dataset, path: Path) -> Path:
    """Write as a DICOM file; a value pydicom cannot encode in the character set fails the test."""
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds.save_as(path, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = mode
    return path


def with_patient_name_from(charset_file: str) -> Dataset:
    """RG1 (header only) carrying the Specific Character Set and Patient's Name of a pydicom charset file."""
    donor = pydicom.dcmread(CHARSET_DIR / charset_file)
    ds = pydicom.dcmread(find("RG1_UNCR.dcm"), stop_before_pixels=True)
    ds.SpecificCharacterSet = donor.SpecificCharacterSet
    ds.PatientName = donor.PatientName
    return ds


def groups(report: Dataset) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    content = getattr(report, "content", None)
    assert isinstance(content, hd.sr.MeasurementReport)
    return list(content.get_image_measurement_groups())


def decision(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[str, str]:
    """(finding code, Present/Absent code) of the group's single qualitative evaluation."""
    (evaluation,) = group.get_qualitative_evaluations()
    item = evaluation[0]
    return item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue


def text_items(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, str]:
    """The group's own TEXT items by concept code value (algorithm name, version, parameters, ...)."""
    return {
        item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }


def raw_value(path: Path, keyword: str) -> bytes:
    """The element's value bytes as stored in the file (no decoding)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    element = ds.get_item(keyword)
    assert element is not None
    value = element.value
    assert isinstance(value, bytes)
    return value.rstrip(b" \x00")


# --- UIDs ---------------------------------------------------------------------------------------


def test_derive_uid_is_deterministic_valid_and_separates_parts() -> None:
    """The same parts give the same valid 2.25 UID; different or differently split parts do not."""
    uid = derive_uid("1.2.3", "model", "0.1")
    assert uid == derive_uid("1.2.3", "model", "0.1")
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid
    assert uid != derive_uid("1.2.3", "model", "0.2")
    assert derive_uid("a", "b.c") != derive_uid("a.b", "c")
    with pytest.raises(ValueError):
        derive_uid()


def test_sr_uids_survive_a_rebuild_and_change_with_new_inputs() -> None:
    """Rebuilding after a crash gives the same UIDs; new images or a predecessor give new ones."""
    source = rg1()
    other = copy.deepcopy(source)
    other.SOPInstanceUID = generate_uid()
    first = study(image_findings(source, label(PNEUMONIA, 0.8)), uid=source.StudyInstanceUID)
    again = study(image_findings(source, label(PNEUMONIA, 0.8)), uid=source.StudyInstanceUID)
    rerun = study(
        image_findings(source, label(PNEUMONIA, 0.8)),
        image_findings(other, label(PNEUMONIA, 0.1)),
        uid=source.StudyInstanceUID,
    )
    sr1 = build_sr(first, [source])
    sr2 = build_sr(again, [source])
    assert (sr1.SeriesInstanceUID, sr1.SOPInstanceUID) == (sr2.SeriesInstanceUID, sr2.SOPInstanceUID)
    assert (sr1.SeriesInstanceUID, sr1.SOPInstanceUID) == sr_uids(first)
    sr3 = build_sr(rerun, [source, other])
    assert sr3.SOPInstanceUID != sr1.SOPInstanceUID and sr3.SeriesInstanceUID != sr1.SeriesInstanceUID
    amended = build_sr(first, [source], predecessor=sr1)
    assert amended.SOPInstanceUID != sr1.SOPInstanceUID
    key1 = build_key_image(first, first.images[0], source, np.zeros((8, 8), np.uint8), None)
    key2 = build_key_image(again, again.images[0], source, np.zeros((8, 8), np.uint8), None)
    assert key1.SOPInstanceUID == key2.SOPInstanceUID
    assert key1.SeriesInstanceUID not in (source.SeriesInstanceUID, sr1.SeriesInstanceUID)


# --- SR content -----------------------------------------------------------------------------


def test_sr_content_round_trips_through_highdicom(tmp_path: Path) -> None:
    """The SR read back with srread holds finding, certainty %, decision, algorithm, observer and evidence."""
    source = rg1()
    findings = study(image_findings(source, label(PNEUMONIA, 0.8734)), uid=source.StudyInstanceUID)
    path = save(build_sr(findings, [source], series_number=77), tmp_path / "sr.dcm")

    report = hd.sr.srread(path)
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.SeriesInstanceUID != source.SeriesInstanceUID
    assert report.SeriesNumber == 77
    assert report.CompletionFlag == "COMPLETE" and report.VerificationFlag == "UNVERIFIED"
    assert "not verified" in report.SeriesDescription and len(report.SeriesDescription) <= 64
    assert report.ContentSequence and report.ContinuityOfContent == "SEPARATE"
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    assert report.ConceptNameCodeSequence[0].CodeValue == "126000"
    observer = content.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    device = observer[0].observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == MODEL.device_observer_uid

    (group,) = groups(report)
    assert group.finding_type == hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
    (certainty,) = group.get_measurements()
    assert certainty.name.value == "111012" and certainty.value == pytest.approx(87.3)
    assert certainty.unit.value == "%" and certainty.unit.scheme_designator == "UCUM"
    assert decision(group) == ("233604007", "52101004")
    texts = text_items(group)
    assert texts["111001"] == "pneumonia-xception" and texts["111003"] == "0.3.0"  # algorithm name, version
    assert texts["111002"] == "threshold=0.50"  # algorithm parameters
    assert group.tracking_uid and group.tracking_identifier
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID

    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert report.SpecificCharacterSet == "ISO_IR 100"
    assert report.PatientName == source.PatientName and report.PatientID == source.PatientID
    assert report.AccessionNumber == source.AccessionNumber
    assert report.StudyDescription == source.StudyDescription


@needs_jpegs
def test_two_view_study_reports_each_image_and_label(tmp_path: Path) -> None:
    """PA and AP views with two labels give four groups, each pointing at its own image; both are evidence."""
    pa = wrap_jpeg(PNEUMONIA_JPEGS[0], study=None, view="PA", instance=1)
    ap = wrap_jpeg(PNEUMONIA_JPEGS[1], study=pa, view="AP", instance=2)
    findings = study(
        image_findings(pa, label(PNEUMONIA, 0.91), label(EFFUSION, 0.12, threshold=0.3)),
        image_findings(ap, label(PNEUMONIA, 0.42), label(EFFUSION, 0.35, threshold=0.3)),
        uid=pa.StudyInstanceUID,
    )
    path = save(build_sr(findings, [pa, ap]), tmp_path / "sr.dcm")
    report = hd.sr.srread(path)
    seen = {
        (g.source_images[0].referenced_sop_instance_uid, decision(g)[0]): (
            g.get_measurements()[0].value,
            decision(g)[1],
        )
        for g in groups(report)
    }
    assert seen == {
        (pa.SOPInstanceUID, "233604007"): (91.0, "52101004"),
        (pa.SOPInstanceUID, "60046008"): (12.0, "272519000"),
        (ap.SOPInstanceUID, "233604007"): (42.0, "272519000"),
        (ap.SOPInstanceUID, "60046008"): (35.0, "52101004"),
    }
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {pa.SOPInstanceUID, ap.SOPInstanceUID}
    assert len({g.tracking_uid for g in groups(report)}) == 4


def test_predecessor_documents_sequence_names_the_earlier_sr(tmp_path: Path) -> None:
    """An amended SR lists the earlier SR's study/series/instance in Predecessor Documents Sequence."""
    source = rg1()
    findings = study(image_findings(source, label(PNEUMONIA, 0.3)), uid=source.StudyInstanceUID)
    earlier = DocumentReference(str(source.StudyInstanceUID), derive_uid("old-series"), derive_uid("old-sr"))
    report = hd.sr.srread(save(build_sr(findings, [source], predecessor=earlier), tmp_path / "sr.dcm"))
    series = report.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == earlier.series_instance_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == earlier.sop_instance_uid


def test_inconsistent_inputs_are_refused() -> None:
    """Findings on an image without its dataset, or sources from another study, raise InvalidDatasetError."""
    source = rg1()
    other = copy.deepcopy(source)
    other.SOPInstanceUID = generate_uid()
    with pytest.raises(InvalidDatasetError):
        build_sr(study(image_findings(other, label(PNEUMONIA, 0.3)), uid=source.StudyInstanceUID), [source])
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(InvalidDatasetError):
        build_sr(
            study(image_findings(source, label(PNEUMONIA, 0.3)), uid=source.StudyInstanceUID), [source, other]
        )


CHARSET_FILES = [
    "chrJapMulti.dcm",
    "chrH31.dcm",
    "chrX1.dcm",
    "chrX2.dcm",
    "chrRuss.dcm",
    "chrGreek.dcm",
    "chrKoreanMulti.dcm",
    "chrArab.dcm",
]


@pytest.mark.parametrize("charset_file", CHARSET_FILES)
def test_specific_character_set_and_patient_name_survive(
    charset_file: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SR and key image carry the source's character set; the name's bytes equal the source's."""
    caplog.set_level(logging.DEBUG)
    source = with_patient_name_from(charset_file)
    source_path = save(source, tmp_path / "source.dcm")
    source = pydicom.dcmread(source_path)
    findings = study(image_findings(source, label(PNEUMONIA, 0.66)), uid=source.StudyInstanceUID)
    sr_path = save(build_sr(findings, [source]), tmp_path / "sr.dcm")
    key = build_key_image(findings, findings.images[0], source, np.full((64, 64), 128, np.uint8), None)
    key_path = save(key, tmp_path / "key.dcm")
    for path in (sr_path, key_path):
        result = pydicom.dcmread(path)
        assert result.SpecificCharacterSet == source.SpecificCharacterSet
        assert result.PatientName == source.PatientName
        assert raw_value(path, "PatientName") == raw_value(source_path, "PatientName")
        assert "not verified" in result.SeriesDescription
    assert str(source.PatientName) not in caplog.text  # no patient data in logs


# --- key image ------------------------------------------------------------------------------


def test_key_image_blends_heatmap_and_writes_result_below(tmp_path: Path) -> None:
    """RGB, radiograph downscaled to 1024, coloured where the map is high, result in a band below it."""
    source = rg1()
    heat = np.zeros((64, 64), np.float32)
    heat[40:56, 8:24] = 1.0
    np.save(tmp_path / "heat.npy", heat)
    findings = study(
        image_findings(source, label(PNEUMONIA, 0.87), heatmaps={"pneumonia": str(tmp_path / "heat.npy")}),
        uid=source.StudyInstanceUID,
    )
    grey = display_image(source)
    key = build_key_image(findings, findings.images[0], source, grey, tmp_path / "heat.npy", series_number=78)
    path = save(key, tmp_path / "key.dcm")
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.PhotometricInterpretation == "RGB" and back.BitsAllocated == 8
    film_rows = round(grey.shape[0] * 1024 / max(grey.shape))
    assert back.Columns == round(grey.shape[1] * 1024 / max(grey.shape)) and back.Rows > film_rows
    assert back.BurnedInAnnotation == "YES"
    assert back.PatientOrientation == source.PatientOrientation
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.SeriesNumber == 78
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "Pneumonia 87.0 % (present at threshold 0.50)" in back.ImageComments
    assert "not for clinical use" in back.ImageComments
    pixels = back.pixel_array.astype(int)
    rows, columns = film_rows, back.Columns
    hot = pixels[int(rows * 0.7) : int(rows * 0.8), int(columns * 0.2) : int(columns * 0.3)]
    cold = pixels[int(rows * 0.4) : int(rows * 0.5), int(columns * 0.7) : int(columns * 0.8)]
    assert np.abs(hot[..., 0] - hot[..., 2]).mean() > 40  # coloured
    assert np.abs(cold[..., 0] - cold[..., 2]).mean() < 2  # still grey
    band = pixels[film_rows:]
    assert (band == 255).all(axis=-1).sum() > 200  # white text drawn in the band
    assert not (pixels[: film_rows // 10] == 255).all(axis=-1).all(axis=1).any()  # no text over the film


def _gradcam_like(rows: int, columns: int) -> np.ndarray:
    """A coarse map as Grad-CAM gives (10 x 10, one broad peak and a weaker one, nowhere zero)."""
    yy, xx = np.mgrid[0:10, 0:10].astype(np.float32)
    heat = np.exp(-((yy - 6) ** 2 + (xx - 3) ** 2) / 8) + 0.4 * np.exp(-((yy - 3) ** 2 + (xx - 7) ** 2) / 5)
    return (0.15 + heat).astype(np.float32)  # the floor Grad-CAM maps have: a fixed 0.3 tinted most pixels


def _radiographs() -> list[Dataset]:
    """Two real radiographs: the adult chest CR and, when installed, a paediatric pneumonia one."""
    found = [rg1()]
    if PNEUMONIA_JPEGS:
        found.append(wrap_jpeg(PNEUMONIA_JPEGS[0], study=None, view="PA", instance=1))
    else:
        found.append(pydicom.dcmread(find("CR-MONO1-10-chest.dcm")))
    return found


@pytest.mark.parametrize("index", [0, 1])
def test_key_image_keeps_the_radiograph_readable(index: int, tmp_path: Path) -> None:
    """Band below the film with legend and caution line; most of the radiograph's pixels unchanged."""
    from dicomnode.report.key_image import _downscale

    source = _radiographs()[index]
    identity = ModelIdentity("pneumonia-xception", "0.3.0", "Pneumonia Xception", not_for_clinical_use=True)
    image = image_findings(source, label(PNEUMONIA, 0.9996))
    findings = StudyFindings(source.StudyInstanceUID, identity, (image,), study_level([image]))
    grey = display_image(source)
    key = build_key_image(findings, image, source, grey, _gradcam_like(*grey.shape))
    path = save(key, tmp_path / "key.dcm")
    Image.fromarray(pydicom.dcmread(path).pixel_array).save(tmp_path / "key.png")  # to look at
    back = pydicom.dcmread(path)
    film = _downscale(grey, 1024)
    film_rows, columns = film.shape
    assert back.Columns == columns and back.Rows > film_rows + 40  # the band is added, not drawn over
    pixels = back.pixel_array.astype(int)
    unchanged = (pixels[:film_rows] == film[:, :, np.newaxis]).all(axis=-1).mean()
    assert unchanged > 0.6, f"{1 - unchanged:.0%} of the radiograph's pixels are tinted"
    band = pixels[film_rows:]
    coloured = np.abs(band[..., 0] - band[..., 2]) > 100  # the colour bar: red and blue ends differ
    assert coloured.sum() > 10 * columns // 4
    assert (band == 255).all(axis=-1).sum() > 200  # the text
    assert "99.9 %" in back.ImageComments and "100" not in back.ImageComments.split("%")[0]
    assert "not verified" in back.ImageComments and "not for clinical use" in back.ImageComments
    dciodvfy = _tool("dciodvfy")
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []


def test_key_image_omits_the_clinical_warning_only_when_the_card_allows() -> None:
    """ "not for clinical use" follows the model card's flag; "not verified" is always there."""
    from dicomnode.report.key_image import caution_text

    assert caution_text(MODEL) == "AI result — not verified — not for clinical use"  # defaulted True
    cleared = ModelIdentity("m", "1", "M", not_for_clinical_use=False)
    assert caution_text(cleared) == "AI result — not verified"


def test_shown_percent_never_reads_0_or_100() -> None:
    """One rounding for SR, key image and infer: one decimal, clamped to 0.1..99.9."""
    from dicomnode.findings import display_percent, format_percent

    assert format_percent(0.999) == "99.9 %"
    assert format_percent(0.9996) == "99.9 %" and format_percent(1.0) == "99.9 %"
    assert format_percent(0.0) == "0.1 %" and format_percent(0.0004) == "0.1 %"
    assert format_percent(0.873) == "87.3 %" and display_percent(0.5) == 50.0


def test_key_object_selection_flags_sr_and_key_image(tmp_path: Path) -> None:
    """The KOS references the SR and the key image, in the same study and character set, stable UIDs."""
    source = with_patient_name_from("chrX2.dcm")
    findings = study(image_findings(source, label(PNEUMONIA, 0.7)), uid=source.StudyInstanceUID)
    sr = pydicom.dcmread(save(build_sr(findings, [source]), tmp_path / "sr.dcm"))
    key = build_key_image(findings, findings.images[0], source, np.zeros((32, 32), np.uint8), None)
    key = pydicom.dcmread(save(key, tmp_path / "key.dcm"))
    kos = pydicom.dcmread(save(build_key_object_selection(findings, [sr, key]), tmp_path / "kos.dcm"))
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert kos.StudyInstanceUID == source.StudyInstanceUID
    assert kos.SpecificCharacterSet == "GB18030" and kos.PatientName == source.PatientName
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    assert referenced == {sr.SOPInstanceUID, key.SOPInstanceUID}
    assert build_key_object_selection(findings, [sr, key]).SOPInstanceUID == kos.SOPInstanceUID


def test_heatmap_blend_equals_the_colormap_formula() -> None:
    """Blending above half the map's maximum, through the colormap's table, equals the full formula."""
    import matplotlib

    rng = np.random.default_rng(7)
    heat = np.clip(rng.normal(0.4, 0.3, (40, 50)), 0, 1).astype(np.float32)
    heat[0, 0], heat[0, 1] = 1.0, 0.0
    grey = rng.integers(0, 256, (80, 100), dtype=np.uint8)
    colour = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)

    def reference(rgb: np.ndarray) -> np.ndarray:
        big = np.asarray(Image.fromarray(heat, mode="F").resize((100, 80), Image.Resampling.BILINEAR))
        big = np.clip(big, 0.0, 1.0)
        colours = matplotlib.colormaps["jet"](big)[:, :, :3] * 255.0
        big = big / big.max()
        alpha = np.clip((big - 0.5) / (1.0 - 0.5), 0.0, 1.0)[:, :, np.newaxis] * 0.45
        return np.clip(np.rint(rgb.astype(np.float32) * (1.0 - alpha) + colours * alpha), 0, 255).astype(
            np.uint8
        )

    grey_rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    assert np.array_equal(blend_heatmap(grey_rgb, heat, grey), reference(grey_rgb))
    assert np.array_equal(blend_heatmap(grey_rgb, heat), reference(grey_rgb))
    assert np.array_equal(blend_heatmap(colour, heat), reference(colour))
    assert np.array_equal(blend_heatmap(colour, np.zeros((4, 4), np.float32)), colour)


def test_result_bundle_builds_sr_key_image_and_kos(tmp_path: Path) -> None:
    """The worker's one-call builder (also run in a report process) encodes SR, key image, KOS."""
    source = rg1()
    findings = study(image_findings(source, label(PNEUMONIA, 0.87)), uid=source.StudyInstanceUID)
    heat = np.zeros((64, 64), np.float32)
    heat[40:56, 8:24] = 1.0
    encoded = build_result_objects(findings, [source], [KeyImageInput(0, display_image(source), heat)])
    assert [obj.kind for obj in encoded] == ["sr", "key-image", "kos"]
    back = [pydicom.dcmread(io.BytesIO(obj.data)) for obj in encoded]
    for obj, ds in zip(encoded, back, strict=True):
        assert ds.SOPInstanceUID == obj.sop_instance_uid and ds.SOPClassUID == obj.sop_class_uid
        assert ds.SeriesInstanceUID == obj.series_instance_uid
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientName == source.PatientName
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in back[2].ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    assert referenced == {back[0].SOPInstanceUID, back[1].SOPInstanceUID}
    assert (
        back[1].SOPInstanceUID
        == build_key_image(findings, findings.images[0], source, display_image(source), heat).SOPInstanceUID
    )


# --- validators -----------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sources and results written once for all validator tests: RG1, two views, Japanese names."""
    if len(PNEUMONIA_JPEGS) < 2:
        pytest.skip("pneumonia_model_package is not installed")
    folder = tmp_path_factory.mktemp("validators")
    files: dict[str, Path] = {}
    source = rg1()
    findings = study(image_findings(source, label(PNEUMONIA, 0.8734)), uid=source.StudyInstanceUID)
    files["rg1"] = save(source, folder / "rg1.dcm")
    files["rg1_sr"] = save(build_sr(findings, [source]), folder / "rg1_sr.dcm")
    heat = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    key = build_key_image(findings, findings.images[0], source, display_image(source), heat)
    files["rg1_key"] = save(key, folder / "rg1_key.dcm")

    pa = wrap_jpeg(PNEUMONIA_JPEGS[0], study=None, view="PA", instance=1)
    ap = wrap_jpeg(PNEUMONIA_JPEGS[1], study=pa, view="AP", instance=2)
    views = study(
        image_findings(pa, label(PNEUMONIA, 0.91), label(EFFUSION, 0.12)),
        image_findings(ap, label(PNEUMONIA, 0.42), label(EFFUSION, 0.05)),
        uid=pa.StudyInstanceUID,
    )
    files["pa"] = save(pa, folder / "pa.dcm")
    files["ap"] = save(ap, folder / "ap.dcm")
    files["views_sr"] = save(build_sr(views, [pa, ap]), folder / "views_sr.dcm")
    files["pa_key"] = save(
        build_key_image(views, views.images[0], pa, display_image(pa), None), folder / "pa_key.dcm"
    )
    sr_and_key = [pydicom.dcmread(files["views_sr"]), pydicom.dcmread(files["pa_key"])]
    files["views_kos"] = save(build_key_object_selection(views, sr_and_key), folder / "views_kos.dcm")

    japanese = with_patient_name_from("chrH31.dcm")
    jp_findings = study(image_findings(japanese, label(PNEUMONIA, 0.2)), uid=japanese.StudyInstanceUID)
    files["jp_sr"] = save(build_sr(jp_findings, [japanese]), folder / "jp_sr.dcm")
    return files


def test_dciodvfy_finds_no_errors(written: dict[str, Path]) -> None:
    """dicom3tools' IOD validator reports no Error lines for any SR or key image."""
    dciodvfy = _tool("dciodvfy")
    for name in ("rg1_sr", "views_sr", "jp_sr", "rg1_key", "pa_key", "views_kos"):
        run = subprocess.run([dciodvfy, str(written[name])], capture_output=True, text=True, timeout=60)
        assert _error_lines(run.stdout + run.stderr) == [], name


def test_dcentvfy_finds_sources_and_results_consistent(written: dict[str, Path]) -> None:
    """dicom3tools' entity checker sees the same patient and study in sources and results."""
    dcentvfy = _tool("dcentvfy")
    for group in (("rg1", "rg1_sr", "rg1_key"), ("pa", "ap", "views_sr", "pa_key", "views_kos")):
        run = subprocess.run(
            [dcentvfy, *(str(written[n]) for n in group)], capture_output=True, text=True, timeout=60
        )
        assert _error_lines(run.stdout + run.stderr) == [], group


@pytest.mark.slow
def test_pixelmed_sr_validator_finds_no_errors(written: dict[str, Path], tmp_path: Path) -> None:
    """PixelMed's SR validator (IOD, TID 1500 / TID 2010 templates) finds no errors in the SRs and the KOS."""
    java = _tool("java")
    if not PIXELMED_JAR.exists():
        pytest.skip("pixelmed.jar is not installed")
    (tmp_path / "SRBatch.java").write_text(SR_BATCH_JAVA)
    names = ("rg1_sr", "views_sr", "jp_sr", "views_kos")
    run = subprocess.run(
        [java, *JAVA_OPTS, "-cp", str(PIXELMED_JAR), str(tmp_path / "SRBatch.java")]
        + [str(written[n]) for n in names],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-2000:]
    assert output.count("IOD validation complete") == len(names), output[-2000:]
    assert "Found Root Template TID_1500" in output
    assert _error_lines(output) == []


def test_dsr2html_renders_finding_certainty_and_algorithm(written: dict[str, Path], tmp_path: Path) -> None:
    """dcmtk renders the finding, "Certainty of Finding" with its percentage and the algorithm name."""
    dsr2html = _tool("dsr2html")
    html = tmp_path / "sr.html"
    subprocess.run([dsr2html, str(written["rg1_sr"]), str(html)], check=True, capture_output=True, timeout=60)
    text = " ".join(re.sub(r"<[^>]+>", " ", html.read_text(errors="replace")).split())
    assert "Pneumonia" in text
    assert "Certainty of Finding: 87.3 %" in text
    assert 'Algorithm Name = "pneumonia-xception"' in text
    assert "Present" in text
    assert "UNVERIFIED" in text
