"""DIMSE (PS3.7 section 9 and annex E): the command-set codec and dispatch to the service user.

A command set is always Implicit VR Little Endian and holds only group 0000 elements, so it is read
and written here directly rather than through a general dataset: the listener answers every C-STORE
with one of these and a pydicom Dataset round trip per message cost more than the rest of the
response path together. Only what a Verification and Storage SCP needs is implemented, and the
N-EVENT-REPORT a Storage Commitment SCP sends back (PS3.4 J.3.3), which goes to the service user's
``n_event_report`` when it has one.

Reading is tolerant where dcmtk's storescp and Orthanc are: elements outside group 0000 are skipped,
C-ECHO is answered on any accepted presentation context. A request whose Affected SOP Class or
Instance UID is not a UID gets a failure status (C-STORE: 0xC001), never a traceback. Any other
known request (no ``n_event_report``: N-EVENT-REPORT too) gets 0x0211 Unrecognized Operation; a
Command Field that is no DIMSE request at all has no response command to answer with (OR-ing
0x8000 gives no defined response), so the association is aborted (A-ABORT, source: service
user), as dcmtk does.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass

from dicomnode.net.association import (
    STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS,
    VERIFICATION_SOP_CLASS,
    AbortAssociationError,
    AbortReason,
    AbortSource,
    Association,
    Response,
    ServiceUser,
)
from dicomnode.status import Status

logger = logging.getLogger(__name__)

# Command Field values (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
N_EVENT_REPORT_RQ = 0x0100
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
# Every request Command Field PS3.7 E.1 defines; other values have no response command.
DIMSE_REQUESTS = frozenset(
    (0x0001, 0x0010, 0x0020, 0x0021, 0x0030, 0x0100, 0x0110, 0x0120, 0x0130, 0x0140, 0x0150, C_CANCEL_RQ)
)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# Command Data Set Type: this value means "no data set follows"; any other means one does.
NO_DATA_SET = 0x0101

_AFFECTED_SOP_CLASS_UID = 0x00000002
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
_PRIORITY = 0x00000700
_COMMAND_DATA_SET_TYPE = 0x00000800
_STATUS = 0x00000900
_ERROR_COMMENT = 0x00000902
_AFFECTED_SOP_INSTANCE_UID = 0x00001000
_EVENT_TYPE_ID = 0x00001002
_MOVE_ORIGINATOR_AE_TITLE = 0x00001030
_MOVE_ORIGINATOR_MESSAGE_ID = 0x00001031

_ELEMENT_HEADER = struct.Struct("<HHL")


class CommandSetError(ValueError):
    """A command set that cannot be decoded: a protocol error, answered by aborting the association."""


@dataclass(frozen=True)
class Command:
    """The fields of a request command set that a Verification and Storage SCP uses."""

    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    priority: int = 0
    move_originator_ae_title: str = ""
    move_originator_message_id: int | None = None
    event_type_id: int | None = None  # N-EVENT-REPORT only


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Decode an Implicit VR Little Endian command set; raise CommandSetError when it is malformed."""
    view = memoryview(data)
    values: dict[int, bytes] = {}
    offset = 0
    end = len(view)
    while offset < end:
        if end - offset < 8:
            raise CommandSetError("truncated element header in the command set")
        group, element, length = _ELEMENT_HEADER.unpack_from(view, offset)
        offset += 8
        if length == 0xFFFFFFFF or offset + length > end:
            raise CommandSetError(f"element ({group:04X},{element:04X}) runs past the end of the command set")
        if group == 0x0000:  # anything else does not belong in a command set: skipped, as dcmtk does
            values[element] = bytes(view[offset : offset + length])
        offset += length

    def us(element: int) -> int | None:
        raw = values.get(element)
        if raw is None:
            return None
        if len(raw) != 2:
            raise CommandSetError(f"(0000,{element:04X}) is not a 2-byte US value")
        return int.from_bytes(raw, "little")

    def text(element: int) -> str:
        raw = values.get(element, b"")
        return raw.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()

    command_field = us(_COMMAND_FIELD)
    if command_field is None:
        raise CommandSetError("the command set has no Command Field (0000,0100)")
    data_set_type = us(_COMMAND_DATA_SET_TYPE)
    if data_set_type is None:
        raise CommandSetError("the command set has no Command Data Set Type (0000,0800)")
    return Command(
        command_field=command_field,
        message_id=us(_MESSAGE_ID) or 0,
        has_data_set=data_set_type != NO_DATA_SET,
        affected_sop_class_uid=text(_AFFECTED_SOP_CLASS_UID),
        affected_sop_instance_uid=text(_AFFECTED_SOP_INSTANCE_UID),
        priority=us(_PRIORITY) or 0,
        move_originator_ae_title=text(_MOVE_ORIGINATOR_AE_TITLE),
        move_originator_message_id=us(_MOVE_ORIGINATOR_MESSAGE_ID),
        event_type_id=us(_EVENT_TYPE_ID),
    )


