"""Audit messages to a syslog collector: RFC 5424 messages over TLS with RFC 5425 octet counting.

A background thread sends, so a slow or absent collector never delays a C-STORE; messages that
cannot be sent are dropped with a warning (the audit file keeps every one).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

PRIORITY = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice), as IHE ATNA uses
MSGID = "IHE+RFC-3881"
QUEUE_SIZE = 10000


def frame(message: bytes, *, hostname: str, app_name: str, when: datetime | None = None) -> bytes:
    """One RFC 5424 message (BOM before the UTF-8 XML), framed as RFC 5425: ``LEN SP MSG``."""
    stamp = (
        (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    header = f"<{PRIORITY}>1 {stamp} {hostname or '-'} {app_name} {os.getpid()} {MSGID} - ".encode("ascii")
    payload = header + b"\xef\xbb\xbf" + message
    return str(len(payload)).encode("ascii") + b" " + payload


class SyslogSender:
    """A TLS connection to the collector, kept open and reopened when it drops."""

    def __init__(
        self, host: str, port: int, *, ca_certificates: Path | None = None, app_name: str = "dicomnode"
    ) -> None:
        self.host = host
        self.port = port
        self.app_name = app_name
        self.hostname = socket.gethostname()
        self.context = ssl.create_default_context(cafile=str(ca_certificates) if ca_certificates else None)
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_SIZE)
        self._sock: ssl.SSLSocket | None = None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def send(self, message: bytes) -> None:
        try:
            self._queue.put_nowait(frame(message, hostname=self.hostname, app_name=self.app_name))
        except queue.Full:
            logger.warning("syslog collector %s:%d is behind; audit message dropped", self.host, self.port)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (within ``timeout``), then close."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=10.0)
        return self.context.wrap_socket(raw, server_hostname=self.host)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            for attempt in (1, 2):  # once more on a fresh connection after a dropped one
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    self._sock.sendall(item)
                    break
                except (OSError, ssl.SSLError) as exc:
                    if self._sock is not None:
                        self._sock.close()
                    self._sock = None
                    if attempt == 2:
                        logger.warning(
                            "audit message not sent to syslog %s:%d: %s", self.host, self.port, exc
                        )
        if self._sock is not None:
            self._sock.close()
