"""The outbox and results contract: OutboxQueue and ResultStore on a real database.

Written once for every backend: the ``backend`` fixture gives a migrated database per test, a SQLite
file under ``tmp_path`` and a fresh database on a real PostgreSQL server the tests start. Jobs are
made the way the node makes them, through
:class:`~dicomnode.queue.jobs.JobQueue`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_queue import record

from dicomnode import migrate
from dicomnode.db import (
    DeliveryState,
    Job,
    JobState,
    Outbox,
    Result,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from dicomnode.findings import ModelIdentity, StudyFindings
from dicomnode.queue.jobs import ClaimedJob, JobQueue
from dicomnode.queue.outbox import (
    ERROR_LENGTH,
    DeliveryAttempt,
    OutboxQueue,
    OutboxRow,
    StoredObject,
    objects_from_json,
    objects_to_json,
)
from dicomnode.queue.results import ResultStore

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
CT = "1.2.840.10008.5.1.4.1.1.2"
DESTINATIONS = ("pacs", "archive")
LEASE = timedelta(seconds=60)


@dataclass
class Backend:
    """A migrated database and the queues on it."""

    sessions: sessionmaker[Session]
    jobs: JobQueue
    outbox: OutboxQueue
    results: ResultStore


@pytest.fixture
def backend(database_url: str) -> Iterator[Backend]:
    """A migrated database on each backend in turn (conftest's ``database_url``: a SQLite file, and a
    fresh database on the PostgreSQL server the tests start); every test below runs on both."""
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    try:
        yield Backend(
            sessions, JobQueue(sessions), OutboxQueue(sessions, DESTINATIONS), ResultStore(sessions)
        )
    finally:
        engine.dispose()


def running_job(backend: Backend, study_instance_uid: str | None = None) -> ClaimedJob:
    """A job leased to this test, made as the node makes one: an instance, assembly, a claim."""
    study = study_instance_uid or generate_uid()
    backend.jobs.record_instance(record(study))
    now = utcnow() + timedelta(seconds=1)
    backend.jobs.assemble_stable_studies(0, 3, now=now)
    (job,) = backend.jobs.claim_many("test", 600, 1, now=now)
    return job


def stored(kind: str = "sr", sop_class_uid: str = SR_STORAGE) -> StoredObject:
    sop = generate_uid()
    return StoredObject(kind, sop, sop_class_uid, generate_uid(), f"results/{sop}.dcm")


def findings_of(job: ClaimedJob, model: str = "cxr") -> StudyFindings:
    return StudyFindings(job.study_instance_uid, ModelIdentity(model, "1.0", model), (), (), job.id)


def finish(backend: Backend, job: ClaimedJob, objects: list[StoredObject], model: str = "cxr") -> int:
    """What the worker's commit does: results row, outbox rows, job done, in one transaction."""
    with backend.jobs.transaction() as session:
        backend.results.add(session, job.id, findings_of(job, model), objects)
        added = backend.outbox.enqueue(session, job, objects)
        backend.jobs.complete(job, "reported", session=session)
    return added


def rows(backend: Backend) -> list[Outbox]:
    with backend.sessions() as session:
        return list(session.scalars(select(Outbox).order_by(Outbox.id)))


def claim_all(backend: Backend, now: datetime) -> list[OutboxRow]:
    due = backend.outbox.due(now, 1000)
    return [row for ids in due.values() for row in backend.outbox.claim(ids, now, LEASE)]


def attempt(
    state: DeliveryState,
    now: datetime,
    *,
    next_at: datetime | None = None,
    status: int | None = None,
    error: str | None = None,
) -> DeliveryAttempt:
    """An attempt at ``now``; next due at ``next_at`` (a retry) or ``now`` (final)."""
    return DeliveryAttempt(state, now, next_at or now, status, error)


# --- the worker's hand-off -------------------------------------------------------------------------


def test_enqueue_adds_one_row_per_destination_and_object_with_the_job(backend: Backend) -> None:
    """Two objects for two destinations make four pending rows, committed with the job and its results."""
    job = running_job(backend)
    objects = [stored(), stored("kos", KOS_STORAGE)]

    assert finish(backend, job, objects) == 4

    found = rows(backend)
    assert sorted((r.destination, r.sop_instance_uid) for r in found) == sorted(
        (d, o.sop_instance_uid) for d in DESTINATIONS for o in objects
    )
    by_uid = {o.sop_instance_uid: o for o in objects}
    for row in found:
        obj = by_uid[row.sop_instance_uid]
        assert (row.sop_class_uid, row.path, row.job_id) == (obj.sop_class_uid, obj.path, job.id)
        assert (row.study_instance_uid, row.state, row.attempts) == (
            job.study_instance_uid,
            DeliveryState.PENDING,
            0,
        )
        assert row.next_attempt_at <= utcnow()
    assert backend.outbox.summary() == {
        d: {"pending": 2, "delivered": 0, "dead": 0, "committed": 0, "commit-failed": 0} for d in DESTINATIONS
    }


