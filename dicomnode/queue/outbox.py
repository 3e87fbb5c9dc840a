"""The delivery outbox: the only code that writes the ``outbox`` table.

One row per (destination, result object). Three users, three parts of :class:`OutboxQueue`:

* the **worker** queues a finished job's objects with :meth:`OutboxQueue.enqueue`, inside the one
  transaction that also adds the job's results (:class:`dicomnode.queue.results.ResultStore`) and
  completes the job, so a job is never done without its deliveries nor delivered without being done;
* the **sender** asks for :meth:`~OutboxQueue.due` rows, leases them with :meth:`~OutboxQueue.claim`
  and stores each attempt with :meth:`~OutboxQueue.record`. It is *handed* the outcome (a
  :class:`DeliveryAttempt`: the new state, the next attempt time, status and error); the sender's
  status policy (``dicomnode.deliver.status``) stays with the sender;
* the **inventory** (``dicomnode retry``, ``dicomnode status``) calls :meth:`~OutboxQueue.retry` and
  :meth:`~OutboxQueue.summary`.

How the worker switches over (checked against ``tests/test_worker.py``): build
``self.outbox = OutboxQueue(services.sessions, [d.name for d in config.destinations])`` and
``self.results = ResultStore(services.sessions)`` once in ``Worker.__init__``; in
``_build_objects`` keep each written ``EncodedObject`` (``dicomnode.report.bundle``) as
``objects.append(StoredObject.of(obj, str(path.relative_to(root))))`` instead of a dict (so
``_Written.outputs`` becomes ``list[tuple[StudyFindings, list[StoredObject]]]``); and ``_commit``
becomes::

    with self.services.queue.transaction() as session:
        for findings, objects in result.outputs:
            self.results.add(session, job.id, findings, objects)
            self.outbox.enqueue(session, job, objects)
        ...                                    # routing_json, as today
        self.services.queue.complete(job, outcome, session=session)

``_predecessor`` calls :meth:`dicomnode.queue.results.ResultStore.predecessor_sr`. :meth:`enqueue`
only adds rows to the caller's session: the caller's transaction commits or rolls back everything
together.

Claims are conditional UPDATEs and every write is plain SQL through SQLAlchemy, so the same code
runs on SQLite and PostgreSQL (``tests/test_outbox.py`` is written as a contract for both).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Commitment, CommitmentState, DeliveryState, Outbox, utcnow

logger = logging.getLogger(__name__)

ERROR_LENGTH = 4000  # last_error is cut to this many characters


def _sendable() -> ColumnElement[bool]:
    """Rows the sender may (re)send: pending, or commit-failed and rescheduled (no transaction link)."""
    return or_(
        Outbox.state == DeliveryState.PENDING,
        and_(Outbox.state == DeliveryState.COMMIT_FAILED, Outbox.commitment_id.is_(None)),
    )


class _Encoded(Protocol):
    """What :meth:`StoredObject.of` reads from a built object (``report.bundle.EncodedObject``)."""

    @property
    def kind(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def series_instance_uid(self) -> str: ...


class _JobRef(Protocol):
    """The job a set of objects belongs to (``queue.jobs.ClaimedJob`` fits)."""

    @property
    def id(self) -> int: ...
    @property
    def study_instance_uid(self) -> str: ...


@dataclass(frozen=True)
class StoredObject:
    """A result object written to the storage folder: what the outbox and the results row record.

    ``path`` is relative to the storage folder. ``kind`` is ``"sr"``, ``"key-image"`` or ``"kos"``.
    """

    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    path: str

    @classmethod
    def of(cls, encoded: _Encoded, path: str) -> StoredObject:
        """The stored form of a built object written at ``path``."""
        return cls(
            encoded.kind, encoded.sop_instance_uid, encoded.sop_class_uid, encoded.series_instance_uid, path
        )

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> StoredObject:
        """Read one entry of ``results.objects_json``."""
        return cls(
            str(value["kind"]),
            str(value["sop_instance_uid"]),
            str(value["sop_class_uid"]),
            str(value.get("series_instance_uid", "")),
            str(value["path"]),
        )


def objects_to_json(objects: Iterable[StoredObject]) -> str:
    """``results.objects_json``: the same keys the worker has always written."""
    return json.dumps([asdict(obj) for obj in objects])


def objects_from_json(text: str | None) -> list[StoredObject]:
    """The objects of a ``results.objects_json`` value (``None``: none)."""
    return [StoredObject.from_dict(item) for item in json.loads(text or "[]")]


@dataclass(frozen=True)
class OutboxRow:
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

    @classmethod
    def of(cls, row: Outbox) -> OutboxRow:
        """The detached copy of a loaded ``Outbox`` row."""
        return cls(
            id=row.id,
            job_id=row.job_id,
            study_instance_uid=row.study_instance_uid,
            destination=row.destination,
            sop_instance_uid=row.sop_instance_uid,
            sop_class_uid=row.sop_class_uid,
            path=row.path,
            attempts=row.attempts,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class DeliveryAttempt:
    """What one attempt made of a row, decided by the sender: stored as it is.

    ``state`` PENDING means "retry at ``next_attempt_at``"; for DELIVERED and DEAD
    ``next_attempt_at`` is the time of the attempt. ``error`` goes to ``last_error`` (cut to
    :data:`ERROR_LENGTH` characters); ``status`` is the DIMSE status, if one came back.
    """

    state: DeliveryState
    attempted_at: datetime
    next_attempt_at: datetime
    status: int | None = None
    error: str | None = None


class OutboxQueue:
    """Database-backed delivery outbox: enqueue, due, claim, record, retry, summary."""

    def __init__(self, sessions: sessionmaker[Session], destinations: Sequence[str] = ()) -> None:
        self.sessions = sessions
        self.destinations = tuple(destinations)
        # SQLite serialises writers anyway; serialising them in-process first avoids busy waits.
        self._write_lock = threading.Lock()

    # --- the worker --------------------------------------------------------------------------------

    def enqueue(self, session: Session, job: _JobRef, objects: Sequence[StoredObject]) -> int:
        """Add one pending row per (configured destination, object) to the caller's transaction.

        Returns how many rows were added. Nothing is committed here: the caller's transaction also
        completes the job, so both happen or neither does.
        """
        now = utcnow()
        for obj in objects:
            for destination in self.destinations:
                session.add(
                    Outbox(
                        job_id=job.id,
                        study_instance_uid=job.study_instance_uid,
                        destination=destination,
                        sop_instance_uid=obj.sop_instance_uid,
                        sop_class_uid=obj.sop_class_uid,
                        path=obj.path,
                        state=DeliveryState.PENDING,
                        created_at=now,
                        next_attempt_at=now,
                    )
                )
        return len(objects) * len(self.destinations)

    # --- the sender --------------------------------------------------------------------------------

    def due(self, now: datetime, limit: int) -> dict[str, list[int]]:
        """Ids of up to ``limit`` due rows (pending, or commit-failed to resend), by destination."""
        with self.sessions() as session:
            rows = session.execute(
                select(Outbox.id, Outbox.destination)
                .where(_sendable(), Outbox.next_attempt_at <= now)
                .order_by(Outbox.next_attempt_at, Outbox.id)
                .limit(limit)
            ).all()
        grouped: dict[str, list[int]] = {}
        for row_id, destination in rows:
            grouped.setdefault(destination, []).append(row_id)
        return grouped

    def claim(self, ids: Sequence[int], now: datetime, lease: timedelta) -> list[OutboxRow]:
        """Lease due rows to the caller by pushing ``next_attempt_at`` to ``now + lease``.

        A conditional UPDATE per row, so a second sender never sends the same row at the same time;
        a row already claimed (or no longer pending or due) is left out. If the caller dies, the
        rows come due again when the lease lapses.
        """
        claimed: list[OutboxRow] = []
        with self._write_lock, self.sessions.begin() as session:
            for row_id in ids:
                result: Any = session.execute(
                    update(Outbox)
                    .where(
                        Outbox.id == row_id,
                        _sendable(),
                        Outbox.next_attempt_at <= now,
                    )
                    .values(next_attempt_at=now + lease)
                )
                if result.rowcount != 1:
                    continue
                row = session.get(Outbox, row_id)
                assert row is not None
                claimed.append(OutboxRow.of(row))
        return claimed

    def record(self, row: OutboxRow, attempt: DeliveryAttempt) -> None:
        """Store one attempt on its row, in its own transaction: attempts + 1 and the new state."""
        values: dict[str, Any] = {
            "attempts": row.attempts + 1,
            "state": attempt.state,
            "last_status": attempt.status,
            "last_error": None if attempt.error is None else attempt.error[:ERROR_LENGTH],
            "next_attempt_at": attempt.next_attempt_at,
        }
        if attempt.state is DeliveryState.DELIVERED:
            values["delivered_at"] = attempt.attempted_at
            values["commitment_id"] = None  # a (re)delivered object gets a fresh Storage Commitment
        with self._write_lock, self.sessions.begin() as session:
            session.execute(update(Outbox).where(Outbox.id == row.id).values(**values))

    # --- the operator ------------------------------------------------------------------------------

    def retry(
        self,
        study_instance_uid: str | None = None,
        job_id: int | None = None,
        destination: str | None = None,
        now: datetime | None = None,
    ) -> int:
        """Put dead (and waiting) rows back to pending, due now, attempts reset, and have delivered
        rows whose Storage Commitment request the peer refused asked again; return how many rows.

        The give-up window restarts too (``created_at`` becomes now), else a row that died of old age
        would die again on its first failure. Delivered rows are not resent: a refused request's rows
        only lose their link to it, so the sender asks the peer about them in a new transaction (an
        operator retries once the PACS has Storage Commitment enabled).
        """
        now = now or utcnow()
        selected: list[ColumnElement[bool]] = []
        if study_instance_uid is not None:
            selected.append(Outbox.study_instance_uid == study_instance_uid)
        if job_id is not None:
            selected.append(Outbox.job_id == job_id)
        if destination is not None:
            selected.append(Outbox.destination == destination)
        refused = select(Commitment.id).where(Commitment.state == CommitmentState.REFUSED)
        with self._write_lock, self.sessions.begin() as session:
            result: Any = session.execute(
                update(Outbox)
                .where(
                    Outbox.state.in_(
                        [DeliveryState.DEAD, DeliveryState.PENDING, DeliveryState.COMMIT_FAILED]
                    ),
                    *selected,
                )
                .values(
                    state=DeliveryState.PENDING,
                    next_attempt_at=now,
                    attempts=0,
                    created_at=now,
                    commitment_id=None,
                )
            )
            resent = int(result.rowcount)
            result = session.execute(
                update(Outbox)
                .where(Outbox.state == DeliveryState.DELIVERED, Outbox.commitment_id.in_(refused), *selected)
                .values(commitment_id=None, last_error=None),
                execution_options={"synchronize_session": False},
            )
            asked_again = int(result.rowcount)
        logger.info(
            "retry: %d outbox rows pending again, %d delivered rows to be asked for storage commitment"
            " again (their request was refused) (study %s, job %s, destination %s)",
            resent,
            asked_again,
            study_instance_uid or "*",
            "*" if job_id is None else job_id,
            destination or "*",
        )
        return resent + asked_again

    def summary(self) -> dict[str, dict[str, int]]:
        """Row counts by state per destination (the configured destinations always appear)."""
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
