"""Hostile-site faults of the receive path, each against real parts: associations on loopback, SQLite
under tmp_path, a real small filesystem for the free-space floor."""

from __future__ import annotations

import io
import logging
import mmap
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import RunningListener, make_config
from factories import ct_like
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from dicomnode.db import Instance, Study
from dicomnode.errors import StorageFullError
from dicomnode.fsio import Buffers, fast_write
from dicomnode.node.services import Services, open_services
from dicomnode.queue.jobs import InstanceConflictError, InstanceRecord
from dicomnode.receive.header import PREAMBLE, data_set_is_complete, file_meta_information, read_part10
from dicomnode.receive.recovery import index_orphans, recover_spool
from dicomnode.receive.spool import InstanceStore, statvfs_free_bytes
from dicomnode.status import Status

MiB = 1024 * 1024


def associate(port: int, ae_title: str) -> object:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    return assoc


def send(port: int, ae_title: str, datasets: list[Dataset]) -> list[Dataset]:
    """C-STORE each data set over one association; return the response command sets."""
    assoc = associate(port, ae_title)
    responses = [assoc.send_c_store(ds) for ds in datasets]  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    return responses


def rows(services: Services) -> list[tuple[str, str, str]]:
    """(SOP Instance UID, Study Instance UID, path) of every indexed instance."""
    with services.sessions() as session:
        found = session.execute(
            select(Instance.sop_instance_uid, Study.study_instance_uid, Instance.path).join(
                Study, Instance.study_id == Study.id
            )
        ).all()
    return sorted((str(a), str(b), str(c)) for a, b, c in found)


def spool_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "instances").rglob("*") if p.is_file())


