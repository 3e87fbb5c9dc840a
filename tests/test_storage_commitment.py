"""Storage Commitment Push Model (PS3.4 Annex J) against real peers.

Orthanc is the Storage Commitment SCP (it answers on a new association, to our listener); dcmtk's
storescp has no Storage Commitment (the N-ACTION is refused); a small pynetdicom AE answers on the
N-ACTION's own association, or not at all; a pynetdicom SCU sends our listener N-EVENT-REPORTs with
SCP/SCU Role Selection. Every test uses a real SQLite database, a real listener on port 0 and the
real sender.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningListener
from e2e_helpers import (
    NodeProcess,
    served_chest_study,
    study_entry,
)
from e2e_helpers import wait_for as wait_for_value
from peers import OrthancPeer, free_port, start_orthanc, start_storescp
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from test_e2e import models_dir  # noqa: F401 - the session's installed default model

from dicomnode.config import DeliveryConfig, DestinationConfig
from dicomnode.db import Commitment, CommitmentState, DeliveryState, Job, JobState, Outbox, Study, utcnow
from dicomnode.deliver.sender import Sender
from dicomnode.net.association import (
    STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS as COMMITMENT_CLASS,
)
from dicomnode.net.association import (
    STORAGE_COMMITMENT_PUSH_MODEL_SOP_INSTANCE as COMMITMENT_INSTANCE,
)
from dicomnode.node.inventory import list_studies, node_status
from dicomnode.node.services import Services
from dicomnode.queue.commitments import AnswerResult, CommitmentStore, FailedObject
from dicomnode.queue.outbox import OutboxQueue
from dicomnode.status import Status

STUDY_UID = "1.2.826.0.1.3680043.8.498.77"
POLICY = DeliveryConfig(
    retry_initial_seconds=5,
    retry_max_seconds=300,
    give_up_after_hours=72,
    poll_interval_seconds=0.05,
    timeout_seconds=5,
    commitment_timeout_seconds=600,
    commitment_wait_seconds=2,
)


# --- helpers -----------------------------------------------------------------------------------------


def add_result(
    services: Services,
    source: str = "CT_small.dcm",
    *,
    dest: str = "pacs",
    state: DeliveryState = DeliveryState.PENDING,
) -> int:
    """A result file (fresh SOP Instance UID) in the storage folder and its outbox row."""
    storage = services.config.storage.path
    dataset = dcmread(get_testdata_file(source, read=False))  # type: ignore[arg-type]
    uid = generate_uid()
    dataset.SOPInstanceUID = uid
    dataset.file_meta.MediaStorageSOPInstanceUID = uid
    dataset.StudyInstanceUID = STUDY_UID
    relative = f"results/{uid}.dcm"
    (storage / "results").mkdir(parents=True, exist_ok=True)
    dataset.save_as(storage / relative)
    now = utcnow()
    with services.sessions.begin() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == STUDY_UID))
        if study is None:
            study = Study(study_instance_uid=STUDY_UID)
            session.add(study)
            session.flush()
        job = Job(study_id=study.id, state=JobState.DONE)
        session.add(job)
        session.flush()
        row = Outbox(
            job_id=job.id,
            study_instance_uid=STUDY_UID,
            destination=dest,
            sop_instance_uid=uid,
            sop_class_uid=str(dataset.SOPClassUID),
            path=relative,
            state=state,
            created_at=now,
            next_attempt_at=now,
            delivered_at=now if state is DeliveryState.DELIVERED else None,
        )
        session.add(row)
        session.flush()
        return row.id


def row(services: Services, row_id: int) -> Outbox:
    with services.sessions() as session:
        found = session.get(Outbox, row_id)
        assert found is not None
        session.expunge(found)
        return found


def commitments(services: Services) -> list[Commitment]:
    with services.sessions() as session:
        found = list(session.scalars(select(Commitment).order_by(Commitment.id)))
        for item in found:
            session.expunge(item)
        return found


def wait_for(
    condition: Callable[[], bool], what: str, timeout: float = 20.0, step: Callable[[], Any] | None = None
) -> None:
    """Poll ``condition`` (running ``step`` between polls) until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if step is not None:
            step()
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_sender(services: Services, dest: DestinationConfig, policy: DeliveryConfig = POLICY) -> Sender:
    return Sender(
        policy,
        [dest],
        services.sessions,
        services.config.storage.path,
        ae_title=services.config.node.ae_title,
        rng=random.Random(3),
    )


