"""The listener against real SCUs (pynetdicom and dcmtk storescu) on loopback."""

from __future__ import annotations

import errno
import io
import shutil
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import RunningListener, make_config
from corpus import all_dicom_files, find
from factories import ct_like, write
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from test_upper_layer import associate_rq, read_pdu

from dicomnode.cli import main
from dicomnode.db import Instance
from dicomnode.fsio import Buffers, durable_write
from dicomnode.receive.scp import ACCEPTED_TRANSFER_SYNTAXES
from dicomnode.receive.spool import InstanceStore
from dicomnode.status import Status

NOT_SENDABLE = -2


def association_reply(port: int, called: str) -> tuple[int, bytes]:
    """Send a raw A-ASSOCIATE-RQ (calling AE "RAWSCU", Verification) and read the PDU that answers it.

    Read off the socket rather than from a pynetdicom requestor, whose state machine now and then
    reports a rejection that arrives as the transport closes as an abort instead.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(associate_rq(called, [str(Verification)]))
        return read_pdu(sock)


def scu(calling: str = "TESTSCU", contexts: list | None = None) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts or []:
        ae.add_requested_context(*context)
    return ae


def stored_instances(listener: RunningListener) -> list[Instance]:
    with listener.services.sessions() as session:
        return list(session.query(Instance).all())


def send_files(listener: RunningListener, paths: list[Path]) -> list[int]:
    """Send each file as it is on disk (pynetdicom reads only its meta) over one association per syntax."""
    statuses = []
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        ae = scu(contexts=[(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])])
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title)
        assert assoc.is_established, path.name
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, unparsed
        try:
            status = assoc.send_c_store(path)
        except (ValueError, AttributeError, UnboundLocalError):  # the SCU cannot send this file
            assoc.abort()
            statuses.append(NOT_SENDABLE)
            continue
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
        statuses.append(int(status.Status) if "Status" in status else -1)
    return statuses


def test_echo_with_pynetdicom_and_cli(listener: RunningListener) -> None:
    """C-ECHO succeeds from pynetdicom and from the operator's `dicomnode echo`."""
    ae = scu(contexts=[(Verification,)])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == Status.SUCCESS
    assoc.release()
    assert main(["echo", "127.0.0.1", str(listener.port), listener.ae_title]) == 0
    assert main(["echo", "127.0.0.1", str(listener.port), "WRONGAE"]) == 1


def test_store_keeps_received_bytes_and_indexes(listener: RunningListener, tmp_path: Path) -> None:
    """A stored instance is byte-identical to what was sent and has its row."""
    source = find("CT_small.dcm")
    assert send_files(listener, [source]) == [Status.SUCCESS]
    [row] = stored_instances(listener)
    stored = listener.store.absolute(row.path)
    original = pydicom.dcmread(source)
    again = pydicom.dcmread(stored)
    assert again.SOPInstanceUID == original.SOPInstanceUID
    assert again.PixelData == original.PixelData
    assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert row.size_bytes == stored.stat().st_size  # start-up recovery compares the two
    assert again.file_meta.SourceApplicationEntityTitle == "TESTSCU"
    assert (
        row.path == f"instances/{original.StudyInstanceUID}/{original.SeriesInstanceUID}/"
        f"{original.SOPInstanceUID}.dcm"
    )
    assert not list(stored.parent.glob(".*.tmp"))


def test_resend_stores_nothing_twice(listener: RunningListener) -> None:
    """Sending the same SOP Instance UID again succeeds and keeps one row and one file."""
    source = find("CT_small.dcm")
    assert send_files(listener, [source, source]) == [Status.SUCCESS, Status.SUCCESS]
    rows = stored_instances(listener)
    assert len(rows) == 1
    assert len(list(listener.store.absolute(rows[0].path).parent.iterdir())) == 1


