"""Result delivery: the outbox, a C-STORE SCU, retry with backoff, and status classification.

The worker writes one :class:`~dicomnode.db.Outbox` row per (destination, result object). The
:class:`Sender` claims due rows, sends them over one association per destination (many objects per
association) and records every outcome in the same row, so delivery survives restarts: everything it
needs is in the database and the storage folder.

Outcomes (see ``docs/delivery.md``): success and warnings are *delivered*; out-of-resources and
network trouble are *retried* with exponential backoff and full jitter until ``give_up_after_hours``
after the row was created; permanent rejections (0xA9xx, 0xCxxx, 0x0122, 0x0124, a presentation
context refused for the SOP class) are *dead* at once, with the reason, until ``dicomnode retry``.

Delivery is at-least-once: a crash between the peer's success and our commit resends the same SOP
Instance UID, which a PACS treats as an overwrite or a duplicate. Logs carry UIDs only.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config, DeliveryConfig, DestinationConfig
from dicomnode.db import DeliveryState, Outbox, utcnow
from dicomnode.net.tls import client_ssl_context
from dicomnode.node.process import StopSignal
from dicomnode.status import (
    CANNOT_UNDERSTAND_RANGE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS_RANGE,
    WARNING_RANGE,
    Status,
)

logger = logging.getLogger(__name__)

# Failures that no amount of retrying changes: fail fast instead of looping.
PERMANENT_STATUSES = frozenset(
    {
        Status.NO_SUCH_ATTRIBUTE,
        Status.INVALID_ATTRIBUTE_VALUE,
        Status.NO_SUCH_SOP_INSTANCE,
        Status.NO_SUCH_ARGUMENT,
        Status.INVALID_ARGUMENT_VALUE,
        Status.INVALID_OBJECT_INSTANCE,
        Status.NO_SUCH_SOP_CLASS,
        Status.CLASS_INSTANCE_CONFLICT,
        Status.MISSING_ATTRIBUTE,
        Status.MISSING_ATTRIBUTE_VALUE,
        Status.SOP_CLASS_NOT_SUPPORTED,
        Status.NOT_AUTHORIZED,
        Status.DUPLICATE_INVOCATION,
        Status.UNRECOGNIZED_OPERATION,
        Status.MISTYPED_ARGUMENT,
    }
)

# A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2).
_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason given",
    0x03: "abstract syntax (SOP class) not supported",
    0x04: "transfer syntaxes not supported",
}

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


class Verdict(enum.StrEnum):
    """What happens to an outbox row after one attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt: a verdict, the DIMSE status if one came back, and why."""

    verdict: Verdict
    reason: str
    status: int | None = None
    detail: str | None = None  # the peer's Error Comment: stored, never logged


def status_name(status: int) -> str:
    """``0xA700 (Refused: Out of Resources)`` style text for a DIMSE status."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(status)
    if status == Status.WARNING_OPTIONAL_ATTRIBUTES:
        entry = ("Warning", "Requested optional attributes are not supported")
    return f"0x{status:04X} ({entry[1] or entry[0]})" if entry else f"0x{status:04X}"


def classify_status(status: int) -> Outcome:
    """Classify a C-STORE response status: delivered, retry later, or dead (permanent)."""
    name = status_name(status)
    if status == Status.SUCCESS:
        return Outcome(Verdict.DELIVERED, "success", status)
    if status in WARNING_RANGE or status in (
        Status.WARNING_OPTIONAL_ATTRIBUTES,
        Status.WARNING_ATTRIBUTE_LIST,
        Status.WARNING_VALUE_OUT_OF_RANGE,
    ):
        return Outcome(Verdict.DELIVERED, f"stored with warning {name}", status)
    if status == Status.DUPLICATE_SOP_INSTANCE:
        return Outcome(Verdict.DELIVERED, f"peer already holds the instance {name}", status)
    if (
        status in DATASET_DOES_NOT_MATCH_SOP_CLASS_RANGE
        or status in CANNOT_UNDERSTAND_RANGE
        or status in PERMANENT_STATUSES
    ):
        return Outcome(Verdict.DEAD, f"peer rejected the object permanently: {name}", status)
    # Out of resources, processing failure, resource limitation, cancel and unknown codes: try again
    # later; give_up_after_hours bounds it.
    return Outcome(Verdict.RETRY, f"peer failed the store: {name}", status)