def committed_destination(port: int, ae_title: str) -> DestinationConfig:
    return DestinationConfig(
        name="pacs", ae_title=ae_title, host="127.0.0.1", port=port, storage_commitment=True
    )


def orthanc_knowing(tmp_path: Path, listener: RunningListener) -> OrthancPeer:
    """Orthanc with our node in its DicomModalities, so it can open the association for the report."""
    orthanc = start_orthanc(tmp_path)
    orthanc.rest(
        f"/modalities/{listener.ae_title.lower()}",
        "PUT",
        f'{{"AET": "{listener.ae_title}", "Host": "127.0.0.1", "Port": {listener.port}}}',
    )
    return orthanc


def states(services: Services, ids: list[int]) -> list[DeliveryState]:
    return [row(services, i).state for i in ids]


def metric(result: str, destination: str = "pacs") -> float:
    """dicomnode_storage_commitments_total for one result, from this process's registry."""
    from prometheus_client import REGISTRY

    labels = {"destination": destination, "result": result}
    return REGISTRY.get_sample_value("dicomnode_storage_commitments_total", labels) or 0.0


# --- Orthanc: a report on a new association -----------------------------------------------------------


@pytest.mark.e2e
def test_orthanc_commits_what_was_delivered(
    tmp_path: Path, services: Services, listener: RunningListener, peers: list[Any]
) -> None:
    """Delivered to Orthanc, N-ACTION, Orthanc's N-EVENT-REPORT reaches our listener: committed."""
    orthanc = orthanc_knowing(tmp_path, listener)
    peers.append(orthanc)
    ids = [add_result(services, name) for name in ("CT_small.dcm", "test-SR.dcm")]
    sender = make_sender(services, committed_destination(orthanc.dicom_port, orthanc.aet))
    assert sender.run_once() >= 2
    wait_for(lambda: states(services, ids) == [DeliveryState.COMMITTED] * 2, "both rows committed")
    [transaction] = commitments(services)
    assert transaction.state is CommitmentState.COMMITTED
    assert (transaction.objects, transaction.failed) == (2, 0)
    # shown to the operator: studies --json, status
    [study] = list_studies(services.sessions, services.config.storage.path)
    assert {d["state"] for d in study["deliveries"]} == {"committed"}
    assert study["state"] == "committed"
    assert sender.run_once() == 0  # nothing more to ask
    assert metric("committed") >= 1


@pytest.mark.e2e
def test_an_object_orthanc_does_not_hold_fails_and_is_resent(
    tmp_path: Path, services: Services, listener: RunningListener, peers: list[Any]
) -> None:
    """A row marked delivered that Orthanc never got: commit-failed (0x0112), resent, then committed."""
    orthanc = orthanc_knowing(tmp_path, listener)
    peers.append(orthanc)
    missing = add_result(services, state=DeliveryState.DELIVERED)  # never sent
    sender = make_sender(services, committed_destination(orthanc.dicom_port, orthanc.aet))
    sender.run_once()
    wait_for(lambda: row(services, missing).state is DeliveryState.COMMIT_FAILED, "commit-failed")
    failed = row(services, missing)
    assert "Failure Reason 0x0112 (NO_SUCH_SOP_INSTANCE)" in (failed.last_error or "")
    assert commitments(services)[0].state is CommitmentState.FAILED

    sender.run_once()  # settles: due again after the back-off
    settled = row(services, missing)
    assert settled.state is DeliveryState.COMMIT_FAILED and settled.commitment_id is None
    assert settled.next_attempt_at > utcnow()
    assert sender.run_once() == 0  # not due yet

    later = settled.next_attempt_at + timedelta(seconds=1)
    sender.run_once(later)  # resent, then a fresh commitment
    wait_for(lambda: row(services, missing).state is DeliveryState.COMMITTED, "committed after the resend")
    assert row(services, missing).sop_instance_uid in orthanc.sop_instance_uids()
    first, second = commitments(services)
    assert (first.state, second.state) == (CommitmentState.FAILED, CommitmentState.COMMITTED)
    assert first.transaction_uid != second.transaction_uid


