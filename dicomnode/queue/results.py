"""What each model found in each job: the only code that writes the ``results`` table.

:meth:`ResultStore.add` adds one row (findings as JSON and the objects built from them) to the
caller's transaction, the same one that queues the objects in the outbox and completes the job (see
``dicomnode.queue.outbox`` for the worker's few lines). :meth:`ResultStore.predecessor_sr` finds the
SR a model made for the study in an earlier job, which the worker's new SR supersedes.
:meth:`ResultStore.add_shadow` stores a shadow model's findings (or its error) in a transaction of
its own, after the job's reporting results committed::

    previous = self.results.predecessor_sr(study_id, findings.job_id, findings.model.name)
    predecessor = (
        None if previous is None
        else DocumentReference(findings.study_instance_uid, previous.series_instance_uid,
                               previous.sop_instance_uid)
    )
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Job, Result
from dicomnode.findings import StudyFindings
from dicomnode.queue.outbox import StoredObject, objects_from_json, objects_to_json

Role = Literal["reporting", "shadow"]
ROLE_REPORTING: Role = "reporting"
ROLE_SHADOW: Role = "shadow"


class ResultStore:
    """Database-backed results: one per (job, model, version), the previous SR of a study."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def add(
        self,
        session: Session,
        job_id: int,
        findings: StudyFindings,
        objects: Sequence[StoredObject],
        *,
        role: Role = ROLE_REPORTING,
        error: str | None = None,
    ) -> None:
        """Add the results row of one model's findings to the caller's transaction (not committed)."""
        session.add(
            Result(
                job_id=job_id,
                model_name=findings.model.name,
                model_version=findings.model.version,
                findings_json=findings.to_json(),
                objects_json=objects_to_json(objects) if role == ROLE_REPORTING else None,
                role=role,
                error=error,
            )
        )

    def add_shadow(self, job_id: int, findings: StudyFindings, error: str | None = None) -> None:
        """Store one shadow model's findings (no objects: a shadow sends nothing) in its own commit.

        A row of an earlier attempt of the job for the same model and version is replaced, so a
        retried job never collides with its own shadow results.
        """
        with self.sessions.begin() as session:
            session.execute(
                delete(Result).where(
                    Result.job_id == job_id,
                    Result.model_name == findings.model.name,
                    Result.model_version == findings.model.version,
                    Result.role == ROLE_SHADOW,
                )
            )
            self.add(session, job_id, findings, (), role=ROLE_SHADOW, error=error)

    def predecessor_sr(self, study_id: int, job_id: int | None, model_name: str) -> StoredObject | None:
        """The SR ``model_name`` made for the study in its newest job other than ``job_id``, or None.

        Only the newest such result is read: if it holds no SR, there is no predecessor.
        """
        with self.sessions() as session:
            objects_json = session.scalar(
                select(Result.objects_json)
                .join(Job, Job.id == Result.job_id)
                .where(
                    Job.study_id == study_id,
                    Job.id != job_id,
                    Result.model_name == model_name,
                    Result.role == ROLE_REPORTING,
                    Result.objects_json.is_not(None),
                )
                .order_by(Result.id.desc())
                .limit(1)
            )
        for obj in objects_from_json(objects_json):
            if obj.kind == "sr":
                return obj
        return None
