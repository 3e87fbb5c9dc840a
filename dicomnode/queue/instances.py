"""The index of received instances: one row per stored SOP instance, written before its C-STORE is answered.

:meth:`InstanceIndex.record_instance` is on every sender's critical path (once per instance, before
the acknowledgement), so it runs prebuilt statements; it is apart from study assembly and job
leasing (``queue.assembly``, ``queue.jobs``), which build on it, so the receive side depends only
on what it uses.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Instance, Job, Study, as_utc, utcnow

# Statements of the receive path, built once (SQLite 3.35+ and PostgreSQL both support RETURNING).
_HELD_PATH = select(Instance.path).where(Instance.sop_instance_uid == bindparam("sop_instance_uid"))
_TOUCH_STUDY = (
    update(Study)
    .where(Study.study_instance_uid == bindparam("match_study_instance_uid"))
    .values(last_received_at=bindparam("now"))
    .returning(Study.id)
)
_INSERT_STUDY = insert(Study).returning(Study.id)
_INSERT_INSTANCE = insert(Instance)


# The same three statements as SQL for SQLite's own driver (table names from the models; a test
# holds their rows to the Core statements', value for value): the embedded default indexes each
# instance in a third of the time SQLAlchemy's execution layer takes around them (0.12 against
# 0.27-0.34 ms measured here), and holds the in-process write lock, which concurrent associations
# queue on, that much shorter.
_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "sop_class_uid",
    "study_id",
    "series_instance_uid",
    "transfer_syntax_uid",
    "modality",
    "path",
    "size_bytes",
    "calling_ae_title",
    "received_at",
)
_STUDY_COLUMNS = ("study_instance_uid", "patient_id", "study_date", "first_received_at", "last_received_at")


def _sqlite_insert(table: str, columns: tuple[str, ...], returning: str = "") -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})" + (
        f" RETURNING {returning}" if returning else ""
    )


_SQLITE_HELD_PATH = f"SELECT path FROM {Instance.__tablename__} WHERE sop_instance_uid = ?"
_SQLITE_TOUCH_STUDY = (
    f"UPDATE {Study.__tablename__} SET last_received_at = ? WHERE study_instance_uid = ? RETURNING id"
)
_SQLITE_INSERT_STUDY = _sqlite_insert(Study.__tablename__, _STUDY_COLUMNS, "id")
_SQLITE_INSERT_INSTANCE = _sqlite_insert(Instance.__tablename__, _INSTANCE_COLUMNS)

_RECORD_ATTEMPTS = 3  # a unique-key race with another process (PostgreSQL) is retried, then raised


class InstanceConflictError(Exception):
    """The SOP Instance UID is already indexed at another path (under another study or series)."""

    def __init__(self, sop_instance_uid: str, held_path: str) -> None:
        super().__init__(f"SOP Instance UID {sop_instance_uid} is already held at {held_path}")
        self.sop_instance_uid = sop_instance_uid
        self.held_path = held_path


@dataclass(frozen=True)
class InstanceRecord:
    """What the listener knows about a stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    patient_id: str | None = None
    study_date: str | None = None
    modality: str | None = None
    calling_ae_title: str | None = None


