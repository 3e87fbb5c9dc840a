"""Retention: delete delivered studies after ``delete_after_days``, or oldest first above the watermark.

A study may go only when nothing is pending for it: every instance is in a job, every job is done,
every result object delivered (or given up as a dead letter, which ``retry`` could still resend:
dead letters keep a study). Rows go first, in one transaction that re-checks that (an instance that
arrived meanwhile keeps the study), then the files by exact path; each deletion is audited. The
clock and the disk usage are injected so tests need not wait days or fill a disk.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from dicomnode import audit
from dicomnode.config import Config
from dicomnode.db import DeliveryState, Instance, Outbox, Study, as_utc
from dicomnode.http.queries import study_states
from dicomnode.node.services import Services
from dicomnode.queue.purge import delete_study

logger = logging.getLogger(__name__)

FINISHED_STATES = ("delivered", "committed", "done")  # "done": nothing to deliver (no model, no destination)
DiskUsage = Callable[[Path], tuple[int, int]]  # path -> (used bytes, total bytes)


def disk_usage(path: Path) -> tuple[int, int]:
    usage = shutil.disk_usage(path)
    return usage.used, usage.total


@dataclass(frozen=True)
class Candidate:
    """A study retention would delete, and why."""

    study_id: int
    study_instance_uid: str
    last_received_at: datetime
    instances: int
    size_bytes: int
    reason: str


def candidates(
    services: Services, *, now: datetime | None = None, usage: DiskUsage = disk_usage
) -> list[Candidate]:
    """The studies to delete now, oldest first: those past the age limit, then more while the disk
    stays above the watermark."""
    config = services.config.retention
    now = now or datetime.now(UTC)
    with services.sessions() as session:
        states = study_states(session)
        dead = set(
            session.scalars(select(Outbox.study_instance_uid).where(Outbox.state == DeliveryState.DEAD))
        )
        rows = session.execute(
            select(
                Study.id,
                Study.study_instance_uid,
                Study.last_received_at,
                func.count(Instance.id),
                func.coalesce(func.sum(Instance.size_bytes), 0),
            )
            .outerjoin(Instance, Instance.study_id == Study.id)
            .group_by(Study.id)
            .order_by(Study.last_received_at, Study.id)
        ).all()
    finished = [
        (study_id, uid, as_utc(last), int(count), int(size))
        for study_id, uid, last, count, size in rows
        if states.get(study_id) in FINISHED_STATES and uid not in dead
    ]
    chosen: list[Candidate] = []
    if config.delete_after_days > 0:
        limit = now - timedelta(days=config.delete_after_days)
        reason = f"delivered and older than {config.delete_after_days:g} days"
        chosen = [Candidate(s, u, last, c, b, reason) for s, u, last, c, b in finished if last < limit]
    used, total = usage(services.config.storage.path)
    allowed = total * config.high_watermark_percent / 100.0
    projected = used - sum(c.size_bytes for c in chosen)
    taken = {c.study_id for c in chosen}
    for study_id, uid, last, count, size in finished:
        if projected <= allowed:
            break
        if study_id in taken:
            continue
        percent = 100.0 * projected / total
        reason = f"disk {percent:.1f} % used, above the {config.high_watermark_percent:g} % watermark"
        chosen.append(Candidate(study_id, uid, last, count, size, reason))
        projected -= size
    return sorted(chosen, key=lambda c: (c.last_received_at, c.study_id))


def purge(services: Services, chosen: list[Candidate]) -> int:
    """Delete the chosen studies' rows, then their files; return how many studies went."""
    root = services.config.storage.path
    results_root = services.config.storage.results_path
    deleted = 0
    for candidate in chosen:
        with services.queue.transaction() as session:
            gone = delete_study(session, candidate.study_id)
        if gone is None:
            logger.info("retention kept study %s: it has pending work again", candidate.study_instance_uid)
            continue
        for relative in (*gone.instance_paths, *gone.result_paths):
            _remove(root / relative, root)
        for job_id in gone.job_ids:
            shutil.rmtree(results_root / gone.study_instance_uid / f"job-{job_id}", ignore_errors=True)
        _remove_empty(results_root / gone.study_instance_uid, root)
        audit.study_deleted(
            gone.study_instance_uid, gone.patient_id, len(gone.instance_paths), candidate.reason
        )
        logger.info(
            "retention deleted study %s (%d instances, %.1f MB): %s",
            gone.study_instance_uid,
            len(gone.instance_paths),
            candidate.size_bytes / 1e6,
            candidate.reason,
        )
        deleted += 1
    return deleted


def _remove(path: Path, root: Path) -> None:
    """Delete one file, then its parent folders as long as they are empty (never ``root``)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("retention could not delete %s: %s", path, exc.strerror or exc)
        return
    _remove_empty(path.parent, root)


def _remove_empty(folder: Path, root: Path) -> None:
    root = root.resolve()
    folder = folder.resolve()
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): stop climbing
            return
        folder = folder.parent


def run_retention(config: Config, services: Services, stop: threading.Event) -> None:
    """The background pass in ``serve``: every ``interval_seconds`` until ``stop`` is set."""
    while not stop.wait(config.retention.interval_seconds):
        try:
            chosen = candidates(services)
            if chosen:
                purge(services, chosen)
        except Exception:
            logger.exception(
                "retention pass failed; trying again in %.0f s", config.retention.interval_seconds
            )


def start_retention(config: Config, services: Services, stop: threading.Event) -> threading.Thread | None:
    """Start the background pass (none when nothing could ever be deleted: no age limit, 100 %)."""
    if config.retention.delete_after_days <= 0 and config.retention.high_watermark_percent >= 100:
        return None
    thread = threading.Thread(
        target=run_retention, args=(config, services, stop), name="retention", daemon=True
    )
    thread.start()
    return thread