def backoff_seconds(attempts: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(maximum, initial * 2**(attempts-1))]."""
    ceiling = min(maximum, initial * 2.0 ** max(0, min(attempts - 1, 60)))
    return rng.uniform(0.0, ceiling)


@dataclass(frozen=True)
class _Row:
    """A claimed outbox row, detached from its session."""

    id: int
    job_id: int
    study_instance_uid: str
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    attempts: int
    created_at: datetime


@dataclass
class _Prepared:
    """A row whose file has been checked: the transfer syntax it is stored in."""

    row: _Row
    file_path: Path
    sop_class_uid: UID
    transfer_syntax_uid: UID


class Sender:
    """Delivers outbox rows to their destinations by C-STORE and records each outcome."""

    def __init__(
        self,
        delivery: DeliveryConfig,
        destinations: Sequence[DestinationConfig],
        sessions: sessionmaker[Session],
        storage_root: Path,
        *,
        ae_title: str,
        max_objects_per_association: int = 64,
        max_rows_per_pass: int = 512,
        rng: random.Random | None = None,
    ) -> None:
        self.delivery = delivery
        self.destinations = {d.name: d for d in destinations}
        self.sessions = sessions
        self.storage_root = Path(storage_root)
        self.ae_title = ae_title
        self.max_objects_per_association = max(1, max_objects_per_association)
        self.max_rows_per_pass = max(1, max_rows_per_pass)
        self.rng = rng or random.Random()
        self._write_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config, sessions: sessionmaker[Session], **kwargs: Any) -> Sender:
        """A sender with the node's AE title, delivery policy, destinations and storage folder."""
        return cls(
            config.delivery,
            config.destinations,
            sessions,
            config.storage.path,
            ae_title=config.node.ae_title,
            **kwargs,
        )

    # --- the delivery loop -------------------------------------------------------------------------

    def run_once(self, now: datetime | None = None) -> int:
        """Send every due pending row once; return how many rows got an outcome (0: nothing was due).

        ``now`` fixes the clock for the whole pass (tests move it forward instead of sleeping).
        """
        clock: Callable[[], datetime] = (lambda: now) if now is not None else utcnow
        start = clock()
        due = self._due(start)
        handled = 0
        for destination_name, ids in due.items():
            destination = self.destinations.get(destination_name)
            for chunk in _chunks(ids, self.max_objects_per_association):
                rows = self._claim(chunk, clock(), len(chunk))
                if not rows:
                    continue
                if destination is None:
                    reason = f"destination {destination_name!r} is not in the configuration"
                    for row in rows:
                        self._record(row, Outcome(Verdict.DEAD, reason), clock())
                    handled += len(rows)
                    continue
                handled += self._deliver_chunk(destination, rows, clock)
        return handled

    def run_forever(self, stop_event: threading.Event | StopSignal) -> None:
        """Loop :meth:`run_once` until ``stop_event`` is set; errors are logged and backed off."""
        failures = 0
        poll = self.delivery.poll_interval_seconds
        while not stop_event.is_set():
            try:
                handled = self.run_once()
            except Exception:
                failures += 1
                wait = min(max(self.delivery.retry_max_seconds, poll), poll * 2.0 ** min(failures, 16))
                logger.exception("delivery pass failed (%d in a row); next pass in %.1f s", failures, wait)
                stop_event.wait(wait)
                continue
            failures = 0
            if handled == 0:
                stop_event.wait(poll)

    # --- operator actions --------------------------------------------------------------------------

    def retry(
        self, study_instance_uid: str | None = None, job_id: int | None = None, destination: str | None = None
    ) -> int:
        """Put dead (and waiting) rows back to pending, due now, attempts reset; return how many.

        The give-up window restarts too (``created_at`` becomes now), else a row that died of old age
        would die again on its first failure.
        """
        now = utcnow()
        statement = update(Outbox).where(Outbox.state.in_([DeliveryState.DEAD, DeliveryState.PENDING]))
        if study_instance_uid is not None:
            statement = statement.where(Outbox.study_instance_uid == study_instance_uid)
        if job_id is not None:
            statement = statement.where(Outbox.job_id == job_id)
        if destination is not None:
            statement = statement.where(Outbox.destination == destination)
        with self._write_lock, self.sessions.begin() as session:
            result: Any = session.execute(
                statement.values(
                    state=DeliveryState.PENDING,
                    next_attempt_at=now,
                    attempts=0,
                    created_at=now,
                )
            )
            count = int(result.rowcount)
        logger.info(
            "retry: %d outbox rows pending again (study %s, job %s, destination %s)",
            count,
            study_instance_uid or "*",
            "*" if job_id is None else job_id,
            destination or "*",
        )
        return count

    def summary(self) -> dict[str, dict[str, int]]:
        """Row counts by state per destination (configured destinations always appear)."""
        result: dict[str, dict[str, int]] = {
            name: {state.value: 0 for state in DeliveryState} for name in self.destinations
        }
        with self.sessions() as session:
            rows = session.execute(
                select(Outbox.destination, Outbox.state, func.count()).group_by(
                    Outbox.destination, Outbox.state
                )
            ).all()
        for destination, state, count in rows:
            counts = result.setdefault(destination, {s.value: 0 for s in DeliveryState})
            counts[DeliveryState(state).value] = int(count)
        return result

    # --- claiming and recording --------------------------------------------------------------------

    def _due(self, now: datetime) -> dict[str, list[int]]:
        """Ids of due pending rows, grouped by destination, oldest first."""
        with self.sessions() as session:
            rows = session.execute(
                select(Outbox.id, Outbox.destination)
                .where(Outbox.state == DeliveryState.PENDING, Outbox.next_attempt_at <= now)
                .order_by(Outbox.next_attempt_at, Outbox.id)
                .limit(self.max_rows_per_pass)
            ).all()
        grouped: dict[str, list[int]] = {}
        for row_id, destination in rows:
            grouped.setdefault(destination, []).append(row_id)
        return grouped

    def _claim(self, ids: Sequence[int], now: datetime, count: int) -> list[_Row]:
        """Lease rows to this pass by pushing next_attempt_at past the time the sends can take.

        A conditional UPDATE per row, so a second sender never sends the same row at the same time;
        if this process dies mid-pass the rows come due again when the lease lapses.
        """
        lease = timedelta(seconds=self.delivery.timeout_seconds * (count + 3))
        claimed: list[_Row] = []
        with self._write_lock, self.sessions.begin() as session:
            for row_id in ids:
                result: Any = session.execute(
                    update(Outbox)
                    .where(
                        Outbox.id == row_id,
                        Outbox.state == DeliveryState.PENDING,
                        Outbox.next_attempt_at <= now,
                    )
                    .values(next_attempt_at=now + lease)
                )
                if result.rowcount != 1:
                    continue
                row = session.get(Outbox, row_id)
                assert row is not None
                claimed.append(
                    _Row(
                        id=row.id,
                        job_id=row.job_id,
                        study_instance_uid=row.study_instance_uid,
                        destination=row.destination,
                        sop_instance_uid=row.sop_instance_uid,
                        sop_class_uid=row.sop_class_uid,
                        path=row.path,
                        attempts=row.attempts,
                        created_at=_aware(row.created_at),
                    )
                )
        return claimed

    def _record(self, row: _Row, outcome: Outcome, now: datetime) -> Verdict:
        """Store one attempt's outcome and log one line (UIDs only). Returns the final verdict."""
        attempts = row.attempts + 1
        verdict = outcome.verdict
        reason = outcome.reason
        values: dict[str, Any] = {"attempts": attempts, "last_status": outcome.status}
        if verdict is Verdict.RETRY:
            deadline = row.created_at + timedelta(hours=self.delivery.give_up_after_hours)
            if now >= deadline:
                verdict = Verdict.DEAD
                reason = (
                    f"gave up after {attempts} attempts over "
                    f"{self.delivery.give_up_after_hours:g} h; last error: {reason}"
                )
            else:
                delay = backoff_seconds(
                    attempts, self.delivery.retry_initial_seconds, self.delivery.retry_max_seconds, self.rng
                )
                values["next_attempt_at"] = min(now + timedelta(seconds=delay), deadline)
        stored = reason if outcome.detail is None else f"{reason}; peer comment: {outcome.detail}"
        if verdict is not Verdict.RETRY:
            values["next_attempt_at"] = now  # the time of the last attempt; the claim lease is over
        if verdict is Verdict.DELIVERED:
            values.update(
                state=DeliveryState.DELIVERED,
                delivered_at=now,
                last_error=None if outcome.status == Status.SUCCESS else stored[:4000],
            )
        elif verdict is Verdict.DEAD:
            values.update(state=DeliveryState.DEAD, last_error=stored[:4000])
        else:
            values.update(last_error=stored[:4000])
        with self._write_lock, self.sessions.begin() as session:
            session.execute(update(Outbox).where(Outbox.id == row.id).values(**values))
        if verdict is Verdict.DELIVERED:
            logger.info(
                "delivered %s (study %s, job %d) to %s: %s",
                row.sop_instance_uid,
                row.study_instance_uid,
                row.job_id,
                row.destination,
                reason,
            )
        elif verdict is Verdict.DEAD:
            logger.error(
                "dead letter %s (study %s, job %d) for %s after attempt %d: %s",
                row.sop_instance_uid,
                row.study_instance_uid,
                row.job_id,
                row.destination,
                attempts,
                reason,
            )
        else:
            logger.warning(
                "will retry %s (study %s, job %d) to %s at %s (attempt %d): %s",
                row.sop_instance_uid,
                row.study_instance_uid,
                row.job_id,
                row.destination,
                values["next_attempt_at"].isoformat(timespec="seconds"),
                attempts,
                reason,
            )
        return verdict

    # --- sending -----------------------------------------------------------------------------------

    def _deliver_chunk(
        self, destination: DestinationConfig, rows: list[_Row], clock: Callable[[], datetime]
    ) -> int:
        """Send a chunk of one destination's rows over one association; record every row."""
        prepared: list[_Prepared] = []
        for row in rows:
            try:
                prepared.append(self._prepare(row))
            except _UnsendableError as exc:
                self._record(row, Outcome(Verdict.DEAD, str(exc)), clock())
        if not prepared:
            return len(rows)
        pending = {p.row.id: p for p in prepared}
        try:
            self._send(destination, prepared, pending, clock)
        except Exception as exc:  # a bug or an unexpected library error: retry, bounded by give-up
            logger.exception("delivery to %s failed unexpectedly", destination.name)
            for p in list(pending.values()):
                outcome = Outcome(Verdict.RETRY, f"unexpected error: {type(exc).__name__}")
                self._record(p.row, outcome, clock())
        return len(rows)

    def _prepare(self, row: _Row) -> _Prepared:
        """Check the row's file is there and readable; learn its transfer syntax."""
        file_path = self.storage_root / row.path
        if not file_path.is_file():
            raise _UnsendableError(f"result file {row.path} is missing from the storage folder")
        try:
            meta = read_file_meta_info(file_path)
            transfer_syntax = UID(meta.TransferSyntaxUID)
            sop_class = UID(meta.get("MediaStorageSOPClassUID", row.sop_class_uid))
            sop_instance = meta.get("MediaStorageSOPInstanceUID", row.sop_instance_uid)
        except Exception as exc:
            raise _UnsendableError(
                f"result file {row.path} is not a readable DICOM file ({type(exc).__name__})"
            ) from exc
        if sop_instance != row.sop_instance_uid:
            raise _UnsendableError(
                f"result file {row.path} holds SOP Instance UID {sop_instance}, not {row.sop_instance_uid}"
            )
        return _Prepared(row, file_path, sop_class, transfer_syntax)

    def _send(
        self,
        destination: DestinationConfig,
        prepared: list[_Prepared],
        pending: dict[int, _Prepared],
        clock: Callable[[], datetime],
    ) -> None:
        """Associate, C-STORE each object, release; rows left in ``pending`` get a retry outcome."""
        timeout = self.delivery.timeout_seconds
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.connection_timeout = timeout
        contexts = _requested_contexts(prepared)
        tls = destination.tls
        tls_args = (
            (client_ssl_context(tls.ca_certificates, tls.certificate, tls.private_key), destination.host)
            if tls
            else None
        )
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            tls_args=tls_args,
        )
        try:
            if not assoc.is_established:
                self._association_failed(destination, assoc, pending, clock)
                return
            for item in prepared:
                if not assoc.is_established:
                    break
                outcome = self._store_one(assoc, item)
                self._record(item.row, outcome, clock())
                del pending[item.row.id]
            if pending:
                reason = _association_lost_reason(assoc, destination)
                for item in list(pending.values()):
                    self._record(item.row, Outcome(Verdict.RETRY, reason), clock())
                    del pending[item.row.id]
        finally:
            if assoc.is_established:
                assoc.release()
            if assoc.is_alive():
                assoc.abort()

    def _association_failed(
        self,
        destination: DestinationConfig,
        assoc: Association,
        pending: dict[int, _Prepared],
        clock: Callable[[], datetime],
    ) -> None:
        """Record why no association came up: refused contexts are permanent, the rest is retried."""
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        primitive = assoc.acceptor.primitive
        if assoc.is_rejected and primitive is not None:
            outcome = Outcome(
                Verdict.RETRY,
                f"association rejected by {where}: {primitive.result_str}, "
                f"{primitive.source_str}, {primitive.reason_str}",
            )
        elif primitive is not None and primitive.result == 0x00 and not assoc.accepted_contexts:
            # Accepted, but with no presentation context at all: every SOP class was refused.
            for item in list(pending.values()):
                self._record(item.row, Outcome(Verdict.DEAD, _context_refusal(assoc, item, where)), clock())
                del pending[item.row.id]
            return
        elif primitive is None:
            outcome = Outcome(
                Verdict.RETRY,
                (
                    f"no association with {where}: connection refused, unreachable or no answer within "
                    f"{self.delivery.timeout_seconds:g} s"
                ),
            )
        else:
            outcome = Outcome(Verdict.RETRY, f"association with {where} aborted during negotiation")
        for item in list(pending.values()):
            self._record(item.row, outcome, clock())
            del pending[item.row.id]

    def _store_one(self, assoc: Association, item: _Prepared) -> Outcome:
        """C-STORE one object in a syntax an accepted context has; classify the answer."""
        where = f"{assoc.acceptor.ae_title}@{assoc.acceptor.address}:{assoc.acceptor.port}"
        accepted = [
            cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class_uid and cx.as_scu
        ]
        if not accepted:
            return Outcome(Verdict.DEAD, _context_refusal(assoc, item, where))
        context = _choose_context(accepted, item.transfer_syntax_uid)
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
            dataset = _dataset_in(item.file_path, UID(context.transfer_syntax[0]))
        except Exception as exc:
            return Outcome(
                Verdict.DEAD,
                f"result file {item.row.path} could not be read or converted ({type(exc).__name__})",
            )
        if dataset.get("SOPInstanceUID") != item.row.sop_instance_uid:
            return Outcome(Verdict.DEAD, f"result file {item.row.path} holds another SOP Instance UID")
        started = time.monotonic()
        response = assoc.send_c_store(dataset)
        status = response.get("Status") if response is not None else None
        if status is None:
            if time.monotonic() - started >= 0.9 * self.delivery.timeout_seconds:
                return Outcome(
                    Verdict.RETRY,
                    f"no C-STORE response from {where} within {self.delivery.timeout_seconds:g} s",
                )
            return Outcome(
                Verdict.RETRY,
                f"association with {where} aborted or closed during the C-STORE (or an invalid response)",
            )
        outcome = classify_status(int(status))
        comment = response.get("ErrorComment")
        if comment:
            outcome = Outcome(outcome.verdict, outcome.reason, outcome.status, str(comment)[:512])
        return outcome


