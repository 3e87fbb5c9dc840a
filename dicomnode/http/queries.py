"""Read-only queries behind the REST API and the dashboard: short transactions, bounded result sizes.

Each function opens one session and closes it before returning, so the listener's writes never wait
for a page (SQLite WAL readers do not block the writer). Objects have the shape of
``dicomnode studies --json`` (:func:`dicomnode.node.inventory.list_studies`), built for one page
of studies at a time instead of all of them.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import DeliveryState, Instance, Job, JobState, Outbox, Result, Study, as_utc
from dicomnode.node.inventory import study_entry, study_state

MAX_PAGE = 500


def _study_objects(session: Session, studies: list[Study], root: Path) -> list[dict[str, Any]]:
    """``studies --json`` objects for ``studies`` (three queries, whatever the page size)."""
    ids = [s.id for s in studies]
    uids = [s.study_instance_uid for s in studies]
    instances: dict[int, list[Instance]] = defaultdict(list)
    for instance in session.scalars(select(Instance).where(Instance.study_id.in_(ids)).order_by(Instance.id)):
        instances[instance.study_id].append(instance)
    jobs: dict[int, list[Job]] = defaultdict(list)
    for job in session.scalars(select(Job).where(Job.study_id.in_(ids)).order_by(Job.id)):
        jobs[job.study_id].append(job)
    outbox: dict[str, list[Outbox]] = defaultdict(list)
    for row in session.scalars(select(Outbox).where(Outbox.study_instance_uid.in_(uids)).order_by(Outbox.id)):
        outbox[row.study_instance_uid].append(row)
    return [
        study_entry(study, instances[study.id], jobs[study.id], outbox[study.study_instance_uid], root)
        for study in studies
    ]


@dataclass(frozen=True)
class _LatestJob:
    """The one field of a study's latest job that its state word needs."""

    state: JobState


def study_states(session: Session) -> dict[int, str]:
    """Every study's state word (as ``study_state`` gives it) from three grouped queries (tuples
    only, no ORM objects: 10,000 studies in tens of milliseconds)."""
    pending = dict(
        session.execute(
            select(Instance.study_id, func.count(Instance.id))
            .where(Instance.job_id.is_(None))
            .group_by(Instance.study_id)
        ).all()
    )
    latest = select(Job.study_id, func.max(Job.id).label("job_id")).group_by(Job.study_id).subquery()
    jobs = {
        study_id: (job_id, state)
        for study_id, job_id, state in session.execute(
            select(latest.c.study_id, Job.id, Job.state).join(Job, Job.id == latest.c.job_id)
        )
    }
    deliveries: dict[int, Counter[str]] = defaultdict(Counter)
    for job_id, state, count in session.execute(
        select(Outbox.job_id, Outbox.state, func.count(Outbox.id))
        .join(latest, latest.c.job_id == Outbox.job_id)
        .group_by(Outbox.job_id, Outbox.state)
    ):
        deliveries[job_id][state.value] = count
    states = {}
    for study_id in session.scalars(select(Study.id)):
        job_id, state = jobs.get(study_id, (-1, None))
        job = _LatestJob(state) if state is not None else None
        states[study_id] = study_state(pending.get(study_id, 0), job, deliveries[job_id])  # type: ignore[arg-type]
    return states


def studies_page(
    sessions: sessionmaker[Session], root: Path, *, state: str | None, limit: int, offset: int
) -> dict[str, Any]:
    """One page of studies, newest first, optionally only those in ``state``."""
    limit = max(1, min(limit, MAX_PAGE))
    offset = max(0, offset)
    order = (Study.last_received_at.desc(), Study.id.desc())
    with sessions() as session:
        if state is None:
            total = session.scalar(select(func.count(Study.id))) or 0
            studies = list(session.scalars(select(Study).order_by(*order).limit(limit).offset(offset)))
        else:
            states = study_states(session)
            wanted = [i for i in session.scalars(select(Study.id).order_by(*order)) if states[i] == state]
            total = len(wanted)
            page = wanted[offset : offset + limit]  # ids of one page: a bounded IN list
            by_id = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(page)))}
            studies = [by_id[i] for i in page]
        items = _study_objects(session, studies, root)
    return {"total": total, "limit": limit, "offset": offset, "state": state, "studies": items}


