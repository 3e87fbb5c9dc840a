"""Study assembly and the job queue, on the database.

* :meth:`JobQueue.record_instance` indexes one stored instance (idempotent per SOP Instance UID; the
  same UID at another path raises :class:`InstanceConflictError`).
* :meth:`JobQueue.assemble_stable_studies` turns studies quiet for ``stable_after_seconds`` into jobs.
  Instances arriving after a job was made start a new job for the study (which covers the whole study).
* :meth:`JobQueue.claim` leases a queued job to one worker; an expired lease (a crashed or killed
  worker) puts the job back. Claims are a conditional UPDATE, so they work the same on PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Instance, Job, JobPriority, JobState, Study, utcnow
from dicomnode.errors import DicomNodeError

logger = logging.getLogger(__name__)


# Statements of the receive path, built once (SQLite 3.35+ and PostgreSQL both support RETURNING).
_HELD_PATH = select(Instance.path).where(Instance.sop_instance_uid == bindparam("sop_instance_uid"))
_TOUCH_STUDY = (
    update(Study)
    .where(Study.study_instance_uid == bindparam("match_study_instance_uid"))
    .values(last_received_at=bindparam("now"))
    .returning(Study.id)
)
_INSERT_STUDY = insert(Study).returning(Study.id)
_INSERT_INSTANCE = insert(Instance)


_RECORD_ATTEMPTS = 3  # a unique-key race with another process (PostgreSQL) is retried, then raised


class InstanceConflictError(Exception):
    """The SOP Instance UID is already indexed at another path (under another study or series)."""

    def __init__(self, sop_instance_uid: str, held_path: str) -> None:
        super().__init__(f"SOP Instance UID {sop_instance_uid} is already held at {held_path}")
        self.sop_instance_uid = sop_instance_uid
        self.held_path = held_path


@dataclass(frozen=True)
class InstanceRecord:
    """What the listener knows about a stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    patient_id: str | None = None
    study_date: str | None = None
    modality: str | None = None
    calling_ae_title: str | None = None


@dataclass(frozen=True)
class PendingInstance:
    """An instance not yet in a job: what study completeness needs to read its header."""

    sop_instance_uid: str
    path: str  # relative to the storage folder
    calling_ae_title: str | None


@dataclass(frozen=True)
class PendingStudy:
    """A study with instances not yet in a job (see :meth:`JobQueue.pending_studies`)."""

    study_id: int
    study_instance_uid: str
    first_received_at: datetime  # of its pending instances
    last_received_at: datetime
    instances: tuple[PendingInstance, ...]
    total_instances: int  # every instance the study holds, pending or in earlier jobs


@dataclass(frozen=True)
class ClaimedJob:
    """A job leased to one worker."""

    id: int
    study_id: int
    study_instance_uid: str
    attempts: int
    max_attempts: int
    owner: str


