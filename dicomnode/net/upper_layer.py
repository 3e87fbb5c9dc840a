"""The DICOM Upper Layer as association acceptor (PS3.8): PDUs, negotiation, P-DATA reassembly.

Why not pynetdicom's acceptor: its reactor threads poll with 1 ms sleeps, read the socket 4 KiB at a
time and build a pydicom Dataset for every command, which made the receive path cost about 6 ms of
CPU per CT instance, more than writing and flushing the instance. Here one thread per association
reads whole PDUs with blocking ``recv_into`` and hands each complete DIMSE message to the service
user. pynetdicom still does the parts where its generality matters and speed does not: decoding
the A-ASSOCIATE-RQ (every user-information sub-item), presentation-context and role negotiation,
and encoding the A-ASSOCIATE-AC/RJ.

Behaviour follows the acceptor side of the PS3.8 state machine: an ARTIM timer while waiting for
the A-ASSOCIATE-RQ and for the peer to close after a release, A-ABORT (A-P-ABORT) on unexpected or
unrecognised PDUs and on malformed P-DATA, A-RELEASE-RP on release. Asynchronous operations, user
identity and extended negotiation are not answered (allowed: the requestor then works with the
defaults: one operation at a time, no identity confirmation).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicomnode.net.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    RESPONSE_BIT,
    Command,
    CommandSetError,
    decode_command,
    encode_response,
)
from dicomnode.net.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.status import Status

logger = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

ACCEPT_POLL_SECONDS = 0.5

# PDU types (PS3.8 9.3).
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_AC_PDU = 0x02
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07

# A-ASSOCIATE-RJ (result, source, reason) triples (PS3.8 9.3.4).
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_APPLICATION_CONTEXT_NOT_SUPPORTED = (0x01, 0x01, 0x02)
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
REJECT_CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
REJECT_PROTOCOL_VERSION_NOT_SUPPORTED = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)

# A-ABORT reasons when the service provider aborts (source 2, PS3.8 9.3.8).
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PDU_PARAMETER = 0x06

_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_MAX_NEGOTIATION_PDU = 1024 * 1024  # an A-ASSOCIATE-RQ is a few KiB even with every SOP class
_MAX_PDU_FLOOR = 64 * 1024 * 1024  # largest PDU read, whatever we advertised (a sloppy peer may exceed it)


class AbortAssociationError(Exception):
    """The association must end with an A-ABORT (a protocol error or a local decision)."""

    def __init__(self, message: str, reason: int = ABORT_REASON_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


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


@dataclass(frozen=True)
class AcceptorSettings:
    """The node's identity and limits, as the acceptor needs them."""

    ae_title: str
    supported_contexts: Sequence[PresentationContext]
    allowed_calling_ae_titles: tuple[str, ...] = ()
    max_associations: int = 16
    max_pdu_size: int = 1048576  # advertised Maximum Length Received; 0 = unlimited
    # ARTIM: how long to wait for the A-ASSOCIATE-RQ, and for the peer to close after a release/reject
    artim_timeout: float = 30.0
    # how long an established association may stay silent before it is aborted
    network_timeout: float = 60.0


def supported_context(abstract_syntax: str, transfer_syntaxes: Sequence[str]) -> PresentationContext:
    """A presentation context the acceptor supports."""
    context = PresentationContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = list(transfer_syntaxes)
    return context


class AcceptorServer:
    """Listens for associations and serves each in its own thread.

    ``reuse_port`` lets other processes bind the same port (SO_REUSEPORT), so the kernel spreads
    associations over several interpreters. ``ssl_context`` makes every connection DICOM TLS.
    """

    def __init__(
        self,
        address: tuple[str, int],
        settings: AcceptorSettings,
        service_user: ServiceUser,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.service_user = service_user
        self.ssl_context = ssl_context
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=128, reuse_port=reuse_port)
        self._socket.settimeout(ACCEPT_POLL_SECONDS)
        self.server_address: tuple[str, int] = self._socket.getsockname()[:2]
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active_associations(self) -> int:
        with self._lock:
            return len(self._connections)

    def start(self) -> None:
        """Accept in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="acceptor", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("accepting a connection failed")
                time.sleep(ACCEPT_POLL_SECONDS)  # e.g. out of file descriptors: do not spin
                continue
            connection = _Connection(self, sock, peer)
            with self._lock:
                self._connections.add(connection)
            threading.Thread(target=connection.run, name=f"association-{peer[1]}", daemon=True).start()

    def shutdown(self, grace_seconds: float = 30.0) -> int:
        """Stop accepting, let open associations finish up to ``grace_seconds``, abort the rest.

        Returns how many had to be aborted.
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=ACCEPT_POLL_SECONDS * 4)
        self._socket.close()
        deadline = time.monotonic() + grace_seconds
        while self.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            remaining = list(self._connections)
        for connection in remaining:
            connection.abort_from_outside()
        return len(remaining)

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)


