"""The spool: received instances written atomically and durably, at paths made only of UIDs.

A write is: temporary file in the target folder -> write -> fsync -> rename over the final name ->
fsync the folder (and the folders created on the way). Only after that may the caller commit the
database row and answer C-STORE success. Nothing from a dataset but validated UIDs ever reaches a path.

The free-space floor is kept by reservation, not by a cached check: before each write the free
space is read (``statvfs``, about a microsecond) and the bytes of writes still in progress are
subtracted, so concurrent associations cannot together write past the floor.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomnode.errors import InvalidDatasetError, StorageFullError
from dicomnode.fsio import Buffers, FilesystemSync, buffers_size, durable_write, fast_write, fsync_dir

logger = logging.getLogger(__name__)


# PS3.5 9.1: digits and dots, components without leading zeros, at most 64 characters. Real devices
# emit leading zeros now and then; they are harmless in a path, so only the shape is enforced.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def statvfs_free_bytes(root: Path) -> int:
    """Bytes an unprivileged writer may still use on ``root``'s filesystem (``df``'s Avail)."""
    stat = os.statvfs(root)
    return stat.f_bavail * stat.f_frsize


def validate_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a clean UID string or raise :class:`InvalidDatasetError` naming ``keyword``."""
    if value is None:
        raise InvalidDatasetError(f"{keyword} is missing")
    text = str(value).strip().rstrip("\x00").strip()
    if not text:
        raise InvalidDatasetError(f"{keyword} is empty")
    if len(text) > 64 or not _UID.match(text):
        raise InvalidDatasetError(f"{keyword} is not a valid UID (digits and dots, at most 64 characters)")
    return text


@dataclass(frozen=True)
class StoredFile:
    """Where an instance landed: the path relative to the spool root and its size."""

    relative_path: str
    size_bytes: int


class InstanceStore:
    """Durable file storage under ``root``/instances/STUDY/SERIES/SOP.dcm."""

    def __init__(
        self,
        root: Path,
        *,
        min_free_bytes: int = 0,
        writer: Callable[[Path, Buffers], None] | None = None,
        flush_mode: str = "syncfs",
        free_bytes: Callable[[Path], int] = statvfs_free_bytes,
    ) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.free_bytes = free_bytes  # injectable: tests hold the free space where they need it
        # "syncfs": write, rename, then one shared syncfs per acknowledgement (group commit);
        # "fsync": fsync every file and folder on its own (for a spool on a busy, shared filesystem)
        self.flush_mode = flush_mode
        self.file_writer = fast_write if flush_mode == "syncfs" else durable_write
        self.writer = writer or self.file_writer  # injectable for fault-injection tests
        self._free_lock = threading.Lock()
        self._reserved = 0  # bytes of writes in progress, not all of them visible in statvfs yet
        self._known_dirs: set[Path] = set()
        (root / "instances").mkdir(parents=True, exist_ok=True)
        self._block_size = max(1, os.statvfs(root).f_frsize)
        self.filesystem_sync = FilesystemSync(root)

    def relative_path(self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> str:
        """The spool path of an instance, from validated UIDs only."""
        parts = (
            validate_uid(study_instance_uid, "StudyInstanceUID"),
            validate_uid(series_instance_uid, "SeriesInstanceUID"),
            validate_uid(sop_instance_uid, "SOPInstanceUID") + ".dcm",
        )
        return "/".join(("instances", *parts))

    def absolute(self, relative_path: str) -> Path:
        return self.root / relative_path

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by writes in progress (for tests and the status view)."""
        with self._free_lock:
            return self._reserved

    @contextlib.contextmanager
    def _reservation(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes (rounded up to whole blocks) against the floor while a write runs.

        Refuse with StorageFullError when free - reserved - incoming would fall below the floor. The
        free space is read on every call: a cached value let a burst leave 4 MB free under a 40 MB floor.
        """
        if self.min_free_bytes <= 0:
            yield
            return
        incoming = -(-size // self._block_size) * self._block_size
        with self._free_lock:
            free = self.free_bytes(self.root)
            if free - self._reserved - incoming < self.min_free_bytes:
                raise StorageFullError(
                    f"free disk space {free / 1e6:.1f} MB, {self._reserved / 1e6:.1f} MB of it being written,"
                    f" leaves less than the storage floor (node.min_free_disk_mb,"
                    f" {self.min_free_bytes / 1e6:.1f} MB) after this {incoming / 1e6:.2f} MB instance"
                )
            self._reserved += incoming
        try:
            yield
        finally:
            with self._free_lock:
                self._reserved -= incoming

    def write(self, relative_path: str, data: Buffers) -> StoredFile:
        """Write ``data`` (one buffer or several in order) to ``relative_path``; durable after
        :meth:`flush`. Raise StorageFullError below the free-space floor or on any OS failure."""
        target = self.root / relative_path
        size = buffers_size(data)
        with self._reservation(size):
            try:
                self._ensure_dir(target.parent)
                self.writer(target, data)
            except OSError as exc:
                reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"OS error {exc.errno}"
                raise StorageFullError(f"cannot write instance file: {reason}") from exc
        return StoredFile(relative_path=relative_path, size_bytes=size)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        missing = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self.flush_mode == "fsync":  # with syncfs the flush before the acknowledgement covers them
            for created in reversed(missing):
                fsync_dir(created.parent)
        self._known_dirs.add(directory)

    def close(self) -> None:
        """Release the folder handle the flushes use."""
        self.filesystem_sync.close()

    def write_file(self, path: Path, data: bytes) -> None:
        """Write a result file atomically; durable after :meth:`flush` (or at once in fsync mode)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file_writer(path, data)

    def flush(self) -> None:
        """Make every write so far durable (one ``syncfs`` shared by concurrent callers)."""
        if self.flush_mode == "fsync":
            return  # every write was flushed on its own
        try:
            self.filesystem_sync.sync()
        except OSError as exc:
            raise StorageFullError(f"cannot flush the spool to disk: OS error {exc.errno}") from exc

    def remove(self, relative_path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / relative_path).unlink()
