"""The DICOM Upper Layer for one connection, acceptor side (PS3.8 section 9 and annex E).

One thread per connection reads whole PDUs with blocking ``recv_into`` and hands each complete DIMSE
message to ``dimse.dispatch``. The acceptor's part of the PS3.8 state machine, with its named states:

* ``AWAITING_ASSOCIATE_RQ`` (Sta2): ARTIM runs from the connection until a complete A-ASSOCIATE-RQ,
  as one deadline (not a gap between bytes: a peer trickling a byte at a time is closed at ARTIM);
* ``ESTABLISHED`` (Sta6): P-DATA-TF, A-RELEASE-RQ (answered A-RELEASE-RP) and A-ABORT; a silence
  longer than the network timeout aborts;
* ``AWAITING_CLOSE`` (Sta13): after a release or a reject, ARTIM again for the peer to close.

Unexpected or unrecognised PDUs and malformed P-DATA are A-ABORTed (A-P-ABORT). Memory follows
the bytes that arrive, not the lengths announced: a PDU body is read into a buffer of at most
``FIRST_CHUNK`` that grows (doubling) only as data actually arrives, and a P-DATA-TF longer than the
Maximum Length we offered (``UNLIMITED_PDU_CAP`` when we offered "unlimited") is an A-ABORT.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import struct
import threading
import time
from typing import Protocol

from dicomnode.net.acse import Negotiator
from dicomnode.net.association import (
    AbortAssociationError,
    AbortReason,
    AbortSource,
    AcceptorSettings,
    Association,
    ConnectionClosedError,
    ServiceUser,
)
from dicomnode.net.dimse import Command, CommandSetError, decode_command, dispatch

logger = logging.getLogger(__name__)


class PduType(enum.IntEnum):
    """PDU types (PS3.8 9.3)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class State(enum.Enum):
    """The acceptor's states of the PS3.8 9.2 state machine that this layer distinguishes."""

    AWAITING_ASSOCIATE_RQ = "Sta2"
    ESTABLISHED = "Sta6"
    AWAITING_CLOSE = "Sta13"


_PDU_TYPES = frozenset(PduType)
_P_DATA_TF = int(PduType.P_DATA_TF)  # a plain int: compared on every PDU
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
MAX_NEGOTIATION_PDU = 1024 * 1024  # an A-ASSOCIATE-RQ is a few KiB even with every SOP class
FIRST_CHUNK = 1024 * 1024  # most of a PDU body allocated before its bytes arrive (the default PDU)
_A_RELEASE_RP = bytes((PduType.A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))


class Host(Protocol):
    """What a connection needs from the server that accepted it."""

    settings: AcceptorSettings
    service_user: ServiceUser
    negotiator: Negotiator

    def admit_association(self) -> bool:
        """Reserve an association slot for a pending connection; False when all are taken."""


