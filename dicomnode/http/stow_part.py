"""One part of a STOW-RS request through the C-STORE rule set (``receive.ingest``).

Its File Meta Information is read (with or without the PS3.10 preamble), the transfer syntax and
SOP class checked as for a C-STORE, the file written and its row recorded; the flush that makes it
durable is shared by the parts of a request (:func:`flush_parts`). What became of the part is its
:class:`Outcome`, which the response of ``http.stow`` lists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from dicomnode.errors import InvalidDatasetError, StorageFullError
from dicomnode.http.multipart import Part
from dicomnode.queue.jobs import InstanceRecord, JobQueue
from dicomnode.receive.ingest import StoreRefused, record_from, store_instance
from dicomnode.receive.scp import ACCEPTED_TRANSFER_SYNTAXES
from dicomnode.receive.spool import InstanceStore, validate_uid
from dicomnode.status import Status

logger = logging.getLogger("dicomnode.http.stow")  # the one name STOW-RS reception logs under

_META_PREFIX = 1024 * 1024  # bytes of a part searched for its File Meta Information


@dataclass
class Outcome:
    """What became of one part: stored (or a resend) or refused with a status."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    refused: StoreRefused | None = None
    record: InstanceRecord | None = None
    recorded: bool = False  # False for a resend: already held


def ingest_part(
    store: InstanceStore, queue: JobQueue, sop_classes: frozenset[str], part: Part, study: str | None
) -> Outcome:
    """Write and index one part (its flush comes later); the outcome says what became of it.

    ``study`` is the study of the request's path, if any; ``sop_classes`` the storage SOP classes
    this node accepts.
    """
    outcome = Outcome()
    try:
        media_type = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if media_type != "application/dicom":
            raise StoreRefused(Status.CANNOT_UNDERSTAND, "the part is not application/dicom")
        with part.view() as body:
            outcome.record, outcome.recorded = _store_part(store, queue, sop_classes, body, study, outcome)
    except StoreRefused as refused:
        outcome.refused = refused
        outcome.sop_instance_uid = refused.sop_instance_uid or outcome.sop_instance_uid
    except Exception as exc:  # a fault outside the rule set (mapping the spooled part): this part only
        outcome.refused = StoreRefused(
            Status.PROCESSING_FAILURE, "the part cannot be processed", detail=type(exc).__name__
        )
    return outcome


def _store_part(
    store: InstanceStore,
    queue: JobQueue,
    sop_classes: frozenset[str],
    body: memoryview,
    study: str | None,
    outcome: Outcome,
) -> tuple[InstanceRecord, bool]:
    """One Part 10 file through the C-STORE rule set; StoreRefused for every failure."""
    try:
        meta, offset = part10_meta(body)
    except Exception as exc:
        raise StoreRefused(
            Status.CANNOT_UNDERSTAND,
            "not a PS3.10 file (preamble, DICM, File Meta Information)",
            detail=type(exc).__name__,
        ) from exc
    outcome.sop_class_uid = _meta_uid(meta, "MediaStorageSOPClassUID")
    outcome.sop_instance_uid = _meta_uid(meta, "MediaStorageSOPInstanceUID")
    transfer_syntax = _meta_uid(meta, "TransferSyntaxUID")
    if not transfer_syntax:
        raise StoreRefused(
            Status.CANNOT_UNDERSTAND,
            "its File Meta Information names no valid Transfer Syntax UID",
            sop_instance_uid=outcome.sop_instance_uid,
        )
    if transfer_syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise StoreRefused(
            Status.REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED,
            "the transfer syntax is not accepted",
            detail=transfer_syntax or "none",
            sop_instance_uid=outcome.sop_instance_uid,
        )
    data = [body[offset:]]
    try:
        record, file_meta = record_from(
            store,
            data,
            len(body) - offset,
            transfer_syntax,
            claimed_sop_class_uid=outcome.sop_class_uid,
            claimed_sop_instance_uid=outcome.sop_instance_uid,
            claimed_by="its File Meta Information",
            calling_ae_title="",
            log=logger,
        )
        outcome.sop_class_uid, outcome.sop_instance_uid = record.sop_class_uid, record.sop_instance_uid
        if record.sop_class_uid not in sop_classes:
            raise StoreRefused(
                Status.SOP_CLASS_NOT_SUPPORTED,
                "the SOP class is not a storage SOP class this node accepts",
                sop_instance_uid=record.sop_instance_uid,
            )
        if study is not None and record.study_instance_uid != study:
            raise StoreRefused(
                Status.CANNOT_UNDERSTAND_UID_MISMATCH,
                "StudyInstanceUID of the dataset is not the study of the request",
                sop_instance_uid=record.sop_instance_uid,
            )
        return record, store_instance(store, queue, record, file_meta, data, flush=False)
    finally:
        data[0].release()


def flush_parts(store: InstanceStore, outcomes: list[Outcome]) -> None:
    """Make the written parts durable; when that fails, none of them counts as stored (0xA700)."""
    if not outcomes:
        return
    try:
        store.flush()
    except StorageFullError as exc:
        for outcome in outcomes:
            outcome.refused = StoreRefused(
                Status.OUT_OF_RESOURCES,
                "cannot flush the spool to disk",
                detail=str(exc),
                sop_instance_uid=outcome.sop_instance_uid,
            )
    outcomes.clear()


def part10_meta(body: memoryview) -> tuple[Dataset, int]:
    """The File Meta Information of a part and the offset of its data set.

    PS3.10 asks for the preamble and ``DICM``; a part that starts right at the File Meta group (what
    ``pydicom.dcmwrite`` makes of a data set without a preamble, as dicomweb-client sends it) is
    accepted too. File Meta Information Group Length is not needed: the group ends at the first
    element of another group. Raise ValueError for anything else.
    """
    prefix = bytes(body[:_META_PREFIX])  # a File Meta group is small
    if prefix[128:132] == b"DICM":
        start = 132
    elif prefix[:2] == b"\x02\x00":
        start = 0
    else:
        raise ValueError("neither a preamble with DICM nor File Meta Information")
    fp = DicomBytesIO(prefix[start:])
    fp.is_little_endian, fp.is_implicit_VR = True, False
    meta = read_dataset(cast(BinaryIO, fp), False, True, stop_when=_after_file_meta)
    if len(meta) == 0:
        raise ValueError("empty File Meta Information")
    return meta, start + fp.tell()


def _after_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag.group != 0x0002)


def _meta_uid(meta: Any, keyword: str) -> str:
    """A File Meta UID, validated, or "" when missing or malformed."""
    try:
        return validate_uid(meta.get(keyword), keyword)
    except InvalidDatasetError:
        return ""