# --- dcmtk storescp: no Storage Commitment ------------------------------------------------------------


@pytest.mark.e2e
def test_storescp_refuses_the_n_action(tmp_path: Path, services: Services, peers: list[Any]) -> None:
    """storescp rejects the Storage Commitment context: stays delivered, with the reason, asked once."""
    peer = start_storescp(tmp_path)
    peers.append(peer)
    refused_before = metric("refused")
    row_id = add_result(services)
    sender = make_sender(services, committed_destination(peer.port, peer.aet))
    sender.run_once()
    delivered = row(services, row_id)
    assert delivered.state is DeliveryState.DELIVERED
    assert "storage commitment refused" in (delivered.last_error or "")
    assert "presentation context" in (delivered.last_error or "")
    [transaction] = commitments(services)
    assert transaction.state is CommitmentState.REFUSED
    assert sender.run_once() == 0  # not asked again
    status = node_status(services.sessions, services.config)
    assert status["deliveries"]["delivered"] == 1 and status["deliveries"]["committed"] == 0
    assert metric("refused") == refused_before + 1
    # the operator's `retry`: the object is not resent, but asked about again in a new transaction
    outbox = OutboxQueue(services.sessions, ["pacs"])
    assert outbox.retry(study_instance_uid=delivered.study_instance_uid) == 1
    assert row(services, row_id).commitment_id is None and row(services, row_id).last_error is None
    sender.run_once()
    first, second = commitments(services)
    assert (first.state, second.state) == (CommitmentState.REFUSED, CommitmentState.REFUSED)
    assert first.transaction_uid != second.transaction_uid
    assert row(services, row_id).state is DeliveryState.DELIVERED  # never resent
    assert outbox.retry(study_instance_uid="1.2.3.999") == 0  # another study: nothing


# --- a pynetdicom peer: a report on the N-ACTION's own association, or none ---------------------------


class CommitmentPeer:
    """A Storage and Storage Commitment SCP that reports on the same association (or never)."""

    def __init__(self, *, report: bool, fail: set[str] | None = None) -> None:
        self.report = report
        self.fail = fail or set()
        self.stored: set[str] = set()
        self.ae = AE(ae_title="COMMITSCP")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(COMMITMENT_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.port = free_port()
        self.threads: list[threading.Thread] = []
        self.action_answered = threading.Event()
        self.server: ThreadedAssociationServer = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_N_ACTION, self._action),
                (evt.EVT_DIMSE_SENT, self._sent),
            ],
        )

    def _store(self, event: Any) -> int:
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _sent(self, event: Any) -> None:
        if type(event.message).__name__ == "N_ACTION_RSP":
            self.action_answered.set()

    def _action(self, event: Any) -> tuple[int, None]:
        info = event.action_information
        self.action_answered.clear()
        if self.report:
            thread = threading.Thread(target=self._send_report, args=(event.assoc, info), daemon=True)
            self.threads.append(thread)
            thread.start()
        return 0x0000, None

    def _send_report(self, assoc: Any, info: Dataset) -> None:
        # the N-ACTION-RSP leaves when the handler returns; the report follows on the same association
        if not self.action_answered.wait(5):
            return
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        ok, failed = [], []
        for item in info.ReferencedSOPSequence:
            target = failed if item.ReferencedSOPInstanceUID in self.fail else ok
            copy = Dataset()
            copy.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            copy.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            if target is failed:
                copy.FailureReason = 0x0110
            target.append(copy)
        report.ReferencedSOPSequence = ok
        if failed:
            report.FailedSOPSequence = failed
        assoc.send_n_event_report(report, 2 if failed else 1, COMMITMENT_CLASS, COMMITMENT_INSTANCE)

    def stop(self) -> None:
        self.server.shutdown()
        for thread in self.threads:
            thread.join(timeout=5)


