"""End to end: modality (dcmtk storescu) -> ``dicomnode serve`` (its own process) -> Orthanc.

Real chest radiographs go in over DICOM in several transfer syntaxes and character sets; the test
waits until Orthanc holds the TID 1500 SR and the key image of every study, reads them back from
Orthanc and checks them against what ``dicomnode infer`` says about the same files. Also: a CT no
model applies to, the PACS being down while results are due, and a model that crashes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from corpus import find, pneumonia_images_dir
from e2e_helpers import (
    COMPREHENSIVE_3D_SR,
    PATIENT_NAMES,
    PNEUMONIA_CODE,
    SECONDARY_CAPTURE,
    NodeProcess,
    Source,
    dciodvfy_errors,
    japanese_patient_name,
    orthanc_download_study,
    orthanc_modalities,
    raw_patient_name,
    reference_probabilities,
    send_by_syntax,
    storescu,
    study_entry,
    wait_for,
    wait_for_results,
    wrap_radiograph,
    write_broken_model,
    write_node_config,
)
from peers import OrthancPeer, start_orthanc
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SYNTAXES = [JPEGBaseline8Bit, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless]
CRASH_AE = "CRASHER"
BROKEN_MODEL = "broken-model"
RESULT_TIMEOUT = 150.0  # 17 studies through one CPU worker on a 2-core CI machine


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model installed once per session, plus a model whose forward always raises."""
    if importlib.util.find_spec("pneumonia_model_package") is None:  # installed --no-deps: never import it
        pytest.skip("pneumonia_model_package is not installed")
    from dicomnode.lifecycle.install import install_default_model

    root = tmp_path_factory.mktemp("models")
    install_default_model(root, pip_install=False)
    write_broken_model(root / BROKEN_MODEL)
    return root


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    if shutil.which("storescu") is None or shutil.which("dciodvfy") is None:
        pytest.skip("dcmtk storescu and dicom3tools dciodvfy are needed")
    peer = start_orthanc(tmp_path_factory.mktemp("pacs"))
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, orthanc: OrthancPeer
) -> Iterator[NodeProcess]:
    """``dicomnode serve`` as a subprocess, Orthanc its destination; must exit 0 on SIGTERM."""
    workdir = tmp_path_factory.mktemp("node")
    config = write_node_config(
        workdir / "config.toml",
        models_dir=models_dir,
        destination_ae=orthanc.aet,
        destination_port=orthanc.dicom_port,
        extra_routes=[{"name": "crash-test", "model": BROKEN_MODEL, "calling_ae_title": [CRASH_AE]}],
    )
    process = NodeProcess(config)
    process.start()
    yield process
    code = process.stop()
    assert code == 0, f"dicomnode serve exited with {code}\n{process.log_tail()}"


@contextlib.contextmanager
def node_log_on_failure(node: NodeProcess) -> Iterator[None]:
    """Re-raise a failure with the tail of the node's log attached."""
    try:
        yield
    except BaseException as exc:
        raise AssertionError(
            f"{type(exc).__name__}: {exc}\n--- node log tail ---\n{node.log_tail()}"
        ) from exc


def read_results(orthanc: OrthancPeer, source: Source, out_dir: Path) -> tuple[Path, list[Path]]:
    """The SR and the key images Orthanc holds for the source's study."""
    files = orthanc_download_study(orthanc, source.study_instance_uid, out_dir / source.study_instance_uid)
    by_class: dict[str, list[Path]] = {}
    for path in files:
        sop_class = str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)
        by_class.setdefault(sop_class, []).append(path)
    srs = by_class.get(COMPREHENSIVE_3D_SR, [])
    assert len(srs) == 1, f"study {source.study_instance_uid}: {len(srs)} SRs in Orthanc"
    return srs[0], by_class.get(SECONDARY_CAPTURE, [])


def character_set(ds: pydicom.Dataset) -> list[str]:
    """Specific Character Set as a list; absent and empty both mean the default repertoire."""
    value = ds.get("SpecificCharacterSet", "")
    values = [value] if isinstance(value, str) else list(value)
    return values if values != [""] else []


def pneumonia_certainty(sr_path: Path, source: Source) -> tuple[float, bool]:
    """Certainty of Finding (%) and Present/Absent of the pneumonia group for the source image."""
    sr = hd.sr.srread(sr_path)
    assert sr.VerificationFlag == "UNVERIFIED"
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = [
        g
        for g in report.get_image_measurement_groups()
        if g.finding_type is not None and g.finding_type.value == PNEUMONIA_CODE
    ]
    assert len(groups) == 1, f"{len(groups)} pneumonia groups"
    group = groups[0]
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in group.source_images}
    assert referenced == {source.sop_instance_uid}
    certainty = [m for m in group.get_measurements() if m.name.value == "111012"]
    assert len(certainty) == 1 and certainty[0].unit.value == "%"
    evaluation = [q for q in group.get_qualitative_evaluations() if q.name.value == PNEUMONIA_CODE]
    assert len(evaluation) == 1
    decision = evaluation[0].value
    assert isinstance(decision, hd.sr.CodedConcept)
    assert decision.value in ("52101004", "272519000")  # SCT Present / Absent
    return float(certainty[0].value), decision.value == "52101004"