def test_whole_corpus_is_accepted_or_refused_cleanly(listener: RunningListener) -> None:
    """Every offline test file is stored or refused with a named status; the listener survives all."""
    sent = 0
    outcomes: dict[str, int] = {}
    accepted_syntaxes: set[str] = set()
    supported = {c.abstract_syntax for c in AllStoragePresentationContexts}
    for path in all_dicom_files():
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
            sop_class = meta.MediaStorageSOPClassUID
            syntax = meta.TransferSyntaxUID
        except Exception:
            continue  # no file meta: nothing an SCU could propose
        if sop_class not in supported or syntax not in ACCEPTED_TRANSFER_SYNTAXES:
            continue
        [status] = send_files(listener, [path])
        if status == NOT_SENDABLE:
            continue
        outcomes[path.name] = status
        if status == Status.SUCCESS:
            accepted_syntaxes.add(str(syntax))
        sent += 1
        assert status in (
            Status.SUCCESS,
            Status.OUT_OF_RESOURCES,
            Status.CANNOT_UNDERSTAND,
            Status.CANNOT_UNDERSTAND_MISSING_UID,
            Status.CANNOT_UNDERSTAND_UID_MISMATCH,
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        ), (path.name, hex(status))
    assert sent > 130
    stored = {row.sop_instance_uid for row in stored_instances(listener)}
    accepted = [name for name, status in outcomes.items() if status == Status.SUCCESS]
    assert len(accepted) > 110
    # every transfer syntax family was accepted (variants sharing a SOP Instance UID are stored once)
    syntaxes = accepted_syntaxes
    for uid in (
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    ):
        assert uid in syntaxes, uid
    for name in accepted:  # every acknowledged instance is stored (variants may share one UID)
        header = pydicom.dcmread(find(name), stop_before_pixels=True, force=True)
        assert str(header.SOPInstanceUID).strip() in stored, name
    # still serving after all of that
    assert send_files(listener, [find("CT_small.dcm")]) == [Status.SUCCESS]


