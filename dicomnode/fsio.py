"""File durability, in one place: atomic replacement, fsync of files and folders, and group commit.

``durable_write`` is for small state files (serve.json, the port file, model cards);
``fast_write`` + :class:`FilesystemSync` is the spool's path, where one ``syncfs(2)`` covers every
write made before it. Nothing else in the package calls ``fsync`` or ``os.replace`` for durability.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# What a write takes: one buffer, or several written back to back (the fragments of a received data
# set go to disk with writev, never joined into one more copy in memory).
Buffers = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]
_IOV_MAX = 1024
_WRITE_CHUNK = 256 * 1024

_syncfs: Any
try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs
except (OSError, AttributeError):  # not Linux: every write is fsynced on its own instead
    _syncfs = None


def syncfs_available() -> bool:
    """Whether this platform has ``syncfs(2)`` (Linux), which the spool's group commit relies on."""
    return _syncfs is not None


class FilesystemSync:
    """Group commit for the spool: one ``syncfs(2)`` makes every write before it durable.

    Callers that arrive while a sync runs wait for the next one, which covers them all: with N
    associations storing at once, one flush serves up to N instances.
    """

    def __init__(self, directory: Path, *, syncer: Callable[[int], None] | None = None) -> None:
        self._directory = directory
        self._fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self._syncer = syncer or _syncfs_fd  # injectable: tests hold and fail flushes where they need
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._failed_upto = 0
        self._running = False

    def close(self) -> None:
        with self._cond:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def sync(self) -> None:
        """Return once every write made before the call is durable (a flush that began after it
        succeeded); OSError when the flush that was to cover it failed."""
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while True:
                if self._done >= ticket:
                    return
                if self._failed_upto >= ticket:
                    raise OSError(errno.EIO, "syncfs failed")
                if not self._running:
                    self._running = True
                    target = self._requested
                    break
                self._cond.wait()
        ok = False
        try:
            self._syncer(self._fd)
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self._done = max(self._done, target)
                else:
                    self._failed_upto = max(self._failed_upto, target)
                self._cond.notify_all()


def _syncfs_fd(fd: int) -> None:
    """``syncfs`` of the filesystem holding ``fd`` (``sync`` where there is no syncfs); OSError on failure."""
    if _syncfs is None:
        os.sync()  # no syncfs on this platform: flush everything
    elif _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sync_filesystem(directory: Path) -> None:
    """One ``syncfs`` of the filesystem holding ``directory`` (``sync`` where there is no syncfs)."""
    sync = FilesystemSync(directory)
    try:
        sync.sync()
    finally:
        sync.close()


def buffers_size(data: Buffers) -> int:
    """Total length in bytes of one buffer or a sequence of them."""
    if isinstance(data, bytes | bytearray | memoryview):
        return memoryview(data).nbytes
    return sum(memoryview(part).nbytes for part in data)


def _write_all(fd: int, data: Buffers) -> None:
    """Write every byte of ``data`` to ``fd`` in system calls of at most ``_WRITE_CHUNK`` bytes.

    One 8 MB ``write``/``writev`` into a new file measured 10-30 ms on ext4 here, the same bytes in
    256 KiB calls 2.5 ms; small buffers (preamble, meta) share a call with the data after them.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        views = [memoryview(data)]
    else:
        views = [memoryview(part) for part in data]
    batch: list[memoryview] = []
    room = _WRITE_CHUNK
    for view in views:
        while view.nbytes:
            piece = view[:room]
            batch.append(piece)
            room -= piece.nbytes
            view = view[piece.nbytes :]
            if room == 0 or len(batch) == _IOV_MAX:
                _writev_fully(fd, batch)
                batch, room = [], _WRITE_CHUNK
    if batch:
        _writev_fully(fd, batch)


def _writev_fully(fd: int, parts: list[memoryview]) -> None:
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= parts[0].nbytes:  # drop what was written, keep the rest
            written -= parts[0].nbytes
            parts.pop(0)
        if written:
            parts[0] = parts[0][written:]


def fast_write(target: Path, data: Buffers) -> None:
    """Temp file, write, rename: durability comes from the FilesystemSync flush that follows."""
    _atomic_write(target, data, flush=False)


def durable_write(target: Path, data: Buffers) -> None:
    """Atomically replace ``target`` with ``data``: temp file, fsync, rename, fsync folder."""
    _atomic_write(target, data, flush=True)
    fsync_dir(target.parent)


def _atomic_write(target: Path, data: Buffers, *, flush: bool) -> None:
    """Write a temporary file beside ``target`` (fsynced when ``flush``) and rename it over ``target``.

    On failure the temporary file is removed, so no partial file is ever left under any name.
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        try:
            _write_all(fd, data)
            if flush:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def fsync_dir(directory: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