def test_report_on_the_same_association(services: Services, peers: list[Any]) -> None:
    """The peer reports before the release: one committed, one failed (resent, with its reason)."""
    rows = [add_result(services), add_result(services)]
    failing = row(services, rows[1]).sop_instance_uid
    peer = CommitmentPeer(report=True, fail={failing})
    peers.append(peer)
    sender = make_sender(services, committed_destination(peer.port, "COMMITSCP"))
    sender.run_once()
    assert states(services, rows) == [DeliveryState.COMMITTED, DeliveryState.COMMIT_FAILED]
    assert "0x0110 (PROCESSING_FAILURE)" in (row(services, rows[1]).last_error or "")
    assert commitments(services)[0].state is CommitmentState.FAILED
    sender.run_once()  # settle
    resend_at = row(services, rows[1]).next_attempt_at + timedelta(seconds=1)
    peer.fail.clear()
    sender.run_once(resend_at)
    assert states(services, rows) == [DeliveryState.COMMITTED, DeliveryState.COMMITTED]
    assert [c.state for c in commitments(services)] == [CommitmentState.FAILED, CommitmentState.COMMITTED]


def test_a_commit_failure_past_the_give_up_window_is_dead(services: Services, peers: list[Any]) -> None:
    """The normal retry policy bounds resends: past give_up_after_hours a commit failure is dead."""
    row_id = add_result(services, state=DeliveryState.DELIVERED)
    with services.sessions.begin() as session:
        old = session.get(Outbox, row_id)
        assert old is not None
        old.created_at = utcnow() - timedelta(hours=POLICY.give_up_after_hours + 1)
    peer = CommitmentPeer(report=True, fail={row(services, row_id).sop_instance_uid})
    peers.append(peer)
    sender = make_sender(services, committed_destination(peer.port, "COMMITSCP"))
    sender.run_once()
    assert row(services, row_id).state is DeliveryState.COMMIT_FAILED
    sender.run_once()
    dead = row(services, row_id)
    assert dead.state is DeliveryState.DEAD
    assert "gave up" in (dead.last_error or "") and "storage commitment failed" in (dead.last_error or "")


def test_no_report_times_out_and_resends(services: Services, peers: list[Any]) -> None:
    """No N-EVENT-REPORT within commitment_timeout_seconds: commit-failed (timed out), resent."""
    peer = CommitmentPeer(report=False)
    peers.append(peer)
    policy = dataclasses.replace(POLICY, commitment_wait_seconds=0.2)
    row_id = add_result(services)
    sender = make_sender(services, committed_destination(peer.port, "COMMITSCP"), policy)
    sender.run_once()
    assert row(services, row_id).state is DeliveryState.DELIVERED
    assert commitments(services)[0].state is CommitmentState.REQUESTED
    late = utcnow() + timedelta(seconds=policy.commitment_timeout_seconds + 1)
    sender.run_once(late)  # expires, settles
    expired = row(services, row_id)
    assert expired.state is DeliveryState.COMMIT_FAILED
    assert "timed out" in (expired.last_error or "")
    assert commitments(services)[0].state is CommitmentState.TIMED_OUT
    sender.run_once(expired.next_attempt_at + timedelta(seconds=1))  # resent, asked again
    assert row(services, row_id).state is DeliveryState.DELIVERED
    assert [c.state for c in commitments(services)] == [CommitmentState.TIMED_OUT, CommitmentState.REQUESTED]


