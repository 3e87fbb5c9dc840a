"""Process plumbing shared by the worker and sender processes: stop on SIGTERM or when orphaned."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

from dicomnode.config import Config
from dicomnode.fsio import durable_write

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "DICOMNODE_PARENT_PID"  # set by `serve` for the children it starts
INSTANCE_NAME_ENV = "DICOMNODE_INSTANCE_NAME"  # set by `serve`: each child's name in leases


def instance_name(config: Config) -> str:
    """This process's stable name, shown as the lease owner of the jobs it runs.

    ``serve`` names each child ``NAME/worker-N`` (NAME: ``node.instance_name``, default the host
    name), stable across restarts of that child; a process started on its own is ``NAME:PID``.
    """
    given = os.environ.get(INSTANCE_NAME_ENV, "")
    if given:
        return given
    return f"{config.node.instance_name or socket.gethostname()}:{os.getpid()}"


def expected_parent() -> int:
    """The supervisor's pid when started by ``serve``, else our current parent."""
    value = os.environ.get(PARENT_PID_ENV, "")
    return int(value) if value.isdigit() else os.getppid()


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (a SIGKILLed ``serve``).

    Called first thing in a child, before heavy imports; if the parent already died while we were
    starting (we were re-parented), exit at once.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the orphan check in StopSignal covers it
        pass
    if os.getppid() != expected_parent():
        logger.warning("parent process %d is gone before start: exiting", expected_parent())
        os._exit(0)


class StopSignal:
    """A stop event set by SIGTERM/SIGINT, or when the parent that started us is gone."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._parent = expected_parent()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s: finishing current work, then stopping", signal.Signals(signum).name)
        self.event.set()

    def is_set(self) -> bool:
        if not self.event.is_set() and os.getppid() != self._parent:
            logger.warning("parent process %d is gone: stopping", self._parent)
            self.event.set()
        return self.event.is_set()

    def wait(self, timeout: float) -> bool:
        self.event.wait(timeout)
        return self.is_set()


RUNTIME_STATE_FILE = "serve.json"


def write_runtime_state(config: Config, host: str, port: int) -> None:
    """Record the running node's pid and bound address for ``dicomnode status``."""
    state = {
        "pid": os.getpid(),
        "host": host,
        "port": port,
        "ae_title": config.node.ae_title,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    durable_write(config.storage.path / RUNTIME_STATE_FILE, json.dumps(state).encode())


def read_runtime_state(config: Config) -> dict[str, Any] | None:
    """The running node's state, or None when no ``serve`` is running on this storage folder."""
    try:
        state = json.loads((config.storage.path / RUNTIME_STATE_FILE).read_text(encoding="utf-8"))
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(state)
