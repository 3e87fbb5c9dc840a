"""The listener's side of Storage Commitment: N-EVENT-REPORT requests on a new association.

A Storage Commitment SCP (the PACS) may report a transaction's result on an association it opens
to us (PS3.4 J.3.3), proposing the Storage Commitment Push Model SOP class with itself as SCP (SCP/SCU
Role Selection: SCU role 0, SCP role 1) or without a role item. The acceptor (``dicomnode.net``)
accepts that context (:func:`commitment_context`) and hands the request here; the result is stored
by :func:`dicomnode.queue.commitments.apply_report`, the same code the sender uses when the report
comes on the N-ACTION's own association. Every refusal has a named status and a log line (UIDs only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from io import BytesIO

from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext

from dicomnode.db import utcnow
from dicomnode.net.association import (
    STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS,
    STORAGE_COMMITMENT_PUSH_MODEL_SOP_INSTANCE,
    Association,
    Response,
    supported_context,
)
from dicomnode.net.dimse import Command
from dicomnode.queue.commitments import CommitmentStore, apply_report
from dicomnode.status import Status

logger = logging.getLogger(__name__)

# N-EVENT-REPORT Event Type IDs of the Storage Commitment Push Model (PS3.4 J.3.3.1)
EVENT_ALL_SUCCEEDED = 1
EVENT_SOME_FAILED = 2


def commitment_context() -> PresentationContext:
    """The Storage Commitment Push Model context, the requestor (the PACS) being SCP when it asks."""
    return supported_context(
        STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS,
        [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
        scu_role=False,
        scp_role=True,
    )


class CommitmentReports:
    """Answers N-EVENT-REPORT requests (Storage Commitment results) for the listener."""

    def __init__(
        self,
        store: CommitmentStore,
        clock: Callable[[], datetime] = utcnow,
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.flush = flush  # the spool's flush: SQLite at synchronous NORMAL is durable only after it

    def n_event_report(
        self,
        association: Association,
        command: Command,
        transfer_syntax_uid: str,
        data: list[memoryview] | None,
    ) -> Response:
        """Check the request, read its Event Information, store the result; never raises."""
        peer = f"{association.calling_ae_title}@{association.address}"
        refusal = _check(command, data)
        if refusal is not None:
            logger.warning(
                "N-EVENT-REPORT from %s refused, 0x%04X: %s", peer, refusal.status, refusal.error_comment
            )
            return refusal
        assert data is not None
        try:
            syntax = UID(transfer_syntax_uid)
            dataset = read_dataset(BytesIO(b"".join(data)), syntax.is_implicit_VR, syntax.is_little_endian)
        except Exception as exc:
            logger.warning(
                "N-EVENT-REPORT from %s refused: Event Information unreadable (%s)", peer, type(exc).__name__
            )
            return Response(Status.PROCESSING_FAILURE, "Event Information cannot be parsed")
        try:
            status, comment = apply_report(self.store, dataset, peer, self.clock())
            if status == Status.SUCCESS:
                self.flush()  # answered success only once the stored result is durable
        except Exception as exc:  # the database or the flush: the peer may send the report again
            logger.error("N-EVENT-REPORT from %s not stored: %s", peer, type(exc).__name__)
            return Response(Status.PROCESSING_FAILURE, "the result cannot be stored now")
        return Response(status, comment)


def _check(command: Command, data: list[memoryview] | None) -> Response | None:
    """A refusal for a request that is no Storage Commitment result, else None."""
    if command.affected_sop_class_uid != STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS:
        return Response(Status.NO_SUCH_SOP_CLASS, "only Storage Commitment results are accepted")
    if command.affected_sop_instance_uid != STORAGE_COMMITMENT_PUSH_MODEL_SOP_INSTANCE:
        return Response(Status.NO_SUCH_SOP_INSTANCE, "not the Storage Commitment SOP instance")
    if command.event_type_id not in (EVENT_ALL_SUCCEEDED, EVENT_SOME_FAILED):
        return Response(Status.NO_SUCH_EVENT_TYPE, "Event Type ID must be 1 or 2")
    if data is None:
        return Response(Status.PROCESSING_FAILURE, "no Event Information")
    return None


__all__ = ["EVENT_ALL_SUCCEEDED", "EVENT_SOME_FAILED", "CommitmentReports", "commitment_context"]
