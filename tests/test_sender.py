"""Result delivery against real peers: dcmtk storescp (with fault flags), a pynetdicom SCP answering
chosen statuses, and Orthanc. The clock is moved with ``run_once(now=...)`` instead of sleeping."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from peers import StorescpPeer, free_port, start_orthanc, start_storescp
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import migrate
from dicomnode.config import DeliveryConfig, DestinationConfig
from dicomnode.db import DeliveryState, Job, Outbox, Study, make_engine, make_sessionmaker, utcnow
from dicomnode.deliver.sender import Sender
from dicomnode.deliver.status import Verdict, backoff_seconds, classify_rejection, classify_status
from dicomnode.net.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.queue.outbox import OutboxQueue

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
OTHER_STUDY_UID = "1.2.826.0.1.3680043.8.498.2"
POLICY = DeliveryConfig(
    retry_initial_seconds=5,
    retry_max_seconds=300,
    give_up_after_hours=72,
    poll_interval_seconds=0.05,
    timeout_seconds=5,
)


# --- fixtures and helpers --------------------------------------------------------------------------


def destination(port: int, ae_title: str = "STORESCP", name: str = "pacs") -> DestinationConfig:
    return DestinationConfig(name=name, ae_title=ae_title, host="127.0.0.1", port=port)


def make_sender(
    sessions: sessionmaker[Session], storage: Path, *dests: DestinationConfig, policy: DeliveryConfig = POLICY
) -> Sender:
    return Sender(policy, dests, sessions, storage, ae_title="DICOMNODE", rng=random.Random(7))


def add_result(
    sessions: sessionmaker[Session],
    storage: Path,
    source: str,
    *,
    dest: str = "pacs",
    study_instance_uid: str = STUDY_UID,
    created_at: datetime | None = None,
) -> int:
    """Copy a test file (with a fresh SOP Instance UID) into the storage folder and queue it."""
    dataset = dcmread(get_testdata_file(source, read=False))  # type: ignore[arg-type]
    sop_instance_uid = generate_uid()
    dataset.SOPInstanceUID = sop_instance_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    dataset.StudyInstanceUID = study_instance_uid
    relative = f"results/{sop_instance_uid}.dcm"
    dataset.save_as(storage / relative)
    now = created_at or utcnow()
    with sessions.begin() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
        if study is None:
            study = Study(study_instance_uid=study_instance_uid)
            session.add(study)
            session.flush()
        job = Job(study_id=study.id)
        session.add(job)
        session.flush()
        row = Outbox(
            job_id=job.id,
            study_instance_uid=study_instance_uid,
            destination=dest,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=dataset.SOPClassUID,
            path=relative,
            state=DeliveryState.PENDING,
            created_at=now,
            next_attempt_at=now,
        )
        session.add(row)
        session.flush()
        return row.id


def outbox(sessions: sessionmaker[Session], row_id: int) -> Outbox:
    """The row, detached, with its times made timezone-aware (SQLite drops the zone)."""
    with sessions() as session:
        row = session.get(Outbox, row_id)
        assert row is not None
        session.expunge(row)
    for name in ("created_at", "next_attempt_at", "delivered_at"):
        value = getattr(row, name)
        if value is not None and value.tzinfo is None:
            setattr(row, name, value.replace(tzinfo=UTC))
    return row


def received_uids(peer: StorescpPeer) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in peer.received()}


def later(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


# --- pure policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (0x0000, Verdict.DELIVERED),
        (0x0001, Verdict.DELIVERED),
        (0xB000, Verdict.DELIVERED),
        (0xB007, Verdict.DELIVERED),
        (0x0111, Verdict.DELIVERED),
        (0xA700, Verdict.RETRY),
        (0xA7FF, Verdict.RETRY),
        (0x0110, Verdict.RETRY),
        (0x0213, Verdict.RETRY),
        (0xA900, Verdict.DEAD),
        (0xC000, Verdict.DEAD),
        (0xC211, Verdict.DEAD),
        (0x0122, Verdict.DEAD),
        (0x0124, Verdict.DEAD),
        (0x0117, Verdict.DEAD),
    ],
)
def test_classify_status(status: int, verdict: Verdict) -> None:
    """Each DIMSE status maps to delivered, retry or dead as the table in docs/delivery.md says."""
    outcome = classify_status(status)
    assert outcome.verdict is verdict
    assert outcome.status == status


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    """Delays stay within [0, min(max, initial * 2**(n-1))] and spread over that range."""
    rng = random.Random(1)
    for attempts, ceiling in [(1, 5), (2, 10), (3, 20), (7, 300), (50, 300), (10_000, 300)]:
        delays = [backoff_seconds(attempts, 5, 300, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.7 * ceiling and min(delays) < 0.3 * ceiling


# --- delivery to dcmtk storescp --------------------------------------------------------------------


def test_delivers_many_objects_over_one_association(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """Three objects of two SOP classes arrive at storescp over a single association."""
    peer = start_storescp(tmp_path, "-v")
    peers.append(peer)
    ids = [add_result(sessions, storage, name) for name in ("CT_small.dcm", "CT_small.dcm", "test-SR.dcm")]
    sender = make_sender(sessions, storage, destination(peer.port))

    assert sender.run_once() == 3

    rows = [outbox(sessions, i) for i in ids]
    assert [r.state for r in rows] == [DeliveryState.DELIVERED] * 3
    assert all(r.attempts == 1 and r.last_status == 0 and r.delivered_at is not None for r in rows)
    assert received_uids(peer) == {r.sop_instance_uid for r in rows}
    assert peer.log_path.read_text().count("Association Received") == 1
    assert sender.run_once() == 0  # nothing left


def test_uncompressed_object_is_converted_to_the_accepted_syntax(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """A peer that takes Implicit VR only still gets an Explicit VR file, converted."""
    peer = start_storescp(tmp_path, "+xi")
    peers.append(peer)
    row_id = add_result(sessions, storage, "CT_small.dcm")
    make_sender(sessions, storage, destination(peer.port)).run_once()

    assert outbox(sessions, row_id).state is DeliveryState.DELIVERED
    (received,) = peer.received()
    assert dcmread(received).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_compressed_object_needs_its_own_syntax(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """JPEG data goes as JPEG when the peer accepts it, and is dead (with the reason) when it does not."""
    plain = start_storescp(tmp_path)  # uncompressed syntaxes only
    everything = start_storescp(tmp_path, "+xa")
    peers.extend([plain, everything])
    refused = add_result(sessions, storage, "SC_rgb_jpeg_dcmtk.dcm", dest="plain")
    taken = add_result(sessions, storage, "SC_rgb_jpeg_dcmtk.dcm", dest="all")
    sender = make_sender(
        sessions, storage, destination(plain.port, name="plain"), destination(everything.port, name="all")
    )

    assert sender.run_once() == 2

    dead = outbox(sessions, refused)
    assert dead.state is DeliveryState.DEAD and dead.attempts == 1
    assert "JPEG Baseline" in (dead.last_error or "") and "not converted" in (dead.last_error or "")
    assert outbox(sessions, taken).state is DeliveryState.DELIVERED
    assert len(everything.received()) == 1 and plain.received() == []


def test_refused_sop_class_is_dead_at_once(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """A peer without the SR SOP class fails the SR at once (no retries) and still takes the CT."""
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[CTOnly]\nPresentationContext1 = CTImageStorage\\Uncompressed\n"
        "[[Profiles]]\n[CT]\nPresentationContexts = CTOnly\n"
    )
    peer = start_storescp(tmp_path, "-xf", str(profile), "CT")
    peers.append(peer)
    ct = add_result(sessions, storage, "CT_small.dcm")
    sr = add_result(sessions, storage, "test-SR.dcm")
    lone_sr = add_result(sessions, storage, "test-SR.dcm", dest="sr-only")
    sender = make_sender(sessions, storage, destination(peer.port), destination(peer.port, name="sr-only"))

    assert sender.run_once() == 3

    assert outbox(sessions, ct).state is DeliveryState.DELIVERED
    for row_id in (sr, lone_sr):  # with the CT in the association, and alone (no context accepted at all)
        row = outbox(sessions, row_id)
        assert row.state is DeliveryState.DEAD and row.attempts == 1
        assert "refused the presentation context for Comprehensive SR Storage" in (row.last_error or "")
        assert "abstract syntax" in (row.last_error or "")
    assert sender.run_once(now=later(3600)) == 0  # dead rows are never picked up again


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--abort-during",), "aborted"),
        (("--abort-after",), "aborted"),
        (("--sleep-during", "5"), "no C-STORE response"),
    ],
)
def test_transient_peer_faults_are_retried(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    storage: Path,
    peers: list[Any],
    flags: tuple[str, ...],
    expected: str,
) -> None:
    """Refused or aborted associations and a silent peer leave the row pending with a backoff."""
    peer = start_storescp(tmp_path, *flags)
    peers.append(peer)
    row_id = add_result(sessions, storage, "CT_small.dcm")
    policy = DeliveryConfig(
        retry_initial_seconds=5,
        retry_max_seconds=300,
        give_up_after_hours=72,
        poll_interval_seconds=0.05,
        timeout_seconds=1,
    )
    before = utcnow()
    make_sender(sessions, storage, destination(peer.port), policy=policy).run_once()

    row = outbox(sessions, row_id)
    assert row.state is DeliveryState.PENDING and row.attempts == 1
    assert expected in (row.last_error or "")
    assert before <= row.next_attempt_at <= utcnow() + timedelta(seconds=5)


def test_permanent_association_rejection_is_dead_at_once(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """storescp --refuse answers A-ASSOCIATE-RJ "rejected-permanent": dead at the first attempt (not
    retried for 72 h), the reason naming the result, source and reason of the rejection."""
    peer = start_storescp(tmp_path, "--refuse")
    peers.append(peer)
    row_id = add_result(sessions, storage, "CT_small.dcm")
    sender = make_sender(sessions, storage, destination(peer.port))

    assert sender.run_once() == 1

    row = outbox(sessions, row_id)
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.DEAD, 1, None)
    error = row.last_error or ""
    assert "association rejected by STORESCP@127.0.0.1" in error
    assert "rejected-permanent" in error and "Service User" in error and "No reason given" in error
    assert sender.run_once(now=later(3600)) == 0  # never picked up again without dicomnode retry
    assert peer.received() == []


@pytest.mark.e2e
def test_a_rejection_followed_at_once_by_the_close_is_never_taken_for_an_abort(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """storescp --refuse sends A-ASSOCIATE-RJ and closes at once; pynetdicom then reports an abort
    with no answer for one association in three to seven (57 of 400, 118 of 400 measured), and the
    delivery was retried for 72 h. Sixty deliveries in a row: every one dead with the rejection."""
    peer = start_storescp(tmp_path, "--refuse")
    peers.append(peer)
    sender = make_sender(sessions, storage, destination(peer.port))
    for _ in range(60):
        row_id = add_result(sessions, storage, "CT_small.dcm")
        assert sender.run_once() == 1
        row = outbox(sessions, row_id)
        assert row.state is DeliveryState.DEAD, row.last_error
        assert "rejected-permanent" in (row.last_error or "")


def test_transient_association_rejection_is_retried(sessions: sessionmaker[Session], storage: Path) -> None:
    """A pynetdicom SCP at its association limit answers "rejected-transient": the row stays pending
    with a backoff and is delivered once the peer has room again."""
    ae = AE(ae_title="BUSYSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.maximum_associations = 1
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)]
    )
    assert isinstance(server, ThreadedAssociationServer)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context("1.2.840.10008.1.1")
    try:
        port = server.server_address[1]
        busy = holder.associate("127.0.0.1", port, ae_title="BUSYSCP")
        assert busy.is_established
        row_id = add_result(sessions, storage, "CT_small.dcm")
        sender = make_sender(sessions, storage, destination(port, "BUSYSCP"))
        now = utcnow()
        assert sender.run_once(now=now) == 1
        row = outbox(sessions, row_id)
        assert (row.state, row.attempts) == (DeliveryState.PENDING, 1)
        assert "rejected-transient" in (row.last_error or "")
        assert "Local limit exceeded" in (row.last_error or "")
        assert now <= row.next_attempt_at <= now + timedelta(seconds=5)

        busy.release()
        wait_for(lambda: not [a for a in ae.active_associations if a.is_acceptor])
        assert sender.run_once(now=later(301)) == 1
        assert outbox(sessions, row_id).state is DeliveryState.DELIVERED
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("result", "verdict", "name"),
    [
        (1, Verdict.DEAD, "rejected-permanent"),
        (2, Verdict.RETRY, "rejected-transient"),
        (7, Verdict.RETRY, "0x07"),
    ],
)
def test_classify_rejection(result: int, verdict: Verdict, name: str) -> None:
    """A-ASSOCIATE-RJ result 1 is permanent, 2 (and anything unknown) is retried; the text names it."""
    outcome = classify_rejection("PACS@host:104", result, "Service User", "No reason given")
    assert outcome.verdict is verdict
    assert name in outcome.reason and "Service User" in outcome.reason and "No reason given" in outcome.reason


def test_sender_announces_dicomnode_identity(sessions: sessionmaker[Session], storage: Path) -> None:
    """The A-ASSOCIATE-RQ carries dicomnode's Implementation Class UID and Version Name (the ones the
    listener announces), not pynetdicom's."""
    seen: list[tuple[str, str]] = []

    def handle_store(event: evt.Event) -> int:
        requestor = event.assoc.requestor
        seen.append((str(requestor.implementation_class_uid), str(requestor.implementation_version_name)))
        return 0x0000

    ae = AE(ae_title="IDSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert isinstance(server, ThreadedAssociationServer)
    try:
        row_id = add_result(sessions, storage, "CT_small.dcm")
        assert make_sender(sessions, storage, destination(server.server_address[1], "IDSCP")).run_once() == 1
    finally:
        server.shutdown()
    assert outbox(sessions, row_id).state is DeliveryState.DELIVERED
    assert seen == [(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)]


def test_peer_down_is_retried_with_growing_backoff(sessions: sessionmaker[Session], storage: Path) -> None:
    """Nothing listening: the row stays pending, each failure pushes the next attempt further out."""
    row_id = add_result(sessions, storage, "CT_small.dcm")
    sender = make_sender(sessions, storage, destination(free_port()))
    now = utcnow()
    for attempt in range(1, 6):
        assert sender.run_once(now=now) == 1
        row = outbox(sessions, row_id)
        assert row.state is DeliveryState.PENDING and row.attempts == attempt
        assert "connection refused" in (row.last_error or "")
        ceiling = min(300, 5 * 2 ** (attempt - 1))
        assert now <= row.next_attempt_at <= now + timedelta(seconds=ceiling)
        assert sender.run_once(now=now) == 0  # not due again before its time
        now = row.next_attempt_at


def test_out_of_resources_is_retried_and_rejections_are_dead(
    sessions: sessionmaker[Session], storage: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pynetdicom SCP answering chosen statuses: 0xA700 retried, 0xC000/0xA900/0x0122/0x0124 dead,
    warnings delivered; the peer's Error Comment is stored but never logged, nor is patient data."""
    statuses = [0xA700, 0xC000, 0xA900, 0x0122, 0x0124, 0xB000, 0x0001]
    answers: dict[str, int] = {}

    def handle_store(event: evt.Event) -> Dataset:
        status = Dataset()
        status.Status = answers[str(event.dataset.SOPInstanceUID)]
        status.ErrorComment = "PEER-COMMENT"
        return status

    ae = AE(ae_title="STATUSSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert isinstance(server, ThreadedAssociationServer)
    try:
        port = server.server_address[1]
        ids = {}
        for status in statuses:
            row_id = add_result(sessions, storage, "CT_small.dcm")
            answers[outbox(sessions, row_id).sop_instance_uid] = status
            ids[status] = row_id
        caplog.set_level(logging.INFO, logger="dicomnode.deliver.sender")
        assert make_sender(sessions, storage, destination(port, "STATUSSCP")).run_once() == len(statuses)
    finally:
        server.shutdown()

    expected = {
        0xA700: DeliveryState.PENDING,
        0xC000: DeliveryState.DEAD,
        0xA900: DeliveryState.DEAD,
        0x0122: DeliveryState.DEAD,
        0x0124: DeliveryState.DEAD,
        0xB000: DeliveryState.DELIVERED,
        0x0001: DeliveryState.DELIVERED,
    }
    for status, state in expected.items():
        row = outbox(sessions, ids[status])
        assert (row.state, row.last_status, row.attempts) == (state, status, 1), hex(status)
        assert "PEER-COMMENT" in (row.last_error or "")
    assert "PEER-COMMENT" not in caplog.text
    assert "CompressedSamples" not in caplog.text and "1CT1" not in caplog.text  # patient name / ID
    assert caplog.text.count("dead letter") == 4 and caplog.text.count("delivered ") == 2


def test_gives_up_after_the_configured_hours(sessions: sessionmaker[Session], storage: Path) -> None:
    """A row older than give_up_after_hours that fails again is dead, with the last error in the reason."""
    old = add_result(sessions, storage, "CT_small.dcm", created_at=utcnow() - timedelta(hours=73))
    young = add_result(sessions, storage, "CT_small.dcm", created_at=utcnow() - timedelta(hours=71.99))
    make_sender(sessions, storage, destination(free_port())).run_once()

    dead = outbox(sessions, old)
    assert dead.state is DeliveryState.DEAD
    assert "gave up after 1 attempts over 72 h" in (dead.last_error or "")
    assert "connection refused" in (dead.last_error or "")
    pending = outbox(sessions, young)
    assert pending.state is DeliveryState.PENDING
    # the last retry is scheduled no later than the deadline
    assert pending.next_attempt_at <= pending.created_at + timedelta(hours=72)


def test_missing_file_and_unknown_destination_are_dead(
    sessions: sessionmaker[Session], storage: Path
) -> None:
    """A result file that vanished, or a destination no longer configured, fails fast with a reason."""
    missing = add_result(sessions, storage, "CT_small.dcm")
    (storage / outbox(sessions, missing).path).unlink()
    unknown = add_result(sessions, storage, "CT_small.dcm", dest="gone")
    make_sender(sessions, storage, destination(free_port())).run_once()

    assert outbox(sessions, missing).state is DeliveryState.DEAD
    assert "missing" in (outbox(sessions, missing).last_error or "")
    assert outbox(sessions, unknown).state is DeliveryState.DEAD
    assert "'gone' is not in the configuration" in (outbox(sessions, unknown).last_error or "")


def test_retry_brings_dead_rows_back(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """retry() by job or by study resets dead rows to pending, due now; they are then delivered."""
    port = free_port()
    first = add_result(sessions, storage, "CT_small.dcm", created_at=utcnow() - timedelta(hours=80))
    second = add_result(
        sessions,
        storage,
        "CT_small.dcm",
        created_at=utcnow() - timedelta(hours=80),
        study_instance_uid=OTHER_STUDY_UID,
    )
    sender = make_sender(sessions, storage, destination(port))
    queue = OutboxQueue(sessions, ["pacs"])
    sender.run_once()
    assert outbox(sessions, first).state is outbox(sessions, second).state is DeliveryState.DEAD
    assert queue.summary() == {
        "pacs": {"pending": 0, "delivered": 0, "dead": 2, "committed": 0, "commit-failed": 0}
    }

    assert queue.retry(job_id=outbox(sessions, first).job_id) == 1
    row = outbox(sessions, first)
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 0)
    assert outbox(sessions, second).state is DeliveryState.DEAD
    assert queue.retry(study_instance_uid=OTHER_STUDY_UID) == 1

    peer = start_storescp(tmp_path, port=port)
    peers.append(peer)
    assert sender.run_once() == 2
    assert queue.summary() == {
        "pacs": {"pending": 0, "delivered": 2, "dead": 0, "committed": 0, "commit-failed": 0}
    }
    assert len(peer.received()) == 2


def test_pending_rows_survive_a_restart(tmp_path: Path, storage: Path, peers: list[Any]) -> None:
    """Rows that failed while the peer was down are delivered by a new Sender on a new engine later."""
    url = f"sqlite:///{tmp_path}/restart.sqlite"
    engine = make_engine(url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    port = free_port()
    ids = [add_result(sessions, storage, "CT_small.dcm") for _ in range(2)]
    make_sender(sessions, storage, destination(port)).run_once()
    assert all(outbox(sessions, i).state is DeliveryState.PENDING for i in ids)
    engine.dispose()  # the node stops

    peer = start_storescp(tmp_path, port=port)
    peers.append(peer)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    sender = make_sender(sessions, storage, destination(port))
    assert sender.run_once() == 0  # backoff still running
    assert sender.run_once(now=later(301)) == 2
    assert all(outbox(sessions, i).state is DeliveryState.DELIVERED for i in ids)
    assert received_uids(peer) == {outbox(sessions, i).sop_instance_uid for i in ids}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_run_forever_delivers_and_survives_bad_rows(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """The loop delivers rows added while it runs, dead-letters a broken one, and stops on the event."""
    peer = start_storescp(tmp_path)
    peers.append(peer)
    sender = make_sender(sessions, storage, destination(peer.port))
    stop = threading.Event()
    thread = threading.Thread(target=sender.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        broken = add_result(sessions, storage, "CT_small.dcm")
        (storage / outbox(sessions, broken).path).write_bytes(b"not dicom")
        good = add_result(sessions, storage, "CT_small.dcm")
        wait_for(lambda: outbox(sessions, good).state is DeliveryState.DELIVERED)
        assert outbox(sessions, broken).state is DeliveryState.DEAD
        later_row = add_result(sessions, storage, "test-SR.dcm")
        wait_for(lambda: outbox(sessions, later_row).state is DeliveryState.DELIVERED)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


# --- a real PACS -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_delivers_to_orthanc(
    tmp_path: Path, sessions: sessionmaker[Session], storage: Path, peers: list[Any]
) -> None:
    """A CT and an SR reach Orthanc; a resend of the same SOP Instance UID is harmless."""
    orthanc = start_orthanc(tmp_path)
    peers.append(orthanc)
    ids = [add_result(sessions, storage, name) for name in ("CT_small.dcm", "test-SR.dcm")]
    sender = make_sender(sessions, storage, destination(orthanc.dicom_port, orthanc.aet))
    assert sender.run_once() == 2
    uids = {outbox(sessions, i).sop_instance_uid for i in ids}
    assert all(outbox(sessions, i).state is DeliveryState.DELIVERED for i in ids)
    assert orthanc.sop_instance_uids() == uids

    # at-least-once: sending again (as after a crash before the commit) leaves one copy each
    assert OutboxQueue(sessions).retry(study_instance_uid=STUDY_UID) == 0  # delivered rows are not retried
    with sessions.begin() as session:
        for row in session.scalars(select(Outbox)):
            row.state = DeliveryState.PENDING
            row.next_attempt_at = utcnow()
    assert sender.run_once() == 2
    assert all(outbox(sessions, i).state is DeliveryState.DELIVERED for i in ids)
    assert orthanc.sop_instance_uids() == uids
