"""Storage Commitment Push Model SCU (PS3.4 Annex J): ask a destination whether it keeps what we sent.

For each destination with ``storage_commitment = true`` the sender's pass (:meth:`Committer.run_once`)

1. closes transactions whose ``delivery.commitment_timeout_seconds`` ran out (their objects fail);
2. *settles* objects a commitment failed for: with the delivery retry policy
   (``dicomnode.deliver.status.decide``) each becomes ``commit-failed`` due for a resend after the
   back-off, or ``dead`` past ``give_up_after_hours``;
3. sends one N-ACTION (Action Type ID 1, a fresh Transaction UID, Referenced SOP Sequence) per
   chunk of delivered objects nobody has asked about. The transaction is recorded before the
   N-ACTION leaves, so a report arriving at once on a new association (the listener,
   ``dicomnode.receive.commitment``) finds it. A report on the N-ACTION's own association is taken
   here (``EVT_N_EVENT_REPORT``) for up to ``delivery.commitment_wait_seconds``, then the
   association is released.

An N-ACTION the peer refuses for good (association rejected permanently, no presentation context
for the SOP class, a failure status such as 0x0112 or 0x0122: dcmtk's storescp has no Storage
Commitment) closes the transaction as ``refused``: the objects stay ``delivered``, the reason is in
their ``last_error`` and a warning says so; commitment is not asked again for them. An N-ACTION that
does not get through for a transient reason (no connection, no answer, aborted, 0x0110, 0x0213) is
``request-failed``: its objects are resent and asked about again, like a failed commitment.
The AE is :func:`dicomnode.deliver.scu.make_ae` (same identity, timeouts and TLS). Logs carry UIDs only.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.config import DeliveryConfig, DestinationConfig
from dicomnode.db import DeliveryState
from dicomnode.deliver.scu import RejectionWitness, make_ae
from dicomnode.deliver.status import Outcome, Verdict, classify_rejection, decide
from dicomnode.fsio import sync_filesystem
from dicomnode.net.association import (
    STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS,
    STORAGE_COMMITMENT_PUSH_MODEL_SOP_INSTANCE,
)
from dicomnode.net.tls import client_ssl_context
from dicomnode.queue.commitments import CommitmentStore, apply_report
from dicomnode.queue.outbox import OutboxRow
from dicomnode.status import Status, status_label

logger = logging.getLogger(__name__)

REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID of the Push Model (PS3.4 J.3.2)
# N-ACTION failures worth asking again later; any other failure status is a refusal
TRANSIENT_ACTION_STATUSES = frozenset((Status.PROCESSING_FAILURE, Status.RESOURCE_LIMITATION))


# A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2)
_CONTEXT_RESULTS = {
    1: "user rejection",
    2: "no reason given",
    3: "abstract syntax not supported",
    4: "transfer syntaxes not supported",
}


class RequestResult(enum.StrEnum):
    """How one N-ACTION went (the metric's ``result`` label for the two failures)."""

    ACCEPTED = "accepted"  # N-ACTION success: the report comes (or came) by N-EVENT-REPORT
    REFUSED = "refused"
    REQUEST_FAILED = "request-failed"


@dataclass(frozen=True)
class RequestOutcome:
    result: RequestResult
    reason: str = ""


def action_information(transaction_uid: str, rows: Sequence[OutboxRow]) -> Dataset:
    """The N-ACTION's Action Information: Transaction UID and one Referenced SOP item per object."""
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    items = []
    for row in rows:
        item = Dataset()
        item.ReferencedSOPClassUID = row.sop_class_uid
        item.ReferencedSOPInstanceUID = row.sop_instance_uid
        items.append(item)
    dataset.ReferencedSOPSequence = items
    return dataset


def request_commitment(
    ae_title: str,
    destination: DestinationConfig,
    transaction_uid: str,
    rows: Sequence[OutboxRow],
    store: CommitmentStore,
    *,
    timeout: float,
    wait: float,
    durable: Path | None = None,
) -> RequestOutcome:
    """Associate, send the N-ACTION, take an N-EVENT-REPORT on this association for ``wait`` s.

    With ``durable`` (a folder on the database's filesystem) the report is flushed there before
    it is answered with success.
    """
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    answered = threading.Event()

    def on_report(event: Any) -> tuple[int, None]:
        status, _comment = apply_report(store, event.event_information, where)
        if status == Status.SUCCESS and durable is not None:
            try:
                sync_filesystem(durable)
            except OSError as exc:
                logger.error("Storage Commitment report from %s not flushed (errno %s)", where, exc.errno)
                return int(Status.PROCESSING_FAILURE), None
        if status == Status.SUCCESS:
            answered.set()
        return int(status), None

    tls = destination.tls
    tls_args = (
        (client_ssl_context(tls.ca_certificates, tls.certificate, tls.private_key), destination.host)
        if tls
        else None
    )
    context = build_context(
        STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    witness = RejectionWitness()
    assoc = make_ae(ae_title, timeout).associate(
        destination.host,
        destination.port,
        contexts=[context],
        ae_title=destination.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report), *witness.evt_handlers],
    )
    try:
        if not assoc.is_established:
            return _no_association(assoc, witness, where, timeout)
        if not any(
            cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS for cx in assoc.accepted_contexts
        ):
            return RequestOutcome(RequestResult.REFUSED, _context_refused(assoc, where))
        status_set, _reply = assoc.send_n_action(
            action_information(transaction_uid, rows),
            REQUEST_COMMITMENT,
            STORAGE_COMMITMENT_PUSH_MODEL_SOP_CLASS,
            STORAGE_COMMITMENT_PUSH_MODEL_SOP_INSTANCE,
        )
        status = status_set.get("Status") if status_set is not None else None
        if status is None:
            return RequestOutcome(
                RequestResult.REQUEST_FAILED, f"no N-ACTION response from {where} within {timeout:g} s"
            )
        if int(status) != Status.SUCCESS:
            result = (
                RequestResult.REQUEST_FAILED
                if int(status) in TRANSIENT_ACTION_STATUSES
                else RequestResult.REFUSED
            )
            return RequestOutcome(result, f"{where} answered the N-ACTION with {status_label(int(status))}")
        _await_report(assoc, answered, store, transaction_uid, wait)
        return RequestOutcome(RequestResult.ACCEPTED)
    finally:
        if assoc.is_established:
            assoc.release()
        if assoc.is_alive():
            assoc.abort()


