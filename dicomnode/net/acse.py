"""Association control (PS3.8 section 7.1 and 9.3.2-9.3.4): A-ASSOCIATE-RQ in, A-ASSOCIATE-AC/RJ out.

pynetdicom decodes the request (every user-information sub-item), negotiates presentation contexts
and roles and encodes the answer: generality matters here and speed does not. Before pynetdicom sees
a request it is checked and tidied here, because pynetdicom is stricter than real devices need
(dcmtk's storescp and Orthanc accept all of these): unknown items and user-information sub-items
are dropped (PS3.8 9.3.1: ignore what is not understood), the AE title fields are read here (NUL or
space padded, any byte; shown escaped), and a presentation context item without its abstract-syntax
or transfer-syntax sub-item is an invalid PDU parameter (A-ABORT reason 6) rather than a traceback.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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

from dicomnode.net.association import (
    APPLICATION_CONTEXT_NAME,
    REJECT_APPLICATION_CONTEXT_NOT_SUPPORTED,
    REJECT_CALLED_AE_NOT_RECOGNIZED,
    REJECT_CALLING_AE_NOT_RECOGNIZED,
    REJECT_LOCAL_LIMIT_EXCEEDED,
    REJECT_PROTOCOL_VERSION_NOT_SUPPORTED,
    AbortAssociationError,
    AbortReason,
    AcceptorSettings,
    Association,
    Rejection,
    ServiceUser,
    TransferSyntaxPreference,
)
from dicomnode.net.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

logger = logging.getLogger(__name__)

_ITEM_HEADER = struct.Struct(">BxH")
_FIXED_FIELDS = 68  # protocol version, reserved, called AE, calling AE, 32 reserved bytes
_AE_FIELDS = slice(4, 36)  # called and calling AE title within the variable part
_PLACEHOLDER_AE = b"DICOMNODE-PEER  " * 2  # what pynetdicom is shown instead of the raw titles

APPLICATION_CONTEXT_ITEM = 0x10
PRESENTATION_CONTEXT_ITEM = 0x20
ABSTRACT_SYNTAX_SUB_ITEM = 0x30
TRANSFER_SYNTAX_SUB_ITEM = 0x40
USER_INFORMATION_ITEM = 0x50
# user-information sub-items an A-ASSOCIATE-RQ may carry that pynetdicom decodes (PS3.7 D.3.3)
KNOWN_USER_INFORMATION_SUB_ITEMS = frozenset(range(0x51, 0x59))


@dataclass(frozen=True)
class Outcome:
    """The answer to an A-ASSOCIATE-RQ: the PDU to send, and the association when it was accepted."""

    pdu: bytes
    association: Association | None
    why: str = ""  # for a rejection: the reason, for the log line
    rejected: Association | None = None  # for a rejection: who asked (for metrics and the audit trail)


def ae_title_text(raw: bytes) -> str:
    """An AE title field as printable text: padding (NUL, space) stripped, other bytes escaped."""
    stripped = raw.strip(b"\x00 ")
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in stripped)


def _items(data: bytes, offset: int, what: str) -> list[tuple[int, bytes]]:
    """(type, value) of the items from ``offset`` to the end; lengths checked against the data."""
    items = []
    end = len(data)
    while offset < end:
        if end - offset < 4:
            raise AbortAssociationError(f"truncated {what}", AbortReason.INVALID_PDU_PARAMETER)
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        if offset + 4 + length > end:
            raise AbortAssociationError(f"{what} runs past its PDU", AbortReason.INVALID_PDU_PARAMETER)
        items.append((item_type, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return items


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def tidy_request(body: bytes) -> bytes:
    """The A-ASSOCIATE-RQ variable part as pynetdicom may decode it (see the module docstring).

    Raises AbortAssociationError (invalid PDU parameter) for a request that is malformed.
    """
    if len(body) < _FIXED_FIELDS:
        raise AbortAssociationError(
            "A-ASSOCIATE-RQ shorter than its fixed fields", AbortReason.INVALID_PDU_PARAMETER
        )
    kept = []
    for item_type, value in _items(body, _FIXED_FIELDS, "A-ASSOCIATE-RQ item"):
        if item_type == PRESENTATION_CONTEXT_ITEM:
            sub_types = (
                [t for t, _ in _items(value, 4, "presentation context sub-item")] if len(value) >= 4 else []
            )
            if sub_types.count(ABSTRACT_SYNTAX_SUB_ITEM) != 1 or TRANSFER_SYNTAX_SUB_ITEM not in sub_types:
                raise AbortAssociationError(
                    "presentation context item without one abstract syntax and a transfer syntax",
                    AbortReason.INVALID_PDU_PARAMETER,
                )
            kept.append(_item(item_type, value))
        elif item_type == USER_INFORMATION_ITEM:
            sub_items = [
                _item(t, v)
                for t, v in _items(value, 0, "user information sub-item")
                if t in KNOWN_USER_INFORMATION_SUB_ITEMS
            ]
            kept.append(_item(item_type, b"".join(sub_items)))
        elif item_type == APPLICATION_CONTEXT_ITEM:
            kept.append(_item(item_type, value))
    return body[:4] + _PLACEHOLDER_AE + body[36:_FIXED_FIELDS] + b"".join(kept)


class Negotiator:
    """Decides on an A-ASSOCIATE-RQ with the node's settings; encodes the A-ASSOCIATE-AC or -RJ."""

    def __init__(self, settings: AcceptorSettings) -> None:
        self.settings = settings
        self._called = settings.ae_title.strip()
        # abstract syntax -> the transfer syntaxes we accept for it
        self._accepted: Mapping[str, frozenset[str]] = {
            str(cx.abstract_syntax): frozenset(str(ts) for ts in cx.transfer_syntax)
            for cx in settings.supported_contexts
        }

    def negotiate(
        self,
        body: bytes,
        peer: tuple[str, int],
        service_user: ServiceUser,
        admit: Callable[[], bool],
    ) -> Outcome:
        """Accept or reject a request (``body``: the PDU's variable part).

        ``admit`` reserves an association slot and is asked last, so a refused request holds none.
        """
        raw_titles = body[_AE_FIELDS]
        tidied = tidy_request(body)
        rq_pdu = A_ASSOCIATE_RQ()
        try:
            rq_pdu.decode(struct.pack(">BxL", 0x01, len(tidied)) + tidied)
            request = rq_pdu.to_primitive()
        except Exception as exc:
            raise AbortAssociationError(
                f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})", AbortReason.INVALID_PDU_PARAMETER
            ) from exc
        called = ae_title_text(raw_titles[:16])
        calling = ae_title_text(raw_titles[16:])
        association = Association(
            calling_ae_title=calling,
            called_ae_title=called,
            address=str(peer[0]),
            port=int(peer[1]),
            contexts={},
            peer_max_pdu=int(request.maximum_length_received or 0),
        )
        settings = self.settings
        rejection: tuple[int, int, int] | None = None
        why = ""
        if not (rq_pdu.protocol_version & 0x0001):
            rejection, why = REJECT_PROTOCOL_VERSION_NOT_SUPPORTED, "protocol version not supported"
        elif str(request.application_context_name) != APPLICATION_CONTEXT_NAME:
            rejection, why = REJECT_APPLICATION_CONTEXT_NOT_SUPPORTED, "unknown application context"
        elif called != self._called:
            rejection, why = REJECT_CALLED_AE_NOT_RECOGNIZED, f"called AE title '{called}' is not ours"
        elif settings.allowed_calling_ae_titles and calling not in settings.allowed_calling_ae_titles:
            rejection, why = REJECT_CALLING_AE_NOT_RECOGNIZED, f"calling AE title '{calling}' is not allowed"
        elif (rejection := service_user.check_association(association)) is not None:
            why = "refused by the node"
        elif not admit():
            rejection, why = REJECT_LOCAL_LIMIT_EXCEEDED, f"already {settings.max_associations} associations"
        if rejection is not None:
            return Outcome(_reject_pdu(Rejection(*rejection)), None, why, rejected=association)

        roles = {
            UID(str(item.sop_class_uid)): (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        requested = list(request.presentation_context_definition_list)
        results, role_items = negotiate_as_acceptor(
            requested, list(settings.supported_contexts), roles or None
        )
        if settings.transfer_syntax_preference is TransferSyntaxPreference.SENDER:
            self._prefer_senders_order(requested, results)
        association.contexts = {
            int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in results
            if cx.result == 0x00 and cx.context_id is not None
        }
        return Outcome(self._accept_pdu(results, role_items, raw_titles), association)

    def _prefer_senders_order(
        self, requested: list[PresentationContext], results: list[PresentationContext]
    ) -> None:
        """Give each accepted context the requestor's first proposed syntax that we accept."""
        proposed = {cx.context_id: cx.transfer_syntax for cx in requested}
        for cx in results:
            if cx.result != 0x00:
                continue
            accepted = self._accepted.get(str(cx.abstract_syntax), frozenset())
            for syntax in proposed.get(cx.context_id, ()):
                if str(syntax) in accepted:
                    cx.transfer_syntax = [syntax]
                    break

    def _accept_pdu(
        self,
        results: list[PresentationContext],
        role_items: list[SCP_SCU_RoleSelectionNegotiation],
        raw_titles: bytes,
    ) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT_NAME
        primitive.calling_ae_title = _PLACEHOLDER_AE[16:].decode()
        primitive.called_ae_title = _PLACEHOLDER_AE[:16].decode()
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        maximum_length = MaximumLengthNotification()
        maximum_length.maximum_length_received = self.settings.max_pdu_size
        implementation_uid = ImplementationClassUIDNotification()
        implementation_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        implementation_version = ImplementationVersionNameNotification()
        implementation_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive.user_information = [maximum_length, implementation_uid, implementation_version, *role_items]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        encoded = bytearray(pdu.encode())
        encoded[10:42] = raw_titles  # PS3.8 9.3.3: the RQ's values, returned as they came
        return bytes(encoded)


def _reject_pdu(rejection: Rejection) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = rejection
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


__all__ = ["Negotiator", "Outcome", "ae_title_text", "tidy_request"]