# --- our listener: a report on a new association, with role selection ---------------------------------


def open_transaction(services: Services) -> tuple[str, Outbox]:
    row_id = add_result(services, state=DeliveryState.DELIVERED)
    transaction_uid = str(generate_uid())
    now = utcnow()
    CommitmentStore(services.sessions).begin(transaction_uid, "pacs", [row_id], now, now + timedelta(hours=1))
    return transaction_uid, row(services, row_id)


def report_for(transaction_uid: str, delivered: Outbox) -> Dataset:
    report = Dataset()
    report.TransactionUID = transaction_uid
    item = Dataset()
    item.ReferencedSOPClassUID = delivered.sop_class_uid
    item.ReferencedSOPInstanceUID = delivered.sop_instance_uid
    report.ReferencedSOPSequence = [item]
    return report


def send_reports(listener: RunningListener, reports: list[tuple[Dataset, int]]) -> list[int]:
    """Open an association as Storage Commitment SCP (role selection) and send each report."""
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(COMMITMENT_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    role = build_role(COMMITMENT_CLASS, scu_role=False, scp_role=True)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title, ext_neg=[role])
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
        assert (context.as_scu, context.as_scp) == (False, True)  # the role we asked for
        statuses = []
        for dataset, event_type in reports:
            status, _reply = assoc.send_n_event_report(
                dataset, event_type, COMMITMENT_CLASS, COMMITMENT_INSTANCE
            )
            statuses.append(int(status.Status))
        return statuses
    finally:
        assoc.release()


def test_listener_takes_a_report_with_role_selection(services: Services, listener: RunningListener) -> None:
    """Role selection (SCU 0, SCP 1) is accepted; the report commits the row and is answered 0x0000."""
    transaction_uid, delivered = open_transaction(services)
    assert send_reports(listener, [(report_for(transaction_uid, delivered), 1)]) == [Status.SUCCESS]
    assert row(services, delivered.id).state is DeliveryState.COMMITTED
    assert commitments(services)[0].state is CommitmentState.COMMITTED
    # the same report again changes nothing and is acknowledged
    assert send_reports(listener, [(report_for(transaction_uid, delivered), 1)]) == [Status.SUCCESS]


def test_listener_refuses_unknown_transactions_and_bad_reports(
    services: Services, listener: RunningListener
) -> None:
    """Unknown Transaction UID 0x0115, no or a malformed Transaction UID 0x0115, bad Event Type ID 0x0113."""
    transaction_uid, delivered = open_transaction(services)
    unknown = report_for(str(generate_uid()), delivered)
    no_uid = report_for(transaction_uid, delivered)
    del no_uid.TransactionUID
    not_a_uid = report_for(transaction_uid, delivered)
    not_a_uid.TransactionUID = "1.2\nforged log line"  # never a UID, never written to the log
    statuses = send_reports(
        listener,
        [(unknown, 1), (no_uid, 1), (not_a_uid, 1), (report_for(transaction_uid, delivered), 7)],
    )
    assert statuses == [
        Status.INVALID_ARGUMENT_VALUE,
        Status.INVALID_ARGUMENT_VALUE,
        Status.INVALID_ARGUMENT_VALUE,
        Status.NO_SUCH_EVENT_TYPE,
    ]
    assert row(services, delivered.id).state is DeliveryState.DELIVERED
    assert commitments(services)[0].state is CommitmentState.REQUESTED


