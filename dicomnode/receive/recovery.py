"""Start-up recovery of the spool: what a crash mid-write can leave behind, and how it is cleared.

Run by ``dicomnode serve`` before the listener starts (:func:`recover_spool`), in this order:

1. temporary files of interrupted writes are deleted (never acknowledged);
2. rows among the newest whose file is missing or short are forgotten (power loss before the flush;
   never acknowledged, so the modality sends them again);
3. instance files without a row (killed between rename and commit; never acknowledged) are indexed
   when they are whole Part 10 files whose UIDs match their path, and deleted otherwise.

Indexing such a file is harmless: it is exactly what the modality sent, and its resend becomes a
duplicate. Only folders modified recently are listed, so a restart does not read a whole archive.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, func, select

from dicomnode.db import Instance, as_utc
from dicomnode.errors import InvalidDatasetError
from dicomnode.fsio import FilesystemSync
from dicomnode.queue.jobs import InstanceConflictError, InstanceRecord, JobQueue
from dicomnode.receive.header import (
    HEADER_KEYWORDS,
    data_set_is_complete,
    header_ascii,
    header_ascii_text,
    header_text,
    parse_header,
    read_part10,
)
from dicomnode.receive.spool import validate_uid

logger = logging.getLogger(__name__)

_HEADER_BYTES = 256 * 1024  # enough for the leading attributes of any data set the spool holds
_LOOKUP_BATCH = 500  # SOP Instance UIDs per look-up (well under SQLite's bound-parameter limit)


@dataclass(frozen=True)
class RecoveryReport:
    """What start-up recovery found (counts only)."""

    temporaries_removed: int = 0
    unflushed_forgotten: int = 0
    orphans_indexed: int = 0
    orphans_removed: int = 0


def recover_spool(root: Path, queue: JobQueue, *, changed_since: float | None) -> RecoveryReport:
    """Clear what an interrupted run left in the spool under ``root``; log what was done."""
    report = RecoveryReport(
        temporaries_removed=remove_stale_temporaries(root, changed_since=changed_since),
        unflushed_forgotten=drop_unflushed_instances(queue, root),
    )
    indexed, removed = index_orphans(root, queue, changed_since=changed_since)
    report = RecoveryReport(report.temporaries_removed, report.unflushed_forgotten, indexed, removed)
    if report.temporaries_removed:
        logger.info(
            "removed %d temporary files left by an interrupted write (never acknowledged)",
            report.temporaries_removed,
        )
    if report.unflushed_forgotten:
        logger.warning(
            "forgot %d instances whose file was not complete (never acknowledged)", report.unflushed_forgotten
        )
    if indexed or removed:
        logger.warning(
            "found %d instance files without a row (written, never acknowledged): indexed %d whole ones,"
            " removed %d invalid or conflicting ones",
            indexed + removed,
            indexed,
            removed,
        )
    return report


def remove_stale_temporaries(root: Path, *, changed_since: float | None = None) -> int:
    """Delete temporary files left by a crash mid-write (never acknowledged); return how many.

    Temporaries live beside their target, in ``instances/STUDY/SERIES`` and ``results/STUDY/job-N``
    (and its ``heatmaps``), and in the storage folder itself (``serve.json``). Only folders modified
    at or after ``changed_since`` (a POSIX time) are listed, so a start after a crash does not read
    every file of a large archive.
    """
    count = _remove_temporaries_in(root, None)  # the runtime state file's (serve.json)
    for top in ("instances", "results"):
        for study in _subfolders(root / top):
            for leaf in _subfolders(study):
                for folder in (leaf, leaf / "heatmaps"):
                    count += _remove_temporaries_in(folder, changed_since)
    return count


def drop_unflushed_instances(queue: JobQueue, storage_root: Path, window_seconds: float = 60.0) -> int:
    """After an unclean stop, forget the newest rows whose file is missing or short (and delete
    such a file); return how many.

    With ``synchronous=NORMAL`` and one ``syncfs`` before each acknowledgement, a row can outlive
    its file's data only for an instance received just before the crash and never acknowledged:
    its sender resends it. Only rows within ``window_seconds`` of the newest one are checked.
    """
    removed = 0
    with queue.transaction() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
        if newest is None:
            return 0
        since = as_utc(newest) - timedelta(seconds=window_seconds)
        rows = session.execute(
            select(Instance.id, Instance.path, Instance.size_bytes).where(
                Instance.received_at >= since, Instance.job_id.is_(None)
            )
        ).all()
        for instance_id, path, size_bytes in rows:
            try:
                complete = (storage_root / path).stat().st_size == size_bytes
            except FileNotFoundError:
                complete = False
            if not complete:
                session.execute(delete(Instance).where(Instance.id == instance_id))
                (storage_root / path).unlink(missing_ok=True)  # so the resend writes it afresh
                removed += 1
    return removed


def index_orphans(root: Path, queue: JobQueue, *, changed_since: float | None = None) -> tuple[int, int]:
    """Index the whole instance files under ``instances/`` that have no row; delete the others.

    A file is indexed when it is a complete Part 10 file (every element present to the end) whose
    SOP Instance, Series and Study UIDs are the ones its path is made of; it is deleted when it is
    not, or when its SOP Instance UID is indexed at another path. Only series folders modified at or
    after ``changed_since`` are listed. Return (indexed, removed).
    """
    orphans: list[tuple[Path, str]] = []
    for study in _subfolders(root / "instances"):
        for series in _subfolders(study):
            orphans += _orphans_in(queue, series, changed_since)
    if not orphans:
        return 0, 0
    sync = FilesystemSync(root)  # never-flushed files: make them durable before their rows commit
    try:
        sync.sync()
    finally:
        sync.close()
    indexed = removed = 0
    for path, relative in orphans:
        record, reason = _orphan_record(path, relative)
        if record is not None:
            try:
                queue.record_instance(record)
                indexed += 1
                logger.info("orphan file %s indexed (complete, never acknowledged)", relative)
                continue
            except InstanceConflictError:
                reason = "its SOP Instance UID is held under another study or series"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        removed += 1
        logger.warning("orphan file %s removed: %s", relative, reason)
    return indexed, removed


def _orphans_in(queue: JobQueue, folder: Path, changed_since: float | None) -> list[tuple[Path, str]]:
    """The ``*.dcm`` files of one series folder with no row at their path, as (path, relative path).

    Looked up by SOP Instance UID (the file's name, a unique index), not by path (not indexed).
    """
    try:
        if changed_since is not None and folder.stat().st_mtime < changed_since:
            return []
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.name.endswith(".dcm") and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    prefix = f"instances/{folder.parent.name}/{folder.name}/"
    held: dict[str, str] = {}
    uids = [name.removesuffix(".dcm") for name in names]
    with queue.sessions() as session:
        for start in range(0, len(uids), _LOOKUP_BATCH):
            batch = uids[start : start + _LOOKUP_BATCH]
            found = session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(Instance.sop_instance_uid.in_(batch))
            ).all()
            held.update((str(uid), str(path)) for uid, path in found)
    return [
        (folder / name, prefix + name)
        for name, uid in zip(names, uids, strict=True)
        if held.get(uid) != prefix + name
    ]


def _orphan_record(path: Path, relative: str) -> tuple[InstanceRecord | None, str]:
    """The row for an orphan file, or None and why it cannot have one (no patient data in the reason)."""
    _, study_part, series_part, name = relative.split("/")
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return None, "empty file"
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                meta, offset = read_part10(data)
                transfer_syntax_uid = validate_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID")
                if not data_set_is_complete(data, offset, transfer_syntax_uid):
                    return None, "the file is cut short (incomplete write)"
                header = parse_header(bytes(data[offset : offset + _HEADER_BYTES]), transfer_syntax_uid)
        uids = [validate_uid(header_ascii(header, keyword), keyword) for keyword in HEADER_KEYWORDS]
    except InvalidDatasetError as exc:
        return None, str(exc)
    except Exception as exc:  # unreadable in any way: it cannot be indexed
        return None, f"not a readable Part 10 file ({type(exc).__name__})"
    sop_class_uid, sop_instance_uid, study_instance_uid, series_instance_uid = uids
    if (study_instance_uid, series_instance_uid, sop_instance_uid + ".dcm") != (
        study_part,
        series_part,
        name,
    ):
        return None, "the data set's UIDs do not match its path"
    if str(meta.get("MediaStorageSOPInstanceUID", "")).rstrip("\x00 ") != sop_instance_uid:
        return None, "the File Meta Information names another SOP Instance UID"
    source = str(meta.get("SourceApplicationEntityTitle", "")).strip()
    return (
        InstanceRecord(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            path=relative,
            size_bytes=size,
            patient_id=header_text(header, "PatientID", 64),
            study_date=header_ascii_text(header, "StudyDate", 8),
            modality=header_ascii_text(header, "Modality", 16),
            calling_ae_title=source[:16] or None,
        ),
        "",
    )


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _remove_temporaries_in(folder: Path, changed_since: float | None) -> int:
    try:
        if changed_since is not None and folder.stat().st_mtime < changed_since:
            return 0
        with os.scandir(folder) as entries:
            stale = [e.path for e in entries if e.name.startswith(".") and e.name.endswith(".tmp")]
    except FileNotFoundError:
        return 0
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return len(stale)
