"""Storage Commitment transactions in the database: the only code that writes ``commitments``.

One :class:`~dicomnode.db.Commitment` row per N-ACTION (PS3.4 Annex J) and, on each outbox row it
asks about, ``commitment_id``. Two users:

* the **sender** (``dicomnode.deliver.commitment``) picks delivered rows nobody has asked about
  (:meth:`CommitmentStore.uncommitted`), records the transaction *before* sending the N-ACTION
  (:meth:`~CommitmentStore.begin`, so a report arriving at once on another association finds it),
  then marks it refused or failed if the N-ACTION does not get through; it also expires unanswered
  transactions (:meth:`~CommitmentStore.expire`) and reschedules the rows a failure left
  (:meth:`~CommitmentStore.unsettled`, :meth:`~CommitmentStore.settle`) with its retry policy;
* the **N-EVENT-REPORT handlers** (the listener's, and the sender's on the N-ACTION's own
  association) store the peer's answer with :meth:`~CommitmentStore.answer`.

Rows the peer reports as committed become ``committed``; failed ones (and ones the report leaves
out) ``commit-failed`` with the Failure Reason, still linked to the transaction until the sender
settles them: then their next attempt time is set and the link cleared, which makes them due for a
resend (``OutboxQueue.due``). A resend that is delivered clears the link again, so it gets a fresh
transaction.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import metrics
from dicomnode.db import Commitment, CommitmentState, DeliveryState, Outbox, utcnow
from dicomnode.queue.outbox import ERROR_LENGTH, OutboxRow
from dicomnode.status import Status, status_label

logger = logging.getLogger(__name__)


class AnswerResult(enum.StrEnum):
    """What :meth:`CommitmentStore.answer` made of an N-EVENT-REPORT."""

    RECORDED = "recorded"
    UNKNOWN_TRANSACTION = "unknown-transaction"  # no N-ACTION of ours had this Transaction UID
    ALREADY_CLOSED = "already-closed"  # answered before, refused, or timed out: nothing changed


@dataclass(frozen=True)
class FailedObject:
    """One Failed SOP Sequence item: the instance and its Failure Reason (0008,1197)."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None


@dataclass(frozen=True)
class Answer:
    """The outcome of storing one N-EVENT-REPORT."""

    result: AnswerResult
    destination: str = ""
    committed: int = 0
    failed: int = 0
    unknown: list[str] = field(default_factory=list)  # listed SOP Instance UIDs not in the transaction


