"""The C-STORE SCU: associate, propose contexts, choose a transfer syntax, re-encode, send.

It returns :class:`~dicomnode.deliver.status.Outcome` values and never writes the database: the
sender records them. :func:`store_all` sends a batch of one destination's objects over one
association and yields each object's outcome as soon as it is known, so the sender records every
object before the next is sent. The AE announces dicomnode's own Implementation Class UID and
Version Name (``dicomnode.net.identity``), the same as the acceptor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventType
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context

from dicomnode.config import DestinationConfig
from dicomnode.deliver.status import Outcome, Verdict, classify_rejection, classify_status
from dicomnode.net.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.net.tls import client_ssl_context
from dicomnode.queue.outbox import OutboxRow

# A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2).
_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason given",
    0x03: "abstract syntax (SOP class) not supported",
    0x04: "transfer syntaxes not supported",
}
_ACCEPTED = 0x00  # A-ASSOCIATE-AC result: acceptance

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


class UnsendableError(Exception):
    """The row's file cannot be sent as it is (missing, unreadable, wrong UID)."""


@dataclass(frozen=True)
class Prepared:
    """A row whose file has been checked: where it is and the transfer syntax it is stored in."""

    row: OutboxRow
    file_path: Path
    sop_class_uid: UID
    transfer_syntax_uid: UID


def prepare(row: OutboxRow, storage_root: Path) -> Prepared:
    """Check the row's file is there and readable and holds the row's object; learn its syntax."""
    file_path = storage_root / row.path
    if not file_path.is_file():
        raise UnsendableError(f"result file {row.path} is missing from the storage folder")
    try:
        meta = read_file_meta_info(file_path)
        transfer_syntax = UID(meta.TransferSyntaxUID)
        sop_class = UID(meta.get("MediaStorageSOPClassUID", row.sop_class_uid))
        sop_instance = meta.get("MediaStorageSOPInstanceUID", row.sop_instance_uid)
    except Exception as exc:
        raise UnsendableError(
            f"result file {row.path} is not a readable DICOM file ({type(exc).__name__})"
        ) from exc
    if sop_instance != row.sop_instance_uid:
        raise UnsendableError(
            f"result file {row.path} holds SOP Instance UID {sop_instance}, not {row.sop_instance_uid}"
        )
    return Prepared(row, file_path, sop_class, transfer_syntax)


def make_ae(ae_title: str, timeout: float) -> AE:
    """A requestor AE with dicomnode's identity and every timeout set to ``timeout`` seconds."""
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