class _UnsendableError(Exception):
    """The row's file cannot be sent as it is (missing, unreadable, wrong UID)."""


def _aware(value: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _requested_contexts(prepared: Sequence[_Prepared]) -> list[PresentationContext]:
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


def _choose_context(
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


def _dataset_in(path: Path, transfer_syntax: UID) -> Dataset:
    """Read the file; re-encode it in ``transfer_syntax`` when it is stored in another (uncompressed) one."""
    dataset = dcmread(path)
    if dataset.file_meta.TransferSyntaxUID == transfer_syntax:
        return dataset
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    dataset.save_as(buffer, implicit_vr=transfer_syntax.is_implicit_VR, little_endian=True)
    buffer.seek(0)
    return dcmread(buffer)


def _context_refusal(assoc: Association, item: _Prepared, where: str) -> str:
    """Why the peer has no context for the object's SOP class, from the negotiation results."""
    results = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == item.sop_class_uid]
    why = "; ".join(sorted({_CONTEXT_RESULTS.get(cx.result or 0, f"result {cx.result}") for cx in results}))
    return f"{where} refused the presentation context for {item.sop_class_uid.name} ({why or 'not proposed'})"


def _association_lost_reason(assoc: Association, destination: DestinationConfig) -> str:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if assoc.is_aborted:
        return f"association with {where} aborted before the object was sent"
    return f"association with {where} ended before the object was sent"


def run_sender(config: Config, *, burst: bool = False) -> int:
    """The sender process: deliver due results until stopped (or once, with ``burst``)."""
    from dicomnode.node.process import die_with_parent
    from dicomnode.node.services import open_services

    die_with_parent()
    services = open_services(config, upgrade=False)
    sender = Sender.from_config(config, services.sessions)
    try:
        if burst:
            while sender.run_once():
                pass
            return 0
        sender.run_forever(StopSignal())
        return 0
    finally:
        services.close()