class CommitmentStore:
    """Database side of Storage Commitment: transactions, answers, expiry and settling."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._write_lock = threading.Lock()

    # --- the sender --------------------------------------------------------------------------------

    def uncommitted(self, destination: str, limit: int) -> list[OutboxRow]:
        """Delivered rows of ``destination`` that no transaction has asked about yet, oldest first."""
        with self.sessions() as session:
            rows = session.scalars(
                select(Outbox)
                .where(
                    Outbox.destination == destination,
                    Outbox.state == DeliveryState.DELIVERED,
                    Outbox.commitment_id.is_(None),
                )
                .order_by(Outbox.id)
                .limit(limit)
            ).all()
            return [OutboxRow.of(row) for row in rows]

    def begin(
        self,
        transaction_uid: str,
        destination: str,
        row_ids: Sequence[int],
        now: datetime,
        deadline: datetime,
    ) -> list[int]:
        """Record a transaction over the rows still delivered and unasked; return their ids.

        When none is left (another sender asked first) nothing is recorded.
        """
        with self._write_lock, self.sessions.begin() as session:
            commitment = Commitment(
                transaction_uid=transaction_uid,
                destination=destination,
                state=CommitmentState.REQUESTED,
                requested_at=now,
                deadline_at=deadline,
                objects=0,
                failed=0,
            )
            session.add(commitment)
            session.flush()
            linked: list[int] = []
            for row_id in row_ids:
                result: Any = session.execute(
                    update(Outbox)
                    .where(
                        Outbox.id == row_id,
                        Outbox.state == DeliveryState.DELIVERED,
                        Outbox.commitment_id.is_(None),
                    )
                    .values(commitment_id=commitment.id)
                )
                if result.rowcount == 1:
                    linked.append(row_id)
            if not linked:
                session.delete(commitment)
                return []
            commitment.objects = len(linked)
            return linked

    def is_open(self, transaction_uid: str) -> bool:
        """Whether the transaction still waits for its N-EVENT-REPORT."""
        with self.sessions() as session:
            state = session.scalar(
                select(Commitment.state).where(Commitment.transaction_uid == transaction_uid)
            )
        return state is CommitmentState.REQUESTED

    def refused(self, transaction_uid: str, reason: str, now: datetime) -> None:
        """The peer refused the N-ACTION: the rows stay delivered (and linked), the reason kept."""
        with self._write_lock, self.sessions.begin() as session:
            commitment = self._get(session, transaction_uid)
            if commitment is None:
                return
            commitment.state = CommitmentState.REFUSED
            commitment.answered_at = now
            commitment.error = reason[:ERROR_LENGTH]
            session.execute(
                update(Outbox)
                .where(Outbox.commitment_id == commitment.id, Outbox.state == DeliveryState.DELIVERED)
                .values(last_error=f"storage commitment refused: {reason}"[:ERROR_LENGTH])
            )

    def request_failed(self, transaction_uid: str, reason: str, now: datetime) -> int:
        """The N-ACTION did not get through (network, timeout): its rows fail, to be resent."""
        return self._close(transaction_uid, CommitmentState.REQUEST_FAILED, reason, now)

    def expire(self, now: datetime) -> list[tuple[str, str, int]]:
        """Close transactions unanswered at their deadline; (destination, transaction, rows) each."""
        with self.sessions() as session:
            overdue = session.execute(
                select(Commitment.transaction_uid, Commitment.destination, Commitment.requested_at).where(
                    Commitment.state == CommitmentState.REQUESTED, Commitment.deadline_at <= now
                )
            ).all()
        expired = []
        for transaction_uid, destination, requested_at in overdue:
            waited = (now - requested_at).total_seconds()
            reason = f"no N-EVENT-REPORT within {waited:.0f} s of the N-ACTION (timed out)"
            count = self._close(transaction_uid, CommitmentState.TIMED_OUT, reason, now)
            expired.append((destination, transaction_uid, count))
        return expired

    def unsettled(self, limit: int) -> list[tuple[OutboxRow, str]]:
        """Failed rows still linked to their transaction (not yet rescheduled), with their error."""
        with self.sessions() as session:
            rows = session.scalars(
                select(Outbox)
                .where(Outbox.state == DeliveryState.COMMIT_FAILED, Outbox.commitment_id.is_not(None))
                .order_by(Outbox.id)
                .limit(limit)
            ).all()
            return [(OutboxRow.of(row), row.last_error or "storage commitment failed") for row in rows]

    def settle(self, row: OutboxRow, state: DeliveryState, next_attempt_at: datetime, error: str) -> None:
        """Reschedule a failed row (``commit-failed`` due at ``next_attempt_at``, or ``dead``)."""
        with self._write_lock, self.sessions.begin() as session:
            session.execute(
                update(Outbox)
                .where(Outbox.id == row.id, Outbox.state == DeliveryState.COMMIT_FAILED)
                .values(
                    state=state,
                    attempts=row.attempts + 1,
                    next_attempt_at=next_attempt_at,
                    last_error=error[:ERROR_LENGTH],
                    commitment_id=None,
                )
            )

    # --- the N-EVENT-REPORT handlers ---------------------------------------------------------------

    def answer(
        self,
        transaction_uid: str,
        committed: Sequence[str],
        failed: Sequence[FailedObject],
        now: datetime,
    ) -> Answer:
        """Store a report: listed-committed rows ``committed``, the rest of the transaction failed."""
        with self._write_lock, self.sessions.begin() as session:
            commitment = self._get(session, transaction_uid)
            if commitment is None:
                return Answer(AnswerResult.UNKNOWN_TRANSACTION)
            if commitment.state is not CommitmentState.REQUESTED:
                return Answer(AnswerResult.ALREADY_CLOSED, commitment.destination)
            rows = session.scalars(
                select(Outbox).where(
                    Outbox.commitment_id == commitment.id, Outbox.state == DeliveryState.DELIVERED
                )
            ).all()
            by_uid = {row.sop_instance_uid: row for row in rows}
            reasons = {item.sop_instance_uid: item.failure_reason for item in failed}
            listed = set(committed) | set(reasons)
            unknown = sorted(uid for uid in listed if uid not in by_uid)
            committed_count = 0
            failed_count = 0
            for uid, row in by_uid.items():
                if uid in reasons:
                    reason = reasons[uid]
                    why = (
                        "no Failure Reason given"
                        if reason is None
                        else f"Failure Reason {status_label(reason)}"
                    )
                    row.state = DeliveryState.COMMIT_FAILED
                    row.last_error = f"storage commitment failed: {why}"
                    row.last_status = reason
                    failed_count += 1
                elif uid in committed:
                    row.state = DeliveryState.COMMITTED
                    row.last_error = None
                    committed_count += 1
                else:
                    row.state = DeliveryState.COMMIT_FAILED
                    row.last_error = "storage commitment failed: the N-EVENT-REPORT does not list the object"
                    failed_count += 1
            commitment.state = CommitmentState.FAILED if failed_count else CommitmentState.COMMITTED
            commitment.failed = failed_count
            commitment.answered_at = now
            return Answer(
                AnswerResult.RECORDED, commitment.destination, committed_count, failed_count, unknown
            )

    # --- helpers -----------------------------------------------------------------------------------

    def _get(self, session: Session, transaction_uid: str) -> Commitment | None:
        """The transaction, row-locked until the caller's transaction ends (PostgreSQL; SQLite's
        BEGIN IMMEDIATE already serialises writers), so a report and a time-out never interleave."""
        return session.scalars(
            select(Commitment).where(Commitment.transaction_uid == transaction_uid).with_for_update()
        ).first()

    def _close(self, transaction_uid: str, state: CommitmentState, reason: str, now: datetime) -> int:
        """End a requested transaction with ``state``; its delivered rows fail with ``reason``."""
        with self._write_lock, self.sessions.begin() as session:
            commitment = self._get(session, transaction_uid)
            if commitment is None or commitment.state is not CommitmentState.REQUESTED:
                return 0
            commitment.state = state
            commitment.answered_at = now
            commitment.error = reason[:ERROR_LENGTH]
            result: Any = session.execute(
                update(Outbox)
                .where(Outbox.commitment_id == commitment.id, Outbox.state == DeliveryState.DELIVERED)
                .values(
                    state=DeliveryState.COMMIT_FAILED,
                    last_error=f"storage commitment failed: {reason}"[:ERROR_LENGTH],
                )
            )
            commitment.failed = int(result.rowcount)
            return int(result.rowcount)


class ReportError(ValueError):
    """Event Information that cannot be a Storage Commitment result; ``status`` is the answer."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Report:
    """The Event Information of a Storage Commitment N-EVENT-REPORT (PS3.4 J.3.3.1)."""

    transaction_uid: str
    committed: tuple[str, ...]  # Referenced SOP Sequence (0008,1199): SOP Instance UIDs
    failed: tuple[FailedObject, ...]  # Failed SOP Sequence (0008,1198)


