"""Result delivery: the sender loop over the outbox, and the ``dicomnode sender`` process.

The worker queues one outbox row per (destination, result object) through
:class:`~dicomnode.queue.outbox.OutboxQueue`. The :class:`Sender` asks it for due rows, claims them,
sends each destination's rows over one association (``dicomnode.deliver.scu``, many objects per
association) or, for a ``type = "dicomweb"`` destination, in one STOW-RS request
(``dicomnode.deliver.stow``), decides what each outcome means (``dicomnode.deliver.status``) and
hands the decision back to the outbox, so delivery survives restarts: everything it needs is in the
database and the storage folder.

Outcomes (see ``docs/delivery.md``): success and warnings are *delivered*; out-of-resources,
network trouble and a transient association rejection are *retried* with exponential backoff and
full jitter until ``give_up_after_hours`` after the row was created; permanent rejections (0xA9xx,
0xCxxx, 0x0122, 0x0124, a presentation context refused for the SOP class, an A-ASSOCIATE-RJ with
result "rejected-permanent") are *dead* at once, with the reason, until ``dicomnode retry``.

Delivery is at-least-once: a crash between the peer's success and our commit resends the same SOP
Instance UID, which a PACS treats as an overwrite or a duplicate. Logs carry UIDs only.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode import audit, metrics
from dicomnode.config import Config, DeliveryConfig, DestinationConfig
from dicomnode.db import DeliveryState, utcnow
from dicomnode.deliver import stow
from dicomnode.deliver.commitment import Committer
from dicomnode.deliver.scu import Prepared, UnsendableError, prepare, store_all
from dicomnode.deliver.status import Decision, Outcome, Verdict, decide
from dicomnode.node.process import StopSignal
from dicomnode.queue.outbox import DeliveryAttempt, OutboxQueue, OutboxRow
from dicomnode.status import Status

logger = logging.getLogger(__name__)

_STATES = {
    Verdict.DELIVERED: DeliveryState.DELIVERED,
    Verdict.RETRY: DeliveryState.PENDING,
    Verdict.DEAD: DeliveryState.DEAD,
}


class Sender:
    """Delivers outbox rows to their destinations (C-STORE or STOW-RS) and records each outcome."""

    def __init__(
        self,
        delivery: DeliveryConfig,
        destinations: Sequence[DestinationConfig],
        sessions: sessionmaker[Session],
        storage_root: Path,
        *,
        ae_title: str,
        max_objects_per_association: int = 64,
        max_rows_per_pass: int = 512,
        rng: random.Random | None = None,
    ) -> None:
        self.delivery = delivery
        self.destinations = {d.name: d for d in destinations}
        self.outbox = OutboxQueue(sessions, [d.name for d in destinations])
        self.storage_root = Path(storage_root)
        self.ae_title = ae_title
        self.max_objects_per_association = max(1, max_objects_per_association)
        self.max_rows_per_pass = max(1, max_rows_per_pass)
        self.rng = rng or random.Random()
        self.commitments = Committer(
            delivery,
            destinations,
            sessions,
            ae_title=ae_title,
            max_objects_per_transaction=self.max_objects_per_association,
            rng=self.rng,
            durable=self.storage_root,
        )

    @classmethod
    def from_config(cls, config: Config, sessions: sessionmaker[Session], **kwargs: Any) -> Sender:
        """A sender with the node's AE title, delivery policy, destinations and storage folder."""
        return cls(
            config.delivery,
            config.destinations,
            sessions,
            config.storage.path,
            ae_title=config.node.ae_title,
            **kwargs,
        )

    # --- the delivery loop -------------------------------------------------------------------------

    def run_once(self, now: datetime | None = None) -> int:
        """Send every due pending row once; return how many rows got an outcome (0: nothing was due).

        ``now`` fixes the clock for the whole pass (tests move it forward instead of sleeping).
        """
        clock: Callable[[], datetime] = (lambda: now) if now is not None else utcnow
        due = self.outbox.due(clock(), self.max_rows_per_pass)
        handled = 0
        for destination_name, ids in due.items():
            destination = self.destinations.get(destination_name)
            for chunk in _chunks(ids, self.max_objects_per_association):
                lease = timedelta(seconds=self.delivery.timeout_seconds * (len(chunk) + 3))
                rows = self.outbox.claim(chunk, clock(), lease)
                if not rows:
                    continue
                if destination is None:
                    reason = f"destination {destination_name!r} is not in the configuration"
                    for row in rows:
                        self._record(row, Outcome(Verdict.DEAD, reason), clock())
                    handled += len(rows)
                    continue
                self._deliver_chunk(destination, rows, clock)
                handled += len(rows)
        return handled + self.commitments.run_once(clock)  # Storage Commitment (deliver/commitment.py)

    def run_forever(self, stop_event: threading.Event | StopSignal) -> None:
        """Loop :meth:`run_once` until ``stop_event`` is set; errors are logged and backed off."""
        failures = 0
        poll = self.delivery.poll_interval_seconds
        while not stop_event.is_set():
            try:
                handled = self.run_once()
            except Exception:
                failures += 1
                wait = min(max(self.delivery.retry_max_seconds, poll), poll * 2.0 ** min(failures, 16))
                logger.exception("delivery pass failed (%d in a row); next pass in %.1f s", failures, wait)
                stop_event.wait(wait)
                continue
            failures = 0
            if handled == 0:
                stop_event.wait(poll)

    # --- sending and recording ---------------------------------------------------------------------

    def _deliver_chunk(
        self, destination: DestinationConfig, rows: list[OutboxRow], clock: Callable[[], datetime]
    ) -> None:
        """Send a chunk of one destination's rows over one association; record every row once."""
        prepared: list[Prepared] = []
        for row in rows:
            try:
                prepared.append(prepare(row, self.storage_root))
            except UnsendableError as exc:
                self._record(row, Outcome(Verdict.DEAD, str(exc)), clock())
        if not prepared:
            return
        recorded: set[int] = set()
        try:
            for item, outcome in self._send(destination, prepared):
                self._record(item.row, outcome, clock())
                recorded.add(item.row.id)
        except Exception as exc:  # a bug or an unexpected library error: retry, bounded by give-up
            logger.exception("delivery to %s failed unexpectedly", destination.name)
            for item in prepared:
                if item.row.id not in recorded:
                    outcome = Outcome(Verdict.RETRY, f"unexpected error: {type(exc).__name__}")
                    self._record(item.row, outcome, clock())

    def _send(
        self, destination: DestinationConfig, prepared: list[Prepared]
    ) -> Iterator[tuple[Prepared, Outcome]]:
        """One batch by the destination's protocol: an association (DIMSE) or a STOW-RS request."""
        timeout = self.delivery.timeout_seconds
        if destination.type == "dicomweb":
            return stow.store_all(destination, prepared, timeout)
        return store_all(self.ae_title, destination, prepared, timeout)

    def _record(self, row: OutboxRow, outcome: Outcome, now: datetime) -> Verdict:
        """Decide what the outcome makes of the row, hand it to the outbox, log one line (UIDs only)."""
        attempts = row.attempts + 1
        decision = decide(
            outcome, attempts=attempts, created_at=row.created_at, now=now, policy=self.delivery, rng=self.rng
        )
        stored = (
            decision.reason
            if outcome.detail is None
            else f"{decision.reason}; peer comment: {outcome.detail}"
        )
        clean_success = decision.verdict is Verdict.DELIVERED and outcome.status == Status.SUCCESS
        self.outbox.record(
            row,
            DeliveryAttempt(
                state=_STATES[decision.verdict],
                attempted_at=now,
                next_attempt_at=decision.next_attempt_at,
                status=outcome.status,
                error=None if clean_success else stored,
            ),
        )
        _log(row, decision, attempts)
        metrics.delivery_attempt(row.destination, outcome.status, decision.verdict.value)
        if decision.verdict is not Verdict.RETRY and row.destination in self.destinations:
            audit.object_delivered(
                self.destinations[row.destination],
                row.study_instance_uid,
                row.sop_class_uid,
                delivered=decision.verdict is Verdict.DELIVERED,
                reason=decision.reason,
            )
        return decision.verdict


