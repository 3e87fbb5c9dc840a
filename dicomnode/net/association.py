"""What the acceptor and its service user share: the association, its settings, answers and refusals.

No I/O here: the transport (``transport.py``), the upper layer (``dul.py``), association control
(``acse.py``) and DIMSE (``dimse.py``) all build on these types, and the Storage SCP implements the
``ServiceUser`` protocol.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from pynetdicom.presentation import PresentationContext

if TYPE_CHECKING:
    from dicomnode.net.dimse import Command

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS = "1.2.840.10008.1.20.1"  # PS3.4 J.3
STORAGE_COMMITMENT_PUSH_MODEL_SOP_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known instance

# With max_pdu_size = 0 ("unlimited" offered), the largest PDU the acceptor still reads.
UNLIMITED_PDU_CAP = 64 * 1024 * 1024


class Rejection(NamedTuple):
    """An A-ASSOCIATE-RJ (result, source, reason/diag) triple (PS3.8 9.3.4)."""

    result: int
    source: int
    reason: int


REJECT_NO_REASON = Rejection(0x01, 0x01, 0x01)
REJECT_APPLICATION_CONTEXT_NOT_SUPPORTED = Rejection(0x01, 0x01, 0x02)
REJECT_CALLING_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x03)
REJECT_CALLED_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x07)
REJECT_PROTOCOL_VERSION_NOT_SUPPORTED = Rejection(0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02)  # transient: try again later


class AbortReason(enum.IntEnum):
    """A-ABORT reason/diag when the service provider aborts (source 2, PS3.8 9.3.8)."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER = 0x06


class AbortSource(enum.IntEnum):
    """Who aborts (PS3.8 9.3.8): the DUL service user (our DIMSE layer) or the service provider."""

    SERVICE_USER = 0x00
    SERVICE_PROVIDER = 0x02


class TransferSyntaxPreference(enum.StrEnum):
    """Which accepted transfer syntax a presentation context gets when several would do."""

    SENDER = "sender"  # the requestor's first proposed syntax we accept: keeps the original bytes
    UNCOMPRESSED = "uncompressed"  # our order (uncompressed first): the sender decompresses


class AbortAssociationError(Exception):
    """The association must end with an A-ABORT (a protocol error or a local decision)."""

    def __init__(
        self,
        message: str,
        reason: AbortReason = AbortReason.NOT_SPECIFIED,
        source: AbortSource = AbortSource.SERVICE_PROVIDER,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.source = source


class ConnectionClosedError(Exception):
    """The peer closed the transport connection."""


@dataclass
class AssociationStats:
    """Counts for the one summary line logged when an association ends (UIDs and counts only)."""

    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0


@dataclass
class Association:
    """An established association: who the peer is and what was negotiated."""

    calling_ae_title: str
    called_ae_title: str
    address: str
    port: int
    # accepted presentation contexts: context ID -> (abstract syntax, transfer syntax)
    contexts: dict[int, tuple[str, str]]
    peer_max_pdu: int
    stats: AssociationStats = field(default_factory=AssociationStats)


@dataclass(frozen=True)
class Response:
    """A service user's answer to a request: a DIMSE status and, for failures, why (no patient data)."""

    status: int
    error_comment: str | None = None


class ServiceUser(Protocol):
    """What the acceptor calls: the Verification and Storage SCP behind it."""

    def check_association(self, association: Association) -> tuple[int, int, int] | None:
        """None to accept, or an A-ASSOCIATE-RJ (result, source, reason) triple."""

    def c_echo(self, association: Association, command: Command) -> Response: ...

    def c_store(
        self, association: Association, command: Command, transfer_syntax_uid: str, data: list[memoryview]
    ) -> Response:
        """Handle a C-STORE; ``data`` is the data set as received, in its fragments (not joined)."""

    def association_ended(self, association: Association, how: str) -> None: ...

    # Optional: ``n_event_report(association, command, transfer_syntax_uid, data) -> Response``
    # receives a Storage Commitment result (see EventReportUser); without it the request gets 0x0211.


class EventReportUser(Protocol):
    """A service user that also takes N-EVENT-REPORT requests (Storage Commitment results)."""

    def n_event_report(
        self,
        association: Association,
        command: Command,
        transfer_syntax_uid: str,
        data: list[memoryview] | None,
    ) -> Response: ...


@dataclass(frozen=True)
class AcceptorSettings:
    """The node's identity and limits, as the acceptor needs them."""

    ae_title: str
    supported_contexts: Sequence[PresentationContext]
    allowed_calling_ae_titles: tuple[str, ...] = ()
    max_associations: int = 16
    # connections that have not (yet) had an A-ASSOCIATE-RQ accepted; 0 = 2 x max_associations + 8
    max_pending_connections: int = 0
    max_pdu_size: int = 1048576  # advertised Maximum Length Received; 0 = unlimited (UNLIMITED_PDU_CAP)
    # ARTIM: the whole of association establishment (connection to complete A-ASSOCIATE-RQ), and
    # how long to wait for the peer to close after a release or reject
    artim_timeout: float = 30.0
    # how long an established association may stay silent before it is aborted
    network_timeout: float = 60.0
    transfer_syntax_preference: TransferSyntaxPreference = TransferSyntaxPreference.SENDER

    @property
    def pending_limit(self) -> int:
        """The cap on pre-association connections (``max_pending_connections`` or its default)."""
        return self.max_pending_connections or 2 * self.max_associations + 8

    @property
    def pdu_limit(self) -> int:
        """The largest P-DATA-TF variable field read: what we offered, or the cap for "unlimited"."""
        return self.max_pdu_size or UNLIMITED_PDU_CAP


def supported_context(
    abstract_syntax: str,
    transfer_syntaxes: Sequence[str],
    *,
    scu_role: bool | None = None,
    scp_role: bool | None = None,
) -> PresentationContext:
    """A presentation context the acceptor supports.

    ``scu_role``/``scp_role`` say which roles the *requestor* may take in SCP/SCU Role Selection
    (PS3.7 D.3.3.4): None leaves the default roles (requestor SCU, acceptor SCP) whatever it asks.
    """
    context = PresentationContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = list(transfer_syntaxes)
    context.scu_role = scu_role
    context.scp_role = scp_role
    return context


__all__ = [
    "APPLICATION_CONTEXT_NAME",
    "STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS",
    "STORAGE_COMMITMENT_PUSH_MODEL_SOP_INSTANCE",
    "UNLIMITED_PDU_CAP",
    "VERIFICATION_SOP_CLASS",
    "AbortAssociationError",
    "AbortReason",
    "AbortSource",
    "AcceptorSettings",
    "Association",
    "AssociationStats",
    "ConnectionClosedError",
    "EventReportUser",
    "Rejection",
    "Response",
    "ServiceUser",
    "TransferSyntaxPreference",
    "supported_context",
]
