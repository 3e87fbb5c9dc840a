"""Deleting a finished study's rows (for retention): the queue owns the Job, Outbox and Result tables.

The check that nothing is pending and the deletes run in one transaction, so a study that received
an instance or got a job since it was chosen is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.orm import Session

from dicomnode.db import (
    Commitment,
    CommitmentState,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Outbox,
    Result,
    Study,
)


@dataclass(frozen=True)
class DeletedStudy:
    """What was removed: the rows' file paths (relative to the storage folder) and job ids."""

    study_instance_uid: str
    patient_id: str | None
    instance_paths: tuple[str, ...]
    result_paths: tuple[str, ...]
    job_ids: tuple[int, ...]


def has_pending_work(session: Session, study_id: int, study_instance_uid: str) -> bool:
    """Instances not yet in a job, a job not done, a result object not yet delivered or dead, or one
    delivered whose Storage Commitment is still awaited (its report must find the row and file)."""
    unassigned = exists().where(Instance.study_id == study_id, Instance.job_id.is_(None))
    unfinished = exists().where(Job.study_id == study_id, Job.state != JobState.DONE)
    undelivered = exists().where(
        Outbox.study_instance_uid == study_instance_uid,
        Outbox.state.in_([DeliveryState.PENDING, DeliveryState.COMMIT_FAILED]),
    )
    awaiting_commitment = exists().where(
        Outbox.study_instance_uid == study_instance_uid,
        Outbox.state == DeliveryState.DELIVERED,
        Outbox.commitment_id == Commitment.id,
        Commitment.state == CommitmentState.REQUESTED,
    )
    return bool(session.scalar(select(or_(unassigned, unfinished, undelivered, awaiting_commitment))))


def delete_study(session: Session, study_id: int) -> DeletedStudy | None:
    """Delete a study's rows in ``session`` (the caller commits); None when it has pending work."""
    study = session.get(Study, study_id)
    if study is None or has_pending_work(session, study_id, study.study_instance_uid):
        return None
    job_ids = tuple(session.scalars(select(Job.id).where(Job.study_id == study_id)))
    instance_paths = tuple(session.scalars(select(Instance.path).where(Instance.study_id == study_id)))
    result_paths = tuple(
        session.scalars(select(Outbox.path).where(Outbox.study_instance_uid == study.study_instance_uid))
    )
    session.execute(delete(Outbox).where(Outbox.study_instance_uid == study.study_instance_uid))
    session.execute(delete(Result).where(Result.job_id.in_(job_ids)))
    session.execute(delete(Instance).where(Instance.study_id == study_id))
    session.execute(delete(Job).where(Job.study_id == study_id))
    session.execute(delete(Study).where(Study.id == study_id))
    return DeletedStudy(study.study_instance_uid, study.patient_id, instance_paths, result_paths, job_ids)