def _await_report(
    assoc: Association, answered: threading.Event, store: CommitmentStore, transaction_uid: str, wait: float
) -> None:
    """Keep the association for a report on it, until one came (here or at the listener) or ``wait`` s."""
    deadline = time.monotonic() + wait
    while assoc.is_established and time.monotonic() < deadline:
        if answered.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            return
        if not store.is_open(transaction_uid):
            return  # answered on another association


def _no_association(
    assoc: Association, witness: RejectionWitness, where: str, timeout: float
) -> RequestOutcome:
    rejection = witness.rejection_of(assoc)
    if rejection is not None:
        outcome = classify_rejection(
            where, int(rejection.result or 0), rejection.source_str, rejection.reason_str
        )
        result = RequestResult.REFUSED if outcome.verdict is Verdict.DEAD else RequestResult.REQUEST_FAILED
        return RequestOutcome(result, outcome.reason)
    primitive = assoc.acceptor.primitive
    if primitive is not None and primitive.result == 0x00 and not assoc.accepted_contexts:
        return RequestOutcome(RequestResult.REFUSED, _context_refused(assoc, where))
    if primitive is None:
        return RequestOutcome(
            RequestResult.REQUEST_FAILED,
            f"no association with {where}: connection refused, unreachable or no answer within {timeout:g} s",
        )
    return RequestOutcome(
        RequestResult.REQUEST_FAILED, f"association with {where} aborted during negotiation"
    )


def _context_refused(assoc: Association, where: str) -> str:
    results = sorted({int(cx.result or 0) for cx in assoc.rejected_contexts})
    why = ", ".join(_CONTEXT_RESULTS.get(r, f"result {r}") for r in results) or "not accepted"
    return f"{where} refused the Storage Commitment Push Model presentation context ({why})"


