"""The DICOM listener: Verification and Storage SCP on dicomnode's upper-layer acceptor.

A C-STORE is answered Success only after the instance is durable on disk (see ``dicomnode.receive.spool``)
and its row is committed (``dicomnode.queue.jobs``). Every other outcome gets a named failure status and
a log line with UIDs only. Pixel data is never decoded here: the received bytes are stored as they came.
This module must not import torch (directly or through the models package).
"""

from __future__ import annotations

import logging
import time

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts, StoragePresentationContexts
from pynetdicom.presentation import PresentationContext

from dicomnode import audit, metrics
from dicomnode.config import NodeConfig
from dicomnode.errors import DicomNodeError, InvalidDatasetError, StorageFullError
from dicomnode.fsio import buffers_size
from dicomnode.net.association import (
    VERIFICATION_SOP_CLASS,
    AcceptorSettings,
    Association,
    Response,
    TransferSyntaxPreference,
    supported_context,
)
from dicomnode.net.dimse import Command
from dicomnode.net.tls import server_ssl_context
from dicomnode.net.transport import AcceptorServer
from dicomnode.queue.commitments import CommitmentStore
from dicomnode.queue.jobs import InstanceConflictError, InstanceRecord, JobQueue
from dicomnode.receive.commitment import CommitmentReports, commitment_context
from dicomnode.receive.header import PREAMBLE, file_meta_information, header_text, read_header
from dicomnode.receive.spool import InstanceStore, validate_uid
from dicomnode.status import OUT_OF_RESOURCES_RANGE, Status, status_label

logger = logging.getLogger(__name__)

# Every transfer syntax pydicom and its decoder plugins can read. The listener stores bytes as
# received; decoding happens later in the worker, under a time limit.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)


