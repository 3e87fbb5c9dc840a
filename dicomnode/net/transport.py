"""The transport side of the acceptor (PS3.8 section 9.1): listening socket, TLS, one thread per connection.

Why not pynetdicom's acceptor: its reactor threads poll with 1 ms sleeps, read the socket 4 KiB at a
time and build a pydicom Dataset for every command, which made the receive path cost about 6 ms of
CPU per CT instance, more than writing and flushing the instance. Here each connection gets one
thread running ``dul.Connection`` with blocking reads.

Two limits keep a hostile or broken peer from taking the node's slots: ``max_associations`` counts
only associations (a connection becomes one once its A-ASSOCIATE-RQ is accepted), and connections
still before that point are capped separately (``pending_limit``): one over the cap is closed at once,
with a log line, before any thread is started for it; the others are closed when ARTIM expires. So
the threads are bounded by ``max_associations + pending_limit`` plus the accept thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time

from dicomnode.net.acse import Negotiator
from dicomnode.net.association import AbortReason, AbortSource, AcceptorSettings, ServiceUser
from dicomnode.net.dul import Connection

logger = logging.getLogger(__name__)

ACCEPT_POLL_SECONDS = 0.5
_REFUSAL_LOG_INTERVAL = 10.0  # at most one "over the cap" log line per interval during a flood


class AcceptorServer:
    """Listens for associations and serves each connection in its own thread.

    ``reuse_port`` lets other processes bind the same port (SO_REUSEPORT), so the kernel spreads
    associations over several interpreters. ``ssl_context`` makes every connection DICOM TLS.
    """

    def __init__(
        self,
        address: tuple[str, int],
        settings: AcceptorSettings,
        service_user: ServiceUser,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.service_user = service_user
        self.negotiator = Negotiator(settings)
        self.ssl_context = ssl_context
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=128, reuse_port=reuse_port)
        self._socket.settimeout(ACCEPT_POLL_SECONDS)
        self.server_address: tuple[str, int] = self._socket.getsockname()[:2]
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._associations = 0
        self._refused_since_log = 0
        self._last_refusal_log = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active_associations(self) -> int:
        """Established associations (those counted toward ``max_associations``)."""
        with self._lock:
            return self._associations

    @property
    def open_connections(self) -> int:
        """Every connection being served: associations and those not yet associated."""
        with self._lock:
            return len(self._connections)

    def admit_association(self) -> bool:
        """Count one more association unless ``max_associations`` are already established."""
        with self._lock:
            if self._associations >= self.settings.max_associations:
                return False
            self._associations += 1
            return True

    def start(self) -> None:
        """Accept in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="acceptor", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Accept connections until ``shutdown``; each within the caps gets a thread."""
        while not self._stopping.is_set():
            try:
                sock, peer = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("accepting a connection failed")
                self._stopping.wait(ACCEPT_POLL_SECONDS)  # e.g. out of file descriptors: do not spin
                continue
            connection = Connection(self, sock, peer, time.monotonic())
            with self._lock:
                pending = len(self._connections) - self._associations
                admitted = pending < self.settings.pending_limit
                if admitted:
                    self._connections.add(connection)
            if not admitted:
                self._refuse(sock, peer)
                continue
            threading.Thread(
                target=self._serve, args=(connection,), name=f"association-{peer[1]}", daemon=True
            ).start()

    def _refuse(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Close a connection over the pending cap at once (no thread, nothing read)."""
        with contextlib.suppress(OSError):
            sock.close()
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
            logger.warning(
                "connection from %s closed: %d connections already waiting to associate (%d refused so far)",
                peer[0],
                self.settings.pending_limit,
                self._refused_since_log,
            )
            self._last_refusal_log = now
            self._refused_since_log = 0

    def _serve(self, connection: Connection) -> None:
        how = "aborted"
        try:
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                connection.sock.settimeout(self.settings.artim_timeout)  # the handshake is part of ARTIM
                connection.sock = self.ssl_context.wrap_socket(connection.sock, server_side=True)
            how = connection.run()
        except ssl.SSLError as exc:
            logger.warning("TLS handshake with %s failed: %s", connection.peer[0], exc.reason or exc)
        except OSError as exc:
            logger.info("connection from %s lost: %s", connection.peer[0], exc.strerror or exc)
        finally:
            with contextlib.suppress(OSError):
                connection.sock.close()
            with self._lock:
                self._connections.discard(connection)
                if connection.admitted:
                    self._associations -= 1
            if connection.association is not None:
                try:
                    self.service_user.association_ended(connection.association, how)
                except Exception:
                    logger.exception("association_ended handler failed")

    def shutdown(self, grace_seconds: float = 30.0) -> int:
        """Stop accepting, let open associations finish up to ``grace_seconds``, abort the rest.

        Connections not yet associated are closed. Returns how many associations had to be aborted.
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=ACCEPT_POLL_SECONDS * 4)
        self._socket.close()
        deadline = time.monotonic() + grace_seconds
        while self.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            remaining = list(self._connections)
        aborted = 0
        for connection in remaining:
            if connection.association is not None:
                aborted += 1
                connection.send_abort(AbortReason.NOT_SPECIFIED, AbortSource.SERVICE_USER)
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
        return aborted


__all__ = ["ACCEPT_POLL_SECONDS", "AcceptorServer"]