class _Connection:
    """One transport connection: negotiation, then DIMSE messages until release or abort."""

    def __init__(self, server: AcceptorServer, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.server = server
        self.sock: socket.socket = sock
        self.peer = peer
        self.association: Association | None = None
        self._send_lock = threading.Lock()
        self._header = bytearray(6)

    # -- lifecycle --

    def run(self) -> None:
        how = "aborted"
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(self.server.settings.artim_timeout)
            if self.server.ssl_context is not None:
                self.sock = self.server.ssl_context.wrap_socket(self.sock, server_side=True)
            if not self._negotiate():
                return
            how = self._serve()
        except ssl.SSLError as exc:
            logger.warning("TLS handshake with %s failed: %s", self.peer[0], exc.reason or exc)
        except AbortAssociationError as exc:
            logger.warning("association from %s aborted: %s", self._who(), exc)
            self._send_abort(exc.reason)
        except ConnectionClosedError:
            logger.info("association from %s: connection closed by the peer", self._who())
        except TimeoutError:
            if self.association is None:  # ARTIM expired before an A-ASSOCIATE-RQ: just close (AA-2)
                logger.warning("connection from %s closed: no association request in time", self._who())
            else:
                logger.warning("association from %s aborted: timed out waiting for the peer", self._who())
                self._send_abort(ABORT_REASON_NOT_SPECIFIED)
        except OSError as exc:
            logger.info("association from %s: connection lost (%s)", self._who(), exc.strerror or exc)
        except Exception:
            logger.exception("association from %s: internal error; aborting", self._who())
            self._send_abort(ABORT_REASON_NOT_SPECIFIED)
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.server._forget(self)
            if self.association is not None:
                try:
                    self.server.service_user.association_ended(self.association, how)
                except Exception:
                    logger.exception("association_ended handler failed")

    def abort_from_outside(self) -> None:
        """Abort at shutdown: A-ABORT to the peer, then unblock the thread reading the socket."""
        self._send_abort(ABORT_REASON_NOT_SPECIFIED, source=0x00)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _who(self) -> str:
        if self.association is not None:
            return f"{self.association.calling_ae_title} ({self.peer[0]})"
        return str(self.peer[0])

    # -- PDU transport --

    def _recv_into(self, view: memoryview) -> None:
        while view:
            count = self.sock.recv_into(view)
            if count == 0:
                raise ConnectionClosedError()
            view = view[count:]

    def _read_pdu(self) -> tuple[int, bytearray]:
        """One whole PDU: its type and its variable part (everything after the 6-byte header)."""
        self._recv_into(memoryview(self._header))
        pdu_type, length = _PDU_HEADER.unpack(self._header)
        if pdu_type not in (1, 2, 3, 4, 5, 6, 7):
            raise AbortAssociationError(f"unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
        if self.association is None:  # before negotiation only small PDUs are legitimate
            limit = _MAX_NEGOTIATION_PDU
        elif self.server.settings.max_pdu_size:
            limit = max(self.server.settings.max_pdu_size * 4, _MAX_PDU_FLOOR)
        else:
            limit = 0xFFFFFFFF  # "unlimited" was offered
        if length > limit:
            raise AbortAssociationError(
                f"PDU of {length} bytes exceeds the limit", ABORT_INVALID_PDU_PARAMETER
            )
        body = bytearray(length)
        self._recv_into(memoryview(body))
        return pdu_type, body

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def _send_abort(self, reason: int, source: int = 0x02) -> None:
        # A-ABORT: type 7, length 4, reserved, reserved, source, reason/diag
        pdu = bytes((A_ABORT_PDU, 0, 0, 0, 0, 4, 0, 0, source, reason if source == 0x02 else 0))
        with contextlib.suppress(OSError):
            self._send(pdu)

    # -- association establishment --

    def _negotiate(self) -> bool:
        pdu_type, body = self._read_pdu()
        if pdu_type == A_ABORT_PDU:
            return False
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise AbortAssociationError(f"PDU type 0x{pdu_type:02X} before association", ABORT_UNEXPECTED_PDU)
        rq_pdu = A_ASSOCIATE_RQ()
        try:
            rq_pdu.decode(bytes(_PDU_HEADER.pack(pdu_type, len(body))) + bytes(body))
            request = rq_pdu.to_primitive()
        except Exception as exc:
            raise AbortAssociationError(
                f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})", ABORT_INVALID_PDU_PARAMETER
            ) from exc
        settings = self.server.settings
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        association = Association(
            calling_ae_title=calling,
            called_ae_title=called,
            address=str(self.peer[0]),
            port=int(self.peer[1]),
            contexts={},
            peer_max_pdu=int(request.maximum_length_received or 0),
        )

        rejection: tuple[int, int, int] | None = None
        why = ""
        if not (rq_pdu.protocol_version & 0x0001):
            rejection, why = REJECT_PROTOCOL_VERSION_NOT_SUPPORTED, "protocol version not supported"
        elif str(request.application_context_name) != APPLICATION_CONTEXT_NAME:
            rejection, why = REJECT_APPLICATION_CONTEXT_NOT_SUPPORTED, "unknown application context"
        elif called != settings.ae_title.strip():
            rejection, why = REJECT_CALLED_AE_NOT_RECOGNIZED, f"called AE title {called!r} is not ours"
        elif settings.allowed_calling_ae_titles and calling not in settings.allowed_calling_ae_titles:
            rejection, why = REJECT_CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} is not allowed"
        elif self.server.active_associations > settings.max_associations:
            rejection, why = REJECT_LOCAL_LIMIT_EXCEEDED, f"already {settings.max_associations} associations"
        else:
            rejection = self.server.service_user.check_association(association)
            why = "refused by the node"
        if rejection is not None:
            logger.warning("association from %s (%s) rejected: %s", calling, self.peer[0], why)
            notify = getattr(self.server.service_user, "association_rejected", None)
            if notify is not None:  # metrics and the audit trail (a security alert for refused AEs)
                notify(association, why)
            self._send_reject(request, rejection)
            self._await_close()
            return False

        roles = {
            UID(str(item.sop_class_uid)): (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        results, role_items = negotiate_as_acceptor(
            request.presentation_context_definition_list,
            list(settings.supported_contexts),
            roles or None,
        )
        association.contexts = {
            int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in results
            if cx.result == 0x00 and cx.context_id is not None
        }
        self._send_accept(request, results, role_items)
        self.association = association
        logger.info(
            "association accepted from %s (%s:%s), %d presentation contexts",
            calling,
            self.peer[0],
            self.peer[1],
            len(association.contexts),
        )
        return True

    def _send_accept(
        self,
        request: A_ASSOCIATE,
        results: list[PresentationContext],
        role_items: list[SCP_SCU_RoleSelectionNegotiation],
    ) -> None:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT_NAME
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        maximum_length = MaximumLengthNotification()
        maximum_length.maximum_length_received = self.server.settings.max_pdu_size
        implementation_uid = ImplementationClassUIDNotification()
        implementation_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        implementation_version = ImplementationVersionNameNotification()
        implementation_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive.user_information = [maximum_length, implementation_uid, implementation_version, *role_items]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        self._send(pdu.encode())

    def _send_reject(self, request: A_ASSOCIATE, rejection: tuple[int, int, int]) -> None:
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = rejection
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        with contextlib.suppress(OSError):
            self._send(pdu.encode())

    def _await_close(self) -> None:
        """After a reject or a release response: wait (ARTIM) for the peer to close the connection."""
        self.sock.settimeout(self.server.settings.artim_timeout)
        with contextlib.suppress(OSError, ConnectionClosedError, AbortAssociationError):
            while True:
                self._read_pdu()

    # -- data transfer --

    def _serve(self) -> str:
        association = self.association
        assert association is not None
        self.sock.settimeout(self.server.settings.network_timeout)
        message = _MessageAssembly()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == P_DATA_TF_PDU:
                for context_id, control, fragment in _pdv_items(body):
                    if context_id not in association.contexts:
                        raise AbortAssociationError(
                            f"P-DATA on presentation context {context_id}, which was not accepted",
                            ABORT_INVALID_PDU_PARAMETER,
                        )
                    complete = message.add(context_id, control, fragment)
                    if complete is not None:
                        self._dispatch(association, *complete)
                        message = _MessageAssembly()
            elif pdu_type == A_RELEASE_RQ_PDU:
                self._send(bytes((A_RELEASE_RP_PDU, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
                self._await_close()
                return "released"
            elif pdu_type == A_ABORT_PDU:
                return "aborted"
            else:
                raise AbortAssociationError(f"unexpected PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)

    def _dispatch(
        self, association: Association, context_id: int, command: Command, data: list[memoryview] | None
    ) -> None:
        abstract_syntax, transfer_syntax = association.contexts[context_id]
        service_user = self.server.service_user
        if command.command_field & RESPONSE_BIT or command.command_field == C_CANCEL_RQ:
            return  # nothing to answer (we never send requests; C-CANCEL has no response)
        if command.command_field == C_ECHO_RQ and abstract_syntax == VERIFICATION_SOP_CLASS:
            response = service_user.c_echo(association, command)
        elif command.command_field == C_STORE_RQ and abstract_syntax != VERIFICATION_SOP_CLASS:
            if data is None:
                response = Response(Status.CANNOT_UNDERSTAND, "C-STORE request without a data set")
            else:
                response = service_user.c_store(association, command, transfer_syntax, data)
        elif command.command_field in (C_ECHO_RQ, C_STORE_RQ):
            response = Response(
                Status.SOP_CLASS_NOT_SUPPORTED, "command not valid on this presentation context"
            )
        else:
            response = Response(Status.UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE are supported")
        encoded = encode_response(
            command, response.status, error_comment=response.error_comment, sop_class_uid=abstract_syntax
        )
        self._send(_p_data_tf(context_id, encoded, association.peer_max_pdu))


class _MessageAssembly:
    """Collects the command and data-set fragments of one DIMSE message (PS3.8 annex E)."""

    def __init__(self) -> None:
        self.context_id: int | None = None
        self.command_parts: list[memoryview] = []
        self.command: Command | None = None
        self.data_parts: list[memoryview] = []

    def add(
        self, context_id: int, control: int, fragment: memoryview
    ) -> tuple[int, Command, list[memoryview] | None] | None:
        """Add a fragment; return (context ID, command, data set fragments or None) once complete."""
        if self.context_id is None:
            self.context_id = context_id
        elif context_id != self.context_id:
            raise AbortAssociationError(
                "fragments of one message on two presentation contexts", ABORT_INVALID_PDU_PARAMETER
            )
        is_command, is_last = bool(control & 0x01), bool(control & 0x02)
        if is_command:
            if self.command is not None:
                raise AbortAssociationError(
                    "command fragment after the command set ended", ABORT_UNEXPECTED_PDU
                )
            self.command_parts.append(fragment)
            if not is_last:
                return None
            try:
                self.command = decode_command(b"".join(self.command_parts))
            except CommandSetError as exc:
                raise AbortAssociationError(
                    f"malformed command set: {exc}", ABORT_INVALID_PDU_PARAMETER
                ) from exc
            if not self.command.has_data_set:
                return context_id, self.command, None
            return None
        if self.command is None:
            raise AbortAssociationError("data set fragment before its command set", ABORT_UNEXPECTED_PDU)
        if not self.command.has_data_set:
            raise AbortAssociationError("data set fragment for a command without one", ABORT_UNEXPECTED_PDU)
        self.data_parts.append(fragment)
        if not is_last:
            return None
        return context_id, self.command, self.data_parts


def _pdv_items(body: bytearray) -> list[tuple[int, int, memoryview]]:
    """The presentation data value items of a P-DATA-TF PDU: (context ID, control header, fragment)."""
    view = memoryview(body)
    items = []
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 6:
            raise AbortAssociationError("truncated PDV item in P-DATA-TF", ABORT_INVALID_PDU_PARAMETER)
        length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
        if length < 2 or offset + 4 + length > end:
            raise AbortAssociationError(
                "PDV item length does not fit its P-DATA-TF", ABORT_INVALID_PDU_PARAMETER
            )
        items.append((context_id, control, view[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    if not items:
        raise AbortAssociationError("P-DATA-TF without PDV items", ABORT_INVALID_PDU_PARAMETER)
    return items


def _p_data_tf(context_id: int, command_set: bytes, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying a command set, fragmented to the peer's Maximum Length Received."""
    room = peer_max_pdu - 6 if peer_max_pdu > 6 else len(command_set) or 1
    pdus = []
    for start in range(0, len(command_set), room):
        fragment = command_set[start : start + room]
        control = 0x01 | (0x02 if start + room >= len(command_set) else 0)
        item = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(_PDU_HEADER.pack(P_DATA_TF_PDU, len(item)) + item)
    return b"".join(pdus)


__all__ = [
    "AbortAssociationError",
    "AcceptorServer",
    "AcceptorSettings",
    "Association",
    "AssociationStats",
    "Response",
    "ServiceUser",
    "supported_context",
]