class Connection:
    """One transport connection: negotiation, then DIMSE messages until release or abort."""

    def __init__(self, host: Host, sock: socket.socket, peer: tuple[str, int], started: float) -> None:
        self.host = host
        self.sock = sock
        self.peer = peer
        self.association: Association | None = None
        self.state = State.AWAITING_ASSOCIATE_RQ
        self.admitted = False  # holds one of the host's association slots
        self._deadline: float | None = started + host.settings.artim_timeout  # ARTIM, when running
        self._send_lock = threading.Lock()
        self._header = bytearray(6)
        self._header_view = memoryview(self._header)
        self._pdu_limit = host.settings.pdu_limit  # read once: checked on every PDU

    def run(self) -> str:
        """Serve the connection to its end; how it ended ("released", "aborted", "rejected", ...)."""
        try:
            if not self._establish():
                return "rejected"
            return self._serve()
        except AbortAssociationError as exc:
            logger.warning("association from %s aborted: %s", self.who(), exc)
            self.send_abort(exc.reason, exc.source)
        except ConnectionClosedError:
            logger.info("association from %s: connection closed by the peer", self.who())
        except TimeoutError:
            if self.state is State.AWAITING_ASSOCIATE_RQ:  # ARTIM expired: just close (AA-2)
                logger.warning(
                    "connection from %s closed: no complete association request in time", self.who()
                )
            else:
                logger.warning("association from %s aborted: timed out waiting for the peer", self.who())
                self.send_abort(AbortReason.NOT_SPECIFIED)
        except OSError as exc:
            logger.info("association from %s: connection lost (%s)", self.who(), exc.strerror or exc)
        except Exception:
            logger.exception("association from %s: internal error; aborting", self.who())
            self.send_abort(AbortReason.NOT_SPECIFIED)
        return "aborted"

    def who(self) -> str:
        """The peer for a log line: calling AE title (escaped) and address."""
        if self.association is not None:
            return f"{self.association.calling_ae_title} ({self.peer[0]})"
        return str(self.peer[0])

    # -- PDU transport --

    def _recv_into(self, view: memoryview) -> int:
        """Read at least one byte into ``view``; under the ARTIM deadline when it runs."""
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("ARTIM expired")
            self.sock.settimeout(remaining)
        count = self.sock.recv_into(view)
        if count == 0:
            raise ConnectionClosedError()
        return count

    def read_pdu(self) -> tuple[int, bytearray]:
        """One whole PDU: its type and its variable part (everything after the 6-byte header)."""
        filled = 0
        while filled < 6:
            filled += self._recv_into(self._header_view[filled:])
        pdu_type, length = _PDU_HEADER.unpack(self._header)
        if pdu_type not in _PDU_TYPES:
            raise AbortAssociationError(
                f"unrecognised PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU
            )
        limit = self.host.settings.pdu_limit if pdu_type == PduType.P_DATA_TF else MAX_NEGOTIATION_PDU
        if length > limit:
            raise AbortAssociationError(
                f"PDU of {length} bytes exceeds the limit of {limit}", AbortReason.INVALID_PDU_PARAMETER
            )
        body = bytearray(min(length, FIRST_CHUNK))
        view = memoryview(body)
        filled = 0
        while filled < length:
            if filled == len(body):  # grow only as far as bytes have actually arrived
                grown = bytearray(min(length, 2 * len(body)))
                grown[:filled] = view
                body, view = grown, memoryview(grown)
            filled += self._recv_into(view[filled:])
        return pdu_type, body

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send_abort(self, reason: int, source: AbortSource = AbortSource.SERVICE_PROVIDER) -> None:
        """A-ABORT (type 7, length 4, reserved, reserved, source, reason/diag); errors ignored."""
        diagnostic = reason if source == AbortSource.SERVICE_PROVIDER else 0
        with contextlib.suppress(OSError):
            self.send(bytes((PduType.A_ABORT, 0, 0, 0, 0, 4, 0, 0, source, diagnostic)))

    # -- association establishment --

    def _establish(self) -> bool:
        pdu_type, body = self.read_pdu()
        if pdu_type == PduType.A_ABORT:
            raise ConnectionClosedError()
        if pdu_type != PduType.A_ASSOCIATE_RQ:
            raise AbortAssociationError(
                f"PDU type 0x{pdu_type:02X} before association", AbortReason.UNEXPECTED_PDU
            )
        outcome = self.host.negotiator.negotiate(bytes(body), self.peer, self.host.service_user, self._admit)
        self.send(outcome.pdu)
        if outcome.association is None:
            logger.warning("association from %s rejected: %s", self.peer[0], outcome.why)
            notify = getattr(self.host.service_user, "association_rejected", None)
            if notify is not None and outcome.rejected is not None:  # metrics, the audit trail
                notify(outcome.rejected, outcome.why)
            self._await_close()
            return False
        self.association = outcome.association
        self.state = State.ESTABLISHED
        self._deadline = None
        self.sock.settimeout(self.host.settings.network_timeout)
        logger.info(
            "association accepted from %s (%s:%s), %d presentation contexts",
            self.association.calling_ae_title,
            self.peer[0],
            self.peer[1],
            len(self.association.contexts),
        )
        return True

    def _admit(self) -> bool:
        self.admitted = self.host.admit_association()
        return self.admitted

    def _await_close(self) -> None:
        """After a reject or a release response: wait (ARTIM) for the peer to close the connection."""
        self.state = State.AWAITING_CLOSE
        self._deadline = time.monotonic() + self.host.settings.artim_timeout
        with contextlib.suppress(OSError, ConnectionClosedError, AbortAssociationError):
            while True:
                self.read_pdu()

    # -- data transfer --

    def _serve(self) -> str:
        association = self.association
        assert association is not None
        contexts = association.contexts
        service_user = self.host.service_user
        message = _MessageAssembly()
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type == PduType.P_DATA_TF:
                for context_id, control, fragment in _pdv_items(body):
                    if context_id not in contexts:
                        raise AbortAssociationError(
                            f"P-DATA on presentation context {context_id}, which was not accepted",
                            AbortReason.INVALID_PDU_PARAMETER,
                        )
                    complete = message.add(context_id, control, fragment)
                    if complete is not None:
                        command, data = complete
                        abstract_syntax, transfer_syntax = contexts[context_id]
                        encoded = dispatch(
                            service_user, association, command, data, abstract_syntax, transfer_syntax
                        )
                        if encoded is not None:
                            self.send(_p_data_tf(context_id, encoded, association.peer_max_pdu))
                        message = _MessageAssembly()
            elif pdu_type == PduType.A_RELEASE_RQ:
                self.send(_A_RELEASE_RP)
                self._await_close()
                return "released"
            elif pdu_type == PduType.A_ABORT:
                return "aborted"
            else:
                raise AbortAssociationError(
                    f"unexpected PDU type 0x{pdu_type:02X}", AbortReason.UNEXPECTED_PDU
                )


