"""A streaming ``multipart/related`` reader that spools each part within fixed limits.

The body is fed chunk by chunk as it arrives; nothing is sized from a length the peer announces.
Part headers are capped (:data:`PART_HEADER_LIMIT`); a part's body stays in memory up to
:data:`MEMORY_PART_BYTES` (and while all parts in memory stay under :data:`MEMORY_REQUEST_BYTES`)
and then moves to an unnamed temporary file (``O_TMPFILE``: nothing is
left behind by a crash). The caller caps the request's total size and checks the disk between
chunks (:attr:`MultipartReader.disk_bytes`).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PART_HEADER_LIMIT = 16 * 1024  # bytes of one part's header block
MEMORY_PART_BYTES = 8 * 1024 * 1024  # a larger part is spooled to a temporary file
MEMORY_REQUEST_BYTES = 64 * 1024 * 1024  # parts held in memory together; later ones go to files
MAX_PARTS = 1000  # per request: each spooled part holds an open temporary file until the request ends


class MultipartError(ValueError):
    """The body is not a well-formed multipart entity (answered 400)."""


class Part:
    """One part: its headers (lower-case names) and its body, in memory or in a temporary file."""

    def __init__(
        self, headers: dict[str, str], spool_dir: Path, memory_limit: int = MEMORY_PART_BYTES
    ) -> None:
        self.headers = headers
        self.size = 0
        self.memory_limit = memory_limit
        self._spool_dir = spool_dir
        self._memory: io.BytesIO | None = io.BytesIO()
        self._file: BinaryIO | None = None

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes | memoryview) -> None:
        if self._memory is not None and self.size + len(data) > self.memory_limit:
            self._file = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115 - closed by close()
            self._file.write(self._memory.getbuffer())
            self._memory = None
        if self._memory is not None:
            self._memory.write(data)
        else:
            assert self._file is not None
            self._file.write(data)
        self.size += len(data)

    @contextlib.contextmanager
    def view(self) -> Iterator[memoryview]:
        """The body as one buffer (a memory map for a spooled part), valid inside the block."""
        if self._memory is not None:
            with self._memory.getbuffer() as view:
                yield view
            return
        assert self._file is not None
        self._file.flush()
        if self.size == 0:
            yield memoryview(b"")
            return
        mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            with memoryview(mapped) as view:
                yield view
        finally:
            with contextlib.suppress(BufferError):  # a view still referenced: the GC unmaps it
                mapped.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._memory = None
        self._file = None


def parse_header_block(block: bytes) -> dict[str, str]:
    """``Name: value`` lines (folded continuation lines joined) into a dict with lower-case names."""
    headers: dict[str, str] = {}
    last = ""
    for raw in block.split(b"\r\n"):
        line = raw.decode("latin-1")
        if not line:
            continue
        if line[0] in " \t" and last:
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError("a part header line without a name and colon")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


class MultipartReader:
    """Feed chunks with :meth:`feed`, then call :meth:`finish`; the parts are in :attr:`parts`."""

    _PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _END = range(5)

    def __init__(self, boundary: str, spool_dir: Path) -> None:
        if not boundary or len(boundary) > 70:
            raise MultipartError("the boundary must have 1 to 70 characters (RFC 2046)")
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._body_delimiter = b"\r\n" + self._delimiter
        self._spool_dir = spool_dir
        self._buffer = bytearray()
        self._state = self._PREAMBLE
        self._part: Part | None = None
        self.parts: list[Part] = []
        self._earlier_disk = 0  # sizes of the parts before the current one, kept as they end
        self._earlier_memory = 0

    def _current(self, on_disk: bool) -> int:
        part = self._part
        return part.size if part is not None and part.on_disk == on_disk else 0

    @property
    def disk_bytes(self) -> int:
        """Bytes spooled to temporary files so far."""
        return self._earlier_disk + self._current(True)

    @property
    def memory_bytes(self) -> int:
        """Bytes of parts held in memory."""
        return self._earlier_memory + self._current(False)

    def _start_part(self, part: Part) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts in one request: send the instances in batches")
        self._part = part
        self.parts.append(part)

    def _end_part(self) -> None:
        part = self._part
        assert part is not None
        if part.on_disk:
            self._earlier_disk += part.size
        else:
            self._earlier_memory += part.size
        self._part = None

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while self._step():
            pass

    def finish(self) -> list[Part]:
        """The parts, once the closing delimiter was seen; MultipartError otherwise."""
        if self._state != self._END:
            raise MultipartError("the body ended before the closing boundary")
        return self.parts

    def close(self) -> None:
        """Drop every spooled part (their temporary files vanish)."""
        for part in self.parts:
            part.close()

    def _step(self) -> bool:
        """Advance the state machine on the buffer; False when it needs more bytes."""
        buffer = self._buffer
        if self._state == self._PREAMBLE:
            at = buffer.find(self._delimiter)
            if at < 0:  # keep only what could begin the delimiter
                del buffer[: max(0, len(buffer) - len(self._delimiter) + 1)]
                return False
            del buffer[: at + len(self._delimiter)]
            self._state = self._AFTER_DELIMITER
            return True
        if self._state == self._AFTER_DELIMITER:
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = self._END
                buffer.clear()
                return False
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > PART_HEADER_LIMIT:
                    raise MultipartError("no line break after a boundary")
                return False
            if buffer[:end].strip(b" \t"):  # only transport padding may follow a delimiter
                raise MultipartError("text after a boundary on its line")
            del buffer[: end + 2]
            self._state = self._HEADERS
            return True
        if self._state == self._HEADERS:
            if buffer[:2] == b"\r\n":  # a part without headers
                block, rest = b"", 2
            else:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > PART_HEADER_LIMIT:
                        raise MultipartError(f"a part's headers exceed {PART_HEADER_LIMIT} bytes")
                    return False
                if end > PART_HEADER_LIMIT:
                    raise MultipartError(f"a part's headers exceed {PART_HEADER_LIMIT} bytes")
                block, rest = bytes(buffer[:end]), end + 4
            budget = max(0, MEMORY_REQUEST_BYTES - self.memory_bytes)
            self._start_part(Part(parse_header_block(block), self._spool_dir, min(MEMORY_PART_BYTES, budget)))
            del buffer[:rest]
            self._state = self._BODY
            return True
        if self._state == self._BODY:
            assert self._part is not None
            at = buffer.find(self._body_delimiter)
            if at < 0:
                keep = len(self._body_delimiter) - 1
                if len(buffer) > keep:
                    self._part.write(memoryview(buffer)[: len(buffer) - keep])
                    del buffer[: len(buffer) - keep]
                return False
            self._part.write(memoryview(buffer)[:at])
            del buffer[: at + len(self._body_delimiter)]
            self._end_part()
            self._state = self._AFTER_DELIMITER
            return True
        buffer.clear()  # the epilogue after the closing delimiter is ignored
        return False