class Committer:
    """The sender's Storage Commitment steps: expire, settle, request (see the module docstring)."""

    def __init__(
        self,
        delivery: DeliveryConfig,
        destinations: Sequence[DestinationConfig],
        sessions: sessionmaker[Session],
        *,
        ae_title: str,
        max_objects_per_transaction: int = 64,
        rng: random.Random | None = None,
        durable: Path | None = None,
    ) -> None:
        self.delivery = delivery
        self.destinations = [d for d in destinations if d.storage_commitment]
        self.store = CommitmentStore(sessions)
        # A report taken on the N-ACTION's association is answered only once durable: SQLite at
        # synchronous NORMAL (the default beside the spool) leaves that to a syncfs of its filesystem.
        self.durable = durable
        self.ae_title = ae_title
        self.max_objects = max(1, max_objects_per_transaction)
        self.rng = rng or random.Random()

    def run_once(self, now: datetime | Callable[[], datetime]) -> int:
        """One pass of the three steps; how many rows or transactions changed (errors are logged)."""
        clock: Callable[[], datetime] = now if callable(now) else (lambda: now)
        handled = 0
        for step in (self._expire, self._settle, self._request):
            try:
                handled += step(clock)
            except Exception:  # never stops deliveries; the next pass tries again
                logger.exception("storage commitment step %s failed", step.__name__.lstrip("_"))
        return handled

    def _expire(self, clock: Callable[[], datetime]) -> int:
        expired = self.store.expire(clock())
        for destination, transaction_uid, count in expired:
            logger.warning(
                "storage commitment %s for %s timed out after %g s: %d objects will be resent",
                transaction_uid,
                destination,
                self.delivery.commitment_timeout_seconds,
                count,
            )
            metrics.commitment_result(destination, "timed-out")
        return len(expired)

    def _settle(self, clock: Callable[[], datetime]) -> int:
        rows = self.store.unsettled(512)
        for row, error in rows:
            now = clock()
            decision = decide(
                Outcome(Verdict.RETRY, error),
                attempts=row.attempts + 1,
                created_at=row.created_at,
                now=now,
                policy=self.delivery,
                rng=self.rng,
            )
            state = DeliveryState.DEAD if decision.verdict is Verdict.DEAD else DeliveryState.COMMIT_FAILED
            self.store.settle(row, state, decision.next_attempt_at, decision.reason)
            if state is DeliveryState.DEAD:
                logger.error(
                    "dead letter %s (study %s, job %d) for %s: %s",
                    row.sop_instance_uid,
                    row.study_instance_uid,
                    row.job_id,
                    row.destination,
                    decision.reason,
                )
            else:
                logger.warning(
                    "will resend %s (study %s, job %d) to %s at %s: %s",
                    row.sop_instance_uid,
                    row.study_instance_uid,
                    row.job_id,
                    row.destination,
                    decision.next_attempt_at.isoformat(timespec="seconds"),
                    decision.reason,
                )
        return len(rows)

    def _request(self, clock: Callable[[], datetime]) -> int:
        handled = 0
        for destination in self.destinations:
            rows = self.store.uncommitted(destination.name, self.max_objects)
            if not rows:
                continue
            transaction_uid = str(generate_uid())
            now = clock()
            deadline = now + timedelta(seconds=self.delivery.commitment_timeout_seconds)
            linked = set(
                self.store.begin(transaction_uid, destination.name, [r.id for r in rows], now, deadline)
            )
            asked = [row for row in rows if row.id in linked]
            if not asked:
                continue
            handled += len(asked)
            try:
                outcome = request_commitment(
                    self.ae_title,
                    destination,
                    transaction_uid,
                    asked,
                    self.store,
                    timeout=self.delivery.timeout_seconds,
                    wait=self.delivery.commitment_wait_seconds,
                    durable=self.durable,
                )
            except Exception as exc:  # a bug or a library error: the objects are resent, bounded by give-up
                logger.exception(
                    "storage commitment %s to %s failed unexpectedly", transaction_uid, destination.name
                )
                outcome = RequestOutcome(
                    RequestResult.REQUEST_FAILED, f"unexpected error: {type(exc).__name__}"
                )
            self._record(destination, transaction_uid, len(asked), outcome, clock())
        return handled

    def _record(
        self,
        destination: DestinationConfig,
        transaction_uid: str,
        count: int,
        outcome: RequestOutcome,
        now: datetime,
    ) -> None:
        if outcome.result is RequestResult.ACCEPTED:
            logger.info(
                "storage commitment %s requested from %s for %d objects",
                transaction_uid,
                destination.name,
                count,
            )
            return
        if outcome.result is RequestResult.REFUSED:
            self.store.refused(transaction_uid, outcome.reason, now)
            logger.warning(
                "storage commitment %s refused by %s (%d objects stay delivered, uncommitted): %s",
                transaction_uid,
                destination.name,
                count,
                outcome.reason,
            )
        else:
            self.store.request_failed(transaction_uid, outcome.reason, now)
            logger.warning(
                "storage commitment %s not requested from %s (%d objects will be resent): %s",
                transaction_uid,
                destination.name,
                count,
                outcome.reason,
            )
        metrics.commitment_result(destination.name, outcome.result.value)


__all__ = ["Committer", "RequestOutcome", "RequestResult", "action_information", "request_commitment"]