def test_enqueue_rolls_back_with_the_callers_transaction(backend: Backend) -> None:
    """A commit that fails after enqueue leaves no outbox row, no result and the job still running."""
    job = running_job(backend)
    with pytest.raises(RuntimeError), backend.jobs.transaction() as session:
        backend.results.add(session, job.id, findings_of(job), [stored()])
        backend.outbox.enqueue(session, job, [stored()])
        backend.jobs.complete(job, "reported", session=session)
        raise RuntimeError("the commit fails")

    assert rows(backend) == []
    with backend.sessions() as session:
        assert session.scalars(select(Result)).all() == []
    with backend.sessions() as session:
        record = session.get(Job, job.id)
        assert record is not None and record.state is JobState.RUNNING


# --- the sender's part ---------------------------------------------------------------------------


def test_due_groups_by_destination_and_respects_the_limit(backend: Backend) -> None:
    """Due rows come grouped by destination, oldest first, at most ``limit`` of them."""
    job = running_job(backend)
    finish(backend, job, [stored() for _ in range(3)])
    now = utcnow()

    due = backend.outbox.due(now, 1000)
    assert set(due) == set(DESTINATIONS) and all(len(ids) == 3 for ids in due.values())
    assert all(ids == sorted(ids) for ids in due.values())
    assert sum(len(ids) for ids in backend.outbox.due(now, 4).values()) == 4
    assert backend.outbox.due(now - timedelta(hours=1), 1000) == {}  # not due before they were made


def test_claim_is_exclusive_until_the_lease_lapses(backend: Backend) -> None:
    """A claimed row is not claimed again until its lease has run out; claimed times are UTC-aware."""
    job = running_job(backend)
    finish(backend, job, [stored()])
    now = utcnow()
    ids = [i for ids in backend.outbox.due(now, 1000).values() for i in ids]

    first = backend.outbox.claim(ids, now, LEASE)
    assert [r.id for r in first] == ids
    assert all(r.created_at.tzinfo is not None and r.attempts == 0 for r in first)
    assert backend.outbox.claim(ids, now, LEASE) == []  # a second sender gets nothing
    assert backend.outbox.due(now + LEASE - timedelta(seconds=1), 1000) == {}
    again = backend.outbox.claim(ids, now + LEASE, LEASE)  # the first sender died
    assert [r.id for r in again] == ids


def test_record_stores_the_decision_it_is_handed(backend: Backend) -> None:
    """Delivered, retry and dead attempts are stored as handed: state, times, status, error cut short."""
    job = running_job(backend)
    finish(backend, job, [stored(), stored(), stored()])
    now = utcnow()
    claimed = [r for r in claim_all(backend, now) if r.destination == "pacs"]
    delivered, retried, dead = claimed
    retry_at = now + timedelta(seconds=42)

    backend.outbox.record(delivered, attempt(DeliveryState.DELIVERED, now, status=0))
    backend.outbox.record(
        retried, attempt(DeliveryState.PENDING, now, next_at=retry_at, status=0xA700, error="busy")
    )
    backend.outbox.record(dead, attempt(DeliveryState.DEAD, now, error="x" * (ERROR_LENGTH + 10)))

    by_id = {r.id: r for r in rows(backend)}
    row = by_id[delivered.id]
    assert (row.state, row.attempts, row.last_status, row.last_error) == (DeliveryState.DELIVERED, 1, 0, None)
    assert row.delivered_at == now and row.next_attempt_at == now
    row = by_id[retried.id]
    assert (row.state, row.attempts, row.last_status, row.last_error) == (
        DeliveryState.PENDING,
        1,
        0xA700,
        "busy",
    )
    assert row.next_attempt_at == retry_at and row.delivered_at is None
    row = by_id[dead.id]
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.DEAD, 1, None)
    assert row.last_error == "x" * ERROR_LENGTH
    assert backend.outbox.due(retry_at - timedelta(seconds=1), 1000) == {}
    assert backend.outbox.due(retry_at, 1000) == {"pacs": [retried.id]}  # archive rows: still leased
    assert delivered.id not in backend.outbox.due(retry_at + timedelta(days=9), 1000)["pacs"]


# --- the operator's part -------------------------------------------------------------------------


