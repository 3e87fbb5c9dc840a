"""The DICOM listener: Verification and Storage SCP (pynetdicom).

A C-STORE is answered Success only after the instance is durable on disk (see ``dicomnode.store``)
and its row is committed (``dicomnode.queue``). Every other outcome gets a named failure status and
a log line with UIDs only. Pixel data is never decoded here: the received bytes are stored as they came.
This module must not import torch (directly or through the models package).
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
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
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import NodeConfig, TLSConfig
from dicomnode.errors import InvalidDatasetError, StorageFullError
from dicomnode.queue import InstanceRecord, JobQueue, record_or_ignore
from dicomnode.store import InstanceStore, validate_uid

logger = logging.getLogger(__name__)

# DIMSE status codes of the Storage Service Class (PS3.4 B.2.3, PS3.7 C).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # cannot store: disk full, below the free-space floor, database down
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000  # the dataset could not be parsed at all
STATUS_CANNOT_UNDERSTAND_MISSING_UID = 0xC001  # a required UID is missing or invalid
STATUS_CANNOT_UNDERSTAND_UID_MISMATCH = 0xC002  # dataset and command disagree on the SOP Instance UID

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

_HEADER_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class _RefusedError(InvalidDatasetError):
    """An invalid dataset together with the status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _AssociationStats:
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0


