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
from dicomnode.queue.jobs import InstanceRecord, JobQueue
from dicomnode.receive.commitment import CommitmentReports, commitment_context
from dicomnode.receive.ingest import StoreRefused, record_from, safe_uid, store_instance
from dicomnode.receive.spool import InstanceStore
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


class StorageSCP:
    """Verification and Storage SCP: the service user the upper-layer acceptor calls.

    Its dependencies (the spool and the queue) are injected; it is called from one thread per
    association and keeps no per-association state of its own.
    """

    def __init__(self, store: InstanceStore, queue: JobQueue) -> None:
        self.store = store
        self.queue = queue
        self.commitments = CommitmentReports(CommitmentStore(queue.sessions), flush=store.flush)

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
                refused.sop_instance_uid or safe_uid(command.affected_sop_instance_uid),
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
        """Write, index and flush (``ingest.store_instance``); return False for a resend."""
        return store_instance(self.store, self.queue, record, meta, data)

    def _record_from(
        self,
        data: list[memoryview],
        data_set_size: int,
        association: Association,
        command: Command,
        transfer_syntax_uid: str,
    ) -> tuple[InstanceRecord, bytes]:
        """The index row and the File Meta Information for a received data set, or StoreRefused."""
        return record_from(
            self.store,
            data,
            data_set_size,
            transfer_syntax_uid,
            claimed_sop_class_uid=command.affected_sop_class_uid,
            claimed_sop_instance_uid=command.affected_sop_instance_uid,
            claimed_by="the C-STORE request",
            calling_ae_title=association.calling_ae_title,
            log=logger,
        )


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
