"""Process plumbing shared by the worker and sender processes: stop on SIGTERM or when orphaned."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (a SIGKILLed ``serve``)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the orphan check in StopSignal covers it
        pass


class StopSignal:
    """A stop event set by SIGTERM/SIGINT, or when the parent that started us is gone."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._parent = os.getppid()
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