def part10(ds: Dataset, source_ae_title: str = "MODALITY") -> bytes:
    """The bytes the SCP writes for a data set: preamble, its File Meta Information, the data set."""
    body = io.BytesIO()
    ds.save_as(body, implicit_vr=False, little_endian=True, enforce_file_format=False)
    meta = file_meta_information(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", source_ae_title)
    return PREAMBLE + meta + body.getvalue()


# --- 4: the free-disk floor is kept by reservation ------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs root), unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0 or shutil.which("umount") is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)  # never leave a mount behind


def test_free_disk_floor_is_never_overshot_on_a_real_filesystem(
    tmp_path: Path, small_filesystem: Path
) -> None:
    """8 MiB free, a 4 MiB floor, 40 instances of 132 KiB sent at once: every success leaves the
    floor free, the first refusal comes when the next instance would cross it (was: 1 s cache)."""
    config = make_config(
        tmp_path,
        node={"min_free_disk_mb": 4},
        storage={"path": str(small_filesystem / "var"), "database_url": f"sqlite:///{tmp_path}/db.sqlite"},
    )
    services = open_services(config, upgrade=True)
    running = RunningListener(services)
    try:
        study, series = generate_uid(), generate_uid()
        datasets = [ct_like(study, series, i, size=256) for i in range(40)]
        statuses = [int(r.Status) for r in send(running.port, running.ae_title, datasets)]
        first_refusal = statuses.index(Status.OUT_OF_RESOURCES)
        assert set(statuses[:first_refusal]) == {Status.SUCCESS}
        assert set(statuses[first_refusal:]) == {Status.OUT_OF_RESOURCES}
        free = statvfs_free_bytes(small_filesystem)
        floor = 4 * MiB
        file_size = spool_files(config.storage.path)[0].stat().st_size
        assert floor <= free < floor + file_size + 4096  # the refused one would have crossed it
        assert len(spool_files(config.storage.path)) == len(rows(services)) == first_refusal
        assert running.store.reserved_bytes == 0
    finally:
        running.stop()
        services.close()


def test_reservations_of_concurrent_writes_count_against_the_floor(tmp_path: Path) -> None:
    """While one write is in progress, its bytes are reserved: a second that would cross the floor
    with them is refused even though statvfs does not show the first yet; once done, space is released."""
    in_write, release = threading.Event(), threading.Event()

    def slow_writer(target: Path, data: Buffers) -> None:
        if not release.is_set():
            in_write.set()
            assert release.wait(10)
        fast_write(target, data)

    floor, instance = 10 * MiB, 3 * MiB
    store = InstanceStore(
        tmp_path, min_free_bytes=floor, writer=slow_writer, free_bytes=lambda _root: floor + 5 * MiB
    )
    try:
        failures: list[BaseException] = []

        def first() -> None:
            try:
                store.write("instances/1/2/3.dcm", b"x" * instance)
            except BaseException as exc:  # reported below
                failures.append(exc)

        thread = threading.Thread(target=first)
        thread.start()
        assert in_write.wait(10)
        assert store.reserved_bytes >= instance
        with pytest.raises(StorageFullError, match="storage floor"):
            store.write("instances/1/2/4.dcm", b"y" * instance)
        release.set()
        thread.join(10)
        assert not failures and not thread.is_alive()
        assert store.reserved_bytes == 0
        store.write("instances/1/2/4.dcm", b"y" * instance)  # free space as injected: fits again
        assert sorted(p.name for p in (tmp_path / "instances/1/2").iterdir()) == ["3.dcm", "4.dcm"]
    finally:
        store.close()


# --- 13: one SOP Instance UID under two studies ----------------------------------------------------------


def test_same_sop_instance_uid_under_another_study_is_refused_and_leaves_no_file(
    listener: RunningListener, caplog: pytest.LogCaptureFixture
) -> None:
    """The second study's copy gets 0xC003 with an Error Comment; only the first file and row remain,
    a resend of the first is still a success, and start-up recovery finds nothing to clean."""
    sop = generate_uid()
    first = ct_like(generate_uid(), generate_uid(), 0, sop_instance_uid=sop)
    moved = ct_like(generate_uid(), generate_uid(), 0, sop_instance_uid=sop)
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive.scp"):
        responses = send(listener.port, listener.ae_title, [first, moved, first])
    assert [int(r.Status) for r in responses] == [
        Status.SUCCESS,
        Status.CANNOT_UNDERSTAND_INSTANCE_CONFLICT,
        0,
    ]
    assert "another Study/Series" in str(responses[1].ErrorComment)
    root = listener.services.config.storage.path
    path = f"instances/{first.StudyInstanceUID}/{first.SeriesInstanceUID}/{sop}.dcm"
    assert rows(listener.services) == [(sop, str(first.StudyInstanceUID), path)]
    assert spool_files(root) == [root / path]
    assert any(sop in r.getMessage() and "0xC003" in r.getMessage() for r in caplog.records)
    assert not [
        r for r in caplog.records if "Test^Patient" in r.getMessage() or "TEST-0001" in r.getMessage()
    ]
    report = recover_spool(root, listener.services.queue, changed_since=None)
    assert (report.orphans_indexed, report.orphans_removed) == (0, 0)


def test_record_instance_raises_on_a_uid_held_at_another_path(services: Services) -> None:
    """The queue tells a resend (False) from the same UID under another study (InstanceConflictError)."""
    sop = generate_uid()
    record = InstanceRecord(
        sop,
        CTImageStorage,
        "1.2.3",
        "1.2.3.4",
        "1.2.840.10008.1.2.1",
        f"instances/1.2.3/1.2.3.4/{sop}.dcm",
        10,
    )
    assert services.queue.record_instance(record) is True
    assert services.queue.record_instance(record) is False
    other = InstanceRecord(
        sop,
        CTImageStorage,
        "1.2.9",
        "1.2.9.4",
        "1.2.840.10008.1.2.1",
        f"instances/1.2.9/1.2.9.4/{sop}.dcm",
        10,
    )
    with pytest.raises(InstanceConflictError) as raised:
        services.queue.record_instance(other)
    assert raised.value.held_path == record.path


# --- 7: files written but never indexed ------------------------------------------------------------------


def _orphan(root: Path, ds: Dataset, data: bytes | None = None, *, study: str = "", series: str = "") -> Path:
    path = root / "instances" / (study or ds.StudyInstanceUID) / (series or ds.SeriesInstanceUID)
    path = path / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10(ds) if data is None else data)
    return path


