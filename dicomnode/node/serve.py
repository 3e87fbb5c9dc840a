"""``dicomnode serve``: the listener in this process, workers and the sender as supervised children.

Isolation: a model that crashes, leaks or hangs takes down at most its own worker process; the
listener keeps receiving and the supervisor starts a new worker. On SIGTERM/SIGINT the listener stops
accepting, in-flight associations finish, the children are asked to stop, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from dicomnode import audit
from dicomnode.config import Config
from dicomnode.errors import ConfigurationError
from dicomnode.fsio import durable_write
from dicomnode.node.process import INSTANCE_NAME_ENV, PARENT_PID_ENV, RUNTIME_STATE_FILE, write_runtime_state
from dicomnode.node.services import open_services
from dicomnode.receive.recovery import recover_spool
from dicomnode.receive.scp import start_listener, stop_listener

logger = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_SECONDS = 30.0


@dataclass
class Child:
    """A supervised child process (a worker or the sender)."""

    name: str
    argv: list[str]
    instance_name: str = ""  # its lease-owner name, stable across restarts
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        if self.instance_name:
            env[INSTANCE_NAME_ENV] = self.instance_name
        self.process = subprocess.Popen(self.argv, env=env)
        self.started_at = time.monotonic()
        logger.info("%s started (pid %d)", self.name, self.process.pid)

    def poll(self) -> None:
        """Restart the child when it has exited, with a growing delay if it keeps dying."""
        now = time.monotonic()
        if self.process is None:
            if now >= self.next_start:
                self.start()
            return
        code = self.process.poll()
        if code is None:
            return
        ran_for = now - self.started_at
        self.restarts = 0 if ran_for > 60 else self.restarts + 1
        delay = min(RESTART_BACKOFF_MAX_SECONDS, 0.5 * 2**self.restarts)
        logger.error(
            "%s exited with code %s after %.1f s; restarting in %.1f s", self.name, code, ran_for, delay
        )
        self.process = None
        self.next_start = now + delay

    def stop(self, timeout: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()


def child_argv(config: Config, command: str, log_level: str | None = None) -> list[str]:
    """The command line of a child process: the same configuration file and the same log level."""
    argv = [sys.executable, "-m", "dicomnode"]
    if config.source is not None:
        argv += ["--config", str(config.source)]
    if log_level is not None:  # a --log-level override given to serve reaches every child
        argv += ["--log-level", log_level]
    return [*argv, command]


def listen(config: Config, port: int) -> int:
    """One more listener process on a shared port (started by ``serve`` when listener_processes > 1)."""
    from dicomnode.node.process import StopSignal

    services = open_services(config, upgrade=False)
    store = services.store()
    audit.configure(config)  # refused AEs and received studies on this listener too
    server, _scp = start_listener(config.node, store, services.queue, port=port, shared_port=True)
    stop = StopSignal()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        stop_listener(server, grace_seconds=30.0)
        audit.shutdown()
        store.close()
        services.close()
    return 0


ROLES = ("listener", "worker", "sender", "http")  # what one serve process can run; all by default


def parse_roles(text: str) -> frozenset[str]:
    """``"listener,sender"`` -> the set of roles; unknown names are refused, naming the valid ones."""
    roles = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(roles - set(ROLES))
    if unknown or not roles:
        raise ConfigurationError(
            "--roles", f"{', '.join(unknown) or 'nothing'} given; choose from {', '.join(ROLES)}"
        )
    return roles


def serve(
    config: Config,
    *,
    port_file: Path | None = None,
    ready: threading.Event | None = None,
    log_level: str | None = None,
    roles: frozenset[str] = frozenset(ROLES),
) -> int:
    """Run the node's ``roles`` until SIGTERM/SIGINT; return the exit code. ``log_level`` overrides
    ``logging.level`` in the children too.

    On several hosts: the host with the spool runs ``listener`` (and usually ``sender``); GPU hosts
    run ``worker`` against the same database, with the spool mounted at the same ``storage.path``.
    Only a process with the listener role cleans the spool at start and writes ``serve.json``.
    """
    from dicomnode.metrics import enable_multiprocess, metrics_dir

    enable_multiprocess(metrics_dir(config.storage.path), clean=True)  # before any process counts
    audit.configure(config)
    services = open_services(config, upgrade=True)
    base_name = config.node.instance_name or socket.gethostname()
    server = store = None
    host, port = "", 0
    if "listener" in roles:
        # before the listener: temporaries, rows without their data, files without their row (logged)
        recover_spool(config.storage.path, services.queue, changed_since=services.queue.newest_activity())
        store = services.store()
        shared = config.node.listener_processes > 1
        server, _scp = start_listener(config.node, store, services.queue, shared_port=shared)
        host, port = server.server_address[:2]
        write_runtime_state(config, host, port)
        if port_file is not None:  # last: it tells a supervisor or a test that the node is ready
            durable_write(port_file, f"{port}\n".encode())  # atomic: readers never see a partial file
    children: list[Child] = []
    if "worker" in roles:
        children += [
            Child(f"worker-{i + 1}", child_argv(config, "worker", log_level), f"{base_name}/worker-{i + 1}")
            for i in range(config.worker.processes)
        ]
    if "sender" in roles and config.destinations:
        children.append(Child("sender", child_argv(config, "sender", log_level), f"{base_name}/sender"))
    if "http" in roles and config.http.enabled:  # the dashboard: its own process, never in reception's way
        http_argv = child_argv(config, "http", log_level) + ([] if server else ["--no-listener-check"])
        children.append(Child("http", http_argv, f"{base_name}/http"))
    if server is not None:
        for index in range(1, config.node.listener_processes):  # more listeners on the same port
            children.append(
                Child(
                    f"listener-{index + 1}",
                    [*child_argv(config, "listen", log_level), "--port", str(port)],
                    f"{base_name}/listener-{index + 1}",
                )
            )

    stop = threading.Event()
    if server is not None:  # retention runs where the spool is
        from dicomnode.node.retention import start_retention

        start_retention(config, services, stop)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    where = f" on {host}:{port}" if server is not None else ""
    logger.info(
        "dicomnode %s serving %s as %s%s (pid %d)",
        base_name,
        ",".join(r for r in ROLES if r in roles),
        config.node.ae_title,
        where,
        os.getpid(),
    )
    audit.application_started()
    if ready is not None:
        ready.set()
    try:
        while not stop.is_set():
            for child in children:
                child.poll()
            stop.wait(0.5)
    finally:
        if server is not None:
            remaining = stop_listener(server, grace_seconds=30.0)
            if remaining:
                logger.warning("aborted %d associations still open after the grace period", remaining)
        for child in children:
            child.stop(timeout=max(10.0, config.worker.job_timeout_seconds / 10))
        if store is not None:
            store.close()
        services.close()
        if server is not None:
            (config.storage.path / RUNTIME_STATE_FILE).unlink(missing_ok=True)
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(signum, handler)
        audit.application_stopped()
        audit.shutdown()
        logger.info("dicomnode stopped")
    return 0