def _log(row: OutboxRow, decision: Decision, attempts: int) -> None:
    """One line per attempt: UIDs, job, destination and the reason (never the peer's comment)."""
    if decision.verdict is Verdict.DELIVERED:
        logger.info(
            "delivered %s (study %s, job %d) to %s: %s",
            row.sop_instance_uid,
            row.study_instance_uid,
            row.job_id,
            row.destination,
            decision.reason,
        )
    elif decision.verdict is Verdict.DEAD:
        logger.error(
            "dead letter %s (study %s, job %d) for %s after attempt %d: %s",
            row.sop_instance_uid,
            row.study_instance_uid,
            row.job_id,
            row.destination,
            attempts,
            decision.reason,
        )
    else:
        logger.warning(
            "will retry %s (study %s, job %d) to %s at %s (attempt %d): %s",
            row.sop_instance_uid,
            row.study_instance_uid,
            row.job_id,
            row.destination,
            decision.next_attempt_at.isoformat(timespec="seconds"),
            attempts,
            decision.reason,
        )


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_sender(config: Config, *, burst: bool = False) -> int:
    """The sender process: deliver due results until stopped (or once, with ``burst``)."""
    from dicomnode.node.process import die_with_parent
    from dicomnode.node.services import open_services

    die_with_parent()
    services = open_services(config, upgrade=False)
    audit.configure(config)
    sender = Sender.from_config(config, services.sessions)
    try:
        if burst:
            while sender.run_once():
                pass
            return 0
        sender.run_forever(StopSignal())
        return 0
    finally:
        audit.shutdown()
        services.close()