def encode_response(
    request: Command, status: int, *, error_comment: str | None = None, sop_class_uid: str = ""
) -> bytes:
    """The response command set to ``request``: C-STORE-RSP, C-ECHO-RSP or any other *-RSP.

    ``error_comment`` (failure statuses only; at most 64 ASCII characters, never patient data) tells
    the sending operator why. The Affected SOP Class/Instance UIDs echo the request's (``sop_class_uid``, the
    presentation context's abstract syntax, stands in when the request has none).
    """
    elements: list[tuple[int, bytes]] = []
    affected_class = request.affected_sop_class_uid
    if not is_uid(affected_class):  # an invalid UID is not echoed: the context's stands in
        affected_class = sop_class_uid
    if is_uid(affected_class):
        elements.append((_AFFECTED_SOP_CLASS_UID, _uid(affected_class)))
    elements.append((_COMMAND_FIELD, _us(request.command_field | RESPONSE_BIT)))
    elements.append((_MESSAGE_ID_BEING_RESPONDED_TO, _us(request.message_id)))
    elements.append((_COMMAND_DATA_SET_TYPE, _us(NO_DATA_SET)))
    elements.append((_STATUS, _us(status)))
    if error_comment and status != Status.SUCCESS:
        comment = error_comment.encode("ascii", errors="replace")[:64]
        elements.append((_ERROR_COMMENT, comment + b" " * (len(comment) % 2)))
    if is_uid(request.affected_sop_instance_uid) and request.command_field in (C_STORE_RQ, N_EVENT_REPORT_RQ):
        elements.append((_AFFECTED_SOP_INSTANCE_UID, _uid(request.affected_sop_instance_uid)))
    if request.command_field == N_EVENT_REPORT_RQ and request.event_type_id is not None:
        elements.append((_EVENT_TYPE_ID, _us(request.event_type_id)))
    body = b"".join(_ELEMENT_HEADER.pack(0, element, len(value)) + value for element, value in elements)
    return _ELEMENT_HEADER.pack(0, 0, 4) + len(body).to_bytes(4, "little") + body


def _us(value: int) -> bytes:
    return value.to_bytes(2, "little")


def is_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid UID (PS3.5 9.1), so that it may be echoed."""
    return 0 < len(value) <= 64 and value.isascii() and _UID.match(value) is not None


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" * (len(raw) % 2)


def dispatch(
    service_user: ServiceUser,
    association: Association,
    command: Command,
    data: list[memoryview] | None,
    abstract_syntax: str,
    transfer_syntax: str,
) -> bytes | None:
    """Hand a complete request to the service user; the response command set, or None for none.

    Raises AbortAssociationError for a Command Field that is no DIMSE request.
    """
    field = command.command_field
    if field & RESPONSE_BIT or field == C_CANCEL_RQ:
        return None  # nothing to answer (we never send requests; C-CANCEL has no response)
    if field not in DIMSE_REQUESTS:
        raise AbortAssociationError(
            f"Command Field 0x{field:04X} is no DIMSE request",
            AbortReason.NOT_SPECIFIED,
            AbortSource.SERVICE_USER,
        )
    response: Response
    if field == C_ECHO_RQ:  # on any accepted context, as dcmtk, Orthanc and pynetdicom answer
        response = service_user.c_echo(association, command)
    elif field == C_STORE_RQ and abstract_syntax == VERIFICATION_SOP_CLASS:
        response = Response(Status.SOP_CLASS_NOT_SUPPORTED, "C-STORE on the Verification context")
    elif field == C_STORE_RQ:
        if not (is_uid(command.affected_sop_class_uid) and is_uid(command.affected_sop_instance_uid)):
            logger.warning(
                "C-STORE from %s refused: Affected SOP Class/Instance UID is not a UID", association.address
            )
            response = Response(
                Status.CANNOT_UNDERSTAND_MISSING_UID, "Affected SOP Class/Instance UID invalid"
            )
        elif data is None:
            response = Response(Status.CANNOT_UNDERSTAND, "C-STORE request without a data set")
        else:
            response = service_user.c_store(association, command, transfer_syntax, data)
    elif field == N_EVENT_REPORT_RQ and abstract_syntax != STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS:
        response = Response(Status.NO_SUCH_SOP_CLASS, "N-EVENT-REPORT only on the Storage Commitment context")
    elif field == N_EVENT_REPORT_RQ and (handler := getattr(service_user, "n_event_report", None)):
        response = handler(association, command, transfer_syntax, data)
    else:
        response = Response(Status.UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE are supported")
    return encode_response(
        command, response.status, error_comment=response.error_comment, sop_class_uid=abstract_syntax
    )


__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_STORE_RQ",
    "DIMSE_REQUESTS",
    "NO_DATA_SET",
    "N_EVENT_REPORT_RQ",
    "RESPONSE_BIT",
    "Command",
    "CommandSetError",
    "decode_command",
    "dispatch",
    "encode_response",
    "is_uid",
]
