"""Read-only views of what the node holds (``studies``, ``status``) and the operator's ``retry``."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config
from dicomnode.db import DeliveryState, Instance, Job, JobPriority, JobState, Outbox, Result, Study
from dicomnode.node.process import read_runtime_state
from dicomnode.node.services import Services
from dicomnode.queue.outbox import OutboxQueue


def study_state(pending_instances: int, job: Job | None, deliveries: Counter[str]) -> str:
    """One word for where a study stands, most urgent first."""
    if pending_instances:
        return "receiving"
    if job is None:
        return "receiving"
    if job.state != JobState.DONE:
        return str(job.state.value)
    if deliveries.get(DeliveryState.DEAD.value):
        return "dead-letter"
    if deliveries.get(DeliveryState.PENDING.value) or deliveries.get(DeliveryState.COMMIT_FAILED.value):
        return "delivering"  # commit-failed objects are resent
    if deliveries.get(DeliveryState.DELIVERED.value):
        return "delivered"
    if deliveries.get(DeliveryState.COMMITTED.value):
        return "committed"  # every object confirmed kept by Storage Commitment
    return "done"


def list_studies(sessions: sessionmaker[Session], storage_root: Path) -> list[dict[str, Any]]:
    """Every study with its instances, jobs and deliveries, newest first."""
    result = []
    with sessions() as session:
        studies = session.scalars(
            select(Study).order_by(Study.last_received_at.desc(), Study.id.desc())
        ).all()
        for study in studies:
            instances = session.scalars(
                select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
            ).all()
            jobs = session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
            outbox = session.scalars(
                select(Outbox)
                .where(Outbox.study_instance_uid == study.study_instance_uid)
                .order_by(Outbox.id)
            ).all()
            results = session.scalars(
                select(Result).where(Result.job_id.in_([j.id for j in jobs])).order_by(Result.id)
            ).all()
            result.append(study_entry(study, instances, jobs, outbox, storage_root, results))
    return result


def study_entry(
    study: Study,
    instances: Sequence[Instance],
    jobs: Sequence[Job],
    outbox: Sequence[Outbox],
    storage_root: Path,
    results: Sequence[Result] | None = None,
) -> dict[str, Any]:
    """One study as ``studies --json`` and ``/api/studies`` show it: its state word, instances,
    jobs (oldest first) and deliveries; with ``results``, each job's models (``role`` "shadow" for
    a shadow model's findings, which are stored and never sent)."""
    latest = jobs[-1] if jobs else None
    counts = Counter(o.state.value for o in outbox if latest is not None and o.job_id == latest.id)
    pending = sum(1 for i in instances if i.job_id is None)
    return {
        "study_instance_uid": study.study_instance_uid,
        "patient_id": study.patient_id,
        "study_date": study.study_date,
        "state": study_state(pending, latest, counts),
        "first_received_at": study.first_received_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
        "instances": [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "sop_class_uid": i.sop_class_uid,
                "series_instance_uid": i.series_instance_uid,
                "transfer_syntax_uid": i.transfer_syntax_uid,
                "modality": i.modality,
                "path": str(storage_root / i.path),
                "size_bytes": i.size_bytes,
                "received_at": i.received_at.isoformat(),
                "job_id": i.job_id,
            }
            for i in instances
        ],
        "jobs": [
            {
                "id": j.id,
                "state": j.state.value,
                "attempts": j.attempts,
                "priority": JobPriority(j.priority).name.lower(),
                "lease_owner": j.lease_owner,
                "outcome": j.outcome,
                "error": j.error,
                "created_at": j.created_at.isoformat(),
                "finished_at": j.finished_at.isoformat() if j.finished_at else None,
                "routing": json.loads(j.routing_json) if j.routing_json else None,
                **(
                    {"results": [_result_entry(r) for r in results if r.job_id == j.id]}
                    if results is not None
                    else {}
                ),
            }
            for j in jobs
        ],
        "deliveries": [
            {
                "job_id": o.job_id,
                "destination": o.destination,
                "sop_instance_uid": o.sop_instance_uid,
                "sop_class_uid": o.sop_class_uid,
                "state": o.state.value,
                "attempts": o.attempts,
                "last_status": o.last_status,
                "last_error": o.last_error,
                "commitment_id": o.commitment_id,
            }
            for o in outbox
        ],
    }


def _result_entry(result: Result) -> dict[str, Any]:
    """A job's result as ``studies --json`` shows it: model, role, error, study-level decisions."""
    findings = json.loads(result.findings_json)
    return {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "role": result.role,
        "error": result.error,
        "study_findings": [
            {"label": f["label"], "probability": f["probability"], "present": f["present"]}
            for f in findings.get("study_findings", [])
        ],
    }