def study_detail(
    sessions: sessionmaker[Session], root: Path, study_instance_uid: str
) -> dict[str, Any] | None:
    """A study's object with its jobs' timings and the findings and result objects of each job."""
    with sessions() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
        if study is None:
            return None
        (item,) = _study_objects(session, [study], root)
        job_ids = [j["id"] for j in item["jobs"]]
        results = list(session.scalars(select(Result).where(Result.job_id.in_(job_ids)).order_by(Result.id)))
        timings = {
            j.id: (j.created_at, j.started_at, j.finished_at)
            for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))
        }
    for job in item["jobs"]:
        created, started, finished = timings[job["id"]]
        job["started_at"] = started.isoformat() if started else None
        job["wait_seconds"] = (as_utc(started) - as_utc(created)).total_seconds() if started else None
        job["duration_seconds"] = (as_utc(finished) - as_utc(created)).total_seconds() if finished else None
    item["results"] = [
        {
            "job_id": r.job_id,
            "model_name": r.model_name,
            "model_version": r.model_version,
            "role": r.role,  # "shadow": stored for comparison, never sent
            "error": r.error,
            "created_at": r.created_at.isoformat(),
            "findings": json.loads(r.findings_json),
            "objects": json.loads(r.objects_json) if r.objects_json else [],
        }
        for r in results
    ]
    return item


def overview(sessions: sessionmaker[Session], *, now: datetime | None = None) -> dict[str, Any]:
    """What the dashboard shows at a glance: queue, the last hour's throughput and p95, failures."""
    now = now or datetime.now(UTC)
    hour_ago = now - timedelta(hours=1)
    with sessions() as session:
        jobs = {state.value: 0 for state in JobState}
        for state, count in session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)):
            jobs[state.value] = count
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
        finished = session.execute(
            select(Job.created_at, Job.finished_at).where(
                Job.state == JobState.DONE, Job.finished_at >= hour_ago
            )
        ).all()
        failures = session.execute(
            select(Job.id, Study.study_instance_uid, Job.error, Job.updated_at)
            .join(Study, Study.id == Job.study_id)
            .where(Job.state == JobState.FAILED)
            .order_by(Job.id.desc())
            .limit(20)
        ).all()
        dead = session.execute(
            select(
                Outbox.job_id,
                Outbox.destination,
                Outbox.study_instance_uid,
                Outbox.last_status,
                Outbox.last_error,
            )
            .where(Outbox.state == DeliveryState.DEAD)
            .order_by(Outbox.id.desc())
            .limit(20)
        ).all()
        deliveries = {state.value: 0 for state in DeliveryState}
        for delivery_state, count in session.execute(
            select(Outbox.state, func.count(Outbox.id)).group_by(Outbox.state)
        ):
            deliveries[delivery_state.value] = count
        recent = list(
            session.scalars(select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(20))
        )
        recent_states = _recent_states(session, recent)
    latencies = sorted((as_utc(f) - as_utc(c)).total_seconds() for c, f in finished if f is not None)
    return {
        "jobs": jobs,
        "oldest_queued_job_age_seconds": (now - as_utc(oldest)).total_seconds() if oldest else 0.0,
        "last_hour": {
            "jobs_done": len(latencies),
            "jobs_per_minute": len(latencies) / 60.0,
            "p95_job_seconds": percentile(latencies, 0.95),
        },
        "deliveries": deliveries,
        "failures": [
            {"job_id": j, "study_instance_uid": s, "reason": e or "", "at": u.isoformat()}
            for j, s, e, u in failures
        ],
        "dead_letters": [
            {"job_id": j, "destination": d, "study_instance_uid": s, "last_status": st, "reason": r or ""}
            for j, d, s, st, r in dead
        ],
        "recent_studies": [
            {
                "study_instance_uid": s.study_instance_uid,
                "state": recent_states[s.id],
                "last_received_at": s.last_received_at.isoformat(),
            }
            for s in recent
        ],
    }


def _recent_states(session: Session, studies: list[Study]) -> dict[int, str]:
    items = _study_objects(session, studies, Path("."))
    return {s.id: item["state"] for s, item in zip(studies, items, strict=True)}


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def job_gauges(sessions: sessionmaker[Session], *, now: datetime | None = None) -> dict[str, Any]:
    """The database gauges of ``/metrics``: jobs by state, deliveries by destination and state."""
    now = now or datetime.now(UTC)
    with sessions() as session:
        jobs = {state.value: 0 for state in JobState}
        for state, count in session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)):
            jobs[state.value] = count
        deliveries = [
            (destination, state.value, count)
            for destination, state, count in session.execute(
                select(Outbox.destination, Outbox.state, func.count(Outbox.id)).group_by(
                    Outbox.destination, Outbox.state
                )
            )
        ]
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
    return {
        "jobs": jobs,
        "deliveries": deliveries,
        "oldest_queued_job_age_seconds": (now - as_utc(oldest)).total_seconds() if oldest else 0.0,
    }