def report_from_dataset(dataset: Dataset) -> Report:
    """Read Transaction UID (0008,1195) and the two sequences; ReportError when they are unusable."""
    transaction_uid = str(dataset.get("TransactionUID", "") or "").strip()
    if not transaction_uid:
        raise ReportError(Status.INVALID_ARGUMENT_VALUE, "no Transaction UID")
    if len(transaction_uid) > 64 or not all(c.isdigit() or c == "." for c in transaction_uid):
        raise ReportError(Status.INVALID_ARGUMENT_VALUE, "the Transaction UID is not a UID")  # never logged
    committed = tuple(
        str(item.get("ReferencedSOPInstanceUID", "")) for item in dataset.get("ReferencedSOPSequence", [])
    )
    failed = tuple(
        FailedObject(
            str(item.get("ReferencedSOPClassUID", "")),
            str(item.get("ReferencedSOPInstanceUID", "")),
            None if item.get("FailureReason") is None else int(item.FailureReason),
        )
        for item in dataset.get("FailedSOPSequence", [])
    )
    return Report(transaction_uid, committed, failed)


def apply_report(
    store: CommitmentStore, dataset: Dataset, peer: str, now: datetime | None = None
) -> tuple[Status, str | None]:
    """Store one report from ``peer`` (for the log); the N-EVENT-REPORT-RSP status and comment.

    Shared by the listener (a new association) and the sender (the N-ACTION's own association).
    An unknown Transaction UID is 0x0115 Invalid Argument Value; a report for a transaction already
    closed (answered twice, or after it timed out) is acknowledged and changes nothing.
    """
    try:
        report = report_from_dataset(dataset)
    except ReportError as exc:
        logger.warning("N-EVENT-REPORT from %s refused, %s: %s", peer, status_label(exc.status), exc)
        return exc.status, str(exc)
    except Exception as exc:  # a sequence item that is not one, a Failure Reason that is no number
        logger.warning(
            "N-EVENT-REPORT from %s refused: unreadable Event Information (%s)", peer, type(exc).__name__
        )
        return Status.PROCESSING_FAILURE, "unreadable Event Information"
    answer = store.answer(report.transaction_uid, report.committed, report.failed, now or utcnow())
    if answer.result is AnswerResult.UNKNOWN_TRANSACTION:
        logger.warning(
            "N-EVENT-REPORT from %s refused: transaction %s is not one of ours", peer, report.transaction_uid
        )
        return Status.INVALID_ARGUMENT_VALUE, "unknown Transaction UID"
    if answer.result is AnswerResult.ALREADY_CLOSED:
        logger.info(
            "N-EVENT-REPORT from %s for transaction %s, which is already closed: ignored",
            peer,
            report.transaction_uid,
        )
        return Status.SUCCESS, None
    result = "failed" if answer.failed else "committed"
    log = logger.warning if answer.failed else logger.info
    log(
        "storage commitment %s from %s for %s: %d committed, %d failed (resent)%s",
        report.transaction_uid,
        peer,
        answer.destination,
        answer.committed,
        answer.failed,
        f"; {len(answer.unknown)} listed objects not in the transaction" if answer.unknown else "",
    )
    metrics.commitment_result(answer.destination, result)
    return Status.SUCCESS, None


__all__ = [
    "Answer",
    "AnswerResult",
    "CommitmentStore",
    "FailedObject",
    "Report",
    "ReportError",
    "apply_report",
    "report_from_dataset",
]