@dataclass(frozen=True)
class JobInstance:
    """An instance a job covers."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    path: str
    calling_ae_title: str | None


class JobQueue:
    """Database-backed study assembly and job leasing."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        # SQLite serialises writers anyway; serialising them in-process first avoids busy waits.
        self._write_lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction serialised with this process's other writers."""
        with self._write_lock, self.sessions.begin() as session:
            yield session

    # --- receiving ---------------------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord) -> bool:
        """Index a stored instance; return False when it was already indexed at this path (a resend).

        Raise :class:`InstanceConflictError` when the UID is indexed at another path: a SOP
        Instance UID names one instance, so the same UID under another study or series is refused by
        the caller rather than indexed twice. A unique-key violation (another process inserted the
        same study or instance between our look-up and insert; possible on PostgreSQL) is retried,
        so the retry sees the other row: a resend is never answered Success without its row.
        """
        for attempt in range(1, _RECORD_ATTEMPTS + 1):
            try:
                return self._insert_instance(record)
            except IntegrityError:
                if attempt == _RECORD_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_instance(self, record: InstanceRecord) -> bool:
        """One attempt of :meth:`record_instance`.

        Three prebuilt Core statements with bound parameters on the session's connection (no ORM
        unit of work, no statement building per instance): this runs once per C-STORE, before the
        acknowledgement, so its cost is on every sender's critical path.
        """
        now = utcnow()
        with self._write_lock, self.sessions.begin() as session:
            connection = session.connection()
            held = connection.scalar(_HELD_PATH, {"sop_instance_uid": record.sop_instance_uid})
            if held is not None:
                if held != record.path:
                    raise InstanceConflictError(record.sop_instance_uid, held)
                return False
            study_id = connection.scalar(
                _TOUCH_STUDY, {"match_study_instance_uid": record.study_instance_uid, "now": now}
            )
            if study_id is None:
                study_id = connection.scalar(
                    _INSERT_STUDY,
                    {
                        "study_instance_uid": record.study_instance_uid,
                        "patient_id": record.patient_id,
                        "study_date": record.study_date,
                        "first_received_at": now,
                        "last_received_at": now,
                    },
                )
            connection.execute(
                _INSERT_INSTANCE,
                {
                    "sop_instance_uid": record.sop_instance_uid,
                    "sop_class_uid": record.sop_class_uid,
                    "study_id": study_id,
                    "series_instance_uid": record.series_instance_uid,
                    "transfer_syntax_uid": record.transfer_syntax_uid,
                    "modality": record.modality,
                    "path": record.path,
                    "size_bytes": record.size_bytes,
                    "calling_ae_title": record.calling_ae_title,
                    "received_at": now,
                },
            )
        return True

    def newest_activity(self, margin_seconds: float = 3600.0) -> float | None:
        """POSIX time an hour before the newest received instance or job change (None: nothing yet).

        A write interrupted by a crash happened after that, so older folders need no cleaning.
        """
        with self.sessions() as session:
            times = [
                session.scalar(select(func.max(Instance.received_at))),
                session.scalar(select(func.max(Job.updated_at))),
            ]
        known = [_aware(t) for t in times if t is not None]
        return max(known).timestamp() - margin_seconds if known else None

    # --- assembling --------------------------------------------------------------------------------

    def pending_studies(self) -> list[PendingStudy]:
        """Every study with instances not yet in a job, with those instances (read-only)."""
        with self.sessions() as session:
            rows = session.execute(
                select(
                    Instance.study_id,
                    Study.study_instance_uid,
                    Instance.sop_instance_uid,
                    Instance.path,
                    Instance.calling_ae_title,
                    Instance.received_at,
                )
                .join(Study, Study.id == Instance.study_id)
                .where(Instance.job_id.is_(None))
                .order_by(Instance.study_id, Instance.id)
            ).all()
            ids = sorted({row[0] for row in rows})
            totals = (
                dict(
                    session.execute(
                        select(Instance.study_id, func.count())
                        .where(Instance.study_id.in_(ids))
                        .group_by(Instance.study_id)
                    ).all()
                )
                if ids
                else {}
            )
        grouped: dict[int, list[Any]] = {}
        for row in rows:
            grouped.setdefault(row[0], []).append(row)
        return [
            PendingStudy(
                study_id=study_id,
                study_instance_uid=members[0][1],
                first_received_at=min(_aware(m[5]) for m in members),
                last_received_at=max(_aware(m[5]) for m in members),
                instances=tuple(PendingInstance(m[2], m[3], m[4]) for m in members),
                total_instances=int(totals.get(study_id, len(members))),
            )
            for study_id, members in grouped.items()
        ]

    def assemble_stable_studies(
        self,
        stable_after_seconds: float | None,
        max_attempts: int,
        now: datetime | None = None,
        *,
        stat_calling_ae_titles: Sequence[str] = (),
        ready_study_ids: Sequence[int] = (),
    ) -> list[int]:
        """Create a job for every study whose not-yet-queued instances have been quiet long enough,
        and for every study in ``ready_study_ids`` (complete by its routes' requirements, decided by
        the caller); with ``stable_after_seconds`` None, only for those.

        A job is STAT when any of its instances came from one of ``stat_calling_ae_titles``."""
        now = now or utcnow()
        cutoff = None if stable_after_seconds is None else now - timedelta(seconds=stable_after_seconds)
        ready = set(ready_study_ids)
        created: list[int] = []
        with self._write_lock, self.sessions.begin() as session:
            _lock_assembly(session)
            rows = session.execute(
                select(
                    Instance.study_id,
                    func.max(Instance.received_at),
                    func.max(case((Instance.calling_ae_title.in_(stat_calling_ae_titles), 1), else_=0)),
                )
                .where(Instance.job_id.is_(None))
                .group_by(Instance.study_id)
            ).all()
            for study_id, last, stat in rows:
                stable = cutoff is not None and last is not None and _aware(last) <= cutoff
                if not stable and study_id not in ready:
                    continue
                job = Job(
                    study_id=study_id,
                    state=JobState.QUEUED,
                    max_attempts=max_attempts,
                    priority=JobPriority.STAT if stat else JobPriority.ROUTINE,
                    created_at=now,
                    updated_at=now,
                    not_before=now,
                )
                session.add(job)
                session.flush()
                session.execute(
                    update(Instance)
                    .where(and_(Instance.study_id == study_id, Instance.job_id.is_(None)))
                    .values(job_id=job.id)
                )
                created.append(job.id)
        for job_id in created:
            logger.info("job %d queued", job_id)
        return created

    # --- leasing -----------------------------------------------------------------------------------

    def requeue_expired(self, now: datetime | None = None) -> int:
        """Put back running jobs whose lease ran out (their worker died); fail those out of attempts."""
        now = now or utcnow()
        with self._write_lock, self.sessions.begin() as session:
            expired = session.scalars(
                select(Job)
                .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
                .with_for_update(skip_locked=True)  # another worker requeueing it keeps it
            ).all()
            for job in expired:
                reason = f"worker {job.lease_owner} stopped while running the job (lease expired)"
                job.lease_owner = None
                job.lease_expires_at = None
                job.updated_at = now
                if job.attempts >= job.max_attempts:
                    job.state = JobState.FAILED
                    job.finished_at = now
                    job.error = reason
                    logger.error("job %d failed: %s", job.id, reason)
                else:
                    job.state = JobState.QUEUED
                    job.error = reason
                    logger.warning("job %d requeued: %s", job.id, reason)
            return len(expired)

    def claim(self, owner: str, lease_seconds: float, now: datetime | None = None) -> ClaimedJob | None:
        """Lease the first due queued job to ``owner``, or return None when there is none."""
        claimed = self.claim_many(owner, lease_seconds, 1, now)
        return claimed[0] if claimed else None

    def claim_many(
        self,
        owner: str,
        lease_seconds: float,
        limit: int,
        now: datetime | None = None,
        *,
        priority_aging_seconds: float = 600.0,
    ) -> list[ClaimedJob]:
        """Lease up to ``limit`` due queued jobs to ``owner`` in one statement: STAT jobs first, then
        routine ones, oldest first within each; a routine job queued longer than
        ``priority_aging_seconds`` ranks with the STAT jobs, so a steady STAT stream cannot starve it.

        ``WITH due AS (SELECT id ... FOR UPDATE SKIP LOCKED) UPDATE jobs ... FROM due RETURNING``
        (a CTE, evaluated once: PostgreSQL may rescan a LIMIT subquery inside ``IN`` and lease more
        than ``limit``): on PostgreSQL concurrent workers skip the rows another claim has locked;
        SQLite has no row locks (the statement compiles without the clause) and serialises writers
        with ``BEGIN IMMEDIATE``. The state condition is repeated in the UPDATE, so a job taken between
        the two never comes back twice. One commit for a whole batch: claiming 16 jobs one
        transaction each cost the worker 5-20 ms per job.
        """
        now = now or utcnow()
        due = (
            select(Job.id)
            .where(Job.state == JobState.QUEUED, Job.not_before <= now)
            .order_by(_claim_rank(now, priority_aging_seconds), Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("due")
        )
        with self._write_lock, self.sessions.begin() as session:
            rows = session.execute(
                update(Job)
                .where(Job.id == due.c.id, Job.state == JobState.QUEUED)
                .values(
                    state=JobState.RUNNING,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    attempts=Job.attempts + 1,
                    started_at=now,
                    updated_at=now,
                )
                .returning(Job.id, Job.study_id, Job.attempts, Job.max_attempts),
                execution_options={"synchronize_session": False},
            ).all()
            if not rows:
                return []
            studies = session.execute(
                select(Study.id, Study.study_instance_uid).where(Study.id.in_({r.study_id for r in rows}))
            ).all()
            study_uids = {study_id: uid for study_id, uid in studies}
        return [
            ClaimedJob(
                id=row.id,
                study_id=row.study_id,
                study_instance_uid=study_uids[row.study_id],
                attempts=row.attempts,
                max_attempts=row.max_attempts,
                owner=owner,
            )
            for row in sorted(rows, key=lambda r: r.id)
        ]

    def heartbeat(self, job: ClaimedJob, lease_seconds: float) -> bool:
        """Extend the lease; False when the job is no longer ours (it was requeued)."""
        now = utcnow()
        with self._write_lock, self.sessions.begin() as session:
            result: Any = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.lease_owner == job.owner, Job.state == JobState.RUNNING)
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
            )
            return bool(result.rowcount == 1)

    def complete(
        self,
        job: ClaimedJob,
        outcome: str,
        session: Session | None = None,
        *,
        routing_json: str | None = None,
    ) -> None:
        """Mark the job done (with the per-image routing decisions, when given). Pass ``session`` to
        commit it together with the job's results."""
        values: dict[str, Any] = dict(
            state=JobState.DONE,
            outcome=outcome,
            finished_at=utcnow(),
            updated_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
            error=None,
        )
        if routing_json is not None:
            values["routing_json"] = routing_json
        statement = (
            update(Job)
            .where(Job.id == job.id, Job.lease_owner == job.owner, Job.state == JobState.RUNNING)
            .values(**values)
        )
        if session is not None:
            _check_lease(session.execute(statement), job)
            return
        with self._write_lock, self.sessions.begin() as own:
            _check_lease(own.execute(statement), job)

    def fail(
        self,
        job: ClaimedJob,
        error: str,
        *,
        retry_delay_seconds: float = 0.0,
        permanent: bool = False,
        log_reason: str | None = None,
    ) -> JobState:
        """Record a failed attempt: requeue with a delay while attempts remain, else fail for good.

        ``error`` is stored for the operator (``dicomnode studies``); ``log_reason``, when given, is
        what the log line says instead (for errors whose text may quote dataset values).
        """
        now = utcnow()
        final = permanent or job.attempts >= job.max_attempts
        state = JobState.FAILED if final else JobState.QUEUED
        with self._write_lock, self.sessions.begin() as session:
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.lease_owner == job.owner)
                .values(
                    state=state,
                    error=error[:4000],
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=now if final else None,
                    not_before=now + timedelta(seconds=retry_delay_seconds),
                )
            )
        log = logger.error if final else logger.warning
        log(
            "job %d %s after attempt %d/%d: %s",
            job.id,
            state.value,
            job.attempts,
            job.max_attempts,
            log_reason or error,
        )
        return state

    def force_fail(self, job_id: int, error: str) -> None:
        """Fail a job regardless of its lease (used by a watchdog that is about to kill its worker)."""
        now = utcnow()
        with self._write_lock, self.sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.RUNNING:
                return
            final = job.attempts >= job.max_attempts
            job.state = JobState.FAILED if final else JobState.QUEUED
            job.error = error
            job.updated_at = now
            job.lease_owner = None
            job.lease_expires_at = None
            if final:
                job.finished_at = now

    def instances_for(self, job_id: int) -> list[JobInstance]:
        """Every instance of the job's study known when the job was made (the whole study so far)."""
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                return []
            rows = (
                session.execute(
                    select(Instance)
                    .where(
                        Instance.study_id == job.study_id,
                        Instance.job_id.is_not(None),
                        Instance.job_id <= job_id,
                    )
                    .order_by(Instance.series_instance_uid, Instance.id)
                )
                .scalars()
                .all()
            )
            return [
                JobInstance(
                    r.sop_instance_uid, r.sop_class_uid, r.series_instance_uid, r.path, r.calling_ae_title
                )
                for r in rows
            ]

    def requeue(self, job_ids: Sequence[int]) -> int:
        """Queue failed or finished jobs again (operator's ``dicomnode retry``)."""
        now = utcnow()
        with self._write_lock, self.sessions.begin() as session:
            result: Any = session.execute(
                update(Job)
                .where(Job.id.in_(job_ids), Job.state.in_([JobState.FAILED, JobState.DONE]))
                .values(
                    state=JobState.QUEUED,
                    attempts=0,
                    not_before=now,
                    updated_at=now,
                    error=None,
                    finished_at=None,
                )
            )
            return int(result.rowcount)


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)


class LeaseLostError(DicomNodeError):
    """The job's lease ran out and it went back to the queue: another worker owns it now. Raised
    inside the completing transaction, so its results roll back with it (a job completes once)."""


def _check_lease(result: Any, job: ClaimedJob) -> None:
    if result.rowcount != 1:
        raise LeaseLostError(f"job {job.id} is no longer leased to {job.owner}; its results are discarded")


def _claim_rank(now: datetime, priority_aging_seconds: float) -> Any:
    """0 for jobs to claim first (STAT, or routine but waiting longer than the aging limit), else 1."""
    aged = now - timedelta(seconds=priority_aging_seconds)
    return case((or_(Job.priority >= JobPriority.STAT, Job.created_at <= aged), 0), else_=1)


# Any fixed 64-bit number: the key of the advisory lock that serialises study assembly on PostgreSQL.
ASSEMBLY_LOCK_KEY = 0x6469636F6D6E6F64  # "dicomnod"


def _lock_assembly(session: Session) -> None:
    """Serialise study assembly across processes and hosts, so two never make two jobs of one study.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: ``BEGIN IMMEDIATE`` already holds the
    database's write lock for the whole transaction.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ASSEMBLY_LOCK_KEY})
