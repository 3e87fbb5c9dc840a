"""Database schema and engine: studies, instances, jobs, results, the delivery outbox, commitments.

SQLite (WAL, busy timeout, synchronous FULL by default) is the embedded default; the same models run on
PostgreSQL through the URL in the configuration. The schema is owned by alembic (``migrations/``);
``alembic check`` in the tests keeps these models and the migrations in step.
"""

from __future__ import annotations

import enum
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from dicomnode import sqlite_lock
from dicomnode.fsio import syncfs_available

UID_LENGTH = 64  # PS3.5: a UID is at most 64 characters

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time in UTC (stored naive-free; SQLite keeps ISO text)."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` with UTC attached when it came back naive (an aggregate of a timestamp column)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC that always comes back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobState(enum.StrEnum):
    """Life of an inference job."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class JobPriority(enum.IntEnum):
    """Which jobs a worker claims first: STAT before ROUTINE (age lifts a routine job, see claim_many)."""

    ROUTINE = 0
    STAT = 1


class DeliveryState(enum.StrEnum):
    """Life of one result object on its way to one destination."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # gave up (permanent rejection or retries exhausted); `dicomnode retry` resends
    COMMITTED = "committed"  # the destination confirmed it keeps the object (Storage Commitment)
    COMMIT_FAILED = "commit-failed"  # commitment failed or timed out: resent at next_attempt_at


class CommitmentState(enum.StrEnum):
    """Life of one Storage Commitment transaction (one N-ACTION listing delivered objects)."""

    REQUESTED = "requested"  # N-ACTION sent (or about to be); waiting for the N-EVENT-REPORT
    COMMITTED = "committed"  # the report lists every object as committed
    FAILED = "failed"  # the report lists some objects as failed (those are resent)
    REFUSED = "refused"  # the peer refused the N-ACTION: its objects stay delivered, uncommitted
    REQUEST_FAILED = "request-failed"  # the N-ACTION did not get through: its objects are resent
    TIMED_OUT = "timed-out"  # no report within delivery.commitment_timeout_seconds: resent


class Study(Base):
    """A study the node holds (one row per Study Instance UID)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to the storage folder."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    modality: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # the job whose creation took this instance in; NULL while the study is still arriving
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)

    __table_args__ = (Index("ix_instances_pending", "study_id", "job_id"),)


class Job(Base):
    """An inference job over a whole study, created when the study has been stable."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=JobState.QUEUED,
        index=True,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    priority: Mapped[int] = mapped_column(Integer, default=JobPriority.ROUTINE, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[str | None] = mapped_column(String(64))  # e.g. "reported", "no-model"
    error: Mapped[str | None] = mapped_column(Text)
    routing_json: Mapped[str | None] = mapped_column(Text)  # per instance: route, model, reason


class Result(Base):
    """What one model found in one job (findings as JSON, see dicomnode.findings)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    findings_json: Mapped[str] = mapped_column(Text)
    objects_json: Mapped[str | None] = mapped_column(Text)  # the DICOM objects built: uids, class, path
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # "reporting" (its objects go to the PACS) or "shadow" (findings stored for comparison only)
    role: Mapped[str] = mapped_column(String(16), default="reporting", server_default="reporting")
    error: Mapped[str | None] = mapped_column(Text)  # why a shadow model produced no findings

    __table_args__ = (
        UniqueConstraint("job_id", "model_name", "model_version", name="uq_results_job_model_version"),
    )


class Outbox(Base):
    """One result object to deliver to one destination, with its retry state."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    path: Mapped[str] = mapped_column(String(512))  # relative to the storage folder
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=DeliveryState.PENDING,
        index=True,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # the Storage Commitment transaction that asked for this delivery (NULL: none asked yet)
    commitment_id: Mapped[int | None] = mapped_column(ForeignKey("commitments.id"), index=True)

    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_outbox_destination_sop"),)


class Commitment(Base):
    """One Storage Commitment Push Model transaction: the N-ACTION sent and what the peer answered."""

    __tablename__ = "commitments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[CommitmentState] = mapped_column(
        Enum(CommitmentState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=CommitmentState.REQUESTED,
        index=True,
    )
    objects: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)


def make_engine(database_url: str, *, synchronous: str = "FULL") -> Engine:
    """An engine with SQLite set up for concurrent writers: WAL, busy timeout, foreign keys."""
    is_sqlite = database_url.startswith("sqlite")
    if is_sqlite:
        db_path = database_url.removeprefix("sqlite:///")
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(database_url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy issue BEGIN itself (pysqlite's own transaction handling is off).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        if db_path and db_path != ":memory:":
            sqlite_lock.install(engine, sqlite_lock.lock_path_for(db_path))  # before BEGIN IMMEDIATE

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(database_url, pool_pre_ping=True)


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    """Sessions that keep loaded attributes after commit (objects are read after the transaction)."""
    return sessionmaker(engine, expire_on_commit=False)


def sqlite_synchronous_for(
    storage_root: Path, database_url: str, configured: str, flush_mode: str = "syncfs"
) -> str:
    """The SQLite ``synchronous`` level to use.

    ``AUTO`` means NORMAL when the SQLite file lives on the spool's filesystem and ``syncfs`` exists:
    the flush that precedes every acknowledgement then makes the committed WAL durable too. Anywhere
    else it means FULL, so each commit is flushed by SQLite itself before the acknowledgement.
    """
    if configured != "AUTO":
        return configured
    if flush_mode != "syncfs" or not syncfs_available() or not database_url.startswith("sqlite:///"):
        return "FULL"
    database = Path(database_url.removeprefix("sqlite:///"))
    folder = database.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    storage = storage_root
    while not storage.exists() and storage != storage.parent:
        storage = storage.parent
    return "NORMAL" if os.stat(folder).st_dev == os.stat(storage).st_dev else "FULL"
