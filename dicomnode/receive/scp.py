"""The DICOM listener: Verification and Storage SCP on dicomnode's upper-layer acceptor.

A C-STORE is answered Success only after the instance is durable on disk (see ``dicomnode.receive.spool``)
and its row is committed (``dicomnode.queue.jobs``). Every other outcome gets a named failure status and
a log line with UIDs only. Pixel data is never decoded here: the received bytes are stored as they came.
This module must not import torch (directly or through the models package).
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from typing import BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
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

from dicomnode.config import NodeConfig
from dicomnode.errors import InvalidDatasetError, StorageFullError
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
from dicomnode.net.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.net.tls import server_ssl_context
from dicomnode.net.transport import AcceptorServer
from dicomnode.queue.jobs import InstanceRecord, JobQueue, record_or_ignore
from dicomnode.receive.spool import InstanceStore, validate_uid
from dicomnode.status import Status

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

# The header parse stops after Series Instance UID: every attribute the index needs comes before it.
_LAST_HEADER_TAG = 0x0020000E
_INFLATE_LIMIT = 4 * 1024 * 1024  # inflated bytes enough for the header of a deflated data set
_HEADER_PREFIX = 256 * 1024  # bytes joined for the header parse before trying the whole data set
_HEADER_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_PREAMBLE = bytes(128) + b"DICM"


class _RefusedError(InvalidDatasetError):
    """An invalid dataset together with the status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StorageSCP:
    """Verification and Storage SCP: the service user the upper-layer acceptor calls.

    Its dependencies (the spool and the queue) are injected; it is called from one thread per
    association and keeps no per-association state of its own.
    """

    def __init__(self, store: InstanceStore, queue: JobQueue) -> None:
        self.store = store
        self.queue = queue

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

    def c_echo(self, association: Association, command: Command) -> Response:
        return Response(Status.SUCCESS)

    def c_store(
        self, association: Association, command: Command, transfer_syntax_uid: str, data: list[memoryview]
    ) -> Response:
        """Store one instance durably, index it, and only then report success."""
        stats = association.stats
        size = buffers_size(data)
        try:
            header = _read_header(data, size, transfer_syntax_uid)
            record, meta = self._record_from(header, association, command, transfer_syntax_uid, size)
        except InvalidDatasetError as exc:
            status = getattr(exc, "status", Status.CANNOT_UNDERSTAND_MISSING_UID)
            logger.warning(
                "C-STORE %s refused (0x%04X): %s", _safe_uid(command.affected_sop_instance_uid), status, exc
            )
            stats.failed += 1
            return Response(status, str(exc))
        except Exception as exc:  # unreadable bytes of any kind: refuse, keep serving
            logger.warning(
                "C-STORE %s refused (0x%04X): dataset cannot be parsed: %s",
                _safe_uid(command.affected_sop_instance_uid),
                Status.CANNOT_UNDERSTAND,
                type(exc).__name__,
            )
            stats.failed += 1
            return Response(Status.CANNOT_UNDERSTAND, "the data set cannot be parsed")

        try:
            # The final name appears only by rename after a complete write, so an existing file is an
            # instance received before (a resend): the first copy is kept. After a power loss, a
            # file whose data never reached the disk is removed at start (drop_unflushed_instances).
            if not self.store.absolute(record.path).exists():
                self.store.write(record.path, [_PREAMBLE, meta, *data])
            recorded = record_or_ignore(self.queue, record)
            # one flush makes file, folder entries and the WAL durable (shared with other associations)
            self.store.flush()
            if not recorded:
                logger.debug("C-STORE %s already stored; acknowledged again", record.sop_instance_uid)
                stats.duplicates += 1
                return Response(Status.SUCCESS)
        except StorageFullError as exc:
            logger.error(
                "C-STORE %s failed (0x%04X out of resources): %s",
                record.sop_instance_uid,
                Status.OUT_OF_RESOURCES,
                exc,
            )
            stats.failed += 1
            return Response(Status.OUT_OF_RESOURCES, str(exc))
        except Exception as exc:  # the database or anything else below us: nothing acknowledged
            logger.error(
                "C-STORE %s failed (0x%04X out of resources): cannot index instance: %s",
                record.sop_instance_uid,
                Status.OUT_OF_RESOURCES,
                type(exc).__name__,
            )
            stats.failed += 1
            return Response(Status.OUT_OF_RESOURCES, "the instance cannot be indexed")
        stats.stored += 1
        stats.bytes += size
        return Response(Status.SUCCESS)

    def _record_from(
        self,
        header: Dataset,
        association: Association,
        command: Command,
        transfer_syntax_uid: str,
        data_set_size: int,
    ) -> tuple[InstanceRecord, bytes]:
        """The index row and the File Meta Information for a validated instance."""
        sop_instance_uid = validate_uid(header.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class_uid = validate_uid(header.get("SOPClassUID"), "SOPClassUID")
        study_instance_uid = validate_uid(header.get("StudyInstanceUID"), "StudyInstanceUID")
        series_instance_uid = validate_uid(header.get("SeriesInstanceUID"), "SeriesInstanceUID")
        if sop_instance_uid != command.affected_sop_instance_uid:
            raise _RefusedError(
                Status.CANNOT_UNDERSTAND_UID_MISMATCH,
                "SOPInstanceUID of the dataset does not match the C-STORE request",
            )
        if sop_class_uid != command.affected_sop_class_uid:
            raise _RefusedError(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPClassUID of the dataset does not match the C-STORE request",
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
            size_bytes=len(_PREAMBLE) + len(meta) + data_set_size,  # the file's size
            patient_id=_text(header, "PatientID", 64),
            study_date=_text(header, "StudyDate", 8),
            modality=_text(header, "Modality", 16),
            calling_ae_title=association.calling_ae_title[:16] or None,
        )
        return record, meta


def _stop_after_header(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_HEADER_TAG


def _read_header(fragments: list[memoryview], size: int, transfer_syntax_uid: str) -> Dataset:
    """Parse the data set's leading attributes, up to Series Instance UID, in its transfer syntax.

    Only the first fragments are joined for it (the identifying attributes come first); when they
    were not enough, the whole data set is. An empty or garbage data set parses "successfully"
    into something without UIDs, which the caller then refuses. Pixel data is never read.
    """
    prefix = bytearray()
    for fragment in fragments:
        prefix += fragment
        if len(prefix) >= _HEADER_PREFIX:
            break
    if len(prefix) == size:
        return _parse_header(bytes(prefix), transfer_syntax_uid)
    try:
        header = _parse_header(bytes(prefix), transfer_syntax_uid)
        if all(keyword in header for keyword in _HEADER_KEYWORDS):
            return header
    except Exception:  # the prefix ended inside an element: parse the whole data set below
        pass
    return _parse_header(b"".join(fragments), transfer_syntax_uid)


def _parse_header(data: bytes, transfer_syntax_uid: str) -> Dataset:
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, _INFLATE_LIMIT)
    implicit = transfer_syntax_uid == ImplicitVRLittleEndian
    little = transfer_syntax_uid != ExplicitVRBigEndian
    fp = DicomBytesIO(data)
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    return read_dataset(cast(BinaryIO, fp), implicit, little, stop_when=_stop_after_header)


def file_meta_information(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str
) -> bytes:
    """The File Meta Information group (PS3.10 7.1), explicit VR little endian, for a received instance."""

    def element(tag_element: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHL", 0x0002, tag_element, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value

    def padded(text: str, pad: bytes) -> bytes:
        raw = text.encode("ascii")
        return raw + pad * (len(raw) % 2)

    elements = [
        element(0x0001, b"OB", b"\x00\x01"),
        element(0x0002, b"UI", padded(sop_class_uid, b"\x00")),
        element(0x0003, b"UI", padded(sop_instance_uid, b"\x00")),
        element(0x0010, b"UI", padded(transfer_syntax_uid, b"\x00")),
        element(0x0012, b"UI", padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        element(0x0013, b"SH", padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    source = source_ae_title.strip()
    if source and source.isascii() and "\\" not in source:
        elements.append(element(0x0016, b"AE", padded(source[:16], b" ")))
    group = b"".join(elements)
    return element(0x0000, b"UL", struct.pack("<L", len(group))) + group


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


def supported_contexts() -> list[PresentationContext]:
    """Verification plus every storage SOP class, each with every accepted transfer syntax."""
    contexts = [supported_context(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])]
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
    "file_meta_information",
    "start_listener",
    "stop_listener",
    "supported_contexts",
]
