"""The worker's watchdog: batch deadlines, the lease heartbeat, and the exit when a model hangs.

A model's forward pass cannot be interrupted from Python, so a batch that runs past its deadline
ends the process: its jobs are failed with the reason first, jobs of other batches in flight are
handed back, and the supervisor (``dicomnode serve``) starts a new worker. Decoding never needs
this: each image has its own deadline in the decode pool, which kills only the process that hangs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

from dicomnode.node.services import Services
from dicomnode.queue.jobs import ClaimedJob

logger = logging.getLogger(__name__)

EXIT_WATCHDOG = 70


class Watchdog:
    """Fails the jobs in flight and exits the process when a batch runs past its deadline.

    Several batches may be in flight at once (one decoding, one in the model, one being reported);
    each has its own deadline, and the leases of all their jobs are renewed.
    """

    def __init__(self, services: Services, lease_seconds: float) -> None:
        self.services = services
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._batches: dict[int, tuple[list[ClaimedJob], float, float]] = {}  # jobs, deadline, timeout
        self._next_token = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def watch(self, jobs: Sequence[ClaimedJob], timeout: float) -> int:
        """Start the deadline of a batch; returns the token for :meth:`rearm` and :meth:`clear`."""
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._batches[token] = (list(jobs), time.monotonic() + timeout, timeout)
        return token

    def rearm(self, token: int, timeout: float) -> None:
        """Give a batch a fresh deadline (when it enters its next stage)."""
        with self._lock:
            if token in self._batches:
                jobs = self._batches[token][0]
                self._batches[token] = (jobs, time.monotonic() + timeout, timeout)

    def split(self, token: int, jobs: Sequence[ClaimedJob], timeout: float) -> int:
        """Move ``jobs`` out of a batch into a batch of their own with a fresh deadline.

        For jobs left behind by their batch (an image still decoding) so that the rest of the
        batch goes on without them; returns the new batch's token.
        """
        moving = {job.id for job in jobs}
        with self._lock:
            if token in self._batches:
                rest, deadline, old_timeout = self._batches[token]
                self._batches[token] = ([j for j in rest if j.id not in moving], deadline, old_timeout)
        return self.watch(jobs, timeout)

    def clear(self, token: int | None = None) -> None:
        """Stop watching one batch (or all)."""
        with self._lock:
            if token is None:
                self._batches.clear()
            else:
                self._batches.pop(token, None)

    def close(self) -> None:
        """Stop the watchdog thread (batches still watched are no longer timed)."""
        self._stop.set()

    def _run(self) -> None:
        beat = max(0.2, min(self.lease_seconds / 3, 10.0))
        last_beat = time.monotonic()
        while not self._stop.wait(0.2):
            with self._lock:
                batches = list(self._batches.values())
            if not batches:
                continue
            now = time.monotonic()
            expired = [(jobs, timeout) for jobs, deadline, timeout in batches if now > deadline]
            if expired:
                self._expire(batches, expired)
            if now - last_beat >= beat:
                last_beat = now
                try:
                    for jobs, _, _ in batches:
                        for job in jobs:
                            self.services.queue.heartbeat(job, self.lease_seconds)
                except Exception as exc:  # the database may be away: the next beat tries again
                    logger.warning("lease heartbeat failed (%s); retrying", type(exc).__name__)

    def _expire(
        self,
        batches: list[tuple[list[ClaimedJob], float, float]],
        expired: list[tuple[list[ClaimedJob], float]],
    ) -> None:
        """Fail the late batches' jobs, hand back the others in flight, and end the process."""
        timeout = expired[0][1]
        reason = f"timed out after {timeout:.0f} s (model or decoder hang); worker restarted"
        late = {job.id for jobs, _ in expired for job in jobs}
        try:
            for jobs, _, _ in batches:
                for job in jobs:
                    if job.id in late:
                        self.services.queue.force_fail(job.id, reason)
                        logger.error("job %d %s", job.id, reason)
                    else:  # an innocent batch in flight beside it: back to the queue (or failed)
                        self.services.queue.force_fail(
                            job.id,
                            "worker restarted while the job was in flight (another batch timed out)",
                        )
        finally:  # without the database the leases run out and the jobs are requeued
            os._exit(EXIT_WATCHDOG)


class Backoff:
    """Exponential back-off of the worker loop while its database fails (a full disk, a lock).

    One log line per step saying why and how long it waits (the traceback only at DEBUG), and one
    line when the database works again.
    """

    def __init__(self, initial_seconds: float = 0.5, max_seconds: float = 30.0) -> None:
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self.failures = 0

    def failed(self, exc: Exception) -> float:
        """Count a failed pass; return the seconds to wait before the next one."""
        delay: float = min(self.max_seconds, self.initial_seconds * float(2**self.failures))
        self.failures += 1
        logger.warning(
            "worker pass failed (%s); retrying in %.1f s (failure %d)",
            failure_reason(exc),
            delay,
            self.failures,
        )
        logger.debug("worker pass failure %d", self.failures, exc_info=exc)
        return delay

    def succeeded(self) -> None:
        """Count a pass that worked; after failures, say that the worker goes on."""
        if self.failures:
            logger.info("worker pass works again after %d failed passes", self.failures)
            self.failures = 0


def failure_reason(exc: BaseException) -> str:
    """A log-safe reason: the driver's own message for database errors (never SQL parameters)."""
    original = getattr(exc, "orig", None)  # sqlalchemy.exc.DBAPIError wraps the driver's error
    if isinstance(original, Exception):
        return f"{type(exc).__name__}: {type(original).__name__}: {original}"
    return type(exc).__name__