class InstanceIndex:
    """The ``studies`` and ``instances`` tables as the receive side writes them."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        # SQLite serialises writers anyway; serialising them in-process first avoids busy waits.
        self._write_lock = threading.Lock()
        bind = sessions.kw.get("bind")
        self._sqlite_engine = bind if isinstance(bind, Engine) and bind.dialect.name == "sqlite" else None
        if self._sqlite_engine is not None:
            # timestamps as SQLAlchemy would bind them (the column type's own processor)
            dialect = self._sqlite_engine.dialect
            received_at = Instance.__table__.c.received_at.type
            processor = received_at.dialect_impl(dialect).bind_processor(dialect)
            self._sqlite_timestamp: Callable[[Any], Any] = processor or (lambda value: value)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction serialised with this process's other writers."""
        with self._write_lock, self.sessions.begin() as session:
            yield session

    def record_instance(self, record: InstanceRecord) -> bool:
        """Index a stored instance; return False when it was already indexed at this path (a resend).

        Raise :class:`InstanceConflictError` when the UID is indexed at another path: a SOP
        Instance UID names one instance, so the same UID under another study or series is refused by
        the caller rather than indexed twice. A unique-key violation (another process inserted the
        same study or instance between our look-up and insert; possible on PostgreSQL) is retried,
        so the retry sees the other row: a resend is never answered Success without its row.
        """
        for attempt in range(1, _RECORD_ATTEMPTS + 1):
            try:
                return self._insert_instance(record)
            except (IntegrityError, sqlite3.IntegrityError):
                if attempt == _RECORD_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_instance(self, record: InstanceRecord) -> bool:
        """One attempt of :meth:`record_instance`."""
        if self._sqlite_engine is not None:
            return self._insert_instance_sqlite(self._sqlite_engine, record)
        return self._insert_instance_core(record)

    def _insert_instance_sqlite(self, engine: Engine, record: InstanceRecord) -> bool:
        """:meth:`_insert_instance_core` in SQL on the SQLite driver's cursor, inside a transaction
        SQLAlchemy begins and ends (so ``BEGIN IMMEDIATE``, the cross-process write lock and the
        commit are exactly those of every other transaction)."""
        now = self._sqlite_timestamp(utcnow())
        with self._write_lock, engine.begin() as connection:
            cursor = cast(sqlite3.Connection, connection.connection.driver_connection).cursor()
            try:
                held = cursor.execute(_SQLITE_HELD_PATH, (record.sop_instance_uid,)).fetchone()
                if held is not None:
                    if held[0] != record.path:
                        raise InstanceConflictError(record.sop_instance_uid, str(held[0]))
                    return False
                study = cursor.execute(_SQLITE_TOUCH_STUDY, (now, record.study_instance_uid)).fetchone()
                if study is None:
                    study = cursor.execute(
                        _SQLITE_INSERT_STUDY,
                        (record.study_instance_uid, record.patient_id, record.study_date, now, now),
                    ).fetchone()
                cursor.execute(
                    _SQLITE_INSERT_INSTANCE,
                    (
                        record.sop_instance_uid,
                        record.sop_class_uid,
                        study[0],
                        record.series_instance_uid,
                        record.transfer_syntax_uid,
                        record.modality,
                        record.path,
                        record.size_bytes,
                        record.calling_ae_title,
                        now,
                    ),
                )
            finally:
                cursor.close()
        return True

    def _insert_instance_core(self, record: InstanceRecord) -> bool:
        """One attempt of :meth:`record_instance` on any database SQLAlchemy drives.

        Three prebuilt Core statements with bound parameters on the session's connection (no ORM
        unit of work, no statement building per instance): this runs once per C-STORE, before the
        acknowledgement, so its cost is on every sender's critical path.
        """
        now = utcnow()
        with self._write_lock, self.sessions.begin() as session:
            connection = session.connection()
            held = connection.scalar(_HELD_PATH, {"sop_instance_uid": record.sop_instance_uid})
            if held is not None:
                if held != record.path:
                    raise InstanceConflictError(record.sop_instance_uid, held)
                return False
            study_id = connection.scalar(
                _TOUCH_STUDY, {"match_study_instance_uid": record.study_instance_uid, "now": now}
            )
            if study_id is None:
                study_id = connection.scalar(
                    _INSERT_STUDY,
                    {
                        "study_instance_uid": record.study_instance_uid,
                        "patient_id": record.patient_id,
                        "study_date": record.study_date,
                        "first_received_at": now,
                        "last_received_at": now,
                    },
                )
            connection.execute(
                _INSERT_INSTANCE,
                {
                    "sop_instance_uid": record.sop_instance_uid,
                    "sop_class_uid": record.sop_class_uid,
                    "study_id": study_id,
                    "series_instance_uid": record.series_instance_uid,
                    "transfer_syntax_uid": record.transfer_syntax_uid,
                    "modality": record.modality,
                    "path": record.path,
                    "size_bytes": record.size_bytes,
                    "calling_ae_title": record.calling_ae_title,
                    "received_at": now,
                },
            )
        return True

    def newest_activity(self, margin_seconds: float = 3600.0) -> float | None:
        """POSIX time an hour before the newest received instance or job change (None: nothing yet).

        A write interrupted by a crash happened after that, so older folders need no cleaning.
        """
        with self.sessions() as session:
            times = [
                session.scalar(select(func.max(Instance.received_at))),
                session.scalar(select(func.max(Job.updated_at))),
            ]
        known = [as_utc(t) for t in times if t is not None]
        return max(known).timestamp() - margin_seconds if known else None