class StorageSCP:
    """C-ECHO and C-STORE handlers with their dependencies injected."""

    def __init__(self, store: InstanceStore, queue: JobQueue) -> None:
        self.store = store
        self.queue = queue
        self._stats: dict[int, _AssociationStats] = {}
        self._stats_lock = threading.Lock()

    # -- association bookkeeping (one summary line per association, UIDs and counts only) --

    def handle_accepted(self, event: evt.Event) -> None:
        with self._stats_lock:
            self._stats[id(event.assoc)] = _AssociationStats()
        requestor = event.assoc.requestor
        logger.info(
            "association accepted from %s (%s:%s)", requestor.ae_title, requestor.address, requestor.port
        )

    def handle_closed(self, event: evt.Event) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        elapsed = time.monotonic() - stats.started
        how = "aborted" if event.event is evt.EVT_ABORTED else "released"
        logger.info(
            "association %s from %s: %d stored, %d duplicates, %d failed, %.1f MB in %.2f s",
            how,
            event.assoc.requestor.ae_title,
            stats.stored,
            stats.duplicates,
            stats.failed,
            stats.bytes / 1e6,
            elapsed,
        )

    def _count(self, event: evt.Event, outcome: str, size: int = 0) -> None:
        stats = self._stats.get(id(event.assoc))
        if stats is not None:
            setattr(stats, outcome, getattr(stats, outcome) + 1)
            stats.bytes += size

    # -- DIMSE handlers --

    def handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def handle_store(self, event: evt.Event) -> int:
        """Store one instance durably, index it, and only then report success."""
        request: Any = event.request
        affected_sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        try:
            data = event.encoded_dataset(include_meta=True)
            header = _read_header(data)
            record = self._record_from(header, event, data)
        except InvalidDatasetError as exc:
            status = getattr(exc, "status", STATUS_CANNOT_UNDERSTAND_MISSING_UID)
            logger.warning(
                "C-STORE %s refused (0x%04X): %s", _safe_uid(affected_sop_instance_uid), status, exc
            )
            self._count(event, "failed")
            return status
        except Exception as exc:  # unreadable bytes of any kind: refuse, keep serving
            logger.warning(
                "C-STORE %s refused (0x%04X): dataset cannot be parsed: %s",
                _safe_uid(affected_sop_instance_uid),
                STATUS_CANNOT_UNDERSTAND,
                type(exc).__name__,
            )
            self._count(event, "failed")
            return STATUS_CANNOT_UNDERSTAND

        try:
            # The final name appears only by rename after a complete write, so an existing file is an
            # instance received before (a resend): the first copy is kept. After a power loss, a
            # file whose data never reached the disk is removed at start (drop_unflushed_instances).
            if not self.store.absolute(record.path).exists():
                self.store.write(record.path, data)
            recorded = record_or_ignore(self.queue, record)
            # one flush makes file, folder entries and the WAL durable (shared with other associations)
            self.store.flush()
            if not recorded:
                logger.debug("C-STORE %s already stored; acknowledged again", record.sop_instance_uid)
                self._count(event, "duplicates")
                return STATUS_SUCCESS
        except StorageFullError as exc:
            logger.error(
                "C-STORE %s failed (0x%04X out of resources): %s",
                record.sop_instance_uid,
                STATUS_OUT_OF_RESOURCES,
                exc,
            )
            self._count(event, "failed")
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # the database or anything else below us: nothing acknowledged
            logger.error(
                "C-STORE %s failed (0x%04X out of resources): cannot index instance: %s",
                record.sop_instance_uid,
                STATUS_OUT_OF_RESOURCES,
                type(exc).__name__,
            )
            self._count(event, "failed")
            return STATUS_OUT_OF_RESOURCES
        self._count(event, "stored", len(data))
        return STATUS_SUCCESS

    def _record_from(self, header: Dataset, event: evt.Event, data: bytes) -> InstanceRecord:
        request: Any = event.request
        sop_instance_uid = validate_uid(header.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class_uid = validate_uid(header.get("SOPClassUID"), "SOPClassUID")
        study_instance_uid = validate_uid(header.get("StudyInstanceUID"), "StudyInstanceUID")
        series_instance_uid = validate_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID")
        if sop_instance_uid != str(request.AffectedSOPInstanceUID).strip():
            raise _RefusedError(
                STATUS_CANNOT_UNDERSTAND_UID_MISMATCH,
                "SOPInstanceUID of the dataset does not match the C-STORE request",
            )
        if sop_class_uid != str(request.AffectedSOPClassUID).strip():
            raise _RefusedError(
                STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPClassUID of the dataset does not match the C-STORE request",
            )
        return InstanceRecord(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            path=self.store.relative_path(study_instance_uid, series_instance_uid, sop_instance_uid),
            size_bytes=len(data),
            patient_id=_text(header, "PatientID", 64),
            study_date=_text(header, "StudyDate", 8),
            modality=_text(header, "Modality", 16),
            calling_ae_title=str(event.assoc.requestor.ae_title).strip()[:16] or None,
        )


def _read_header(data: bytes) -> Dataset:
    """Parse everything but the pixel data; an empty or garbage dataset has no UIDs and fails later."""
    return dcmread(io.BytesIO(data), stop_before_pixels=True)


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element must not refuse the whole instance
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


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


def build_ae(node: NodeConfig) -> AE:
    """An application entity with the node's identity, limits and presentation contexts."""
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.require_called_aet = True
    ae.require_calling_aet = list(node.allowed_calling_ae_titles)
    ae.add_supported_context(Verification)
    for sop_class_uid in storage_sop_classes():
        ae.add_supported_context(sop_class_uid, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


class SharedPortServer(ThreadedAssociationServer):
    """An association server whose port other listener processes may bind too (SO_REUSEPORT).

    The kernel spreads new associations over the processes, so parallel associations are not
    limited by one interpreter's GIL.
    """

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """A server-side TLS context: TLS 1.2 or newer, our certificate, and client certificates
    required when a CA is configured (PS3.15 BCP 195 profile)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def start_listener(
    node: NodeConfig,
    store: InstanceStore,
    queue: JobQueue,
    *,
    port: int | None = None,
    shared_port: bool = False,
) -> tuple[ThreadedAssociationServer, StorageSCP]:
    """Start the SCP in background threads; the returned server's ``server_address`` has the real port.

    With ``shared_port`` other processes can listen on the same port (``node.listener_processes``);
    each then allows ``max_associations`` divided among the processes.
    """
    scp = StorageSCP(store, queue)
    ae = build_ae(node)
    if shared_port and node.listener_processes > 1:
        ae.maximum_associations = max(1, -(-node.max_associations // node.listener_processes))
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, scp.handle_echo),
        (evt.EVT_C_STORE, scp.handle_store),
        (evt.EVT_ACCEPTED, scp.handle_accepted),
        (evt.EVT_RELEASED, scp.handle_closed),
        (evt.EVT_ABORTED, scp.handle_closed),
    ]
    address = (node.host, node.port if port is None else port)
    ssl_context = server_ssl_context(node.tls) if node.tls is not None else None
    if shared_port:
        server = ae.make_server(
            address, evt_handlers=handlers, server_class=SharedPortServer, ssl_context=ssl_context
        )
        threading.Thread(target=server.serve_forever, name="listener", daemon=True).start()
        ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it again
    else:
        started = ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=ssl_context)
        assert started is not None
        server = started
    logger.info(
        "listening as %s on %s:%d%s",
        node.ae_title,
        *server.server_address[:2],
        " (TLS)" if ssl_context is not None else "",
    )
    return server, scp


def stop_listener(server: ThreadedAssociationServer, *, grace_seconds: float = 30.0) -> int:
    """Stop accepting and let in-flight associations finish (up to ``grace_seconds``).

    Returns how many were still open and had to be aborted.
    """
    server.shutdown()
    deadline = time.monotonic() + grace_seconds
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    remaining = server.active_associations
    for assoc in remaining:
        assoc.abort()
    return len(remaining)


__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_CANNOT_UNDERSTAND_MISSING_UID",
    "STATUS_CANNOT_UNDERSTAND_UID_MISMATCH",
    "STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "StorageSCP",
    "build_ae",
    "start_listener",
    "stop_listener",
]