class RejectionWitness:
    """Keeps the A-ASSOCIATE-RJ a peer sent, for when pynetdicom reports an abort instead.

    pynetdicom 3.0.4's requestor looks at the socket once its request is sent; a peer that answers
    A-ASSOCIATE-RJ and closes at once (dcmtk ``storescp --refuse``) has often closed it by then,
    and the association is reported aborted, with no primitive: 57 of 400 associations here. The
    PDU was received and decoded all the same (``EVT_PDU_RECV``): without this a permanent rejection
    was retried for ``give_up_after_hours`` one time in seven.
    """

    def __init__(self) -> None:
        self.rejection: A_ASSOCIATE | None = None

    def _on_pdu(self, event: Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            self.rejection = event.pdu.to_primitive()

    @property
    def evt_handlers(self) -> list[tuple[EventType, Callable[..., Any]]]:
        """The handler to bind when requesting the association."""
        return [(evt.EVT_PDU_RECV, self._on_pdu)]

    def rejection_of(self, assoc: Association) -> A_ASSOCIATE | None:
        """The peer's A-ASSOCIATE-RJ, however pynetdicom reported the association; None if none came."""
        primitive = assoc.acceptor.primitive
        if assoc.is_rejected and primitive is not None:
            return primitive
        return self.rejection if primitive is None else None


def store_all(
    ae_title: str, destination: DestinationConfig, prepared: Sequence[Prepared], timeout: float
) -> Iterator[tuple[Prepared, Outcome]]:
    """Associate, C-STORE each object, release; yield every object's outcome exactly once.

    Objects the association could not carry (it never came up, or ended early) get the reason as
    their outcome. Closing the iterator early releases (or aborts) the association.
    """
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    tls = destination.tls
    tls_args = (
        (client_ssl_context(tls.ca_certificates, tls.certificate, tls.private_key), destination.host)
        if tls
        else None
    )
    witness = RejectionWitness()
    assoc = make_ae(ae_title, timeout).associate(
        destination.host,
        destination.port,
        contexts=requested_contexts(prepared),
        ae_title=destination.ae_title,
        tls_args=tls_args,
        evt_handlers=[*witness.evt_handlers],
    )
    try:
        if not assoc.is_established:
            for item in prepared:
                yield item, _no_association(assoc, witness, item, where, timeout)
            return
        sent = 0
        for item in prepared:
            if not assoc.is_established:
                break
            outcome = _store_one(assoc, item, where, timeout)
            sent += 1
            yield item, outcome
        lost = _association_lost_reason(assoc, where)
        for item in prepared[sent:]:
            yield item, Outcome(Verdict.RETRY, lost)
    finally:
        if assoc.is_established:
            assoc.release()
        if assoc.is_alive():
            assoc.abort()


def _no_association(
    assoc: Association, witness: RejectionWitness, item: Prepared, where: str, timeout: float
) -> Outcome:
    """Why no association came up: a permanent rejection or refused contexts are dead, the rest retried."""
    rejection = witness.rejection_of(assoc)
    if rejection is not None:
        return classify_rejection(
            where, int(rejection.result or 0), rejection.source_str, rejection.reason_str
        )
    primitive = assoc.acceptor.primitive
    if primitive is not None and primitive.result == _ACCEPTED and not assoc.accepted_contexts:
        # Accepted, but with no presentation context at all: every SOP class was refused.
        return Outcome(Verdict.DEAD, _context_refusal(assoc, item, where))
    if primitive is None:
        return Outcome(
            Verdict.RETRY,
            f"no association with {where}: connection refused, unreachable or no answer within {timeout:g} s",
        )
    return Outcome(Verdict.RETRY, f"association with {where} aborted during negotiation")


def _store_one(assoc: Association, item: Prepared, where: str, timeout: float) -> Outcome:
    """C-STORE one object in a syntax an accepted context has; classify the answer."""
    accepted = [
        cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class_uid and cx.as_scu
    ]
    if not accepted:
        return Outcome(Verdict.DEAD, _context_refusal(assoc, item, where))
    context = choose_context(accepted, item.transfer_syntax_uid)
    if context is None:
        offered = ", ".join(sorted({UID(cx.transfer_syntax[0]).name for cx in accepted}))
        return Outcome(
            Verdict.DEAD,
            (
                f"{where} accepts {item.sop_class_uid.name} only as {offered}; the object is stored as "
                f"{item.transfer_syntax_uid.name}, which is not converted"
            ),
        )
    try:
        dataset = dataset_in(item.file_path, UID(context.transfer_syntax[0]))
    except Exception as exc:
        return Outcome(
            Verdict.DEAD, f"result file {item.row.path} could not be read or converted ({type(exc).__name__})"
        )
    if dataset.get("SOPInstanceUID") != item.row.sop_instance_uid:
        return Outcome(Verdict.DEAD, f"result file {item.row.path} holds another SOP Instance UID")
    started = time.monotonic()
    response = assoc.send_c_store(dataset)
    status = response.get("Status") if response is not None else None
    if status is None:
        if time.monotonic() - started >= 0.9 * timeout:
            return Outcome(Verdict.RETRY, f"no C-STORE response from {where} within {timeout:g} s")
        return Outcome(
            Verdict.RETRY,
            f"association with {where} aborted or closed during the C-STORE (or an invalid response)",
        )
    outcome = classify_status(int(status))
    comment = response.get("ErrorComment")
    if comment:
        outcome = Outcome(outcome.verdict, outcome.reason, outcome.status, str(comment)[:512])
    return outcome


def requested_contexts(prepared: Sequence[Prepared]) -> list[PresentationContext]:
    """Per SOP class: one context per compressed syntax in use, one with the uncompressed syntaxes.

    Separate contexts let the peer accept a compressed syntax for the objects that need it while
    still taking the rest uncompressed; at most 128 contexts (extra SOP classes are left out and
    their objects fail with a context refusal).
    """
    by_class: dict[str, list[str | UID]] = {}
    for item in prepared:
        syntaxes = by_class.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in syntaxes:
            syntaxes.append(item.transfer_syntax_uid)
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in by_class.items():
        compressed: list[str | UID] = [ts for ts in syntaxes if UID(ts).is_compressed]
        uncompressed: list[str | UID] = [ts for ts in syntaxes if not UID(ts).is_compressed]
        for ts in (*uncompressed, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in uncompressed:
                uncompressed.append(ts)
        wanted = [build_context(sop_class, [ts]) for ts in compressed]
        wanted.append(build_context(sop_class, uncompressed))
        if len(contexts) + len(wanted) > MAX_CONTEXTS:
            break
        contexts.extend(wanted)
    return contexts


def choose_context(
    accepted: Sequence[PresentationContext], transfer_syntax: UID
) -> PresentationContext | None:
    """The accepted context for the object: its own syntax, else an uncompressed one it converts to."""
    for cx in accepted:
        if cx.transfer_syntax[0] == transfer_syntax:
            return cx
    if transfer_syntax.is_compressed or not transfer_syntax.is_little_endian:
        return None  # compressed data needs its own syntax; big endian is not converted
    for preferred in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        for cx in accepted:
            if cx.transfer_syntax[0] == preferred:
                return cx
    for cx in accepted:
        ts = UID(cx.transfer_syntax[0])
        if not ts.is_compressed and ts.is_little_endian:
            return cx
    return None


def dataset_in(path: Path, transfer_syntax: UID) -> Dataset:
    """Read the file; re-encode it in ``transfer_syntax`` when it is stored in another (uncompressed) one."""
    dataset = dcmread(path)
    if dataset.file_meta.TransferSyntaxUID == transfer_syntax:
        return dataset
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    dataset.save_as(buffer, implicit_vr=transfer_syntax.is_implicit_VR, little_endian=True)
    buffer.seek(0)
    return dcmread(buffer)


def _context_refusal(assoc: Association, item: Prepared, where: str) -> str:
    """Why the peer has no context for the object's SOP class, from the negotiation results."""
    results = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == item.sop_class_uid]
    why = "; ".join(sorted({_CONTEXT_RESULTS.get(cx.result or 0, f"result {cx.result}") for cx in results}))
    return f"{where} refused the presentation context for {item.sop_class_uid.name} ({why or 'not proposed'})"


def _association_lost_reason(assoc: Association, where: str) -> str:
    if assoc.is_aborted:
        return f"association with {where} aborted before the object was sent"
    return f"association with {where} ended before the object was sent"