def test_report_handler_refuses_what_is_no_commitment_result(services: Services) -> None:
    """Wrong SOP class or instance, no or unreadable Event Information: named statuses, no change."""
    from dicomnode.net.association import Association
    from dicomnode.net.dimse import N_EVENT_REPORT_RQ, Command
    from dicomnode.receive.commitment import CommitmentReports

    handler = CommitmentReports(CommitmentStore(services.sessions))
    association = Association("PACS", "DICOMNODE", "127.0.0.1", 1, {}, 16384)

    def answer(sop_class: str, instance: str, data: list[memoryview] | None) -> int:
        command = Command(N_EVENT_REPORT_RQ, 1, data is not None, sop_class, instance, event_type_id=1)
        return handler.n_event_report(association, command, str(ImplicitVRLittleEndian), data).status

    truncated = [memoryview(b"\x08\x00\x95\x11\x40\x00\x00\x00" + b"1.2")]  # (0008,1195), 64 bytes announced
    assert answer("1.2.840.10008.1.1", COMMITMENT_INSTANCE, truncated) == Status.NO_SUCH_SOP_CLASS
    assert answer(COMMITMENT_CLASS, "1.2.3", truncated) == Status.NO_SUCH_SOP_INSTANCE
    assert answer(COMMITMENT_CLASS, COMMITMENT_INSTANCE, None) == Status.PROCESSING_FAILURE
    # pydicom reads the cut value as "1.2": a Transaction UID we never sent
    assert answer(COMMITMENT_CLASS, COMMITMENT_INSTANCE, truncated) == Status.INVALID_ARGUMENT_VALUE
    # a sequence of undefined length whose item tag is garbage cannot be read at all
    broken = (
        b"\x08\x00\x95\x11\x04\x00\x00\x001.2\x00"  # Transaction UID
        b"\x08\x00\x99\x11\xff\xff\xff\xff\x12\x34\x56\x78\x00\x00\x00\x00"  # SQ, then no item tag
    )
    assert answer(COMMITMENT_CLASS, COMMITMENT_INSTANCE, [memoryview(broken)]) == Status.PROCESSING_FAILURE


def test_commitment_store_contract(backend_services: Services) -> None:
    """begin, answer, expire and settle on SQLite and PostgreSQL: the states the sender relies on."""
    services = backend_services
    store = CommitmentStore(services.sessions)
    ok, failed, left_out = (add_result(services, state=DeliveryState.DELIVERED) for _ in range(3))
    pending = add_result(services)
    assert [r.id for r in store.uncommitted("pacs", 10)] == [ok, failed, left_out]
    now = utcnow()
    assert store.begin("2.25.1", "pacs", [ok, failed, left_out, pending], now, now + timedelta(hours=1)) == [
        ok,
        failed,
        left_out,
    ]
    assert store.uncommitted("pacs", 10) == [] and store.is_open("2.25.1")
    failed_uid = row(services, failed).sop_instance_uid
    answer = store.answer(
        "2.25.1",
        [row(services, ok).sop_instance_uid, "2.25.999"],
        [FailedObject("1.2.3", failed_uid, Status.NO_SUCH_SOP_INSTANCE)],
        now,
    )
    assert (answer.result, answer.committed, answer.failed, answer.unknown) == (
        AnswerResult.RECORDED,
        1,
        2,
        ["2.25.999"],
    )
    assert states(services, [ok, failed, left_out]) == [
        DeliveryState.COMMITTED,
        DeliveryState.COMMIT_FAILED,
        DeliveryState.COMMIT_FAILED,
    ]
    assert store.answer("2.25.1", [], [], now).result is AnswerResult.ALREADY_CLOSED
    assert store.answer("2.25.2", [], [], now).result is AnswerResult.UNKNOWN_TRANSACTION
    unsettled = dict((r.id, error) for r, error in store.unsettled(10))
    assert set(unsettled) == {failed, left_out} and "0x0112" in unsettled[failed]
    assert OutboxQueue(services.sessions, ["pacs"]).due(now + timedelta(days=1), 10) == {"pacs": [pending]}
    for settled_row, error in store.unsettled(10):
        store.settle(settled_row, DeliveryState.COMMIT_FAILED, now, error)
    assert sorted(OutboxQueue(services.sessions, ["pacs"]).due(now, 10)["pacs"]) == sorted(
        [failed, left_out, pending]
    )
    # nothing left to ask about: no transaction; one nobody answers expires
    assert store.begin("2.25.3", "pacs", [ok, pending], now, now) == []
    assert not store.is_open("2.25.3")
    late = add_result(services, state=DeliveryState.DELIVERED)
    assert store.begin("2.25.4", "pacs", [late], now, now) == [late]
    assert store.expire(now + timedelta(seconds=1)) == [("pacs", "2.25.4", 1)]
    assert not store.is_open("2.25.4")
    assert row(services, late).state is DeliveryState.COMMIT_FAILED
    assert "timed out" in (row(services, late).last_error or "")


