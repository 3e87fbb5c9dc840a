"""STOW-RS receive as an operator runs it: ``serve --roles listener,http`` on port 0, dicomweb-client and
curl as the clients, the radiographs of the e2e tests in several transfer syntaxes. After a STOW-RS
request the instances are in the database and the spool, and become jobs, exactly as after C-STORE."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pydicom
import pytest
from conftest import make_config
from corpus import pneumonia_images_dir
from dicomweb_client.api import DICOMwebClient
from e2e_helpers import storescu, wait_for, wrap_radiograph
from factories import ct_like
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from requests.exceptions import HTTPError
from starlette.applications import Starlette
from starlette.routing import Route
from test_http import HttpNode, write_config

from dicomnode.config import load_config
from dicomnode.errors import StorageFullError
from dicomnode.http import multipart as multipart_module
from dicomnode.http.multipart import MultipartError, MultipartReader
from dicomnode.http.stow import StowService
from dicomnode.node.services import Services, open_services
from dicomnode.receive.header import PREAMBLE, file_meta_information, read_part10
from dicomnode.receive.spool import InstanceStore
from dicomnode.status import Status

pytestmark = pytest.mark.timeout(300)

TOKEN = "stow-token-0123456789abcdef"
MAX_REQUEST_MB = 16
SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    JPEG2000Lossless,
)
DICOM_MULTIPART = 'multipart/related; type="application/dicom"; boundary={}'


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpNode]:
    folder = tmp_path_factory.mktemp("stow-node")
    (folder / "token").write_text(TOKEN + "\n", encoding="utf-8")
    http = {"port": 0, "token_file": str(folder / "token"), "stow_max_request_mb": MAX_REQUEST_MB}
    process = HttpNode(write_config(folder, http=http))
    process.start()
    yield process
    process.stop()


def client(node: HttpNode) -> DICOMwebClient:
    return DICOMwebClient(url=node.base_url + "/dicom-web", headers={"Authorization": f"Bearer {TOKEN}"})


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(parts: list[bytes], boundary: str = "stow-boundary-1234") -> bytes:
    """A multipart/related body of application/dicom parts, built by hand."""
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    return body + b"--" + boundary.encode() + b"--\r\n"


def post(
    node: HttpNode, body: bytes | Iterator[bytes], path: str = "/dicom-web/studies", **headers: str
) -> httpx.Response:
    sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": DICOM_MULTIPART.format("stow-boundary-1234")}
    sent.update(headers)
    return httpx.post(node.base_url + path, content=body, headers=sent, timeout=60.0)


def rows(node: HttpNode, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(node.database_path()) as db:
        return db.execute(sql, args).fetchall()


def instance_row(node: HttpNode, sop_instance_uid: str) -> tuple[Any, ...] | None:
    found = rows(
        node,
        "SELECT i.sop_class_uid, s.study_instance_uid, i.series_instance_uid, i.transfer_syntax_uid, i.path,"
        " i.size_bytes, i.modality, i.calling_ae_title FROM instances i JOIN studies s ON s.id = i.study_id"
        " WHERE i.sop_instance_uid = ?",
        sop_instance_uid,
    )
    return found[0] if found else None


def failures(body: dict[str, Any]) -> dict[str, int]:
    """SOP Instance UID (or "" for a part without one) -> Failure Reason, from a STOW-RS response."""
    found = {}
    for item in body.get("00081198", {}).get("Value", []):
        uid = item.get("00081155", {}).get("Value", [""])[0]
        found[uid] = item["00081197"]["Value"][0]
    return found


def stored(body: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in body.get("00081199", {}).get("Value", [])]


def radiographs(folder: Path) -> list[Path]:
    """One chest radiograph per transfer syntax (implicit VR and deflated re-encoded with pydicom)."""
    jpegs = sorted(pneumonia_images_dir().glob("*.jpeg"))
    files = []
    for index, syntax in enumerate(SYNTAXES):
        target = folder / f"{index}.dcm"
        wrapped = JPEGBaseline8Bit if syntax == JPEGBaseline8Bit else ExplicitVRLittleEndian
        compressed = syntax in (JPEGLSLossless, RLELossless, JPEG2000Lossless)
        source = wrap_radiograph(jpegs[index], target, syntax if compressed else wrapped)
        if syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            ds = pydicom.dcmread(source.path)
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(target, enforce_file_format=True)
        files.append(target)
    return files


def test_dicomweb_client_stores_radiographs_in_every_transfer_syntax(node: HttpNode, tmp_path: Path) -> None:
    """One request, seven syntaxes: each instance listed as stored, its row and spool file exactly what
    a C-STORE of the same bytes makes (no calling AE), one job per study, audited, counted."""
    files = radiographs(tmp_path)
    datasets = [pydicom.dcmread(path) for path in files]
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in datasets} == set(SYNTAXES)
    response = client(node).store_instances(datasets)
    assert "FailedSOPSequence" not in response
    assert [str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence] == [
        str(ds.SOPInstanceUID) for ds in datasets
    ]
    for path, ds in zip(files, datasets, strict=True):
        row = instance_row(node, str(ds.SOPInstanceUID))
        assert row is not None, ds.file_meta.TransferSyntaxUID
        sop_class, study, series, syntax, spooled, size, modality, calling_ae = row
        assert (sop_class, study, series) == (ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert (syntax, modality, calling_ae) == (ds.file_meta.TransferSyntaxUID, "DX", None)
        sent = path.read_bytes()
        data_set = sent[read_part10(sent)[1] :]
        meta = file_meta_information(sop_class, ds.SOPInstanceUID, syntax, "")
        on_disk = (node.workdir / "var" / spooled).read_bytes()
        assert on_disk == PREAMBLE + meta + data_set and size == len(on_disk)  # the data set as sent

    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    services = open_services(load_config(node.config_path))

    def jobs_made() -> bool:  # what a worker pass does: every quiet study becomes a job
        services.queue.assemble_stable_studies(0.5, 3)
        jobs = rows(node, "SELECT s.study_instance_uid FROM jobs j JOIN studies s ON s.id = j.study_id")
        return studies <= {uid for (uid,) in jobs}

    try:
        wait_for(lambda: jobs_made() or None, "a job for every study", 20.0)
    finally:
        services.close()

    audit_log = node.workdir / "var" / "audit" / "audit.xml.log"
    text = wait_for(lambda: (audit_log.exists() and audit_log.read_text()) or None, "audit file", 10.0)
    assert all(uid in text for uid in studies)
    counted = 'calling_ae_title="STOW-RS",status="SUCCESS"'
    wait_for(lambda: counted in node.get("/metrics", token=TOKEN).text, "the STOW-RS reception metric", 10.0)


def test_curl_posts_a_hand_built_multipart_body(node: HttpNode, tmp_path: Path) -> None:
    """curl with a body built by hand: 200, application/dicom+json naming the instance."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    ds = ct_like(generate_uid(), generate_uid(), 0)
    (tmp_path / "body").write_bytes(multipart([encoded(ds)], "curl-boundary"))
    result = subprocess.run(
        [
            "curl", "-sS", "-o", str(tmp_path / "out.json"), "-w", "%{http_code} %{content_type}",
            "-H", f"Authorization: Bearer {TOKEN}",
            "-H", 'Content-Type: multipart/related; type="application/dicom"; boundary=curl-boundary',
            "--data-binary", f"@{tmp_path / 'body'}",
            node.base_url + "/dicom-web/studies",
        ],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert result.stdout == "200 application/dicom+json"
    body = json.loads((tmp_path / "out.json").read_text())
    assert stored(body) == [ds.SOPInstanceUID] and not failures(body)
    assert body["00081199"]["Value"][0]["00081150"]["Value"] == [ds.SOPClassUID]
    assert instance_row(node, ds.SOPInstanceUID) is not None


def test_bad_parts_fail_with_a_reason_while_the_good_ones_are_stored(node: HttpNode) -> None:
    """202: garbage (0xC000), no SOP Instance UID (0xC001), a SOP class that is not storage (0x0122),
    a class differing from its File Meta (0xA900), a transfer syntax not accepted (0xC122); the good
    parts around them are stored."""
    study = generate_uid()
    good = [ct_like(study, generate_uid(), i) for i in range(2)]
    missing_uid = ct_like(study, generate_uid(), 2)
    del missing_uid.SOPInstanceUID
    not_storage = ct_like(study, generate_uid(), 3)
    not_storage.SOPClassUID = not_storage.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.1"
    mismatched = ct_like(study, generate_uid(), 4)
    # pydicom writes the File Meta's class from the data set's: patch it to MR (the same length)
    mismatched_bytes = encoded(mismatched).replace(CTImageStorage.encode(), MRImageStorage.encode(), 1)
    unknown_syntax = ct_like(study, generate_uid(), 5)  # a made-up syntax UID as long as explicit VR LE's
    unknown_bytes = encoded(unknown_syntax).replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.99999.1.2.1\x00", 1)
    parts = [
        encoded(good[0]),
        unknown_bytes,
        b"this is not DICOM at all",
        encoded(missing_uid),
        encoded(not_storage),
        mismatched_bytes,
        encoded(good[1]),
    ]
    response = post(node, multipart(parts))
    assert response.status_code == 202, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body = response.json()
    assert stored(body) == [good[0].SOPInstanceUID, good[1].SOPInstanceUID]
    reasons = failures(body)
    assert reasons[""] == Status.CANNOT_UNDERSTAND
    assert reasons[missing_uid.file_meta.MediaStorageSOPInstanceUID] == Status.CANNOT_UNDERSTAND_MISSING_UID
    assert reasons[not_storage.SOPInstanceUID] == Status.SOP_CLASS_NOT_SUPPORTED
    assert reasons[mismatched.SOPInstanceUID] == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert reasons[unknown_syntax.SOPInstanceUID] == Status.REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED
    assert len(reasons) == 5
    assert all(instance_row(node, ds.SOPInstanceUID) for ds in good)
    assert instance_row(node, not_storage.SOPInstanceUID) is None
    assert instance_row(node, mismatched.SOPInstanceUID) is None


def test_a_client_asking_for_xml_gets_the_native_dicom_model(node: HttpNode) -> None:
    """Accept: application/dicom+xml gets the same answer as PS3.19 XML in its namespace: what was
    stored in the Referenced SOP Sequence, each failure with its Failure Reason; our own STOW-RS
    user agent reads it back to the same outcome."""
    import xml.etree.ElementTree as ET

    from dicomnode.deliver.stow import parse_response

    study = generate_uid()
    good = ct_like(study, generate_uid(), 0)
    missing_uid = ct_like(study, generate_uid(), 1)
    del missing_uid.SOPInstanceUID
    body = multipart([encoded(good), encoded(missing_uid)])
    response = post(node, body, Accept="application/dicom+xml")
    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/dicom+xml")
    root = ET.fromstring(response.content)
    namespace = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
    assert root.tag == f"{namespace}NativeDicomModel"
    failed = root.find(f"{namespace}DicomAttribute[@tag='00081198']")
    assert failed is not None and failed.get("vr") == "SQ" and failed.get("keyword") == "FailedSOPSequence"
    reason = failed.find(f"{namespace}Item/{namespace}DicomAttribute[@tag='00081197']/{namespace}Value")
    assert reason is not None and int(reason.text or "") == Status.CANNOT_UNDERSTAND_MISSING_UID
    parsed = parse_response(response.content, response.headers["content-type"])
    assert parsed.stored == {good.SOPInstanceUID: None}
    assert parsed.failed == {
        missing_uid.file_meta.MediaStorageSOPInstanceUID: Status.CANNOT_UNDERSTAND_MISSING_UID
    }
    # JSON stays the default, and wins a tie or a wildcard
    for accept in ("application/dicom+json", "*/*", "application/dicom+xml;q=0.5, application/dicom+json"):
        resent = post(node, body, Accept=accept)
        assert resent.headers["content-type"] == "application/dicom+json", accept


def test_the_accept_header_picks_xml_only_when_it_ranks_it_first() -> None:
    from dicomnode.http.dicom_xml import prefers_xml

    assert prefers_xml("application/dicom+xml")
    assert prefers_xml("application/dicom+xml, application/dicom+json;q=0.5")
    assert prefers_xml("application/dicom+xml;q=0.9, */*;q=0.1")
    assert not prefers_xml(None) and not prefers_xml("") and not prefers_xml("*/*")
    assert not prefers_xml("application/dicom+json, application/dicom+xml")  # a tie: JSON
    assert not prefers_xml("application/dicom+xml;q=bad")
    assert not prefers_xml("application/dicom+xml;q=0.2, application/*")


def test_every_part_failing_is_409(node: HttpNode) -> None:
    response = post(node, multipart([b"garbage one", b"garbage two"]))
    assert response.status_code == 409
    assert list(failures(response.json()).values()) == [Status.CANNOT_UNDERSTAND]  # both have no UID


def test_posting_to_a_study_requires_every_instance_to_be_of_it(node: HttpNode) -> None:
    """POST /dicom-web/studies/{study}: an instance of another study fails (0xC002), the rest stored."""
    study = generate_uid()
    mine, other = ct_like(study, generate_uid(), 0), ct_like(generate_uid(), generate_uid(), 1)
    response = post(node, multipart([encoded(mine), encoded(other)]), f"/dicom-web/studies/{study}")
    assert response.status_code == 202
    assert stored(response.json()) == [mine.SOPInstanceUID]
    assert failures(response.json()) == {other.SOPInstanceUID: Status.CANNOT_UNDERSTAND_UID_MISMATCH}
    assert instance_row(node, other.SOPInstanceUID) is None
    assert post(node, multipart([encoded(mine)]), "/dicom-web/studies/not-a-uid").status_code == 400


def test_duplicates_behave_like_c_store_duplicates(node: HttpNode, tmp_path: Path) -> None:
    """A resend (by STOW-RS or by C-STORE) is stored again as success with no second row and the first
    file kept; the same SOP Instance UID under another study is refused with 0xC003, as by C-STORE."""
    ds = ct_like(generate_uid(), generate_uid(), 0)
    assert post(node, multipart([encoded(ds)])).status_code == 200
    path = node.workdir / "var" / str(instance_row(node, ds.SOPInstanceUID)[4])  # type: ignore[index]
    first = path.stat().st_mtime_ns
    again = post(node, multipart([encoded(ds)]))
    assert again.status_code == 200 and stored(again.json()) == [ds.SOPInstanceUID]
    storescu([ct_file(ds, tmp_path)], node.port, node.ae_title)  # C-STORE of the same instance: success
    assert rows(node, "SELECT count(*) FROM instances WHERE sop_instance_uid = ?", ds.SOPInstanceUID) == [
        (1,)
    ]
    assert path.stat().st_mtime_ns == first

    moved = ct_like(generate_uid(), generate_uid(), 0, sop_instance_uid=ds.SOPInstanceUID)
    response = post(node, multipart([encoded(moved)]))
    assert response.status_code == 409
    assert failures(response.json()) == {ds.SOPInstanceUID: Status.CANNOT_UNDERSTAND_INSTANCE_CONFLICT}
    assert instance_row(node, ds.SOPInstanceUID)[1] == ds.StudyInstanceUID  # type: ignore[index]
    assert not list((node.workdir / "var" / "instances" / moved.StudyInstanceUID).rglob("*.dcm"))


def ct_file(ds: Dataset, folder: Path) -> Path:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_request_level_refusals(node: HttpNode) -> None:
    """415 for another media type, 400 without a boundary, without parts or cut short, 401 without the
    token; a GET is not STOW-RS (405)."""
    ds = ct_like(generate_uid(), generate_uid(), 0)
    body = multipart([encoded(ds)])
    assert post(node, body, **{"Content-Type": "application/dicom"}).status_code == 415
    json_parts = 'multipart/related; type="application/dicom+json"; boundary=stow-boundary-1234'
    assert post(node, body, **{"Content-Type": json_parts}).status_code == 415
    no_boundary = 'multipart/related; type="application/dicom"'
    assert post(node, body, **{"Content-Type": no_boundary}).status_code == 400
    assert post(node, b"--stow-boundary-1234--\r\n").status_code == 400
    assert post(node, body[:-40]).status_code == 400  # no closing boundary
    assert post(node, body, Authorization="").status_code == 401
    assert post(node, body, Authorization="Bearer wrong-token-0123456789").status_code == 401
    assert (
        httpx.get(
            node.base_url + "/dicom-web/studies", headers={"Authorization": f"Bearer {TOKEN}"}
        ).status_code
        == 405
    )
    assert instance_row(node, ds.SOPInstanceUID) is None


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
def test_an_oversize_request_is_413_and_leaves_nothing(node: HttpNode, announced: bool) -> None:
    """A request over http.stow_max_request_mb: 413, whether its length was announced or not; the small
    valid instance before the big part is not stored, and no spooled part remains."""
    ds = ct_like(generate_uid(), generate_uid(), 0)
    big = bytes(1024 * 1024)
    parts = [encoded(ds), big * (MAX_REQUEST_MB + 1)]
    body = multipart(parts)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    try:
        response = post(node, body if announced else chunks())
        assert response.status_code == 413
    except httpx.TransportError:  # the server may close before the whole body was sent
        assert not announced
    assert instance_row(node, ds.SOPInstanceUID) is None
    assert not (node.workdir / "var" / "instances" / ds.StudyInstanceUID).exists()
    leftovers = [p for p in (node.workdir / "var").iterdir() if p.name.startswith("tmp")]
    assert not leftovers
    assert "HTTP 413" in wait_for(lambda: "HTTP 413" in node.log_tail() and node.log_tail(), "log", 10.0)


def test_below_the_free_space_floor_every_instance_is_refused_with_0xa700_and_503(
    tmp_path: Path,
) -> None:
    """The listener's reservation against node.min_free_disk_mb applies to STOW-RS: 0xA700 per
    instance, and 503 with Retry-After when nothing could be stored for want of space."""
    (tmp_path / "token").write_text(TOKEN + "\n", encoding="utf-8")
    path = write_config(tmp_path, http={"port": 0, "token_file": str(tmp_path / "token")})
    floor = shutil.disk_usage(tmp_path).free // 2**20 + 10_000
    path.write_text(path.read_text().replace("min_free_disk_mb = 0", f"min_free_disk_mb = {floor}"))
    full = HttpNode(path)
    full.start()
    try:
        ds = ct_like(generate_uid(), generate_uid(), 0)
        response = post(full, multipart([encoded(ds)]))
        assert response.status_code == 503 and response.headers["retry-after"]
        assert failures(response.json()) == {ds.SOPInstanceUID: Status.OUT_OF_RESOURCES}
        assert instance_row(full, ds.SOPInstanceUID) is None
    finally:
        full.stop()


def test_multipart_reader_fed_byte_by_byte(tmp_path: Path) -> None:
    """The reader finds every part whatever the chunking; no boundary in a part's bytes is missed."""
    parts = [b"", b"\r\n--not-the-boundary\r\n", bytes(range(256)) * 100]
    body = b"preamble\r\n" + multipart(parts, "b1") + b"epilogue"
    for size in (1, 7, 4096):
        reader = MultipartReader("b1", tmp_path)
        for start in range(0, len(body), size):
            reader.feed(body[start : start + size])
        found = reader.finish()
        assert [p.headers["content-type"] for p in found] == ["application/dicom"] * 3
        for part, expected in zip(found, parts, strict=True):
            with part.view() as view:
                assert bytes(view) == expected
        reader.close()
    cut = MultipartReader("b1", tmp_path)
    cut.feed(multipart(parts, "b1")[:-10])
    with pytest.raises(MultipartError):
        cut.finish()
    huge_headers = MultipartReader("b1", tmp_path)
    with pytest.raises(MultipartError):
        huge_headers.feed(b"--b1\r\nX: " + b"a" * 20000)


def test_multipart_reader_spools_a_large_part_to_an_unnamed_file(tmp_path: Path) -> None:
    """A part over 8 MiB goes to a temporary file that has no name in the folder."""
    payload = uuid.uuid4().bytes * (9 * 1024 * 1024 // 16)
    reader = MultipartReader("b2", tmp_path)
    body = multipart([payload], "b2")
    for start in range(0, len(body), 1024 * 1024):
        reader.feed(body[start : start + 1024 * 1024])
    (part,) = reader.finish()
    assert part.on_disk and reader.disk_bytes == len(payload) and not list(tmp_path.iterdir())
    with part.view() as view:
        assert view[: len(payload)] == payload
    reader.close()


def test_multipart_reader_keeps_only_so_much_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small parts stay in memory only while all of them together fit the request's memory budget."""
    monkeypatch.setattr(multipart_module, "MEMORY_REQUEST_BYTES", 2500)
    reader = MultipartReader("b3", tmp_path)
    reader.feed(multipart([bytes(1000)] * 4, "b3"))
    assert [part.on_disk for part in reader.finish()] == [False, False, True, True]
    assert reader.memory_bytes == 2000 and reader.disk_bytes == 2000
    reader.close()


def test_multipart_reader_refuses_more_parts_than_its_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny parts cannot pile up (memory, open temporary files, quadratic bookkeeping): a cap per request."""
    monkeypatch.setattr(multipart_module, "MAX_PARTS", 3)
    reader = MultipartReader("b4", tmp_path)
    reader.feed(multipart([b"x"] * 3, "b4"))
    assert len(reader.finish()) == 3
    reader.close()
    reader = MultipartReader("b4", tmp_path)
    with pytest.raises(MultipartError, match="more than 3 parts"):
        reader.feed(multipart([b"x"] * 4, "b4"))
    reader.close()


def test_dicomweb_client_posting_to_a_study(node: HttpNode) -> None:
    """store_instances(study_instance_uid=...) posts to /studies/{study}: stored when the instance is of
    it; HTTP 409 (an HTTPError in dicomweb-client) when it is not."""
    study = generate_uid()
    mine = ct_like(study, generate_uid(), 0)
    response = client(node).store_instances([mine], study_instance_uid=study)
    assert [str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence] == [
        mine.SOPInstanceUID
    ]
    other = ct_like(generate_uid(), generate_uid(), 0)
    with pytest.raises(HTTPError) as raised:
        client(node).store_instances([other], study_instance_uid=study)
    assert raised.value.response is not None and raised.value.response.status_code == 409
    assert failures(raised.value.response.json()) == {
        other.SOPInstanceUID: Status.CANNOT_UNDERSTAND_UID_MISMATCH
    }
    assert instance_row(node, mine.SOPInstanceUID) and not instance_row(node, other.SOPInstanceUID)


class FailingFlushStore(InstanceStore):
    """A real spool whose flush fails, as syncfs does when the disk reports an error."""

    def flush(self) -> None:
        raise StorageFullError("cannot flush the spool to disk: OS error 5")


def test_a_failed_flush_lists_no_instance_as_stored(services: Services) -> None:
    """The parts of a request share one flush; when it fails none of them is acknowledged (0xA700,
    503), and a resend after the disk recovered is answered as a duplicate, as for C-STORE."""
    service = StowService(services.config, services.sessions)
    service._store = FailingFlushStore(services.config.storage.path)
    app = Starlette(routes=[Route("/dicom-web/studies", service.handle, methods=["POST"])])
    datasets = [ct_like(generate_uid(), generate_uid(), i) for i in range(2)]
    headers = {"Content-Type": DICOM_MULTIPART.format("stow-boundary-1234")}
    body = multipart([encoded(d) for d in datasets])

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as http:
            return await http.post("/dicom-web/studies", content=body, headers=headers)

    response = anyio.run(send)
    assert response.status_code == 503
    assert failures(response.json()) == {d.SOPInstanceUID: Status.OUT_OF_RESOURCES for d in datasets}
    service._store = InstanceStore(services.config.storage.path)
    again = anyio.run(send)
    assert again.status_code == 200 and stored(again.json()) == [d.SOPInstanceUID for d in datasets]
    assert len(services.queue.pending_studies()) == 2


def test_a_client_that_stops_sending_is_cut_off_and_too_many_requests_wait(tmp_path: Path) -> None:
    """No part of the body for node.network_timeout_seconds: 408, nothing stored. More than four
    requests at once: 503 with Retry-After (each may hold 64 MiB of parts in memory)."""
    config = make_config(tmp_path, node={"network_timeout_seconds": 1})
    services = open_services(config, upgrade=True)
    try:
        service = StowService(config, services.sessions)
        app = Starlette(routes=[Route("/dicom-web/studies", service.handle, methods=["POST"])])
        ds = ct_like(generate_uid(), generate_uid(), 0)
        body = multipart([encoded(ds)])
        headers = {"Content-Type": DICOM_MULTIPART.format("stow-boundary-1234")}

        async def stalling() -> AsyncIterator[bytes]:
            yield body[:100]
            await anyio.sleep(3)
            yield body[100:]

        async def send(content: Any) -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
                return await http.post("/dicom-web/studies", content=content, headers=headers)

        started = time.monotonic()
        assert anyio.run(send, stalling()).status_code == 408
        assert time.monotonic() - started < 2.9
        assert services.queue.pending_studies() == []
        service._active = 4
        busy = anyio.run(send, body)
        assert busy.status_code == 503 and busy.headers["retry-after"]
        service._active = 0
        assert anyio.run(send, body).status_code == 200
    finally:
        services.close()