def test_retry_resets_dead_and_pending_rows_and_leaves_delivered_ones(backend: Backend) -> None:
    """retry() by job, study or destination makes rows pending and due now, attempts and clock reset."""
    first, second = running_job(backend), running_job(backend)
    finish(backend, first, [stored(), stored()])
    finish(backend, second, [stored()])
    now = utcnow()
    for row in claim_all(backend, now):
        state = (
            DeliveryState.DELIVERED
            if row.job_id == first.id and row.destination == "archive"
            else DeliveryState.DEAD
        )
        backend.outbox.record(row, attempt(state, now, error="refused"))

    assert backend.outbox.retry(job_id=first.id, destination="pacs") == 2
    assert backend.outbox.retry(job_id=first.id) == 2  # the two pacs rows again; archive delivered
    later = utcnow() + timedelta(seconds=1)
    assert backend.outbox.retry(study_instance_uid=second.study_instance_uid, now=later) == 2

    by_job = {(r.job_id, r.destination, r.sop_instance_uid): r for r in rows(backend)}
    for (job_id, destination, _), stored_row in by_job.items():
        if job_id == first.id and destination == "archive":
            assert stored_row.state is DeliveryState.DELIVERED and stored_row.attempts == 1
        else:
            assert (stored_row.state, stored_row.attempts) == (DeliveryState.PENDING, 0)
    second_rows = [r for r in by_job.values() if r.job_id == second.id]
    assert all(r.created_at == later and r.next_attempt_at == later for r in second_rows)
    assert backend.outbox.summary() == {
        "pacs": {"pending": 3, "delivered": 0, "dead": 0, "committed": 0, "commit-failed": 0},
        "archive": {"pending": 1, "delivered": 2, "dead": 0, "committed": 0, "commit-failed": 0},
    }


def test_summary_lists_configured_and_unconfigured_destinations(backend: Backend) -> None:
    """Configured destinations appear with zeros; rows for a destination removed since still count."""
    job = running_job(backend)
    with backend.jobs.transaction() as session:
        OutboxQueue(backend.sessions, ["gone"]).enqueue(session, job, [stored()])
    assert backend.outbox.summary() == {
        "pacs": {"pending": 0, "delivered": 0, "dead": 0, "committed": 0, "commit-failed": 0},
        "archive": {"pending": 0, "delivered": 0, "dead": 0, "committed": 0, "commit-failed": 0},
        "gone": {"pending": 1, "delivered": 0, "dead": 0, "committed": 0, "commit-failed": 0},
    }


# --- results ---------------------------------------------------------------------------------------


def test_results_row_holds_the_findings_and_the_objects(backend: Backend) -> None:
    """add() stores findings JSON and objects JSON with the keys the worker has always written."""
    job = running_job(backend)
    objects = [stored(), stored("key-image", "1.2.840.10008.5.1.4.1.1.7")]
    finish(backend, job, objects)

    with backend.sessions() as session:
        (result,) = session.scalars(select(Result)).all()
    assert (result.job_id, result.model_name, result.model_version) == (job.id, "cxr", "1.0")
    assert StudyFindings.from_json(result.findings_json) == findings_of(job)
    assert objects_from_json(result.objects_json) == objects
    assert objects_to_json(objects) == result.objects_json
    assert set(objects_from_json(result.objects_json)[0].__dict__) == {
        "kind",
        "sop_instance_uid",
        "sop_class_uid",
        "series_instance_uid",
        "path",
    }


def test_predecessor_sr_is_the_newest_other_job_of_the_same_model(backend: Backend) -> None:
    """The SR a model made for the study in an earlier job; not its own job's, another model's or study's."""
    study = generate_uid()
    first = running_job(backend, study)
    first_sr = stored()
    finish(backend, first, [first_sr, stored("kos", KOS_STORAGE)])
    finish(backend, running_job(backend), [stored()])  # another study
    second = running_job(backend, study)
    second_sr = stored()
    finish(backend, second, [second_sr], model="other")
    third = running_job(backend, study)

    assert backend.results.predecessor_sr(third.study_id, third.id, "cxr") == first_sr
    assert backend.results.predecessor_sr(third.study_id, third.id, "other") == second_sr
    assert backend.results.predecessor_sr(first.study_id, first.id, "cxr") is None  # only its own
    assert backend.results.predecessor_sr(third.study_id, third.id, "unknown") is None
    finish(backend, third, [stored("kos", KOS_STORAGE)])  # a newer result without an SR
    fourth = running_job(backend, study)
    assert backend.results.predecessor_sr(fourth.study_id, fourth.id, "cxr") is None


def test_stored_object_of_an_encoded_object() -> None:
    """StoredObject.of takes the report bundle's EncodedObject and the path it was written at."""
    from dicomnode.report.bundle import EncodedObject

    encoded = EncodedObject("sr", "1.2.3", SR_STORAGE, "1.2.4", b"DICM")
    assert StoredObject.of(encoded, "results/x.dcm") == StoredObject(
        "sr", "1.2.3", SR_STORAGE, "1.2.4", "results/x.dcm"
    )
