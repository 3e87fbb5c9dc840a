"""The cross-process SQLite write lock (dicomnode/sqlite_lock.py): held exactly while a transaction is."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from dicomnode.db import make_engine
from dicomnode.sqlite_lock import acquire, lock_path_for


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (n INTEGER)"))
    yield engine
    engine.dispose()


def lock_is_free(database: Path) -> bool:
    """Whether another open file can take the lock right now (without waiting)."""
    fd = os.open(lock_path_for(str(database)), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def test_held_from_begin_until_commit_or_rollback(engine: Engine, tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    assert lock_is_free(database)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (1)"))
        assert not lock_is_free(database)
    assert lock_is_free(database)

    with pytest.raises(RuntimeError), engine.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (2)"))
        assert not lock_is_free(database)
        raise RuntimeError("rolled back")
    assert lock_is_free(database)

    with engine.connect() as connection:  # a read: still a transaction, released on return to the pool
        assert connection.execute(text("SELECT count(*) FROM t")).scalar() == 1
        assert not lock_is_free(database)
    assert lock_is_free(database)


def test_a_second_writer_waits_on_the_lock_and_goes_on_when_it_is_released(
    engine: Engine, tmp_path: Path
) -> None:
    """The waiter blocks in flock (not SQLite's busy handler) and commits once the holder is done."""
    other = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    entered = threading.Event()
    done = threading.Event()

    def second_writer() -> None:
        entered.set()
        with other.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (20)"))
        done.set()

    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (10)"))
            thread = threading.Thread(target=second_writer)
            thread.start()
            assert entered.wait(10)
            assert not done.wait(0.2)  # it cannot get past the lock while this transaction holds it
        assert done.wait(10)
        thread.join(10)
        with engine.connect() as connection:
            assert sorted(connection.execute(text("SELECT n FROM t")).scalars()) == [10, 20]
    finally:
        other.dispose()


HOLDER = """
import sys, time
from sqlalchemy import text
from dicomnode.db import make_engine
engine = make_engine(sys.argv[1])
connection = engine.connect()
transaction = connection.begin()
connection.execute(text("INSERT INTO t VALUES (99)"))
print("holding", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_releases_the_lock(engine: Engine, tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, f"sqlite:///{database}"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        assert not lock_is_free(database)
        holder.kill()
        holder.wait(10)
        deadline = time.monotonic() + 10
        while not lock_is_free(database):
            assert time.monotonic() < deadline, "the lock outlived its killed holder"
            time.sleep(0.01)
        with engine.begin() as connection:  # and SQLite itself recovered the uncommitted insert
            connection.execute(text("INSERT INTO t VALUES (1)"))
        with engine.connect() as connection:
            assert list(connection.execute(text("SELECT n FROM t")).scalars()) == [1]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_waiter_gives_up_on_the_flock_after_its_wait_and_leaves_it_to_sqlite(tmp_path: Path) -> None:
    """A holder that never lets go (stopped mid-transaction) costs a bounded wait, never a hang."""
    path = str(tmp_path / "lock")
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    waiter = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        assert not acquire(waiter, 0.05)
        assert time.monotonic() - started >= 0.05
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert acquire(waiter, 0.05)
    finally:
        os.close(holder)
        os.close(waiter)