def make_radiographs(out_dir: Path) -> list[Source]:
    """The 16 labelled JPEGs as DX studies: four transfer syntaxes, ASCII/UTF-8/ISO 2022 names."""
    jpegs = sorted(pneumonia_images_dir().glob("*.jpeg"))
    assert len(jpegs) == 16
    sources = []
    for index, jpeg in enumerate(jpegs):
        if index == 0:
            charset: str | list[str] = ["", "ISO 2022 IR 87"]
            name = japanese_patient_name()
        else:
            charset, name = PATIENT_NAMES[index % len(PATIENT_NAMES)]
        sources.append(
            wrap_radiograph(
                jpeg,
                out_dir / f"{index:02d}.dcm",
                SYNTAXES[index % len(SYNTAXES)],
                character_set=charset,
                patient_name=name,
                patient_id=f"E2E-{index:04d}",
            )
        )
    return sources


def adult_chest_cr(out_dir: Path) -> Source:
    """pydicom-data's RG1_UNCR.dcm: a real adult chest CR (MONOCHROME1), as stored."""
    path = shutil.copy(find("RG1_UNCR.dcm"), out_dir / "RG1_UNCR.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Source(
        Path(path),
        str(ds.StudyInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
        None,
    )


def not_analysed_outside_intended_use(sr: pydicom.Dataset) -> bool:
    """Whether the SR says "not analysed: outside the model's intended use" and holds no pneumonia group."""
    from dicomnode.report.sr import NOT_ANALYSED_INTENDED_USE

    def walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
        for item in ds.get("ContentSequence", []):
            yield item
            yield from walk(item)

    values = [str(i.ConceptCodeSequence[0].CodeValue) for i in walk(sr) if "ConceptCodeSequence" in i]
    return NOT_ANALYSED_INTENDED_USE.value in values and PNEUMONIA_CODE not in values


def test_chest_radiographs_come_back_as_sr_and_key_image(
    node: NodeProcess, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    sources = make_radiographs(tmp_path / "modality")
    cr = adult_chest_cr(tmp_path / "modality")
    with node_log_on_failure(node):
        started = time.monotonic()
        send_by_syntax([*sources, cr], node.port, node.ae_title)
        sent = time.monotonic()
        # the adult is outside the default model's intended population (1-6 years): not analysed
        reference = reference_probabilities(node, [s.path for s in sources])
        inferred = time.monotonic()
        wait_for_results(orthanc, [s.study_instance_uid for s in [*sources, cr]], RESULT_TIMEOUT)
        print(
            f"\nsent 17 studies in {sent - started:.1f} s; dicomnode infer took {inferred - sent:.1f} s; "
            f"all results in Orthanc {time.monotonic() - started:.1f} s after the first send"
        )

        correct = 0
        for source in [*sources, cr]:
            sr_path, key_images = read_results(orthanc, source, tmp_path / "pacs")
            sr = pydicom.dcmread(sr_path)
            assert sr.StudyInstanceUID == source.study_instance_uid
            assert sr.Modality == "SR"
            assert raw_patient_name(sr_path) == raw_patient_name(source.path), source.path.name
            assert character_set(sr) == character_set(pydicom.dcmread(source.path, stop_before_pixels=True))
            assert dciodvfy_errors(sr_path) == []
            if source is cr:
                assert not_analysed_outside_intended_use(sr)
                present = False
            else:
                percent, present = pneumonia_certainty(sr_path, source)
                probability = reference[source.path]
                assert abs(percent - 100.0 * probability) <= 0.1, (source.path.name, percent, probability)
                assert present == (probability >= 0.5)

            assert len(key_images) == 1
            key = pydicom.dcmread(key_images[0], stop_before_pixels=True)
            assert key.BurnedInAnnotation == "YES"
            assert key.StudyInstanceUID == source.study_instance_uid
            assert raw_patient_name(key_images[0]) == raw_patient_name(source.path)
            assert dciodvfy_errors(key_images[0]) == []
            if source.pneumonia is not None:
                correct += int(present == source.pneumonia)

    # no patient data in the node's log: names, IDs, birth dates and accession numbers never appear
    log = node.log_path.read_bytes().decode("utf-8", errors="replace")
    for source in [*sources, cr]:
        header = pydicom.dcmread(source.path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(header.get(keyword, "") or "").strip()
            if len(value) >= 4:  # shorter values ("M", "1") would match unrelated text
                assert value not in log, f"{keyword} of {source.path.name} appears in the node's log"
            for part in value.split("^"):
                if len(part) >= 4:
                    assert part not in log, f"part of {keyword} of {source.path.name} appears in the log"

    labelled = [s for s in sources if s.pneumonia is not None]
    accuracy = correct / len(labelled)
    print(
        f"\nend-to-end accuracy on the {len(labelled)} labelled radiographs (SRs read from Orthanc): "
        f"{correct}/{len(labelled)} = {accuracy:.4f}"
    )
    assert accuracy >= 0.5  # a sanity floor: the converted model scores ~0.8 here


def test_ct_gets_no_model_and_nothing_is_sent(
    node: NodeProcess, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    ct = Path(shutil.copy(find("CT_small.dcm"), tmp_path / "CT_small.dcm"))
    ds = pydicom.dcmread(ct, stop_before_pixels=True)
    study_uid = str(ds.StudyInstanceUID)
    with node_log_on_failure(node):
        storescu([ct], node.port, node.ae_title)

        def finished() -> dict[str, Any] | None:
            study = study_entry(node, study_uid)
            if study and study["jobs"] and study["jobs"][-1]["outcome"]:
                return study
            return None

        study = wait_for(finished, "a job outcome for the CT study", 60.0, 0.5)
        assert study["jobs"][-1]["outcome"] == "no-model"
        assert study["deliveries"] == []
        [instance] = study["instances"]
        assert instance["sop_instance_uid"] == ds.SOPInstanceUID
        assert instance["transfer_syntax_uid"] == ExplicitVRLittleEndian
        assert Path(instance["path"]).is_file()
        assert pydicom.dcmread(instance["path"], stop_before_pixels=True).SOPInstanceUID == ds.SOPInstanceUID
        assert orthanc_modalities(orthanc, study_uid) == set()


def test_results_wait_for_the_pacs_and_arrive_when_it_is_back(
    node: NodeProcess, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    jpeg = sorted(pneumonia_images_dir().glob("person*.jpeg"))[0]
    source = wrap_radiograph(jpeg, tmp_path / "resilience.dcm", ExplicitVRLittleEndian)
    with node_log_on_failure(node):
        orthanc.stop()
        try:
            storescu([source.path], node.port, node.ae_title)

            def pending_and_tried() -> bool:
                study = study_entry(node, source.study_instance_uid)
                rows = study["deliveries"] if study else []
                return (
                    bool(rows)
                    and all(r["state"] == "pending" for r in rows)
                    and any(r["attempts"] >= 1 for r in rows)
                )

            wait_for(pending_and_tried, "failed delivery attempts while Orthanc is down", 90.0, 0.5)
            status = node.cli_json("status", "--json")
            assert status["deliveries"]["pending"] >= 1
            pacs = status["deliveries_by_destination"]["pacs"]  # why, per destination
            assert pacs["counts"]["pending"] >= 1 and pacs["last_error"]
            text = node.cli("status")
            assert text.returncode == 0 and "  pacs: " in text.stdout and "last error:" in text.stdout
        finally:
            orthanc.start()
        wait_for_results(orthanc, [source.study_instance_uid], 60.0)

        def all_delivered() -> dict[str, Any] | None:
            study = study_entry(node, source.study_instance_uid)
            rows = study["deliveries"] if study else []
            return study if rows and all(r["state"] == "delivered" for r in rows) else None

        study = wait_for(all_delivered, "all deliveries marked delivered", 30.0, 0.5)
        assert all(r["destination"] == "pacs" for r in study["deliveries"])


def test_a_crashing_model_fails_only_its_own_job(
    node: NodeProcess, orthanc: OrthancPeer, tmp_path: Path
) -> None:
    jpegs = sorted(pneumonia_images_dir().glob("NORMAL*.jpeg"))
    doomed = wrap_radiograph(jpegs[0], tmp_path / "doomed.dcm", ExplicitVRLittleEndian)
    healthy = wrap_radiograph(jpegs[1], tmp_path / "healthy.dcm", JPEGBaseline8Bit)
    with node_log_on_failure(node):
        storescu([doomed.path], node.port, node.ae_title, calling_ae=CRASH_AE)
        send_by_syntax([healthy], node.port, node.ae_title)

        def failed_with_reason() -> dict[str, Any] | None:
            study = study_entry(node, doomed.study_instance_uid)
            jobs = study["jobs"] if study else []
            return study if any(j["error"] for j in jobs) else None

        study = wait_for(failed_with_reason, "the broken model's job to fail", 90.0, 0.5)
        error = next(j["error"] for j in study["jobs"] if j["error"])
        assert "model failed" in error and "RuntimeError" in error, error
        assert study["deliveries"] == []
        # The listener and the other studies carry on.
        later = wrap_radiograph(jpegs[2], tmp_path / "later.dcm", RLELossless)
        send_by_syntax([later], node.port, node.ae_title)
        wait_for_results(orthanc, [healthy.study_instance_uid, later.study_instance_uid], 90.0)
        assert orthanc_modalities(orthanc, doomed.study_instance_uid) == set()