def test_orphan_files_are_indexed_when_whole_and_removed_otherwise(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """Files without a row: a whole one is indexed (with its calling AE); cut-short, garbage,
    path-mismatching and conflicting ones are removed; old folders and indexed files are untouched."""
    root = services.config.storage.path
    study, series = generate_uid(), generate_uid()
    whole = ct_like(study, series, 0)
    whole_path = _orphan(root, whole)
    cut = ct_like(study, series, 1)
    cut_path = _orphan(root, cut, part10(cut)[:-100])
    garbage = ct_like(study, series, 2)
    garbage_path = _orphan(root, garbage, b"\x00" * 300)
    elsewhere = ct_like(study, series, 3)
    elsewhere_path = _orphan(root, elsewhere, series="1.2.999")  # the data set names another series
    held = ct_like(generate_uid(), generate_uid(), 4)
    held_path = f"instances/{held.StudyInstanceUID}/{held.SeriesInstanceUID}/{held.SOPInstanceUID}.dcm"
    held_record = InstanceRecord(
        str(held.SOPInstanceUID), CTImageStorage, held.StudyInstanceUID, held.SeriesInstanceUID,
        "1.2.840.10008.1.2.1", held_path, len(part10(held)),
    )  # fmt: skip
    assert services.queue.record_instance(held_record)
    (root / held_record.path).parent.mkdir(parents=True)
    (root / held_record.path).write_bytes(part10(held))  # indexed: left alone
    conflicting = ct_like(generate_uid(), generate_uid(), 4, sop_instance_uid=str(held.SOPInstanceUID))
    conflicting_path = _orphan(root, conflicting)
    old = ct_like(generate_uid(), generate_uid(), 5)
    old_path = _orphan(root, old)
    os.utime(old_path.parent, (1_000_000, 1_000_000))

    with caplog.at_level(logging.INFO, logger="dicomnode.receive.recovery"):
        report = recover_spool(root, services.queue, changed_since=2_000_000)
    assert (report.orphans_indexed, report.orphans_removed) == (1, 4)
    assert whole_path.exists() and old_path.exists() and (root / held_record.path).exists()
    for gone in (cut_path, garbage_path, elsewhere_path, conflicting_path):
        assert not gone.exists(), gone
    relative = str(whole_path.relative_to(root))
    assert (str(whole.SOPInstanceUID), study, relative) in rows(services)
    with services.sessions() as session:
        row = session.scalars(select(Instance).where(Instance.path == relative)).one()
        assert (row.size_bytes, row.calling_ae_title, row.modality) == (
            whole_path.stat().st_size,
            "MODALITY",
            "CT",
        )
        assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    messages = [r.getMessage() for r in caplog.records]
    assert any("indexed 1 whole ones" in m and "removed 4" in m for m in messages)
    assert not [m for m in messages if "Test^Patient" in m or "TEST-0001" in m or "19700101" in m]
    assert index_orphans(root, services.queue) == (1, 0)  # without a bound the old folder is found too


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_RLE.dcm",
     "JPEG2000.dcm", "rtplan.dcm", "emri_small_jpeg_2k_lossless.dcm"],
)  # fmt: skip
def test_completeness_check_accepts_whole_files_and_rejects_cut_ones(name: str, tmp_path: Path) -> None:
    """Across transfer syntaxes, sequences and encapsulated pixel data: whole is complete, any cut is not."""
    source = get_testdata_file(name)
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # writes the File Meta Information Group Length
    data = buffer.getvalue()
    meta, offset = read_part10(data)
    syntax = str(meta.TransferSyntaxUID)
    assert data_set_is_complete(data, offset, syntax), name
    last = 2 if syntax == "1.2.840.10008.1.2.1.99" else 1  # a deflated stream's last byte may be padding
    for cut in {len(data) - last, len(data) - 7, (offset + len(data)) // 2, offset + 5}:
        assert not data_set_is_complete(data[:cut], offset, syntax), (name, cut)
    path = tmp_path / "f.dcm"
    path.write_bytes(data)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert data_set_is_complete(mapped, offset, syntax)


# --- 15: the command's Affected SOP Instance UID differs from the data set's -----------------------------


def test_command_uid_differing_from_the_data_set_is_stored_under_the_data_sets(
    listener: RunningListener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As PixelMed and dcmsend send it: success, file, meta and row carry the data set's UID; logged."""
    ds = ct_like(generate_uid(), generate_uid(), 0)
    requested = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = requested  # pynetdicom puts this one in the request
    path = tmp_path / "mismatch.dcm"
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=False)
    from pynetdicom import _config

    assoc = associate(listener.port, listener.ae_title)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file as it is: the request names its meta's UID
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode.receive.scp"):
            response = assoc.send_c_store(path)  # type: ignore[attr-defined]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()  # type: ignore[attr-defined]
    assert int(response.Status) == Status.SUCCESS
    [(sop, _study, stored)] = rows(listener.services)
    assert sop == ds.SOPInstanceUID and stored.endswith(f"/{ds.SOPInstanceUID}.dcm")
    written = pydicom.dcmread(listener.services.config.storage.path / stored)
    assert written.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == written.SOPInstanceUID
    assert any(
        requested in r.getMessage() and str(ds.SOPInstanceUID) in r.getMessage() for r in caplog.records
    )


def test_the_header_fallback_parses_a_bounded_head_not_a_whole_huge_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the first bytes do not hold the identifying UIDs, at most _HEADER_FALLBACK_LIMIT bytes are
    parsed (a spooled STOW-RS part can be gigabytes): beyond it the data set is refused, never copied."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomnode.receive import header as header_module

    ds = Dataset()
    ds.ImageType = ["DERIVED"] * 2000  # (0008,0008): about 16 KB before the UIDs
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    data = fp.getvalue()
    fragments = [memoryview(data[i : i + 1000]) for i in range(0, len(data), 1000)]
    monkeypatch.setattr(header_module, "_HEADER_PREFIX", 1000)
    parsed = header_module.read_header(fragments, len(data), ExplicitVRLittleEndian)
    assert parsed.SOPInstanceUID == "1.2.3.4"  # within the limit: the whole data set is parsed
    monkeypatch.setattr(header_module, "_HEADER_FALLBACK_LIMIT", 4000)
    try:
        parsed = header_module.read_header(fragments, len(data), ExplicitVRLittleEndian)
    except Exception:
        return  # the cut head cannot be parsed: refused by the caller
    assert "SOPInstanceUID" not in parsed


def test_a_header_prefix_cut_inside_the_last_uid_is_never_taken_for_the_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The header parse copies only a prefix; one that ends inside Series Instance UID (or anywhere
    before the element after it) is not trusted, and the data set is parsed further instead."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomnode.receive import header as header_module

    ds = ct_like(generate_uid(), "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234", 0)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    data = fp.getvalue()
    cut = data.index(b"1.2.826.0.1.3680043.8.498.1234567890") + 20  # inside the value
    fragments = [memoryview(data[:cut]), memoryview(data[cut:])]
    for prefix in (cut - 30, cut, cut + 10, len(data) // 2):
        monkeypatch.setattr(header_module, "_HEADER_PREFIX", prefix)
        parsed = header_module.read_header(fragments, len(data), ExplicitVRLittleEndian)
        assert parsed.SeriesInstanceUID == ds.SeriesInstanceUID
        assert parsed.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize(
    "transfer_syntax_uid",
    ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"],
    ids=["explicit-le", "implicit-le", "explicit-be", "deflated"],
)
def test_identifying_values_read_from_the_raw_elements_equal_pydicoms(transfer_syntax_uid: str) -> None:
    """UIDs, Study Date and Modality are read from the elements' bytes (default repertoire), Patient
    ID through pydicom in the Specific Character Set; both give what pydicom reads from the file."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicomnode.receive.header import header_ascii, header_ascii_text, header_text, read_header

    ds = ct_like(generate_uid(), generate_uid(), 0)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = "ÄÖ-0001"
    ds.SeriesInstanceUID = "1.2.3.45"  # odd length: NUL-padded on the wire
    del ds.AccessionNumber
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax_uid != "1.2.840.10008.1.2.2"
    fp.is_implicit_VR = transfer_syntax_uid == "1.2.840.10008.1.2"
    write_dataset(fp, ds)
    data = fp.getvalue()
    if transfer_syntax_uid.endswith(".99"):
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    header = read_header([memoryview(data)], len(data), transfer_syntax_uid)
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
        assert header_ascii(header, keyword) == str(ds[keyword].value)
    assert header_ascii_text(header, "StudyDate", 8) == ds.StudyDate
    assert header_text(header, "PatientID", 64) == "ÄÖ-0001"
    assert header_ascii(header, "AccessionNumber") is None  # absent


def test_a_uid_with_a_byte_outside_ascii_is_refused_not_cleaned(services: Services) -> None:
    """A UID is never repaired: a Latin-1 byte in the data set's SOP Instance UID refuses the
    instance with 0xC001 (as the UID check always did), nothing stored."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicomnode.receive.ingest import StoreRefused, record_from

    ds = ct_like(generate_uid(), generate_uid(), 0)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)  # the data set alone, as a C-STORE carries it
    uid = str(ds.SOPInstanceUID).encode()
    data = fp.getvalue().replace(uid, uid[:-1] + b"\xe9", 1)
    store = services.store()
    try:
        with pytest.raises(StoreRefused) as refused:
            record_from(
                store,
                [memoryview(data)],
                len(data),
                "1.2.840.10008.1.2.1",
                claimed_sop_class_uid=str(ds.SOPClassUID),
                claimed_sop_instance_uid=str(ds.SOPInstanceUID),
                claimed_by="the C-STORE request",
                calling_ae_title="MODALITY",
            )
        assert refused.value.status == Status.CANNOT_UNDERSTAND_MISSING_UID
        assert spool_files(services.config.storage.path) == []
    finally:
        store.close()