class StoreRefused(DicomNodeError):  # noqa: N818 - the name the layout gives it (a refusal, not a fault)
    """A C-STORE that is answered with a failure ``status``.

    ``message`` becomes the Error Comment (0000,0902; at most 64 characters, never patient data);
    ``detail`` is added to the log line only (numbers, the exception type).
    """

    def __init__(self, status: Status, message: str, *, detail: str = "", sop_instance_uid: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.sop_instance_uid = sop_instance_uid


class StorageSCP:
    """Verification and Storage SCP: the service user the upper-layer acceptor calls.

    Its dependencies (the spool and the queue) are injected; it is called from one thread per
    association and keeps no per-association state of its own.
    """

    def __init__(self, store: InstanceStore, queue: JobQueue) -> None:
        self.store = store
        self.queue = queue
        self.commitments = CommitmentReports(CommitmentStore(queue.sessions))

    def check_association(self, association: Association) -> tuple[int, int, int] | None:
        return None  # AE titles and limits are checked by the acceptor; the disk floor per C-STORE

    def association_ended(self, association: Association, how: str) -> None:
        stats = association.stats
        logger.info(
            "association %s from %s: %d stored, %d duplicates, %d failed, %.1f MB in %.2f s",
            how,
            association.calling_ae_title,
            stats.stored,
            stats.duplicates,
            stats.failed,
            stats.bytes / 1e6,
            time.monotonic() - stats.started,
        )
        metrics.association_ended(association.calling_ae_title, how)
        audit.association_ended(association, how)

    def association_rejected(self, association: Association, why: str) -> None:
        """Called by the acceptor after an A-ASSOCIATE-RJ (its log line says why)."""
        metrics.association_ended(association.calling_ae_title, "rejected")
        audit.association_rejected(association, why)

    def c_echo(self, association: Association, command: Command) -> Response:
        return Response(Status.SUCCESS)

    def n_event_report(
        self,
        association: Association,
        command: Command,
        transfer_syntax_uid: str,
        data: list[memoryview] | None,
    ) -> Response:
        """A Storage Commitment result on an association the PACS opened (``receive/commitment.py``)."""
        return self.commitments.n_event_report(association, command, transfer_syntax_uid, data)

    def c_store(
        self, association: Association, command: Command, transfer_syntax_uid: str, data: list[memoryview]
    ) -> Response:
        """Store one instance durably, index it, and only then report success."""
        stats = association.stats
        size = buffers_size(data)
        try:
            record, meta = self._record_from(data, size, association, command, transfer_syntax_uid)
            recorded = self._store(record, meta, data)
        except StoreRefused as refused:
            log = logger.error if refused.status in OUT_OF_RESOURCES_RANGE else logger.warning
            log(
                "C-STORE %s refused, %s: %s%s",
                refused.sop_instance_uid or _safe_uid(command.affected_sop_instance_uid),
                status_label(refused.status),
                refused.message,
                f" ({refused.detail})" if refused.detail else "",
            )
            stats.failed += 1
            metrics.instance_received(association.calling_ae_title, refused.status.name)
            return Response(refused.status, refused.message)
        metrics.instance_received(association.calling_ae_title, Status.SUCCESS.name)
        if not recorded:
            logger.debug("C-STORE %s already stored; acknowledged again", record.sop_instance_uid)
            stats.duplicates += 1
            return Response(Status.SUCCESS)
        stats.stored += 1
        stats.bytes += size
        audit.instance_stored(association, record)
        return Response(Status.SUCCESS)

    def _store(self, record: InstanceRecord, meta: bytes, data: list[memoryview]) -> bool:
        """Write, index and flush; return False for a resend. Raise StoreRefused for every failure."""
        uid = record.sop_instance_uid
        try:
            # The final name appears only by rename after a complete write, so an existing file is an
            # instance received before (a resend): the first copy is kept. After a power loss, a
            # file whose data never reached the disk is removed at start (recovery.py).
            if not self.store.absolute(record.path).exists():
                self.store.write(record.path, [PREAMBLE, meta, *data])
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
            recorded = self.queue.record_instance(record)
        except InstanceConflictError as exc:
            # A UID names one instance: the copy held is kept and this file must not outlive the refusal.
            self.store.remove(record.path)
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
        try:
            # one flush makes file, folder entries and the WAL durable (shared with other associations)
            self.store.flush()
        except StorageFullError as exc:
            raise StoreRefused(
                Status.OUT_OF_RESOURCES,
                "cannot flush the spool to disk",
                detail=str(exc),
                sop_instance_uid=uid,
            ) from exc
        return recorded

    def _record_from(
        self,
        data: list[memoryview],
        data_set_size: int,
        association: Association,
        command: Command,
        transfer_syntax_uid: str,
    ) -> tuple[InstanceRecord, bytes]:
        """The index row and the File Meta Information for a received data set, or StoreRefused."""
        try:
            header = read_header(data, data_set_size, transfer_syntax_uid)
            uids = [validate_uid(header.get(keyword), keyword) for keyword in _UID_KEYWORDS]
        except InvalidDatasetError as exc:
            raise StoreRefused(Status.CANNOT_UNDERSTAND_MISSING_UID, str(exc)) from exc
        except Exception as exc:  # unreadable bytes of any kind: refuse, keep serving
            raise StoreRefused(
                Status.CANNOT_UNDERSTAND, "the data set cannot be parsed", detail=type(exc).__name__
            ) from exc
        sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid = uids
        if sop_instance_uid != command.affected_sop_instance_uid:
            # PixelMed and dcmsend send real files this way: the data set is the truth (PS3.10 file
            # names and the index are made from it), so store it under its own UID and say so.
            logger.info(
                "C-STORE request names SOP Instance UID %s, its data set %s: stored under the data set's",
                _safe_uid(command.affected_sop_instance_uid),
                sop_instance_uid,
            )
        if sop_class_uid != command.affected_sop_class_uid:
            raise StoreRefused(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPClassUID of the dataset does not match the C-STORE request",
                sop_instance_uid=sop_instance_uid,
            )
        meta = file_meta_information(
            sop_class_uid, sop_instance_uid, transfer_syntax_uid, association.calling_ae_title
        )
        record = InstanceRecord(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            path=self.store.relative_path(study_instance_uid, series_instance_uid, sop_instance_uid),
            size_bytes=len(PREAMBLE) + len(meta) + data_set_size,  # the file's size
            patient_id=header_text(header, "PatientID", 64),
            study_date=header_text(header, "StudyDate", 8),
            modality=header_text(header, "Modality", 16),
            calling_ae_title=association.calling_ae_title[:16] or None,
        )
        return record, meta


_UID_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")


def _safe_uid(value: str) -> str:
    """A UID for a log line, or a placeholder when the peer sent something that is not one."""
    try:
        return validate_uid(value, "AffectedSOPInstanceUID")
    except InvalidDatasetError:
        return "<invalid UID>"


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows, retired ones included (old modalities still send them)."""
    uids = {str(c.abstract_syntax) for c in (*AllStoragePresentationContexts, *StoragePresentationContexts)}
    return sorted(uids)


def supported_contexts() -> list[PresentationContext]:
    """Verification, Storage Commitment results, every storage SOP class with every accepted syntax."""
    contexts = [supported_context(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])]
    contexts.append(commitment_context())
    contexts += [supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES) for uid in storage_sop_classes()]
    return contexts


def acceptor_settings(node: NodeConfig, *, processes: int = 1) -> AcceptorSettings:
    """The acceptor's identity and limits; ``max_associations`` is shared among ``processes``."""
    return AcceptorSettings(
        ae_title=node.ae_title,
        supported_contexts=supported_contexts(),
        allowed_calling_ae_titles=tuple(node.allowed_calling_ae_titles),
        max_associations=max(1, -(-node.max_associations // max(1, processes))),
        max_pending_connections=-(-node.max_pending_connections // max(1, processes)),
        max_pdu_size=node.max_pdu_size,
        artim_timeout=node.artim_timeout_seconds,
        network_timeout=node.network_timeout_seconds,
        transfer_syntax_preference=TransferSyntaxPreference(node.transfer_syntax_preference),
    )


def start_listener(
    node: NodeConfig,
    store: InstanceStore,
    queue: JobQueue,
    *,
    port: int | None = None,
    shared_port: bool = False,
) -> tuple[AcceptorServer, StorageSCP]:
    """Start the SCP in background threads; the returned server's ``server_address`` has the real port.

    With ``shared_port`` other processes can listen on the same port (``node.listener_processes``);
    each then allows ``max_associations`` divided among the processes.
    """
    scp = StorageSCP(store, queue)
    processes = node.listener_processes if shared_port else 1
    ssl_context = (
        server_ssl_context(node.tls.certificate, node.tls.private_key, node.tls.ca_certificates)
        if node.tls is not None
        else None
    )
    server = AcceptorServer(
        (node.host, node.port if port is None else port),
        acceptor_settings(node, processes=processes),
        scp,
        ssl_context=ssl_context,
        reuse_port=shared_port,
    )
    server.start()
    logger.info(
        "listening as %s on %s:%d%s",
        node.ae_title,
        *server.server_address[:2],
        " (TLS)" if ssl_context is not None else "",
    )
    return server, scp


def stop_listener(server: AcceptorServer, *, grace_seconds: float = 30.0) -> int:
    """Stop accepting and let in-flight associations finish (up to ``grace_seconds``).

    Returns how many were still open and had to be aborted.
    """
    return server.shutdown(grace_seconds)


__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "StorageSCP",
    "StoreRefused",
    "start_listener",
    "stop_listener",
    "supported_contexts",
]
