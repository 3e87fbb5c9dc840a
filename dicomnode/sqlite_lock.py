"""A cross-process write lock in front of SQLite's own, so a waiting writer goes on as soon as it is free.

SQLite lets one writer at a time hold a database; a second process that asks (``BEGIN IMMEDIATE``)
while the lock is held does not block on anything it could be woken from: its busy handler sleeps
1, 2, 5, 10, 15, 20, 25 … 100 ms between retries. Measured with ``benchmarks/ingest.py``
(``dicomnode-busy``, CT over four associations): the worker's transactions, held a few milliseconds
each but stretched by its low CPU priority, made the listener's inserts sleep through those steps,
long after the lock was free, and with the listener's writers serialised behind the one asleep,
reception halved while the model ran.

So every SQLite transaction first takes an exclusive ``flock`` on ``<database>-writelock`` (one
open file per pooled connection, so threads of one process queue on it too) and lets it go right
after ``COMMIT`` or ``ROLLBACK``. A waiter retries at most every millisecond, asleep in between, so
it runs again within a millisecond of the release and leaves the CPU to the holder meanwhile (which
ends a priority inversion with a niced worker quickly). The flock only schedules: SQLite's own lock
stays the authority. A waiter that has not had the flock after ``wait_seconds`` (a holder stopped
mid-transaction) goes on to ``BEGIN IMMEDIATE`` without it, where SQLite's busy timeout decides, so
a stuck process costs what it cost before and never a hang.

Closing a connection's file (pool close, process exit, ``kill -9``) releases its lock, so a crashed
holder never leaves the lock behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

_FD_KEY = "dicomnode_writelock_fd"
_LONGEST_NAP = 0.001  # seconds between two tries of a waiting writer, at most


def lock_path_for(database_path: str) -> str:
    """The lock file beside a SQLite database file."""
    return f"{database_path}-writelock"


def acquire(fd: int, wait_seconds: float) -> bool:
    """Take the flock on ``fd``; False (not held) when it stayed busy for ``wait_seconds``."""
    nap = 0.00005
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(nap)
            nap = min(nap * 2, _LONGEST_NAP)


def install(engine: Engine, lock_path: str, *, wait_seconds: float = 30.0) -> None:
    """Take ``lock_path`` exclusively around every transaction ``engine`` begins.

    The caller's ``begin`` listener issues ``BEGIN IMMEDIATE`` after this one has the lock (or has
    given up waiting for it after ``wait_seconds``).
    """
    held: dict[int, int] = {}  # id(DBAPI connection) -> its lock file while it holds the lock

    @event.listens_for(engine, "begin")
    def _take(conn: Any) -> None:
        info = conn.connection.info  # the pool record's: lives as long as the DBAPI connection
        fd = info.get(_FD_KEY)
        if fd is None:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            info[_FD_KEY] = fd
        if acquire(fd, wait_seconds):
            held[id(conn.connection.dbapi_connection)] = fd
        else:
            logger.warning(
                "another process has held %s for %.0f s; this transaction waits on SQLite's own lock",
                lock_path,
                wait_seconds,
            )

    def _release(connection: Any) -> None:
        # The dialect is handed the pool's proxy or the DBAPI connection itself, depending on the caller.
        fd = held.pop(id(getattr(connection, "dbapi_connection", connection)), None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)

    dialect = engine.dialect
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def do_commit(dbapi_connection: Any) -> None:
        try:
            commit(dbapi_connection)
        finally:
            _release(dbapi_connection)

    def do_rollback(dbapi_connection: Any) -> None:
        try:
            rollback(dbapi_connection)
        finally:
            _release(dbapi_connection)

    # Released after SQLite's COMMIT/ROLLBACK returned (the connection events fire before them).
    dialect.do_commit = do_commit  # type: ignore[method-assign]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign]

    @event.listens_for(engine, "close")
    def _close(dbapi_connection: Any, record: Any) -> None:
        _release(dbapi_connection)
        fd = record.info.pop(_FD_KEY, None)
        if fd is not None:
            os.close(fd)

    @event.listens_for(engine, "close_detached")
    def _close_detached(dbapi_connection: Any) -> None:
        _release(dbapi_connection)