class _MessageAssembly:
    """Collects the command and data-set fragments of one DIMSE message (PS3.8 annex E)."""

    def __init__(self) -> None:
        self.context_id: int | None = None
        self.command_parts: list[memoryview] = []
        self.command: Command | None = None
        self.data_parts: list[memoryview] = []

    def add(
        self, context_id: int, control: int, fragment: memoryview
    ) -> tuple[Command, list[memoryview] | None] | None:
        """Add a fragment; return (command, data set fragments or None) once the message is complete."""
        if self.context_id is None:
            self.context_id = context_id
        elif context_id != self.context_id:
            raise AbortAssociationError(
                "fragments of one message on two presentation contexts", AbortReason.INVALID_PDU_PARAMETER
            )
        is_command, is_last = bool(control & 0x01), bool(control & 0x02)
        if is_command:
            if self.command is not None:
                raise AbortAssociationError(
                    "command fragment after the command set ended", AbortReason.UNEXPECTED_PDU
                )
            self.command_parts.append(fragment)
            if not is_last:
                return None
            try:
                self.command = decode_command(b"".join(self.command_parts))
            except CommandSetError as exc:
                raise AbortAssociationError(
                    f"malformed command set: {exc}", AbortReason.INVALID_PDU_PARAMETER
                ) from exc
            if not self.command.has_data_set:
                return self.command, None
            return None
        if self.command is None:
            raise AbortAssociationError(
                "data set fragment before its command set", AbortReason.UNEXPECTED_PDU
            )
        if not self.command.has_data_set:
            raise AbortAssociationError(
                "data set fragment for a command without one", AbortReason.UNEXPECTED_PDU
            )
        self.data_parts.append(fragment)
        if not is_last:
            return None
        return self.command, self.data_parts


def _pdv_items(body: bytearray) -> list[tuple[int, int, memoryview]]:
    """The presentation data value items of a P-DATA-TF PDU: (context ID, control header, fragment)."""
    view = memoryview(body)
    items = []
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 6:
            raise AbortAssociationError("truncated PDV item in P-DATA-TF", AbortReason.INVALID_PDU_PARAMETER)
        length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
        if length < 2 or offset + 4 + length > end:
            raise AbortAssociationError(
                "PDV item length does not fit its P-DATA-TF", AbortReason.INVALID_PDU_PARAMETER
            )
        items.append((context_id, control, view[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    if not items:
        raise AbortAssociationError("P-DATA-TF without PDV items", AbortReason.INVALID_PDU_PARAMETER)
    return items


def _p_data_tf(context_id: int, command_set: bytes, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying a command set, fragmented to the peer's Maximum Length Received."""
    room = peer_max_pdu - 6 if peer_max_pdu > 6 else len(command_set) or 1
    pdus = []
    for start in range(0, len(command_set), room):
        fragment = command_set[start : start + room]
        control = 0x01 | (0x02 if start + room >= len(command_set) else 0)
        item = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(_PDU_HEADER.pack(PduType.P_DATA_TF, len(item)) + item)
    return b"".join(pdus)


__all__ = ["FIRST_CHUNK", "MAX_NEGOTIATION_PDU", "Connection", "Host", "PduType", "State"]