def _craft(tmp_path: Path, name: str, body: bytes, sop_instance_uid: str) -> Path:
    """A Part 10 file with a valid meta header and an arbitrary dataset body."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    path = tmp_path / name
    path.write_bytes(buffer.getvalue() + body)
    return path


@pytest.mark.parametrize(
    "body,expected",
    [
        (b"", Status.CANNOT_UNDERSTAND_MISSING_UID),
        (b"\x01\x02\x03\x04\x05\x06\x07", (Status.CANNOT_UNDERSTAND_MISSING_UID, Status.CANNOT_UNDERSTAND)),
        (b"\xff" * 300, (Status.CANNOT_UNDERSTAND_MISSING_UID, Status.CANNOT_UNDERSTAND)),
    ],
)
def test_empty_or_garbage_datasets_are_refused(
    listener: RunningListener, tmp_path: Path, body: bytes, expected: int | tuple[int, ...]
) -> None:
    """pydicom reads an empty or garbage dataset "successfully": the listener checks UIDs itself."""
    path = _craft(tmp_path, "bad.dcm", body, generate_uid())
    [status] = send_files(listener, [path])
    assert status in (expected if isinstance(expected, tuple) else (expected,))
    assert stored_instances(listener) == []


def test_missing_study_uid_is_refused(listener: RunningListener, tmp_path: Path) -> None:
    """A dataset without StudyInstanceUID is not stored: 0xC001."""
    ds = ct_like(generate_uid(), generate_uid(), 0)
    del ds.StudyInstanceUID
    no_study = write(ds, tmp_path / "no_study.dcm")
    assert send_files(listener, [no_study]) == [Status.CANNOT_UNDERSTAND_MISSING_UID]
    assert stored_instances(listener) == []


def test_storescu_sends_a_compressed_file_in_its_own_syntax(listener: RunningListener) -> None:
    """dcmtk's storescu with -xv proposes the JPEG 2000 file's own syntax; it is stored as received."""
    source = find("RG1_J2KR.dcm")
    result = subprocess.run(
        [
            "storescu",
            "-xv",
            "-aet",
            "MODALITY",
            "-aec",
            listener.ae_title,
            "127.0.0.1",
            str(listener.port),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [row] = stored_instances(listener)
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"
    assert row.calling_ae_title == "MODALITY"
    stored = pydicom.dcmread(listener.store.absolute(row.path))
    assert stored.PixelData == pydicom.dcmread(source).PixelData  # compressed bytes kept as sent


def test_unknown_calling_ae_is_refused(tmp_path: Path) -> None:
    """With an allow-list, an unknown calling AE cannot associate; a listed one can."""
    from dicomnode.node.services import open_services

    config = make_config(tmp_path, node={"allowed_calling_ae_titles": ["MODALITY"]})
    services = open_services(config, upgrade=True)
    running = RunningListener(services)
    try:
        pdu_type, body = association_reply(running.port, running.ae_title)
        assert pdu_type == 0x03  # A-ASSOCIATE-RJ
        assert body[1:4] == bytes((1, 1, 3))  # rejected-permanent, service user, calling AE not recognized
        accepted = scu("MODALITY", [(Verification,)]).associate(
            "127.0.0.1", running.port, ae_title=running.ae_title
        )
        assert accepted.is_established
        accepted.release()
    finally:
        running.stop()
        services.close()


def test_associations_beyond_the_maximum_are_refused(tmp_path: Path) -> None:
    """node.max_associations bounds concurrent associations."""
    from dicomnode.node.services import open_services

    services = open_services(make_config(tmp_path, node={"max_associations": 1}), upgrade=True)
    running = RunningListener(services)
    try:
        first = scu(contexts=[(Verification,)]).associate(
            "127.0.0.1", running.port, ae_title=running.ae_title
        )
        assert first.is_established
        pdu_type, body = association_reply(running.port, running.ae_title)
        assert pdu_type == 0x03  # A-ASSOCIATE-RJ
        assert body[1] == 2  # rejected-transient: try again later
        first.release()
    finally:
        running.stop()
        services.close()


def _send_datasets(port: int, ae_title: str, datasets: list) -> list[int]:
    ae = scu(contexts=[(CTImageStorage, ["1.2.840.10008.1.2.1"])])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def test_disk_full_answers_out_of_resources_and_recovers(services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A write failing with ENOSPC mid-file: 0xA700, no partial file, and the next write works."""
    failing = {"on": True}

    def writer(target: Path, buffers: Buffers) -> None:
        data = b"".join(buffers) if isinstance(buffers, list) else bytes(buffers)
        if failing["on"]:

            def half_then_full(path: Path, payload: bytes) -> None:
                with open(path, "wb") as handle:
                    handle.write(payload[: len(payload) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

            tmp = target.with_name(f".{target.name}.fault.tmp")
            try:
                half_then_full(tmp, data)
            finally:
                tmp.unlink(missing_ok=True)
        durable_write(target, data)

    store = InstanceStore(services.config.storage.path, writer=writer)
    running = RunningListener(services, store=store)
    try:
        study = generate_uid()
        series = generate_uid()
        ds = ct_like(study, series, 0)
        assert _send_datasets(running.port, running.ae_title, [ds]) == [Status.OUT_OF_RESOURCES]
        assert not [p for p in (services.config.storage.path / "instances").rglob("*") if p.is_file()]
        assert stored_instances(running) == []
        failing["on"] = False
        assert _send_datasets(running.port, running.ae_title, [ds]) == [Status.SUCCESS]
        assert len(stored_instances(running)) == 1
    finally:
        running.stop()


def test_real_full_filesystem(tmp_path: Path) -> None:
    """On a 3 MB tmpfs: instances fill it, the next gets 0xA700 with no partial file, space freed -> OK."""
    from dicomnode.node.services import open_services

    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0 or shutil.which("umount") is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        config = make_config(
            tmp_path,
            storage={"path": str(mount_point / "var"), "database_url": f"sqlite:///{tmp_path}/db.sqlite"},
        )
        services = open_services(config, upgrade=True)
        running = RunningListener(services)
        try:
            study, series = generate_uid(), generate_uid()
            datasets = [ct_like(study, series, i, size=256) for i in range(40)]  # 128 KiB each
            statuses = _send_datasets(running.port, running.ae_title, datasets)
            assert Status.OUT_OF_RESOURCES in statuses
            first_failure = statuses.index(Status.OUT_OF_RESOURCES)
            assert all(s == Status.SUCCESS for s in statuses[:first_failure])
            files = [p for p in (mount_point / "var").rglob("*") if p.is_file()]
            assert not [p for p in files if p.name.endswith(".tmp")]
            assert len(files) == len(stored_instances(running)) == statuses.count(Status.SUCCESS)
            for path in files[:5]:
                path.unlink()  # the operator frees space; no restart
            assert _send_datasets(running.port, running.ae_title, [datasets[-1]]) == [Status.SUCCESS]
        finally:
            running.stop()
            services.close()
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)  # never leave a mount behind


def test_free_disk_floor_answers_out_of_resources(services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Below node.min_free_disk_mb the listener refuses to store, with 0xA700."""
    store = InstanceStore(services.config.storage.path, min_free_bytes=2**62)
    running = RunningListener(services, store=store)
    try:
        ds = ct_like(generate_uid(), generate_uid(), 0)
        assert _send_datasets(running.port, running.ae_title, [ds]) == [Status.OUT_OF_RESOURCES]
    finally:
        running.stop()


def test_database_failure_answers_out_of_resources(listener: RunningListener) -> None:
    """When the row cannot be committed, nothing is acknowledged."""
    with listener.services.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_instances_pending")
        conn.exec_driver_sql("ALTER TABLE instances RENAME TO instances_gone")
    ds = ct_like(generate_uid(), generate_uid(), 0)
    assert _send_datasets(listener.port, listener.ae_title, [ds]) == [Status.OUT_OF_RESOURCES]


def test_storage_contexts_cover_every_storage_class() -> None:
    """The SCP offers every storage SOP class pynetdicom knows."""
    from dicomnode.receive.scp import supported_contexts

    offered = {c.abstract_syntax for c in supported_contexts()}
    assert {c.abstract_syntax for c in StoragePresentationContexts} <= offered


def test_fsync_flush_mode_stores_and_keeps_sqlite_full(tmp_path: Path) -> None:
    """storage.flush = "fsync": every file is flushed on its own and SQLite stays FULL."""
    from dicomnode.db import sqlite_synchronous_for
    from dicomnode.node.services import open_services

    config = make_config(tmp_path, storage={"flush": "fsync"})
    assert sqlite_synchronous_for(config.storage.path, config.storage.database_url, "AUTO", "fsync") == "FULL"
    services = open_services(config, upgrade=True)
    running = RunningListener(services)
    try:
        assert running.store.flush_mode == "fsync"
        ds = ct_like(generate_uid(), generate_uid(), 0)
        assert _send_datasets(running.port, running.ae_title, [ds, ds]) == [Status.SUCCESS, Status.SUCCESS]
        assert len(stored_instances(running)) == 1
    finally:
        running.stop()
        services.close()


def test_stale_temporaries_are_removed_only_where_writes_happened_recently(tmp_path: Path) -> None:
    """Start-up cleaning lists only recently modified folders; without a bound it cleans them all."""
    import os

    from dicomnode.receive.recovery import remove_stale_temporaries

    old = tmp_path / "instances" / "1.2" / "1.2.3"
    new = tmp_path / "results" / "1.2" / "job-7" / "heatmaps"
    for folder in (old, new):
        folder.mkdir(parents=True)
        (folder / ".x.dcm.1.2.tmp").write_bytes(b"partial")
        (folder / "kept.dcm").write_bytes(b"complete")
    os.utime(old, (1_000_000, 1_000_000))  # last written long ago
    (tmp_path / ".serve.json.12.34.tmp").write_bytes(b"{")  # serve killed while writing its state
    assert remove_stale_temporaries(tmp_path, changed_since=2_000_000) == 2
    assert (old / ".x.dcm.1.2.tmp").exists() and not (new / ".x.dcm.1.2.tmp").exists()
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.rglob("*.dcm")) == ["kept.dcm", "kept.dcm"]
