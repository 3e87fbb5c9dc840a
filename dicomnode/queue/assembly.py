"""Study assembly: studies whose instances have been quiet long enough (or are complete) become jobs.

Instances arriving after a job was made start a new job for the study, which covers the whole
study. Apart from the instance index it reads (``queue.instances``) and from job leasing
(``queue.jobs``), which leases what this makes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select, text, update
from sqlalchemy.orm import Session

from dicomnode.db import Instance, Job, JobPriority, JobState, Study, as_utc, utcnow
from dicomnode.queue.instances import InstanceIndex

logger = logging.getLogger("dicomnode.queue.jobs")  # the name its log lines have always had


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


class StudyAssembly(InstanceIndex):
    """The instance index, plus turning its studies into jobs."""

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
                first_received_at=min(as_utc(m[5]) for m in members),
                last_received_at=max(as_utc(m[5]) for m in members),
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
                stable = cutoff is not None and last is not None and as_utc(last) <= cutoff
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


# Any fixed 64-bit number: the key of the advisory lock that serialises study assembly on PostgreSQL.
ASSEMBLY_LOCK_KEY = 0x6469636F6D6E6F64  # "dicomnod"


def _lock_assembly(session: Session) -> None:
    """Serialise study assembly across processes and hosts, so two never make two jobs of one study.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: ``BEGIN IMMEDIATE`` already holds the
    database's write lock for the whole transaction.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ASSEMBLY_LOCK_KEY})
