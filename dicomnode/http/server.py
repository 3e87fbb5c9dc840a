"""``dicomnode http``: uvicorn serving :mod:`dicomnode.http.app` on ``[http]`` host and port.

Run by ``serve`` as a supervised child (role ``http``), so a crash or a slow page never touches
reception. The socket is bound here, before uvicorn starts, so that port 0 can be reported:
``<storage.path>/http.json`` (and ``--port-file``) hold the bound port once it accepts connections.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from dicomnode import audit
from dicomnode.config import Config
from dicomnode.fsio import durable_write

logger = logging.getLogger(__name__)

HTTP_STATE_FILE = "http.json"
HTTP_NICENESS = 10  # below the listener, workers and sender when they compete for a CPU


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (IPv6 when the host is one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, reuse_port=False)
    sock.set_inheritable(True)
    return sock


def write_http_state(config: Config, host: str, port: int) -> None:
    state = {
        "pid": os.getpid(),
        "host": host,
        "port": port,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    durable_write(config.storage.path / HTTP_STATE_FILE, json.dumps(state).encode())


def read_http_state(config: Config) -> dict[str, Any] | None:
    """The running HTTP server's address, or None."""
    try:
        state = json.loads((config.storage.path / HTTP_STATE_FILE).read_text(encoding="utf-8"))
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(state)


def run_http(config: Config, *, port_file: Path | None = None, check_listener: bool = True) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn's own handlers); return the exit code."""
    import uvicorn

    from dicomnode.http.app import create_app
    from dicomnode.metrics import MULTIPROC_ENV, enable_multiprocess, metrics_dir
    from dicomnode.node.services import open_services

    with contextlib.suppress(OSError):  # reception first: pages wait when the CPUs are busy
        os.nice(HTTP_NICENESS)
    if not os.environ.get(MULTIPROC_ENV) and metrics_dir(config.storage.path).is_dir():
        enable_multiprocess(metrics_dir(config.storage.path), clean=False)  # a node's files, read only
    services = open_services(config, upgrade=False)
    audit.configure(config)  # studies received over STOW-RS are audited like C-STORE ones
    app = create_app(config, services.sessions, check_listener=check_listener)
    sock = bind(config.http.host, config.http.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    )
    write_http_state(config, host, port)
    if port_file is not None:
        durable_write(port_file, f"{port}\n".encode())
    logger.info(
        "dashboard on http://%s:%d/ (pid %d)", host if ":" not in host else f"[{host}]", port, os.getpid()
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        (config.storage.path / HTTP_STATE_FILE).unlink(missing_ok=True)
        services.close()
        audit.shutdown()
    return 0