def node_status(sessions: sessionmaker[Session], config: Config) -> dict[str, Any]:
    """Counts by state, disk use and the listener's address, for ``dicomnode status``."""
    with sessions() as session:
        studies = session.scalar(select(func.count(Study.id))) or 0
        instances = session.scalar(select(func.count(Instance.id))) or 0
        stored_bytes = session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0
        jobs = {state.value: 0 for state in JobState}
        for state, count in session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)):
            jobs[state.value] = count
        deliveries = {state.value: 0 for state in DeliveryState}
        for delivery_state, count in session.execute(
            select(Outbox.state, func.count(Outbox.id)).group_by(Outbox.state)
        ):
            deliveries[delivery_state.value] = count
        by_destination: dict[str, dict[str, Any]] = {
            d.name: {"counts": {state.value: 0 for state in DeliveryState}, "last_error": None}
            for d in config.destinations
        }
        for name, delivery_state, count in session.execute(
            select(Outbox.destination, Outbox.state, func.count(Outbox.id)).group_by(
                Outbox.destination, Outbox.state
            )
        ):
            entry = by_destination.setdefault(
                name, {"counts": {state.value: 0 for state in DeliveryState}, "last_error": None}
            )
            entry["counts"][delivery_state.value] = count
        for name, error in session.execute(  # why each destination last failed (pending or dead rows)
            select(Outbox.destination, Outbox.last_error)
            .where(Outbox.state != DeliveryState.DELIVERED, Outbox.last_error.is_not(None))
            .order_by(Outbox.id)
        ):
            by_destination.setdefault(
                name, {"counts": {state.value: 0 for state in DeliveryState}, "last_error": None}
            )["last_error"] = error
        running_on = dict(
            session.execute(
                select(Job.lease_owner, func.count(Job.id))
                .where(Job.state == JobState.RUNNING)
                .group_by(Job.lease_owner)
            ).all()
        )
        results = {"reporting": 0, "shadow": 0, "shadow_errors": 0}
        for role, failed, count in session.execute(
            select(Result.role, Result.error.is_not(None), func.count(Result.id)).group_by(
                Result.role, Result.error.is_not(None)
            )
        ):
            results[role] = results.get(role, 0) + count
            if role == "shadow" and failed:
                results["shadow_errors"] += count
        dead = session.execute(
            select(Outbox.destination, Outbox.study_instance_uid, Outbox.sop_instance_uid, Outbox.last_error)
            .where(Outbox.state == DeliveryState.DEAD)
            .order_by(Outbox.id.desc())
            .limit(20)
        ).all()
    root = config.storage.path
    usage = shutil.disk_usage(root if root.exists() else Path.cwd())
    return {
        "listener": _listener(config),
        "studies": studies,
        "instances": instances,
        "jobs": jobs,
        "running_on": {str(owner): int(count) for owner, count in sorted(running_on.items(), key=str)},
        "deliveries": deliveries,
        "deliveries_by_destination": by_destination,
        "results": results,  # rows by role; shadow runs (stored, never sent) and how many failed
        "dead_letters": [
            {"destination": d, "study_instance_uid": s, "sop_instance_uid": u, "reason": r}
            for d, s, u, r in dead
        ],
        "disk": {
            "path": str(root),
            "used_bytes": int(stored_bytes),
            "free_bytes": usage.free,
            "total_bytes": usage.total,
            "min_free_bytes": config.node.min_free_disk_mb * 1024 * 1024,
        },
        "destinations": [d.name for d in config.destinations],
    }


def _listener(config: Config) -> dict[str, Any]:
    """The configured listener, with the bound address and pid when a ``serve`` is running."""
    state = read_runtime_state(config)
    listener: dict[str, Any] = {
        "ae_title": config.node.ae_title,
        "host": config.node.host,
        "port": config.node.port,
        "running": state is not None,
    }
    if state is not None:
        listener.update(
            host=state["host"], port=state["port"], pid=state["pid"], started_at=state["started_at"]
        )
    return listener


def retry(services: Services, target: str) -> tuple[int, int]:
    """Requeue failed jobs and dead deliveries of a job id or a Study Instance UID, and have delivered
    objects whose Storage Commitment request was refused asked about again.

    Both writes go through ``queue/``: the jobs through :class:`~dicomnode.queue.jobs.JobQueue`,
    the deliveries through :class:`~dicomnode.queue.outbox.OutboxQueue`.
    """
    with services.sessions() as session:
        if target.isdigit():
            job_ids = list(session.scalars(select(Job.id).where(Job.id == int(target))))
        else:
            study = session.scalar(select(Study).where(Study.study_instance_uid == target))
            job_ids = list(session.scalars(select(Job.id).where(Job.study_id == study.id))) if study else []
        failed = list(
            session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.state == JobState.FAILED))
        )
    jobs = services.queue.requeue(failed) if failed else 0
    outbox = OutboxQueue(services.sessions, [d.name for d in services.config.destinations])
    if target.isdigit():
        deliveries = outbox.retry(job_id=int(target))
    else:
        deliveries = outbox.retry(study_instance_uid=target)
    return jobs, deliveries
