"""Job leasing on the database: claims, heartbeats, completion, failure and retries.

* :meth:`JobQueue.record_instance` indexes one stored instance (``queue.instances``).
* :meth:`JobQueue.assemble_stable_studies` turns quiet or complete studies into jobs (``queue.assembly``).
* :meth:`JobQueue.claim` leases a queued job to one worker; an expired lease (a crashed or killed
  worker) puts the job back. Claims are a conditional UPDATE, so they work the same on PostgreSQL.

``JobQueue`` is the one object the processes hold; the names of the modules it builds on are
re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.db import Instance, Job, JobPriority, JobState, Study, utcnow
from dicomnode.errors import DicomNodeError
from dicomnode.queue.assembly import ASSEMBLY_LOCK_KEY, PendingInstance, PendingStudy, StudyAssembly
from dicomnode.queue.instances import InstanceConflictError, InstanceIndex, InstanceRecord

logger = logging.getLogger(__name__)


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


class JobQueue(StudyAssembly):
    """Database-backed instance index, study assembly and job leasing."""

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


__all__ = [
    "ASSEMBLY_LOCK_KEY",
    "ClaimedJob",
    "InstanceConflictError",
    "InstanceIndex",
    "InstanceRecord",
    "JobInstance",
    "JobQueue",
    "LeaseLostError",
    "PendingInstance",
    "PendingStudy",
]