def test_storage_commitment_config_key(tmp_path: Path) -> None:
    """destinations[].storage_commitment defaults to false and must be a boolean."""
    from conftest import make_config

    from dicomnode.config import ConfigurationError

    base = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    assert make_config(tmp_path, destinations=[base]).destinations[0].storage_commitment is False
    config = make_config(tmp_path, destinations=[{**base, "storage_commitment": True}])
    assert config.destinations[0].storage_commitment is True
    assert config.delivery.commitment_timeout_seconds == 14400
    with pytest.raises(ConfigurationError, match=r"destinations\[0\]\.storage_commitment"):
        make_config(tmp_path, destinations=[{**base, "storage_commitment": "yes"}])


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_serve_delivers_to_orthanc_and_its_commitment_report_marks_every_object_committed(
    tmp_path: Path,
    peers: list[Any],
    models_dir: Path,  # noqa: F811 - the fixture imported from test_e2e
) -> None:
    """`dicomnode serve` as an operator runs it: a radiograph in by C-STORE, its SR and key image out
    to Orthanc, the N-ACTION from the sender process, Orthanc's N-EVENT-REPORT on a new association
    to the listener, and every delivery row of the study `committed` in `studies --json`."""
    orthanc = start_orthanc(tmp_path / "pacs")
    peers.append(orthanc)

    def report_to_our_listener(node: NodeProcess) -> None:  # known once the node has its port
        orthanc.rest(
            f"/modalities/{node.ae_title.lower()}",
            "PUT",
            f'{{"AET": "{node.ae_title}", "Host": "127.0.0.1", "Port": {node.port}}}',
        )

    settings = {
        "destination_ae": orthanc.aet,
        "destination_port": orthanc.dicom_port,
        "storage_commitment": True,
        "before_send": report_to_our_listener,
    }
    with served_chest_study(tmp_path, peers, models_dir, orthanc, **settings) as (node, source):

        def committed() -> list[dict[str, Any]] | None:
            study = study_entry(node, source.study_instance_uid)
            rows = study["deliveries"] if study else []
            return rows if rows and all(r["state"] == "committed" for r in rows) else None

        rows = wait_for_value(committed, "every delivery row committed", 60.0, 0.5)
        assert {r["destination"] for r in rows} == {"pacs"}
        assert all(r["commitment_id"] for r in rows)
        status = node.cli_json("status", "--json")
        assert status["deliveries"].get("committed") == len(rows)


def test_retention_keeps_a_study_whose_commitment_is_awaited(services: Services) -> None:
    """A delivered object whose report is still due is pending work: purging it would leave the
    report nothing to find and the failed objects nothing to resend."""
    from dicomnode.queue.purge import has_pending_work

    transaction_uid, delivered = open_transaction(services)

    def pending() -> bool:
        with services.sessions() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == STUDY_UID))
            assert study is not None
            return has_pending_work(session, study.id, STUDY_UID)

    assert pending()
    answer = CommitmentStore(services.sessions).answer(
        transaction_uid, [delivered.sop_instance_uid], [], utcnow()
    )
    assert answer.result is AnswerResult.RECORDED
    assert not pending()
