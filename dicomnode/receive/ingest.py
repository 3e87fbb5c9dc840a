"""The one rule set for an instance that arrives, whatever carried it (C-STORE or STOW-RS).

:func:`record_from` validates the data set's header against what the sender claimed and builds the
index row and the File Meta Information; :func:`store_instance` writes, indexes and flushes it.
Both raise :class:`StoreRefused` with a named status for every failure, so the DIMSE listener
(``receive.scp``) and the DICOMweb server (``http.stow``) refuse the same things the same way, and
both acknowledge an instance only after its file is durable and its row committed. Pixel data is
never decoded here. This module must not import torch.
"""

from __future__ import annotations

import logging

from dicomnode.errors import DicomNodeError, InvalidDatasetError, StorageFullError
from dicomnode.queue.jobs import InstanceConflictError, InstanceRecord, JobQueue
from dicomnode.receive.header import (
    PREAMBLE,
    file_meta_information,
    header_ascii,
    header_ascii_text,
    header_text,
    read_header,
)
from dicomnode.receive.spool import InstanceStore, validate_uid
from dicomnode.status import Status

logger = logging.getLogger(__name__)

_UID_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")


class StoreRefused(DicomNodeError):  # noqa: N818 - the name the layout gives it (a refusal, not a fault)
    """An instance that is answered with a failure ``status``.

    ``message`` becomes the Error Comment (0000,0902; at most 64 characters, never patient data);
    ``detail`` is added to the log line only (numbers, the exception type).
    """

    def __init__(self, status: Status, message: str, *, detail: str = "", sop_instance_uid: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.sop_instance_uid = sop_instance_uid


def safe_uid(value: str, keyword: str = "AffectedSOPInstanceUID") -> str:
    """A UID for a log line, or a placeholder when the peer sent something that is not one."""
    try:
        return validate_uid(value, keyword)
    except InvalidDatasetError:
        return "<invalid UID>"


def record_from(
    store: InstanceStore,
    data: list[memoryview],
    data_set_size: int,
    transfer_syntax_uid: str,
    *,
    claimed_sop_class_uid: str,
    claimed_sop_instance_uid: str,
    claimed_by: str,
    calling_ae_title: str,
    log: logging.Logger = logger,
) -> tuple[InstanceRecord, bytes]:
    """The index row and the File Meta Information for a received data set, or StoreRefused.

    ``claimed_*`` are the UIDs the carrier named (the C-STORE request, a STOW part's File Meta
    Information), ``claimed_by`` says which, for the messages; ``log`` is the carrier's logger.
    """
    try:
        header = read_header(data, data_set_size, transfer_syntax_uid)
        uids = [validate_uid(header_ascii(header, keyword), keyword) for keyword in _UID_KEYWORDS]
    except InvalidDatasetError as exc:
        raise StoreRefused(Status.CANNOT_UNDERSTAND_MISSING_UID, str(exc)) from exc
    except Exception as exc:  # unreadable bytes of any kind: refuse, keep serving
        raise StoreRefused(
            Status.CANNOT_UNDERSTAND, "the data set cannot be parsed", detail=type(exc).__name__
        ) from exc
    sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid = uids
    if sop_instance_uid != claimed_sop_instance_uid:
        # PixelMed and dcmsend send real files this way: the data set is the truth (PS3.10 file
        # names and the index are made from it), so store it under its own UID and say so.
        log.info(
            "%s names SOP Instance UID %s, its data set %s: stored under the data set's",
            claimed_by,
            safe_uid(claimed_sop_instance_uid),
            sop_instance_uid,
        )
    if sop_class_uid != claimed_sop_class_uid:
        raise StoreRefused(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPClassUID of the dataset does not match {claimed_by}",
            sop_instance_uid=sop_instance_uid,
        )
    meta = file_meta_information(sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae_title)
    record = InstanceRecord(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        transfer_syntax_uid=transfer_syntax_uid,
        path=store.relative_path(study_instance_uid, series_instance_uid, sop_instance_uid),
        size_bytes=len(PREAMBLE) + len(meta) + data_set_size,  # the file's size
        patient_id=header_text(header, "PatientID", 64),
        study_date=header_ascii_text(header, "StudyDate", 8),
        modality=header_ascii_text(header, "Modality", 16),
        calling_ae_title=calling_ae_title[:16] or None,
    )
    return record, meta


def store_instance(
    store: InstanceStore,
    queue: JobQueue,
    record: InstanceRecord,
    meta: bytes,
    data: list[memoryview],
    *,
    flush: bool = True,
) -> bool:
    """Write, index and flush; return False for a resend. Raise StoreRefused for every failure.

    When this returns, the file and its row are durable: only then may the caller acknowledge it.
    With ``flush=False`` the caller flushes (``store.flush()``, one for several instances) and
    acknowledges none of them before that succeeded.
    """
    uid = record.sop_instance_uid
    try:
        # The final name appears only by rename after a complete write, so an existing file is an
        # instance received before (a resend): the first copy is kept. After a power loss, a
        # file whose data never reached the disk is removed at start (recovery.py).
        if not store.absolute(record.path).exists():
            store.write(record.path, [PREAMBLE, meta, *data])
    except StorageFullError as exc:
        raise StoreRefused(
            Status.OUT_OF_RESOURCES,
            "cannot store: disk full or below the free-space floor",
            detail=str(exc),
            sop_instance_uid=uid,
        ) from exc
    except Exception as exc:  # a fault below us of any other kind: nothing acknowledged
        raise StoreRefused(
            Status.OUT_OF_RESOURCES,
            "cannot write the instance file",
            detail=type(exc).__name__,
            sop_instance_uid=uid,
        ) from exc
    try:
        recorded = queue.record_instance(record)
    except InstanceConflictError as exc:
        # A UID names one instance: the copy held is kept and this file must not outlive the refusal.
        store.remove(record.path)
        raise StoreRefused(
            Status.CANNOT_UNDERSTAND_INSTANCE_CONFLICT,
            "SOP Instance UID already held under another Study/Series UID",
            detail=f"held as {exc.held_path}",
            sop_instance_uid=uid,
        ) from exc
    except Exception as exc:  # the database or anything else below us: nothing acknowledged
        # The file stays: a resend indexes it, and start-up recovery indexes it if none comes.
        raise StoreRefused(
            Status.OUT_OF_RESOURCES,
            "the instance cannot be indexed",
            detail=type(exc).__name__,
            sop_instance_uid=uid,
        ) from exc
    if not flush:
        return recorded
    try:
        # one flush makes file, folder entries and the WAL durable (shared with other callers)
        store.flush()
    except StorageFullError as exc:
        raise StoreRefused(
            Status.OUT_OF_RESOURCES,
            "cannot flush the spool to disk",
            detail=str(exc),
            sop_instance_uid=uid,
        ) from exc
    return recorded


__all__ = ["StoreRefused", "record_from", "safe_uid", "store_instance"]
