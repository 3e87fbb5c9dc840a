"""The spool's group commit (``fsio.FilesystemSync``): who is covered by which flush, failures.
The flush itself is injected where a test must hold or fail it; one test runs the real ``syncfs``
on a folder under tmp_path."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dicomnode.fsio import FilesystemSync, fast_write

WAIT = 10.0  # seconds any event may take before the test fails (never slept through)


class HeldFlushes:
    """A syncer whose every call blocks until the test releases it, counting calls in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[threading.Event] = []
        self.release: list[threading.Event] = []
        self.fail: set[int] = set()
        self.in_flight = 0
        self.most_in_flight = 0
        self.changed = threading.Condition(self.lock)

    def __call__(self, fd: int) -> None:
        with self.lock:
            index = len(self.started)
            self.started.append(threading.Event())
            self.release.append(threading.Event())
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.started[index].set()
            self.changed.notify_all()
        try:
            assert self.release[index].wait(WAIT)
            if index in self.fail:
                raise OSError(5, "Input/output error")
        finally:
            with self.lock:
                self.in_flight -= 1
                self.changed.notify_all()

    def wait_started(self, count: int) -> None:
        with self.lock:
            assert self.changed.wait_for(lambda: len(self.started) >= count, WAIT)


def in_thread(call: Callable[[], None]) -> tuple[threading.Thread, list[BaseException], threading.Event]:
    errors: list[BaseException] = []
    finished = threading.Event()

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors, finished


def test_callers_arriving_during_a_flush_share_the_next_one_and_none_returns_early(tmp_path: Path) -> None:
    """A's flush is running. B and C call during it: their writes may have missed it, so they wait
    for it to end, then share one new flush (two calls, one flush), and return only after that."""
    flushes = HeldFlushes()
    sync = FilesystemSync(tmp_path, syncer=flushes)
    try:
        _, a_errors, a_done = in_thread(sync.sync)
        flushes.wait_started(1)
        _, b_errors, b_done = in_thread(sync.sync)
        _, c_errors, c_done = in_thread(sync.sync)
        assert not b_done.wait(0.2) and not c_done.is_set()
        assert len(flushes.started) == 1  # no second flush while the first runs
        flushes.release[0].set()
        assert a_done.wait(WAIT) and not a_errors
        flushes.wait_started(2)  # one flush, started once the first ended, for both B and C
        assert not b_done.wait(0.2) and not c_done.is_set()  # A's flush began before their calls
        flushes.release[1].set()
        assert b_done.wait(WAIT) and c_done.wait(WAIT) and not b_errors and not c_errors
        assert len(flushes.started) == 2 and flushes.most_in_flight == 1
    finally:
        for release in flushes.release:
            release.set()
        sync.close()


def test_a_failed_flush_fails_the_callers_it_was_to_cover_and_the_next_succeeds(tmp_path: Path) -> None:
    flushes = HeldFlushes()
    flushes.fail.add(0)
    sync = FilesystemSync(tmp_path, syncer=flushes)
    try:
        _, errors, done = in_thread(sync.sync)
        flushes.wait_started(1)
        flushes.release[0].set()
        assert done.wait(WAIT)
        assert len(errors) == 1 and isinstance(errors[0], OSError)
        _, errors, done = in_thread(sync.sync)
        flushes.wait_started(2)
        flushes.release[1].set()
        assert done.wait(WAIT) and not errors
    finally:
        for release in flushes.release:
            release.set()
        sync.close()


def test_the_real_syncfs_flushes_a_spool_folder(tmp_path: Path) -> None:
    """With the platform's own flush: many threads at once all return, none raises."""
    sync = FilesystemSync(tmp_path)
    try:
        results: list[BaseException] = []

        def write_and_flush(index: int) -> None:
            try:
                fast_write(tmp_path / f"{index}.dcm", bytes(64 * 1024))
                sync.sync()
            except BaseException as exc:  # reported below
                results.append(exc)

        threads = [threading.Thread(target=write_and_flush, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not results and not any(t.is_alive() for t in threads)
        assert len(list(tmp_path.glob("*.dcm"))) == 16
    finally:
        sync.close()


def test_a_closed_sync_raises_instead_of_flushing_nothing(tmp_path: Path) -> None:
    sync = FilesystemSync(tmp_path)
    sync.close()
    with pytest.raises(OSError):
        sync.sync()
